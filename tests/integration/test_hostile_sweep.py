"""Hostile conditions on the Ray paths (slow; real local Ray, real MLflow stores):

- a sweep whose every trial diverges: trials FAILED (trial_state=failed), the divergence not trained again on
  Tune's retry, no best config, the parent run FAILED, and the driver ends with one `error:` line, exit 2;
- `service.encoder train` on Ray Train workers with a diverging lr: Ray's wrapped worker error unwrapped into
  one `error: training diverged ...` line, exit 2, its MLflow run FAILED;
- a sweep against a real `mlflow server` given `http://admin:PASSWORD@host`, stopped by SIGTERM (parent run
  KILLED, exit 143) and resumed (no duplicate child runs): the password is in no file, log or output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_hostile_tracking_cli import ADMIN_PASSWORD, SECRET, files_containing, mlflow_server  # noqa: F401 (fixture)

from service.tracking import store as tracking

ROOT = Path(__file__).resolve().parents[2]
# The embedded generated task (no skeleton chain to train first), cut down to a few evaluations per trial.
FAST = ["--splits", "synthetic-u5", "--scheduler", "fifo", "--max-concurrent", "1",
        "--set", "model.preset=tiny", "--set", "train.steps=40", "--set", "train.eval_every=20",
        "--set", "train.checkpoint_every=20", "--set", "data.synthetic.samples_per_class=12",
        "--set", "eval.noise_draws=1"]
SPACE = """method: tdsm
params:
  optim.lr: {{choice: {lrs}}}
inference:
  t_test: [1, 5, 9]
"""


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", *tracking.CREDENTIAL_VARS):
        out.pop(key, None)
    return out


def sweep_cmd(tmp_path: Path, lrs: list[float], *args: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(lrs=lrs))
    return [sys.executable, "-m", "service.sweep", "tdsm", "--space", str(space), *FAST,
            "--storage-path", str(tmp_path / "results"), *args]


def last_line_is_the_only_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    return errors[0]


def sweep_runs(client: MlflowClient, experiment: str) -> tuple[object, list]:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def test_input_error_cause_unwraps_ray_train_and_tune_wrappers():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from service.orchestration.cluster import input_error_cause
    from trainers.errors import TrainingDivergedError

    diverged = TrainingDivergedError("training diverged: non-finite loss at step 2 (loss=nan)")
    worker = RayTaskError("train_fn", "Traceback ...", diverged)                 # the worker's exception
    group = WorkerGroupError("[Rank 0 Error Snippet]: ...", {0: worker})       # what trainer.fit() raises
    trial = RayTaskError("tune_trial", "Traceback ...", group)                  # what a Tune trial records
    for err in (diverged, worker, group, trial):
        found = input_error_cause(err)
        assert type(found) is TrainingDivergedError and str(found) == str(diverged)
    assert input_error_cause(RayTaskError("f", "tb", WorkerGroupError("x", {0: RuntimeError("bug")}))) is None


@pytest.mark.slow
def test_sweep_of_diverging_trials_fails_cleanly_without_a_best_config(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    t0 = time.monotonic()
    out = subprocess.run(sweep_cmd(tmp_path, [1.0e30], "--num-samples", "2", "--set", "optim.grad_clip=0",
                                   "--tracking-uri", uri, "--name", "diverge", "--experiment-name", "diverge"),
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=1500)
    elapsed = time.monotonic() - t0
    assert out.returncode == 2, out.stderr[-3000:]
    line = last_line_is_the_only_error(out.stderr)
    assert line.startswith("error: [synthetic-u5] no trial produced a finite val/zsl_top1 (2 of 2 trials failed: "
                           "training diverged: non-finite loss at step"), line
    assert not list((tmp_path / "results").rglob("best_config.yaml"))
    parent, kids = sweep_runs(MlflowClient(uri), "diverge")
    assert parent.info.status == "FAILED" and "no trial produced" in parent.data.tags["sweep_error"]
    assert "best_config" not in parent.data.tags
    assert len(kids) == 2
    assert all(k.info.status == "FAILED" and k.data.tags["trial_state"] == "failed" for k in kids)
    # Tune retried each trial (--trial-retries 1): the retry re-raised the recorded divergence, trained nothing.
    markers = list((tmp_path / "results" / "diverge-train").glob("train-*/input_error.txt"))
    assert len(markers) == 2 and all(m.read_text().startswith("training diverged") for m in markers)
    print(f"diverging sweep: {elapsed:.0f} s")


@pytest.mark.slow
def test_encoder_on_ray_with_a_diverging_lr_is_one_line_exit_2(tmp_path):
    from trainers.skeleton.prepare import prepare
    from trainers.skeleton.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "raw", num_classes=8, per_class=6, seed=3)
    prepare("synthetic", tmp_path / "raw", tmp_path / "prepared", progress=False, log=lambda m: None)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    sets = ["name=stgcn", "base_channels=8", "units_per_stage=[1, 1]", "batch_size=8", "steps=6",
            "checkpoint_every=3", "precision=fp32", "device=cpu", "lr=1e30"]
    out = subprocess.run([sys.executable, "-m", "service.encoder", "train", "--data", str(tmp_path / "prepared"),
                          "--unseen", "1,4", "--out", str(tmp_path / "enc"), "--storage-path", str(tmp_path / "ray"),
                          "--tracking-uri", uri, *[f"--set={s}" for s in sets]],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 2, out.stderr[-3000:]
    line = last_line_is_the_only_error(out.stderr)
    assert line.startswith("error: training diverged: non-finite loss at step "), line
    assert not (tmp_path / "enc" / "encoder.pt").exists()
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("encoder-prepared").experiment_id])
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_sweep_with_credentials_stopped_by_sigterm_then_resumed(tmp_path, mlflow_server, monkeypatch):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    host = mlflow_server.split("://", 1)[1]
    cmd = sweep_cmd(work, [2.0e-3], "--num-samples", "3", "--tracking-uri", f"http://admin:{ADMIN_PASSWORD}@{host}",
                    "--name", "creds", "--experiment-name", "creds")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")          # this test's own client
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    client = MlflowClient(mlflow_server)
    # Warm the server's auth app up: the sweep's 5 s reachability probe timed out on a cold server (load ~40).
    client.search_experiments()
    logs = []
    with open(work / "first.out", "w") as stdout, open(work / "first.err", "w") as stderr:
        first = subprocess.Popen(cmd, cwd=work, env=env(), stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        done = []
        while not done and first.poll() is None and time.monotonic() < deadline:
            time.sleep(3)
            exp = client.get_experiment_by_name("creds")
            done = exp and client.search_runs([exp.experiment_id], "tags.trial_state = 'finished'")
        assert done and first.poll() is None, (work / "first.err").read_text()[-3000:]
        time.sleep(5)                                    # let Tune snapshot the finished trial
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
    logs += [(work / "first.out").read_text(), (work / "first.err").read_text()]
    assert first.returncode == 128 + signal.SIGTERM, logs[1][-3000:]
    assert logs[1].rstrip().endswith("terminated (SIGTERM)"), logs[1][-3000:]
    parent, kids = sweep_runs(client, "creds")
    assert parent.info.status == "KILLED"
    finished_before = {k.info.run_id for k in kids if k.data.tags.get("trial_state") == "finished"}
    assert finished_before

    again = subprocess.run([*cmd, "--resume"], cwd=work, env=env(), capture_output=True, text=True, timeout=1500)
    logs += [again.stdout, again.stderr]
    assert again.returncode == 0, again.stderr[-3000:]
    parent_after, kids = sweep_runs(client, "creds")
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    assert len(kids) == 3 and len({k.data.tags["ray_trial_id"] for k in kids}) == 3     # no duplicates
    assert finished_before <= {k.info.run_id for k in kids if k.data.tags["trial_state"] == "finished"}
    assert Path(parent_after.data.tags["best_config"]).is_file()

    for text in logs:
        assert SECRET not in text
    for root in (work, tmp_path / "art"):            # results (Tune's pickled state too), cwd, artifact root
        assert not files_containing(root, SECRET.encode()), root


def test_set_of_a_searched_key_is_refused_before_ray_starts(tmp_path, capsys):
    """`--set optim.lr=1e30` on a sweep whose space samples optim.lr would be silently replaced in every trial."""
    from service.sweep import main

    code = main(["tdsm", "--smoke", "--set", "optim.lr=1e30", "--set", "optim.grad_clip=0",
                 "--storage-path", str(tmp_path / "results"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and "--set optim.lr: " in last_line_is_the_only_error(err) and "params.optim.lr" in err
    assert not (tmp_path / "results").exists()
