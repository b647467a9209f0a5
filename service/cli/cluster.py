"""Stop the local Ray head that `make cluster` started: `python -m service.cluster stop TEMP_DIR`.

Only the processes under that temp dir, never other Ray clusters of the machine (see
service.orchestration.cluster.stop_cluster).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service.process import exits_cleanly
from trainers.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.cluster", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    stop = sub.add_parser("stop", help="stop the head started with this --temp-dir and everything under it")
    stop.add_argument("temp_dir", type=Path, help="the --temp-dir the head was started with")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.temp_dir.is_dir():
        raise InputError(f"{args.temp_dir}: no such Ray temp dir (expected the --temp-dir of `make cluster`)")
    from service.orchestration import cluster as job  # Ray, MLflow: only once the command line is known
    print(f"stopped {job.stop_cluster(args.temp_dir)} Ray processes under {args.temp_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
