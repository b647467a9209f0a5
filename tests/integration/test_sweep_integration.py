"""End-to-end sweeps on a real local Ray and a real MLflow store (slow; run by .ci/run).

- the README's `make cluster` (a Ray head on loopback), `service.sweep tdsm --smoke` on the embedded default
  submitted with its `ray job submit` line verbatim from a shell without the venv on PATH (the whole skeleton
  chain: generate -> prepare -> ST-GCN on Ray Train -> features -> sweep) and its `make cluster-stop`, then
  `service.final`, whose unseen-class accuracy must be well above chance;
- a sweep driver killed mid-way and resumed: finished trials kept, no duplicated MLflow runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import terminated_trials
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# A smoke sweep cut further down, on the generated feature task: the point is the machinery, not the accuracy.
FAST = ["--set", "train.steps=40", "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20",
        "--set", "data.synthetic.samples_per_class=12"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1",
               MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK="true")
    return env


def submit_job(cmd: list, env: dict[str, str], timeout: float,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's dashboard agent is still starting (a loaded machine)."""
    deadline = time.time() + 420
    while True:
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if job.returncode == 0 or "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
            return job
        time.sleep(5)


def children_of_sweep(uri: str, experiment: str) -> tuple[object, list]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("phase") == "sweep"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], kids


# The README's Quick start, verbatim: run from the checkout by a shell whose PATH has no venv on it.
README_CLUSTER = ["make cluster", "RAY_AUTH_MODE=token .venv/bin/ray job submit --working-dir . -- "
                  "python -m service.sweep tdsm --smoke", "make cluster-stop"]


def test_job_submit_smoke_sweep_then_final(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert all(line in readme for line in README_CLUSTER)
    env = env_for(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gcs, dash = free_port(), free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="skr", dir="/tmp"))   # short: Ray's socket paths must fit 107 bytes
    # Only what a fresh login shell has, plus where this test wants the cluster and its outputs.
    shell = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)), "OMP_NUM_THREADS": "1",
             **{k: v for k, v in os.environ.items() if k.startswith(("SKELDIFF_", "HF_", "LANG", "LC_"))},
             "MLFLOW_TRACKING_URI": uri, "SKELDIFF_RESULTS": str(tmp_path / "results"),
             "CLUSTER_PORT": str(gcs), "CLUSTER_DASHBOARD_PORT": str(dash), "CLUSTER_TEMP_DIR": str(ray_tmp),
             # The agent's fixed default port (52365) is taken by any other Ray on the machine: no agent, no job.
             "CLUSTER_ARGS": f"--dashboard-agent-listen-port={free_port()} --num-cpus=2"}
    start, submit, stop = README_CLUSTER
    try:
        up = subprocess.run(start, shell=True, cwd=REPO, env=shell, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        job = submit_job(["bash", "-c", submit], {**shell, "RAY_ADDRESS": f"http://127.0.0.1:{dash}"},
                         timeout=1500, cwd=REPO)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
    finally:
        down = subprocess.run(stop, shell=True, cwd=REPO, env=shell, capture_output=True, text=True, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr

    client = MlflowClient(uri)
    [encoder] = client.search_runs([client.get_experiment_by_name("encoder-prepared-raw-12x46-s0").experiment_id])
    assert encoder.info.status == "FINISHED" and encoder.data.metrics["encoder/held_out_top1"] > 2 * 100 / 34
    parent, kids = children_of_sweep(uri, "tdsm-synthetic-skeleton-sweeps")
    assert client.get_experiment_by_name("tdsm-synthetic-skeleton-sweeps").tags["mlflow.experimentKind"] == \
        "custom_model_development"
    assert len(kids) >= 4
    for kid in kids:
        params = kid.data.params
        assert {"diffusion.num_train_timesteps", "loss.margin", "loss.triplet_weight"} <= set(params)
        assert {"val/zsl_top1", "val/zsl_top1_max"} <= set(kid.data.metrics)
        assert kid.data.tags["trial_state"] in {"finished", "early_stopped"}
        assert kid.info.status == "FINISHED"                  # ASHA-stopped trials too (trial_state tells them apart)
        assert kid.info.run_name.startswith("T=") and " λ=" in kid.info.run_name     # named by what differs
        assert kid.data.tags["sweep"] == parent.data.tags["sweep"]
        # its own cost: seconds from start to the first metric, the share of its wall time outside the fit loop
        assert 0 < kid.data.metrics["trial/start_to_first_metric_s"] < kid.data.metrics["trial/wall_s"]
        assert 0 <= kid.data.metrics["trial/overhead_share"] < 1
    assert {"sweep/start_to_first_metric_s_median", "sweep/overhead_share_max"} <= set(parent.data.metrics)
    best = Path(parent.data.tags["best_config"])
    assert best.is_file()
    assert {"best_config.yaml", "trials.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert (best.parent / "trials.csv").read_text().count("\n") == len(kids) + 1

    final = subprocess.run(
        [sys.executable, "-m", "service.final", "--from", str(best), "--seeds", "1", "--noise-draws", "3",
         "--tracking-uri", uri, "--out", str(tmp_path / "final"), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    summary = json.loads(final.stdout.strip().splitlines()[-1])
    row = summary["splits"][0]
    assert row["split"] == "synthetic-skeleton" and (row["seen"], row["unseen"]) == (34, 12)
    assert row["test/zsl_top1_mean"] > 3 * 100 / 12         # unseen classes, well above chance (8.3 %)
    assert row["registered_version"] == "1"
    assert (tmp_path / "final" / f"table-{row['split']}.md").read_text().count("|") > 10
    version = client.get_model_version_by_alias(f"tdsm-{row['split']}", "final")
    assert str(version.version) == "1"


def test_killed_driver_resumes_without_duplicates(tmp_path):
    env = env_for(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = "resume-me"
    # 6 trials of 80 steps (~10-15 s each, one at a time): the kill, 15 s after the second trial finished, must
    # land while later trials still run (at 4 x 40 steps the whole sweep had finished by then).
    longer = [a.replace("train.steps=40", "train.steps=80") for a in FAST]
    cmd = [sys.executable, "-m", "service.sweep", "tdsm", "--smoke", "--num-samples", "6", "--max-concurrent", "1",
           "--scheduler", "fifo", *longer, "--tracking-uri", uri, "--storage-path", str(tmp_path / "results"),
           "--name", name]
    log = open(tmp_path / "first.log", "w")
    # Tune snapshots its state every 10-19 s by default ("auto": at least 10 s, 19x the last snapshot's cost); a
    # trial that finished inside that window is restored from its last checkpoint and reports again on resume
    # (without training). Snapshot every 2 s so that "finished before the kill" means finished in the snapshot.
    first = subprocess.Popen(cmd, env={**env, "TUNE_GLOBAL_CHECKPOINT_S": "2"}, stdout=log, stderr=subprocess.STDOUT,
                             cwd=tmp_path, start_new_session=True)
    client = MlflowClient(uri)
    deadline = time.time() + 900
    finished_before: dict[str, int] = {}
    try:
        while time.time() < deadline and first.poll() is None:
            time.sleep(3)
            db = tmp_path / "mlflow.db"
            exp = client.get_experiment_by_name("tdsm-synthetic-sweeps") if db.exists() else None
            if exp is None:
                continue
            # finished in the state Tune wrote (what a resume will not run again), not only in MLflow
            states = sorted((tmp_path / "results" / name).glob("experiment_state-*.json"))
            done = terminated_trials(states[-1].read_text()) if states else set()
            if len(done) >= 2:
                runs = client.search_runs([exp.experiment_id], "tags.trial_state = 'finished'")
                finished_before = {r.info.run_id: r.info.end_time for r in runs if r.data.tags["ray_trial_id"] in done}
                break
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert finished_before, "no trial finished within the deadline"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)   # the driver and the local Ray it started
        first.wait(timeout=60)
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)

    again = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    parent, kids = children_of_sweep(uri, "tdsm-synthetic-sweeps")
    assert len(kids) == 6, sorted(k.data.tags.get("ray_trial_id") for k in kids)     # no duplicates
    assert len({k.data.tags["ray_trial_id"] for k in kids}) == 6
    by_id = {k.info.run_id: k for k in kids}
    for run_id, end_time in finished_before.items():   # completed before the kill: kept, not re-run
        assert by_id[run_id].info.end_time == end_time
        assert by_id[run_id].data.tags["trial_state"] == "finished"
    assert all(k.info.status == "FINISHED" for k in kids)
    assert Path(parent.data.tags["best_config"]).is_file()
    shutil.rmtree(tmp_path / "results", ignore_errors=True)
