"""Catalogue of hostile inputs and faults (issue 12 §4, §5, §7, §9): each is a one-line `error:` and exit code 2,
a skipped file listed with its reason, or a warning, never a traceback, a NaN result with exit 0, or a hang.

The CLI cases start at once in one module fixture (each pays the torch + MLflow import), then each test reads its
own result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_feature_folder

from trainers.errors import InputError, TrainingDivergedError
from trainers.guards import LossGuard

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 12
UNSEEN = [2, 7]
NAMES = [f"action number {i}" for i in range(NUM_CLASSES)]
TINY = ["--set", "model.preset=tiny", "--set", "train.steps=6", "--set", "train.eval_every=3",
        "--set", "train.checkpoint_every=3", "--set", "optim.batch_size=16", "--set", "optim.warmup_steps=1",
        "--set", "eval.noise_draws=1", "--set", "eval.t_test_grid=[10, 25]", "--set", "train.threads=1",
        "--no-progress"]


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def features(ws: Path, name: str, edit=None) -> Path:
    """A copy of the good feature folder with `edit(folder)` applied."""
    folder = ws / name
    shutil.copytree(ws / "feats", folder)
    if edit is not None:
        edit(folder)
    return folder


def save(path: Path, arr) -> None:
    np.save(path, np.asarray(arr))


def tdsm_args(ws: Path, feats: str = "feats", *extra: str) -> list[str]:
    return ["service.run", "tdsm", "--features", str(ws / feats), "--class-names", str(ws / "names.txt"),
            "--val-unseen", "2", *TINY, *extra]


def build_cases(ws: Path) -> dict[str, tuple[list[str], str]]:
    """{case: (python -m argv, text the one-line error must hold)}."""
    x = np.load(ws / "feats" / "train.npy")
    big = x.copy()
    big[3, 5] = 3e38                            # finite in float32, overflows once squared
    nan = x.copy()
    nan[4, 0] = np.nan
    features(ws, "f_big", lambda f: save(f / "train.npy", big))
    features(ws, "f_nan", lambda f: save(f / "train.npy", nan))
    features(ws, "f_str", lambda f: save(f / "train.npy", x.astype(str)))
    features(ws, "f_zero", lambda f: (save(f / "train.npy", np.zeros((len(x), 0), np.float32)),
                                      save(f / "ztest.npy", np.zeros((20, 0), np.float32))))
    features(ws, "f_empty_test", lambda f: (save(f / "ztest.npy", np.zeros((0, x.shape[1]), np.float32)),
                                            save(f / "z_label.npy", np.zeros(0, np.int64))))
    save(ws / "rv_empty.npy", np.zeros(0, np.int64))
    (ws / "dup.yaml").write_text("optim:\n  lr: 0.001\n  weight_decay: 0.0\n  lr: 0.1\n")
    (ws / "names_latin1.txt").write_bytes("\n".join(NAMES[:-1] + ["caf\xe9 au lait"]).encode("latin-1") + b"\n")
    (ws / "a_file").write_text("not a folder\n")
    return {
        "diverging_run": (tdsm_args(ws, "feats", "--set", "optim.lr=1e30", "--set", "optim.grad_clip=0",
                                    "--run-dir", str(ws / "run_div")),
                          "training diverged: non-finite loss at step"),
        "features_3e38": (tdsm_args(ws, "f_big"), "f_big/train.npy: sample 3 holds |value| up to 3e+38"),
        "features_nan": (tdsm_args(ws, "f_nan"), "f_nan/train.npy: sample 4 holds NaN or inf"),
        "features_string_dtype": (tdsm_args(ws, "f_str"),
                                  "f_str/train.npy: expected numbers (N x D features), got dtype <U"),
        "features_zero_width": (tdsm_args(ws, "f_zero"), "f_zero/train.npy: zero-width features"),
        "empty_test_split": (tdsm_args(ws, "f_empty_test"), "f_empty_test/ztest.npy: no samples"),
        "empty_rv_file": (tdsm_args(ws, "feats", "--val-unseen", str(ws / "rv_empty.npy")),
                          "rv_empty.npy: no class ids"),
        "steps_true": (tdsm_args(ws, "feats", "--set", "train.steps=true"),
                       "config key 'train.steps': expected a number, got a boolean"),
        "duplicate_yaml_key": (tdsm_args(ws, "feats", "--config", str(ws / "dup.yaml")),
                               "dup.yaml: duplicate key 'lr' on line 4 (first given on line 2)"),
        "non_utf8_class_names": (tdsm_args(ws, "feats", "--class-names", str(ws / "names_latin1.txt")),
                                 "names_latin1.txt: not UTF-8 text"),
        "run_dir_under_a_file": (tdsm_args(ws, "feats", "--run-dir", str(ws / "a_file" / "run")), "a_file"),
        "ensemble_out_is_a_file": (["service.ensemble", str(ws / "p1"), str(ws / "p2"), "--out", str(ws / "a_file")],
                                   "--out " + str(ws / "a_file") + ": is a file"),
    }


# One interpreter runs every bad-input case through the CLIs' main() (exits_cleanly included) in turn: each case as
# its own process would pay the torch + MLflow import again (~5 s of CPU each).
DRIVER = """
import contextlib, io, json, os, sys, traceback
import service.ensemble, service.run
out = {}
for name, (argv, cwd) in json.loads(sys.argv[1]).items():
    os.chdir(cwd)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = {"service.run": service.run, "service.ensemble": service.ensemble}[argv[0]].main(argv[1:])
        except BaseException:
            traceback.print_exc(file=err)
            rc = -1
    out[name] = [rc, err.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """{case: (result with returncode, stderr, cwd; expected error text)}: the diverging run as its own process,
    started first, while one driver process runs every bad-input case."""
    ws = tmp_path_factory.mktemp("hostile")
    write_feature_folder(ws / "feats", num_classes=NUM_CLASSES, unseen=UNSEEN)
    (ws / "names.txt").write_text("\n".join(NAMES) + "\n")
    cases = build_cases(ws)
    for name in cases:
        (ws / f"cwd_{name}").mkdir()
    div_argv, div_expected = cases.pop("diverging_run")
    div = subprocess.Popen([sys.executable, "-m", *div_argv], cwd=ws / "cwd_diverging_run", env=env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    driver = subprocess.run([sys.executable, "-c", DRIVER,
                             json.dumps({n: (argv, str(ws / f"cwd_{n}")) for n, (argv, _) in cases.items()})],
                            cwd=ws, env=env(), capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    results = json.loads(driver.stdout.splitlines()[-1])
    out = {n: (SimpleNamespace(returncode=results[n][0], stderr=results[n][1], cwd=ws / f"cwd_{n}"), expected)
           for n, (_, expected) in cases.items()}
    _, stderr = div.communicate(timeout=600)
    out["diverging_run"] = (SimpleNamespace(returncode=div.returncode, stderr=stderr, cwd=ws / "cwd_diverging_run"),
                            div_expected)
    return out


def assert_one_line_error(res, expected: str) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert expected in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case", ["features_3e38", "features_nan", "features_string_dtype", "features_zero_width",
                                  "empty_test_split", "empty_rv_file", "steps_true", "duplicate_yaml_key",
                                  "non_utf8_class_names", "run_dir_under_a_file", "ensemble_out_is_a_file"])
def test_bad_input_is_one_line_and_exit_2(cli, case):
    res, expected = cli[case]
    assert_one_line_error(res, expected)


def test_a_diverging_run_fails_fast_and_its_mlflow_run_is_failed(cli):
    """§4: lr 1e30 without clipping: exit 2 naming the step, MLflow FAILED, no test metrics logged."""
    from mlflow.tracking import MlflowClient

    res, expected = cli["diverging_run"]
    line = assert_one_line_error(res, expected)
    step = int(line.split("at step ")[1].split()[0])
    assert 1 <= step <= 6
    client = MlflowClient(f"sqlite:///{res.cwd / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name.startswith("tdsm-")]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert not any(k.startswith("test/") for k in run.data.metrics)
    assert all(np.isfinite(v) for v in run.data.metrics.values())     # nothing diverged was logged


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


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_a_read_only_output_folder_is_one_line(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    res = subprocess.run([sys.executable, "-m", "service.prepare", "synthetic", "--out", str(out / "x"),
                          "--classes", "2", "--per-class", "1", "--no-progress"], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert_one_line_error(res, str(out / "x"))


# ----------------------------------------------------------------------------------------------
# Raw files: one hostile file is skipped with its reason, the rest are prepared
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ntu_files(tmp_path_factory) -> tuple[Path, list[str]]:
    from trainers.skeleton.synthetic import write_synthetic_dataset

    gen = tmp_path_factory.mktemp("ntu_gen")
    paths = write_synthetic_dataset(gen, num_classes=2, per_class=2, seed=0)
    return gen, [p.read_text() for p in paths]


def hostile_ntu(good: str) -> dict[str, tuple[str, str]]:
    """{sample name: (file content, reason fragment)} built from one good file."""
    lines = good.splitlines()
    first_joint = 4                       # frame count, body count, info line, joint count, then joints
    assert lines[3].strip() == "25"
    far, nan = list(lines), list(lines)
    far[first_joint] = " ".join(["1e308"] + lines[first_joint].split()[1:])
    nan[first_joint] = " ".join(["nan"] + lines[first_joint].split()[1:])
    many_bodies = list(lines)
    many_bodies[1] = "99999999"
    return {
        "S001C001P001R001A050": ("99999999999999\n" + "\n".join(lines[1:]) + "\n", "frame count 99999999999999"),
        "S001C001P001R001A051": ("\n".join(far) + "\n", "m from the camera"),
        "S001C001P001R001A052": ("\n".join(nan) + "\n", "expected a finite number"),
        # a body count that lies allocates nothing: parsing meets the next frame's lines and stops there
        "S001C001P001R001A053": ("\n".join(many_bodies) + "\n", "expected the info line of body 2 of frame 1"),
    }


def test_ntu_prepare_skips_each_hostile_file_with_its_reason(ntu_files, tmp_path):
    gen, contents = ntu_files
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    for p in gen.glob("*.skeleton"):
        os.symlink(p, raw / p.name)
    bad = hostile_ntu(contents[0])
    for name, (text, _) in bad.items():
        (raw / f"{name}.skeleton").write_text(text)
    res = subprocess.run([sys.executable, "-m", "service.prepare", "ntu60", "--raw", str(raw), "--out", str(out),
                          "--workers", "1", "--no-progress"], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["samples"] == 4
    skipped = {row.split("\t")[0]: row.split("\t")[2] for row in (out / "skipped.tsv").read_text().splitlines()[1:]}
    assert set(skipped) == set(bad)
    for name, (_, reason) in bad.items():
        assert reason in skipped[name], skipped[name]
    assert np.isfinite(np.load(out / "data.npy")).all()


def kinetics_clip(frame_index=1, label_index=3, x=0.5) -> str:
    """A clip's JSON text: two frames of one person."""
    person = {"pose": [x, 0.5] * 18, "score": [0.9] * 18}
    return json.dumps({"data": [{"frame_index": frame_index, "skeleton": [person]},
                                {"frame_index": 2, "skeleton": [person]}], "label": "a", "label_index": label_index})


HUGE = "1" + "0" * 400                    # an integer JSON literal beyond float64's range
KINETICS_CASES = {
    "frame_index_huge": (kinetics_clip(frame_index=99999999999), "frame_index: expected an integer in 1..100000"),
    "label_index_float": (kinetics_clip().replace('"label_index": 3', '"label_index": 1e30'),
                          "label_index: expected an integer, got 1e+30"),
    "label_index_bigint": (kinetics_clip(label_index=10**30), "label_index: expected an integer in 0..399"),
    "label_index_negative": (kinetics_clip(label_index=-5), "label_index: expected an integer in 0..399, got -5"),
    "pose_absurd": (kinetics_clip(x=1e300), "exceeds 10000"),
    "pose_beyond_float": (kinetics_clip().replace("0.5", HUGE), "expected numbers of magnitude"),
}


def test_kinetics_prepare_skips_each_hostile_clip_with_its_reason(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "kinetics_train").mkdir(parents=True)
    (raw / "kinetics_val").mkdir()
    for i in range(2):
        for split in ("kinetics_train", "kinetics_val"):
            (raw / split / f"{split}_{i}.json").write_text(kinetics_clip(label_index=i))
    for name, (text, _) in KINETICS_CASES.items():
        (raw / "kinetics_train" / f"{name}.json").write_text(text)
    res = subprocess.run([sys.executable, "-m", "service.prepare", "kinetics", "--raw", str(raw), "--out", str(out),
                          "--workers", "1", "--no-progress"], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1])["samples"] == 4
    skipped = {row.split("\t")[0]: row.split("\t")[2] for row in (out / "skipped.tsv").read_text().splitlines()[1:]}
    assert set(skipped) == set(KINETICS_CASES)
    for name, (_, reason) in KINETICS_CASES.items():
        assert reason in skipped[name], (name, skipped[name])
    assert sorted(np.load(out / "label.npy").tolist()) == [0, 0, 1, 1]


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


def children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out |= {int(c) for c in text}
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_prepare_pool_workers_die_with_a_killed_parent(ntu_files, tmp_path):
    """A worker blocked on a FIFO (never written) keeps the pool busy; SIGKILL the parent: no worker survives."""
    gen, _ = ntu_files
    raw = tmp_path / "raw"
    raw.mkdir()
    for p in sorted(gen.glob("*.skeleton"))[:2]:
        os.symlink(p, raw / p.name)
    os.mkfifo(raw / "S001C001P001R001A059.skeleton")
    proc = subprocess.Popen([sys.executable, "-m", "service.prepare", "ntu60", "--raw", str(raw), "--out",
                             str(tmp_path / "out"), "--workers", "2", "--chunk-size", "1", "--no-progress"],
                            cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            workers = children(proc.pid)
            time.sleep(0.2)
        assert len(workers) >= 2, proc.stderr.read().decode() if proc.poll() is not None else "no workers"
        time.sleep(1.0)                                     # the FIFO's worker is now blocked in open()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [w for w in workers if alive(w)]
        assert not survivors
    finally:
        for w in workers:                                    # only the pids this test started, by id
            if alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
