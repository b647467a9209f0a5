"""The Ray cluster a command runs on: connect (or start a local one) with the environment its workers need, route
workers' output, size concurrency to it, unwrap a worker's one-line error, and stop a `make cluster` head.

`ray stop` kills every Ray process of the machine (other users' clusters, a local sweep's `ray.init()`), so
`make cluster` gives its head a temp dir of its own and `stop_cluster` stops only the processes under that temp
dir: every Ray daemon names its session directory (`TEMP_DIR/session_...`) on its command line, and the
workers, agents and job drivers are their descendants.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import ray  # first: it puts Ray's bundled psutil on sys.path, the one `ray stop` uses

# isort: split
import psutil
import ray._private.worker as ray_worker
from ray.exceptions import RayTaskError

from service import THREAD_ENV_DEFAULTS
from service.process import install_sigterm_handler
from service.storage import STORAGE_ENDPOINT_VARS
from service.tracking.store import CREDENTIAL_VARS, HTTP_DEFAULTS
from trainers.errors import InputError


def input_error_cause(err: BaseException) -> InputError | None:
    """The InputError (e.g. TrainingDivergedError) a Ray Train/Tune failure wraps, or None.

    Ray wraps a worker's exception in a RayTaskError, then in a WorkerGroupError (Train) and again in a
    RayTaskError (a Tune trial): walk those wrappers (and __cause__ chains) so the driver can report the
    one-line message instead of Ray's traceback.
    """
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RayTaskError):      # its dual-class instance prints a traceback: use the cause itself
            todo.append(e.cause)
            continue
        if isinstance(e, InputError):
            return e
        todo.extend([*(getattr(e, "worker_failures", None) or {}).values(), getattr(e, "controller_failure", None),
                     e.__cause__, e.__context__])
    return None


def cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    """The daemons whose command line names a session under `temp_dir`, and all their descendants."""
    marker = f"{temp_dir.resolve()}/session_"
    keep = {os.getpid(), *(p.pid for p in psutil.Process().parents())}   # never the stopper or its shell
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid not in keep and any(marker in arg for arg in proc.info["cmdline"] or ()):
            roots.append(proc)
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update((c.pid, c) for c in root.children(recursive=True) if c.pid not in keep)
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def stop_cluster(temp_dir: Path, grace_s: float = 10.0) -> int:
    """SIGTERM the cluster's processes, SIGKILL what is left after `grace_s`; returns how many were found."""
    procs = cluster_processes(temp_dir)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    # A stale address file would make the next `ray.init(_temp_dir=...)` attach to the dead head (docs/METHODS.md §4).
    (temp_dir / "ray_current_cluster").unlink(missing_ok=True)
    return len(procs)


# Lines of Ray's workers that are ours (the chain encoder's progress, warnings of our code). Everything else workers
# print (Ray Train's INFO lines, internal threads' tracebacks, C++ core_worker messages) stays in Ray's log files.
OWN_WORKER_LINES = ("encoder step", "chain:", "synthetic:", "warning:", "error:", "note:")


WORKER_COUNT_HINT = "PYTHON worker processes have been started"


def route_worker_logs(forward_all: bool) -> None:
    """Forward only our own lines from Ray's workers to this terminal (all of them with `--ray-logs`).

    Ray prints what its workers write through one handler of its log dispatcher (ray.init(log_to_driver=True));
    it is replaced by a filtering one. Should that internal handler move, workers' output is not forwarded at all.
    """
    dispatcher = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if forward_all or dispatcher is None or printer is None or getattr(printer, "routed", False):
        return                                                 # routed already (a second ray.init in one process)
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)  # noqa: SLF001

    def ours(batch: dict[str, Any]) -> None:
        lines = [line for line in batch.get("lines", []) if line.lstrip().startswith(OWN_WORKER_LINES)]
        if lines:
            printer({**batch, "lines": lines}, ignore_prefix=ignore_prefix)

    def raylet_messages(batch: dict[str, Any], ignore_prefix: bool) -> None:
        # The raylet's messages (a worker killed for memory, a crash) stay, except its hint that many worker
        # processes started at once: every trial starts a Train controller and workers, so it is expected here.
        if batch.get("pid") == "raylet" and any(WORKER_COUNT_HINT in line for line in batch.get("lines", [])):
            return
        printer(batch, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", ours)
    raylet_messages.routed = True
    ray_worker.print_to_stdstream = raylet_messages     # what ray's error-message listener prints through


def connect_ray(address: str | None, forward_all: bool = False) -> None:
    """Attach to a running cluster (--address, $RAY_ADDRESS, `ray job submit`) or start a local one."""
    # Train's controller polls every 2 s by default; each report would cost that much (docs/METHODS.md §4).
    # A finished trial's workers release their CPUs a little late; waiting for them is not a failure.
    # Tune snapshots its state every 10 s (its "auto" period grows to 19x a snapshot's cost, and a snapshot includes
    # recording the state's digests in MLflow: service.orchestration.tune_state); uploaded every 10 s (sweep.py).
    tuned = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
             "TUNE_GLOBAL_CHECKPOINT_S": "10",
             **THREAD_ENV_DEFAULTS}   # a worker imports torch before any service module: set its wait policy here
    for key, value in tuned.items():
        os.environ.setdefault(key, value)
    # Inside `ray job submit`, Ray merges this with the job's runtime env and refuses conflicting keys: only
    # add what the job did not set itself.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    preset = set(job_env.get("env_vars") or {})
    env = {"env_vars": {key: os.environ[key] for key in tuned if key not in preset}}
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers of an existing cluster do not inherit this process's environment: forward MLflow's HTTP limits and
    # the tracking credentials (service.tracking.store.move_credentials) so the URI itself never carries a secret.
    # Object storage (service.storage): only the endpoint of an S3-compatible store is forwarded. Bucket credentials
    # never travel in a runtime env (Ray shows it in `ray list jobs` and the dashboard): each node has its own
    # (env from a Secret, a credentials file, an instance role), as deploy/ sets them up.
    forwarded = ((*HTTP_DEFAULTS, *CREDENTIAL_VARS, *STORAGE_ENDPOINT_VARS) if address else tuple(HTTP_DEFAULTS))
    env["env_vars"].update({key: os.environ[key] for key in forwarded if key in os.environ and key not in preset})
    context = ray.init(address=address or None, runtime_env=env, log_to_driver=True)
    install_sigterm_handler()   # ray.init's own handler would exit without closing the MLflow runs
    if not forward_all:
        route_worker_logs(forward_all)
        # Tune's status table and trial errors are printed, not logged; its INFO records ("Wrote the latest version
        # of all result files ...") are not for the user, its warnings (e.g. a trial that cannot fit) are.
        for name in ("ray.tune", "ray.train", "ray.air"):
            logging.getLogger(name).setLevel(logging.WARNING)
        session = (getattr(context, "address_info", None) or {}).get("session_dir") or "/tmp/ray/session_latest"
        print(f"Ray's own output (workers, Train controllers): {session}/logs on each node, or `ray logs`; "
              "--ray-logs shows it here", file=sys.stderr)


def default_concurrency(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """Trials that fit the cluster at once: workers x CPUs (and GPUs) per trial, never oversubscribed."""
    res = ray.cluster_resources()
    by_cpu = int(res.get("CPU", 1) // max(1e-9, workers * cpus_per_worker))
    by_gpu = int(res.get("GPU", 0) // (workers * gpus_per_worker)) if gpus_per_worker else by_cpu
    return max(1, min(by_cpu, by_gpu))
