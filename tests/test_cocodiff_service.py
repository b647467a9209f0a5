"""CoCoDiff through `service/` as a user runs it: the embedded default (the generated 46-class set, prepared and
cached), `service.run cocodiff` end to end (JSON line, MLflow params, metrics and artifacts), its one-line
refusals, the search space and named splits, `service.final` (seeds, registry, ablation, --splits), and (slow) a
real smoke sweep on a local Ray whose child runs are read back from MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from service.data.generated import prepare_cocodiff_inputs, synthetic_root
from service.methods.search_space import (
    check_against_config,
    load_search_space,
    trial_overrides,
)
from trainers.config import build_config, to_plain
from trainers.configs import CoCoDiffConfig
from trainers.errors import InputError
from trainers.skeleton.synthetic import NUM_CLASSES as SYNTHETIC_CLASSES
from trainers.skeleton.synthetic import action_catalogue

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "cocodiff.yaml"
SPLITS = ROOT / "search_spaces" / "cocodiff_splits.yaml"
PER_CLASS = 8   # generated sequences per class in these tests (46 classes)
TINY = {"backbone.encoder": "stgcn", "backbone.base_channels": 8, "backbone.units_per_stage": "[1, 1, 1]",
        "module.hidden": 32, "module.depth": 1, "module.align_dim": 16, "optim.batch_size": 16,
        "optim.warmup_steps": 2, "optim.lr": 3e-3, "train.steps": 20, "train.eval_every": 10,
        "train.checkpoint_every": 10, "train.threads": 1, "data.synthetic.per_class": PER_CLASS}


def sets(overrides: dict) -> list[str]:
    return [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true", "PYTHONUNBUFFERED": "1"}
    out.pop("MLFLOW_TRACKING_URI", None)
    out.pop("RAY_ADDRESS", None)
    return out


def run_module(module: str, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The embedded default: the generated set, prepared once under $SKELDIFF_CACHE/synthetic
# ----------------------------------------------------------------------------------------------

def test_synthetic_default_is_the_generated_46_class_set_prepared_once():
    cfg = build_config(CoCoDiffConfig, {}, {"data.synthetic.per_class": 4, "module.enabled": False})
    data, names, fine, coarse = prepare_cocodiff_inputs(cfg)
    assert data.num_classes == SYNTHETIC_CLASSES == 46 and names == [c.name for c in action_catalogue()]
    assert fine is None and coarse is None
    assert data.train_x.shape[1:] == (3, 64, 25, 2)                                # NTU layout, 64 frames
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == 4 * 46
    assert len(data.test_y) > 0 and len(data.val_y) > 0
    (folder,) = [p for p in synthetic_root().iterdir() if p.name.startswith("prepared-") and "raw-4x46-s0" in p.name]
    stamp = (folder / "data.npy").stat().st_mtime_ns
    again = prepare_cocodiff_inputs(cfg)[0]
    assert (folder / "data.npy").stat().st_mtime_ns == stamp and torch.equal(again.test_x, data.test_x)
    # X-View splits the same set by camera instead of performer
    xview = prepare_cocodiff_inputs(build_config(CoCoDiffConfig, to_plain(cfg), {"data.benchmark": "ntu60-xview"}))[0]
    assert len(xview.test_y) != len(data.test_y)


def test_shipped_configs_are_the_embedded_default_and_the_paper_plan():
    default = build_config(CoCoDiffConfig, yaml.safe_load((ROOT / "service/configs/cocodiff_default.yaml").read_text()))
    assert default == CoCoDiffConfig()
    paper = build_config(CoCoDiffConfig, yaml.safe_load((ROOT / "service/configs/cocodiff_paper.yaml").read_text()),
                         {"data.prepared_dir": "/data/ntu60"})
    assert (paper.backbone.encoder, paper.backbone.base_channels,
            paper.backbone.units_per_stage) == ("ctrgcn", 64, [4, 3, 3])
    assert (paper.module.hidden, paper.module.depth, paper.optim.batch_size, paper.data.num_classes) == (512, 3, 64, 60)


def test_named_splits_cover_the_synthetic_default_and_every_benchmark(monkeypatch):
    from service.data.splits import load_splits
    from trainers.skeleton.splits import BENCHMARKS

    monkeypatch.setenv("SKELDIFF_DATA", "/data")
    table = yaml.safe_load(SPLITS.read_text())
    assert {"synthetic-skeleton", *BENCHMARKS} <= set(table)
    assert {"synthetic-kinetics", "synthetic-pku-xsub", "synthetic-pku-xview"} <= set(table)
    for name, overrides in load_splits(SPLITS, list(table)):
        cfg = build_config(CoCoDiffConfig, {}, overrides)
        assert cfg.data.benchmark == (name if name in BENCHMARKS else cfg.data.benchmark)
        if cfg.data.source == "prepared":
            family = BENCHMARKS[name].family
            assert str(cfg.data.prepared_dir).startswith(f"/data/prepared/{'ntu' if family == 'ntu' else family}")
    assert build_config(CoCoDiffConfig, {}, dict(load_splits(SPLITS, ["synthetic-skeleton"]))["synthetic-skeleton"]) \
        == CoCoDiffConfig()                                                            # the embedded default


# ----------------------------------------------------------------------------------------------
# service.run cocodiff
# ----------------------------------------------------------------------------------------------

def test_run_cocodiff_logs_metrics_and_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = last_json(run_module("service.run", tmp_path, "cocodiff", *sets(TINY), "--tracking-uri", uri,
                               "--no-progress"))
    for key in ("val/top1_max", "test/top1", "test/top5"):
        assert 0.0 <= out[key] <= 100.0
    assert out["best_step"] in (10, 20)
    run_dir = tmp_path / out["run_dir"]
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()

    client = MlflowClient(uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "cocodiff-synthetic-skeleton"
    params = run.data.params
    assert params["method"] == "cocodiff" and params["module.w_diff"] == "1.0" and params["backbone.encoder"] == "stgcn"
    assert int(params["derived.num_parameters_module"]) > 0 and int(params["derived.num_classes"]) == 46
    n_test = int(params["derived.test_samples"])
    assert 0 < n_test < PER_CLASS * 46 == (
        n_test + int(params["derived.train_samples"]) + int(params["derived.val_samples"]))
    assert run.data.metrics["test/top1"] == pytest.approx(out["test/top1"], abs=1e-3)
    assert all(round(run.data.metrics[k], 4) == out[k] for k in out if "/" in k)     # the JSON's numbers, by name
    assert int(run.data.tags["best_step"]) == out["best_step"]
    assert {"train/loss", "train/loss_diff", "train/loss_coarse", "val/top1"} <= set(run.data.metrics)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "plots", "predictions"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/val_confusion.png",
                                                                                  "plots/test_confusion.png"}
    logits = np.load(client.download_artifacts(run.info.run_id, "predictions/test_logits.npy", str(tmp_path)))
    labels = np.load(client.download_artifacts(run.info.run_id, "predictions/test_labels.npy", str(tmp_path)))
    assert logits.shape == (n_test, 46) and labels.shape == (n_test,)
    assert (logits.argmax(1) == labels).mean() * 100 == pytest.approx(out["test/top1"], abs=1e-3)
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert build_config(CoCoDiffConfig, config).backbone.base_channels == 8


@pytest.mark.parametrize("args,message", [
    (["--features", "feats"], "--features: zero-shot data flags are TDSM-only"),
    (["--unseen", "ru.npy", "--val-unseen", "5"], "--unseen, --val-unseen: zero-shot data flags are TDSM-only"),
    (["--set", "module.w_dif=1"], "unknown config key 'module.w_dif'"),
])
def test_run_cocodiff_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch, args, message):
    from service.run import main

    monkeypatch.chdir(tmp_path)
    assert main(["cocodiff", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (tmp_path / "runs").exists()


def test_print_config_is_a_cocodiff_config(capsys):
    from service.run import main

    assert main(["cocodiff", "--print-config", "--set", "module.w_gen=0.25"]) == 0
    cfg = build_config(CoCoDiffConfig, yaml.safe_load(capsys.readouterr().out))
    assert cfg.module.w_gen == 0.25 and cfg.data.source == "synthetic"


# ----------------------------------------------------------------------------------------------
# Search space
# ----------------------------------------------------------------------------------------------

def test_shipped_cocodiff_space_is_valid():
    space = load_search_space(SPACE)
    assert space.method == "cocodiff" and space.metric == "val/top1" and space.mode == "max"
    assert space.inference is None
    assert {"module.w_diff", "module.w_gen", "module.w_coarse", "module.num_train_timesteps",
            "module.beta_schedule", "optim.lr"} <= set(space.params)
    base = to_plain(CoCoDiffConfig())
    check_against_config(space, CoCoDiffConfig, base, SPACE)
    smoke_base = build_config(CoCoDiffConfig, base, space.smoke.config).model_dump(mode="json")
    check_against_config(space.for_smoke(), CoCoDiffConfig, smoke_base, SPACE)
    assert build_config(CoCoDiffConfig, smoke_base).backbone.units_per_stage == [1, 1, 1]


def test_trial_overrides_without_inference_are_the_sampled_params():
    space = load_search_space(SPACE)
    sampled = {"module.w_diff": 0.7, "module.num_train_timesteps": 50}
    assert trial_overrides(space, sampled) == sampled


def write(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_cocodiff_space_rejects_an_inference_grid(tmp_path):
    path = write(tmp_path, {"method": "cocodiff", "params": {"optim.lr": {"choice": [1e-3]}},
                            "inference": {"t_test": [5]}})
    with pytest.raises(InputError, match="cocodiff has no inference-time parameters"):
        load_search_space(path)


def test_tdsm_space_still_requires_its_grid(tmp_path):
    path = write(tmp_path, {"method": "tdsm", "params": {"optim.lr": {"choice": [1e-3]}}})
    with pytest.raises(InputError, match="inference: required for method tdsm"):
        load_search_space(path)
    assert load_search_space(ROOT / "search_spaces" / "tdsm.yaml").metric == "val/zsl_top1"


@pytest.mark.parametrize("key,value,message", [
    ("module.w_dif", {"choice": [1.0]}, r"params\.module\.w_dif.*unknown config key 'module\.w_dif'"),
    ("module.beta_schedule", {"choice": ["cosine", "sigmoid"]}, r"module\.beta_schedule"),
    ("module.w_gen", {"uniform": [-1.0, 1.0]}, r"module\.w_gen"),
    ("data.synthetic.per_class", {"choice": [8, 16]}, "per sweep"),
])
def test_bad_cocodiff_params_fail_naming_the_key(tmp_path, key, value, message):
    path = write(tmp_path, {"method": "cocodiff", "params": {key: value}})
    with pytest.raises(InputError, match=message):
        check_against_config(load_search_space(path), CoCoDiffConfig, to_plain(CoCoDiffConfig()), path)


@pytest.mark.parametrize("args,message", [
    (["--splits", "synthetic-u5"], "--splits synthetic-u5: unknown split"),
    (["--space", str(ROOT / "search_spaces" / "tdsm.yaml")], "a search space for tdsm, not cocodiff"),
])
def test_sweep_refuses_what_cocodiff_cannot_do_before_ray_starts(capsys, args, message):
    from service.sweep import main

    assert main(["cocodiff", *args]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# service.final
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_config_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_plain(build_config(CoCoDiffConfig, {}, {
        **TINY, "backbone.units_per_stage": [1, 1, 1]}))))
    return path


def test_final_trains_each_seed_tests_once_and_registers_the_classifier(tmp_path, tiny_config_file):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = last_json(run_module("service.final", tmp_path, "--from", str(tiny_config_file), "--seeds", "2",
                               "--tracking-uri", uri, "--out", str(tmp_path / "final"), "--no-progress"))
    (row,) = out["rows"]
    assert row["arm"] == "cocodiff" and row["seeds"] == 2 and len(row["test/top1_per_seed"]) == 2
    assert row["train_samples"] + row["test_samples"] == PER_CLASS * 46   # train + validation: nothing held out
    assert row["classes"] == 46 and row["registered_version"] == "1"
    assert "± " in (tmp_path / "final" / "final-cocodiff-synthetic-skeleton.md").read_text()

    import mlflow

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/cocodiff-synthetic-skeleton@final")
    pred = model.predict(np.zeros((3, 3, 64, 25, 2), dtype=np.float32))
    assert pred.shape == (3,) and set(pred.tolist()) <= set(range(46))
    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("cocodiff-synthetic-skeleton").experiment_id],
                                  f"tags.mlflow.parentRunId = '{row['parent_run_id']}'")
    assert len(children) == 2 and all("test/top1" in r.data.metrics for r in children)


def test_ablation_reports_both_arms_and_their_paired_difference(tmp_path, tiny_config_file):
    """--splits re-targets the config: here the generated set's X-View split."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = last_json(run_module("service.final", tmp_path, "--from", str(tiny_config_file), "--ablation", "--seeds",
                               "2", "--set", "train.steps=10", "--splits", "synthetic-skeleton-xview",
                               "--tracking-uri", uri, "--out", str(tmp_path / "final"), "--no-progress"))
    baseline, cocodiff = out["rows"]
    assert (baseline["arm"], cocodiff["arm"]) == ("baseline", "cocodiff")
    assert baseline["split"] == cocodiff["split"] == "synthetic-skeleton-xview"
    assert "registered_version" not in cocodiff
    expected = np.mean(np.array(cocodiff["test/top1_per_seed"]) - np.array(baseline["test/top1_per_seed"]))
    assert cocodiff["delta/top1_mean"] == pytest.approx(expected, abs=1e-2)
    assert -100 <= cocodiff["delta/top5_mean"] <= 100 and cocodiff["delta/top5_std_seeds"] >= 0
    table = (tmp_path / "final" / "ablation-cocodiff-synthetic-skeleton-xview.md").read_text()
    assert "| baseline |" in table and "| cocodiff |" in table and "paired by seed" in table


# ----------------------------------------------------------------------------------------------
# Smoke sweep on a real local Ray (slow)
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_sweep_leaves_child_runs_with_the_guidance_weights(tmp_path):
    """Also the `train` trial driver (a TorchTrainer per trial, what DDP sweeps use) end to end."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = last_json(run_module(
        "service.sweep", tmp_path, "cocodiff", "--smoke", "--num-samples", "2", "--trial-driver", "train",
        *sets({"train.steps": 40, "train.eval_every": 20, "train.checkpoint_every": 20,
               "data.synthetic.per_class": PER_CLASS}),
        "--tracking-uri", uri, "--storage-path", str(tmp_path / "results"), timeout=1200))
    (summary,) = out["sweeps"]
    assert summary["metric"] == "val/top1_max" and summary["errors"] == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cocodiff-synthetic-skeleton-sweeps")
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(kids) >= 2
    for kid in kids:
        assert {"module.w_diff", "module.w_gen", "module.w_coarse", "module.num_train_timesteps",
                "optim.lr"} <= set(kid.data.params)
        assert {"val/top1", "val/top1_max"} <= set(kid.data.metrics)
        assert kid.data.tags["trial_state"] in {"finished", "early_stopped"}
        assert kid.data.metrics["trial/start_to_first_metric_s"] > 0
    assert summary["start_to_first_metric_s_max"] > 0
    best = Path(summary["best_config"])
    cfg = build_config(CoCoDiffConfig, yaml.safe_load(best.read_text()))
    assert cfg.backbone.base_channels == 8 and cfg.train.steps == 40
    assert summary["best_metric"] == pytest.approx(max(k.data.metrics["val/top1_max"] for k in kids), abs=1e-3)
