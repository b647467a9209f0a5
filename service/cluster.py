"""Stop the local Ray head that `make cluster` started: `python -m service.cluster stop TEMP_DIR`.

`ray stop` kills every Ray process of the machine (other users' clusters, a local sweep's `ray.init()`), so
`make cluster` gives its head a temp dir of its own and this stops only the processes under that temp dir:
every Ray daemon names its session directory (`TEMP_DIR/session_...`) on its command line, and the
workers, agents and job drivers are their descendants.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path: the one `ray stop` uses)
import psutil

from service.cli import exits_cleanly
from trainers.errors import InputError


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
    # A stale address file would make the next `ray.init(_temp_dir=...)` attach to the dead head (RAY_MLFLOW_NOTES.md).
    (temp_dir / "ray_current_cluster").unlink(missing_ok=True)
    return len(procs)


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.cluster", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    stop = sub.add_parser("stop", help="stop the head started with this --temp-dir and everything under it")
    stop.add_argument("temp_dir", type=Path, help="the --temp-dir the head was started with")
    args = p.parse_args(argv)
    if not args.temp_dir.is_dir():
        raise InputError(f"{args.temp_dir}: no such Ray temp dir (expected the --temp-dir of `make cluster`)")
    print(f"stopped {stop_cluster(args.temp_dir)} Ray processes under {args.temp_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
