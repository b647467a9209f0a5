"""Beyond one machine (slow; run by .ci/run): a real Ray cluster of a head and two worker nodes (separate raylets,
`ray.cluster_utils.Cluster`, the way Ray's own tests build one), results in a real S3-API server on loopback
(moto's standalone server) and a real `mlflow server` whose artifacts go to the same bucket (proxied), so no node
shares a filesystem with another.

- a sweep submitted with --address: its trials run on both worker nodes (the head has no CPU for them); a worker
  node killed mid-sweep: its trial restarts on the surviving node from its last checkpoint in the bucket, keeps its
  one MLflow run, and the sweep picks its best config; nothing of the sweep is written to the local disk; the
  bucket's secret never appears in an output, a param or a tag; `service.final --from` the S3 best config and
  `--from` the sweep's run id finish;
- a sweep submitted with `ray job submit` whose driver is SIGKILLed, resumed from a fresh working directory with
  nothing but the URI and the sweep name: finished trials kept, no duplicate runs.
Each test prints what it measured (recovery seconds, steps re-trained); README "Scaling out" quotes them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import terminated_trials
from mlflow.tracking import MlflowClient
from ray._private import ray_constants
from servers import BUCKET, TEST_ENV, S3Server, free_port, wait_for_health  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The feature task, cut down: the point is where trials run and what survives, not the accuracy.
FAST = ["--set", "train.eval_every=20", "--set", "train.checkpoint_every=20",
        "--set", "data.synthetic.samples_per_class=12"]
# What the service writes under its storage: none of it may land on a local disk when the storage is a URI.
STORAGE_FILES = ("best_config.yaml", "trials.csv", "skeldiff_sweep.json", "tuner.pkl", "input_error.txt",
                 "last.pt", "best.pt", "paper_table.md")


class Stack:
    """The S3 server, the MLflow server and the Ray cluster of this module."""

    def __init__(self, tmp: Path):
        from ray.cluster_utils import Cluster

        self.tmp = tmp
        self.s3 = S3Server().start()
        self.s3.create_bucket()
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: every Ray process takes 127.0.0.1 as its node address (Ray's local
        # mode of address detection), so all of the cluster's traffic stays on loopback.
        self.env = {**os.environ, **self.s3.env(), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true", "OMP_NUM_THREADS": "1",
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)     # the raylets (and so every worker) inherit it: each node has the bucket env
        # This process imported Ray before the variable was set: its node address detection reads the constant.
        ray_constants.ENABLE_RAY_CLUSTER = False
        self.mlflow_port = free_port()
        self.mlflow_log = open(tmp / "mlflow-server.log", "a")
        self.start_mlflow()
        self.uri = f"http://127.0.0.1:{self.mlflow_port}"
        self.dashboard = free_port()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard,
            "dashboard_agent_listen_port": free_port(), "object_store_memory": 150 * 1024**2})
        self.workers = [self.add_worker(), self.add_worker()]
        self.wait_for_mlflow()

    def start_mlflow(self) -> None:
        self.mlflow = subprocess.Popen(
            [BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--host", "127.0.0.1",
             "--port", str(self.mlflow_port), "--workers", "1"], env=self.env, stdout=self.mlflow_log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def kill_mlflow(self) -> None:
        os.killpg(self.mlflow.pid, signal.SIGKILL)
        self.mlflow.wait(timeout=60)

    def add_worker(self):
        # Its own temp dir, as on another machine: nodes sharing one unpack a job's working dir into the same
        # folder at once and read each other's half-written files.
        self.nodes_made = getattr(self, "nodes_made", 0) + 1
        temp = Path(tempfile.mkdtemp(prefix=f"rw{self.nodes_made}", dir="/tmp"))   # short: socket paths < 108 bytes
        self.node_dirs = [*getattr(self, "node_dirs", []), temp]
        node = self.cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2, temp_dir=str(temp))
        self.cluster.wait_for_nodes()
        return node

    def wait_for_mlflow(self) -> None:
        wait_for_health(self.uri, self.tmp / "mlflow-server.log", self.mlflow)

    def sweep_cmd(self, name: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "service.sweep", "tdsm", "--smoke", "--scheduler", "fifo", *FAST,
                "--tracking-uri", self.uri, "--storage-path", f"s3://{BUCKET}/results", "--name", name, *extra]

    def workdir(self, name: str) -> tuple[Path, dict[str, str]]:
        """A fresh working directory and HOME: what a second machine would have (nothing of the sweep)."""
        work = self.tmp / name
        (work / "home").mkdir(parents=True)
        return work, {**self.env, "HOME": str(work / "home")}

    def close(self) -> None:
        import ray._private.utils

        address = self.cluster.gcs_address
        self.cluster.shutdown()
        if ray._private.utils.read_ray_address() == address:   # else the next local ray.init() attaches to it
            os.remove(ray._private.utils.get_ray_address_file(None))
        if self.mlflow.poll() is None:
            self.kill_mlflow()
        self.mlflow_log.close()
        self.s3.stop()
        for temp in self.node_dirs:
            shutil.rmtree(temp, ignore_errors=True)
        os.environ.clear()
        os.environ.update(self.saved)
        ray_constants.ENABLE_RAY_CLUSTER = True


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("multinode"))
    try:
        yield s
    finally:
        s.close()


def sweep_runs(uri: str, name: str) -> tuple[object, list]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tdsm-synthetic-sweeps")
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{name}'", max_results=1000)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def local_storage_files(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots for p in root.rglob("*") if p.name in STORAGE_FILES)


def test_sweep_over_two_worker_nodes_survives_losing_one(stack):
    name = "two-nodes"
    work, env = stack.workdir("driver")
    head_node = stack.cluster.head_node.node_id
    # 4 trials of 160 steps, 2 at a time (a CPU on each worker node), checkpoints every 20 steps.
    cmd = stack.sweep_cmd(name, "--num-samples", "4", "--set", "train.steps=160", "--address", stack.cluster.address)
    log = open(work / "sweep.log", "w")
    t0 = time.time()
    driver = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    doomed = stack.workers[1]
    client = MlflowClient(stack.uri)
    killed_at, victim = None, None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None and killed_at is None:
            time.sleep(1)
            exp = client.get_experiment_by_name("tdsm-synthetic-sweeps")
            if exp is None:
                continue
            for run in client.search_runs([exp.experiment_id], f"tags.ray_node_id = '{doomed.node_id}'"):
                # a checkpoint in the bucket (step 40 evaluated: checkpoints at 20 and 40) and far from the end
                if 40 <= run_step(client, run) < 120:
                    stack.cluster.remove_node(doomed, allow_graceful=False)      # SIGKILL of its raylet + workers
                    killed_at, victim = time.time(), run.info.run_id
                    break
        assert killed_at is not None, (work / "sweep.log").read_text()[-3000:]
        driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
        stack.workers[1] = stack.add_worker()        # the next test has two worker nodes again
    out = (work / "sweep.log").read_text()
    assert driver.returncode == 0, out[-4000:]
    wall = time.time() - t0

    parent, kids = sweep_runs(stack.uri, name)
    assert len(kids) == 4 and len({k.data.tags["ray_trial_id"] for k in kids}) == 4        # one run per trial
    assert all(k.info.status == "FINISHED" and k.data.tags["trial_state"] == "finished" for k in kids)
    nodes = {n for k in kids for n in k.data.tags["ray_node_ids"].split(",")}
    assert nodes == {stack.workers[0].node_id, doomed.node_id} and head_node not in nodes    # both workers, no head
    assert all(k.data.tags["host"] for k in kids)
    restarted = client.get_run(victim)
    assert restarted.data.tags["ray_node_ids"].split(",") == [doomed.node_id, stack.workers[0].node_id]
    resumed = int(restarted.data.tags["resumed_from_step"])
    assert resumed >= 20                                               # from its checkpoint, not from step 0
    history = client.get_metric_history(victim, "train/loss")
    before = max(m.step for m in history if m.timestamp / 1000 < killed_at)
    after = [m for m in history if m.timestamp / 1000 >= killed_at]
    retrained = before - resumed
    recovery = min(m.timestamp for m in after) / 1000 - killed_at
    assert 0 <= retrained < 40                                         # at most the steps since the last checkpoint
    print(f"\nmultinode: 4 trials on 2 worker nodes in {wall:.0f} s; node lost at +{killed_at - t0:.0f} s; "
          f"restarted trial resumed from step {resumed}, re-trained {retrained} steps, first metric again after "
          f"{recovery:.0f} s")

    # in the bucket: Tune's state, checkpoints, the best config, trials.csv, MLflow's artifacts
    keys = stack.s3.keys(prefix="results/")
    assert f"results/{name}/best_config.yaml" in keys and f"results/{name}/trials.csv" in keys
    assert f"results/{name}/tuner.pkl" in keys
    assert any(k.startswith(f"results/{name}/tune_trial_") and k.endswith("/last.pt") for k in keys)
    assert any("/artifacts/config.yaml" in k for k in stack.s3.keys(prefix="mlartifacts/"))
    assert parent.data.tags["best_config"] == f"s3://{BUCKET}/results/{name}/best_config.yaml"
    assert local_storage_files(work) == []                             # no stray local copy
    secret = TEST_ENV["AWS_SECRET_ACCESS_KEY"]
    assert secret not in out
    for run in [parent, *kids]:
        assert secret not in json.dumps({**run.data.params, **run.data.tags})

    # final from the S3 best config, and from the sweep's run id, in fresh directories
    for source in (parent.data.tags["best_config"], parent.info.run_id):
        fwork, fenv = stack.workdir(f"final-{source[-6:]}")
        final = subprocess.run([sys.executable, "-m", "service.final", "--from", source, "--seeds", "1",
                                "--noise-draws", "1", "--set", "train.steps=40", "--tracking-uri", stack.uri,
                                "--storage-path", f"s3://{BUCKET}/results", "--no-register", "--no-progress"],
                               cwd=fwork, env=fenv, capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr[-3000:]
        assert json.loads(final.stdout.strip().splitlines()[-1])["splits"][0]["split"] == "synthetic"
        assert local_storage_files(fwork) == []
    tables = [k for k in stack.s3.keys(prefix="results/final/") if k.endswith("table-synthetic.md")]
    assert len(tables) == 2


def run_step(client: MlflowClient, run) -> int:
    """The last evaluated step of a trial run (its val/zsl_top1 history)."""
    history = client.get_metric_history(run.info.run_id, "val/zsl_top1")
    return max((m.step for m in history), default=0)


def test_driver_killed_under_ray_job_submit_resumes_from_the_bucket(stack):
    from ray.job_submission import JobSubmissionClient

    name = "driver-loss"
    work, env = stack.workdir("job")
    jobs = JobSubmissionClient(f"http://127.0.0.1:{stack.dashboard}")
    cmd = stack.sweep_cmd(name, "--num-samples", "6", "--max-concurrent", "1", "--set", "train.steps=60")
    job_id = jobs.submit_job(entrypoint=" ".join(cmd[:1] + [f"'{a}'" for a in cmd[1:]]),
                             runtime_env={"working_dir": str(REPO)})
    client = MlflowClient(stack.uri)
    finished_before: dict[str, int] = {}
    deadline = time.time() + 600
    while time.time() < deadline and not finished_before:
        time.sleep(2)
        status = jobs.get_job_status(job_id).value
        assert status in ("PENDING", "RUNNING"), jobs.get_job_logs(job_id)[-3000:]
        # finished in the state Tune uploaded to the bucket (every 10 s): what a resume must not run again
        states = [k for k in stack.s3.keys(prefix=f"results/{name}/experiment_state-")]
        done = terminated_trials(stack.s3.client().get_object(Bucket=BUCKET, Key=states[-1])["Body"].read()
                                 .decode()) if states else set()
        if len(done) >= 2:
            exp = client.get_experiment_by_name("tdsm-synthetic-sweeps")
            runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{name}'")
            finished_before = {r.info.run_id: r.info.end_time for r in runs
                               if r.data.tags.get("ray_trial_id") in done}
    assert finished_before, jobs.get_job_logs(job_id)[-3000:]
    pid = jobs.get_job_info(job_id).driver_info.pid
    os.kill(int(pid), signal.SIGKILL)                                  # the job's driver, nothing else
    time.sleep(5)
    assert jobs.get_job_status(job_id).value in ("FAILED", "STOPPED")

    again_work, again_env = stack.workdir("resume-elsewhere")          # nothing local: the URI and the name only
    t0 = time.time()
    again = subprocess.run([*stack.sweep_cmd(name, "--num-samples", "6", "--max-concurrent", "1", "--set",
                                             "train.steps=60", "--address", stack.cluster.address), "--resume"],
                           cwd=again_work, env=again_env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    parent, kids = sweep_runs(stack.uri, name)
    assert len(kids) == 6 and len({k.data.tags["ray_trial_id"] for k in kids}) == 6          # no duplicates
    by_id = {k.info.run_id: k for k in kids}
    for run_id, end_time in finished_before.items():                  # finished before the kill: not re-run
        assert by_id[run_id].info.end_time == end_time
    assert all(k.info.status == "FINISHED" for k in kids)
    assert f"results/{name}/best_config.yaml" in stack.s3.keys(prefix=f"results/{name}/")
    assert local_storage_files(again_work) == []
    print(f"\nmultinode: driver killed after {len(finished_before)} of 6 trials; resumed elsewhere in "
          f"{time.time() - t0:.0f} s, 0 finished trials re-run")


def test_tracking_server_restart_and_object_store_outage_mid_sweep(stack):
    """The MLflow server killed and back 20 s later, then the S3 server down for 10 s, during one sweep: the trials
    ride out the first (metrics buffered) and retry through the second (Tune restarts a trial whose checkpoint upload
    failed from its last checkpoint); every run ends, nothing is lost without a warning line."""
    name = "faults"
    work, env = stack.workdir("faults")
    cmd = stack.sweep_cmd(name, "--num-samples", "4", "--set", "train.steps=120", "--trial-retries", "3",
                          "--address", stack.cluster.address)
    log = open(work / "sweep.log", "w")
    driver = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = MlflowClient(stack.uri)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None:
            time.sleep(1)
            exp = client.get_experiment_by_name("tdsm-synthetic-sweeps")
            runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{name}'") if exp else []
            if any(run_step(client, r) >= 20 for r in runs):
                break
        stack.kill_mlflow()
        time.sleep(20)
        stack.start_mlflow()
        stack.wait_for_mlflow()
        time.sleep(10)
        stack.s3.stop()
        time.sleep(10)
        stack.s3.start()
        driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
        if stack.mlflow.poll() is not None:
            stack.start_mlflow()
            stack.wait_for_mlflow()
    out = (work / "sweep.log").read_text()
    print(f"\nmultinode faults: exit {driver.returncode}; warnings: "
          f"{[line for line in out.splitlines() if 'warning:' in line or 'note:' in line][:8]}")
    assert driver.returncode == 0, out[-4000:]
    # the outage was seen and said: by the trials that met it, or by the driver recording Tune's state
    assert "could not reach the tracking server" in out or "warning: tracking server" in out
    parent, kids = sweep_runs(stack.uri, name)
    assert len(kids) == 4 and len({k.data.tags["ray_trial_id"] for k in kids}) == 4
    assert all(k.info.status in ("FINISHED", "FAILED") for k in kids)    # none left RUNNING
    for kid in kids:                                 # no metric lost: every logged step of a finished trial is there
        if kid.info.status == "FINISHED":
            steps = {m.step for m in client.get_metric_history(kid.info.run_id, "train/loss")}
            assert steps == set(range(6, 121, 6)), sorted(steps)
    assert parent.info.status == "FINISHED"
    best = parent.data.tags["best_config"]
    assert f"results/{name}/best_config.yaml" in stack.s3.keys(prefix=f"results/{name}/")
    assert client.get_run(parent.data.tags["best_run_id"]).info.status == "FINISHED"
    assert best.endswith(f"{name}/best_config.yaml")
