"""Catalogue of hostile inputs and faults (issue 12 §4, §5, §7, §9), in process: a diverging loss in each fit loop,
non-finite or mistyped prepared data, booleans given as numbers, duplicate YAML keys, a read-only text cache, a
reader that raises. Each is one `InputError` / `TrainingDivergedError` line or a warning, never a traceback or a NaN
result. The same catalogue through the CLIs (exit code 2, skipped files): tests/integration/test_hostile_inputs_cli.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainers.errors import InputError, TrainingDivergedError
from trainers.fit_loop import LossGuard

# ----------------------------------------------------------------------------------------------
# Loss guard in the fit loops (CoCoDiff and the encoder through their fit functions)
# ----------------------------------------------------------------------------------------------

def test_cocodiff_fit_raises_on_a_diverging_loss():
    from trainers.cocodiff_fit import fit_cocodiff
    from trainers.config import build_config
    from trainers.configs import CoCoDiffConfig
    from trainers.tracking import ListReporter

    cfg = build_config(CoCoDiffConfig, {}, {
        "backbone.encoder": "stgcn", "backbone.base_channels": 8, "backbone.units_per_stage": [1, 1, 1],
        "module.hidden": 32, "module.depth": 1, "module.align_dim": 16, "optim.batch_size": 8,
        "optim.warmup_steps": 0, "optim.lr": 1e30, "optim.grad_clip": 0, "train.steps": 10, "train.eval_every": 5,
        "train.checkpoint_every": 5, "train.device": "cpu", "train.precision": "fp32"})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 25, 2, generator=g), torch.arange(16) % 4
    fine, coarse = torch.randn(4, 12, generator=g), torch.randn(4, 10, generator=g)
    reporter = ListReporter()
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss at step \d+"):
        fit_cocodiff(cfg, x, y, x[:8], y[:8], fine, coarse, reporter, progress=False)
    assert not reporter.evaluations                                  # nothing evaluated after the divergence


def test_encoder_fit_raises_on_a_diverging_loss(tmp_path):
    from trainers.configs import EncoderConfig
    from trainers.encoder_fit import fit_encoder
    from trainers.tracking import ListReporter

    cfg = EncoderConfig(base_channels=4, steps=10, batch_size=8, lr=1e30, precision="fp32", device="cpu",
                        checkpoint_every=5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 25, 2, generator=g), torch.arange(16) % 4
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss at step \d+"):
        fit_encoder(cfg, x, y, [0, 1, 2, 3], ListReporter(), tmp_path, progress=False)
    assert not (tmp_path / "encoder.pt").exists()


def test_loss_guard_on_an_accelerator_reports_the_first_bad_step_at_flush():
    """The device-side path (no per-step sync): the first non-finite step is kept until the next flush."""
    guard = LossGuard(torch.device("cuda"), "hint")                  # tensors stay on CPU: only the logic
    for step, value in enumerate([1.0, 2.0, float("inf"), float("nan"), 3.0], start=1):
        guard.update(torch.tensor(value), step)
    with pytest.raises(TrainingDivergedError, match="non-finite loss at step 3 "):
        guard.flush()
    guard.update(torch.tensor(1.0), 6)
    guard.flush()                                                    # a finite window passes


def test_sweep_best_config_never_comes_from_a_failed_or_non_finite_trial():
    from service.tracking.trials import eligible_for_best

    def run(status, value, state=None):
        tags = {"trial_state": state} if state else {}
        return SimpleNamespace(info=SimpleNamespace(status=status),
                               data=SimpleNamespace(metrics={"m": value}, tags=tags))

    assert eligible_for_best(run("FINISHED", 50.0, "finished"), "m")
    assert eligible_for_best(run("KILLED", 40.0, "early_stopped"), "m")      # ASHA-stopped: its best is real
    assert not eligible_for_best(run("FAILED", 99.0, "failed"), "m")
    assert not eligible_for_best(run("RUNNING", 99.0, "failed"), "m")
    assert not eligible_for_best(run("FINISHED", float("nan")), "m")
    assert not eligible_for_best(run("FINISHED", float("inf")), "m")
    assert not eligible_for_best(SimpleNamespace(info=SimpleNamespace(status="FINISHED"),
                                                 data=SimpleNamespace(metrics={}, tags={})), "m")


# ----------------------------------------------------------------------------------------------
# Prepared data, config
# ----------------------------------------------------------------------------------------------

def write_prepared(folder: Path, data: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "data.npy", data)
    np.save(folder / "label.npy", np.arange(len(data)) % 3)
    rows = ["name\tlabel\tsetup\tcamera\tperformer\treplication\tntu60-xsub"]
    rows += [f"S00{i}\t0\t1\t1\t1\t1\t{'train' if i % 2 else 'test'}" for i in range(len(data))]
    (folder / "index.tsv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("value, kind", [(np.nan, "NaN or inf"), (np.inf, "NaN or inf"), (3e38, "|value| up to 3e+38")])
def test_a_non_finite_prepared_sample_is_named(tmp_path, value, kind):
    from trainers.skeleton.prepared import read_prepared

    data = np.zeros((6, 3, 4, 25, 2), np.float32)
    data[4, 1, 2, 3, 0] = value
    prepared = read_prepared(write_prepared(tmp_path / "p", data))
    prepared.rows(np.array([0, 1, 2]))                                 # clean rows load
    with pytest.raises(InputError, match=rf"data.npy: sample 1 \(S004, row 4\) holds {kind}".replace("|", r"\|")
                       .replace("+", r"\+")):
        prepared.rows(np.array([0, 4, 5]))


def test_a_string_data_npy_is_one_line(tmp_path):
    from trainers.skeleton.prepared import read_prepared

    with pytest.raises(InputError, match="data.npy: expected a float"):
        read_prepared(write_prepared(tmp_path / "p", np.full((6, 3, 4, 25, 2), "x")))


def test_cocodiff_refuses_an_empty_test_split(tmp_path):
    from trainers.cocodiff_data import load_prepared

    folder = write_prepared(tmp_path / "p", np.zeros((6, 3, 4, 25, 2), np.float32))
    (folder / "index.tsv").write_text((folder / "index.tsv").read_text().replace("\ttest", "\ttrain"))
    with pytest.raises(InputError, match="no ntu60-xsub test samples"):
        load_prepared(folder, "ntu60-xsub", 0.2, 0)


@pytest.mark.parametrize("key, value", [("train.steps", True), ("optim.lr", False), ("optim.batch_size", True),
                                        ("eval.noise_draws", True), ("data.val_unseen", True)])
def test_booleans_are_not_numbers(key, value):
    from trainers.config import build_config
    from trainers.configs import TDSMConfig

    with pytest.raises(InputError, match=f"config key '{key}': expected a number, got a boolean"):
        build_config(TDSMConfig, {}, {key: value})
    assert build_config(TDSMConfig, {}, {"eval.tune_t_test": True}).eval.tune_t_test is True


def test_duplicate_yaml_keys_are_refused_but_merges_are_not(tmp_path):
    from trainers.config import load_yaml

    (tmp_path / "nested.yaml").write_text("train:\n  steps: 5\noptim:\n  lr: 1\ntrain:\n  seed: 3\n")
    with pytest.raises(InputError, match="nested.yaml: duplicate key 'train' on line 5"):
        load_yaml(tmp_path / "nested.yaml")
    (tmp_path / "merge.yaml").write_text("base: &b {lr: 1, wd: 2}\noptim:\n  <<: *b\n  lr: 3\n")
    assert load_yaml(tmp_path / "merge.yaml")["optim"] == {"lr": 3, "wd": 2}


def test_a_read_only_text_cache_warns_and_goes_on(tmp_path, capsys):
    from trainers.text import _cache_writable

    (tmp_path / "file").write_text("x")
    assert not _cache_writable(tmp_path / "file" / "cache" / "text-0.pt")
    assert "going on without caching" in capsys.readouterr().err
    assert _cache_writable(tmp_path / "cache" / "text-0.pt")


# ----------------------------------------------------------------------------------------------
# Raw files: one file's exception skips that file only
# ----------------------------------------------------------------------------------------------

def test_any_exception_while_reading_a_file_skips_only_that_file(monkeypatch, tmp_path):
    """A MemoryError / OverflowError / RecursionError from one file becomes a skip with its type as the reason."""
    import trainers.skeleton.prepare as prep

    def boom(path, max_people=2, num_classes=None):
        raise OverflowError("Python int too large to convert to C long")

    monkeypatch.setattr(prep, "read_kinetics", boom)
    (tmp_path / "c.json").write_text("{}")
    ((kind, name, path, reason),) = prep.process_job(prep.Job("kinetics", str(tmp_path / "c.json")), 8)
    assert kind == "skip" and name == "c"
    assert reason == f"{tmp_path / 'c.json'}: OverflowError: Python int too large to convert to C long"
