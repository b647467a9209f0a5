"""The paper's table across splits: `python -m service.report --splits A B ... [--tracking-uri URI] [--out DIR]`.

What each column means: service.tracking.report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.cli.options import DEFAULT_STORAGE, storage_arg
from service.data.splits import load_references, splits_file
from service.process import exits_cleanly
from service.storage import Storage
from service.tracking.report import REPORT_EXPERIMENT, write_report
from service.tracking.store import resolve_tracking_uri
from trainers.config import load_yaml
from trainers.errors import InputError, short_repr
from trainers.runtime import apply_thread_policy

REPORT_EXAMPLES = """examples:
  python -m service.report --splits ntu60-synse-55-5 ntu60-synse-48-12 --tracking-uri http://mlflow:5000
  python -m service.report --splits synthetic-skeleton --out report/ --no-log
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.report", description=__doc__.splitlines()[0],
                                epilog=REPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", nargs="+", required=True, help="named splits (their latest TDSM final runs)")
    p.add_argument("--splits-file", type=Path, help="default: search_spaces/tdsm_splits.yaml")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--out", type=storage_arg,
                   help="folder for paper_table.md / .csv (default: $SKELDIFF_RESULTS/report)")
    p.add_argument("--no-log", action="store_true",
                   help=f"do not attach the table to the final runs nor log it in experiment {REPORT_EXPERIMENT}")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    apply_thread_policy()   # CPU threads sized to this process's cores, before any parallel work
    args = build_parser().parse_args(argv)
    path = splits_file("tdsm", args.splits_file)
    if not path.is_file():
        raise InputError(f"--splits-file {path}: not found")
    known = load_yaml(path)
    unknown = [name for name in args.splits if name not in known]
    if unknown:    # a `not run` row with exit 0 said nothing about the typo
        raise InputError(f"--splits {short_repr(unknown[0])}: unknown split; known in {path}: {', '.join(known)}")
    uri = resolve_tracking_uri(args.tracking_uri)
    refs = load_references(path, list(args.splits))
    out = args.out or Storage.parse(DEFAULT_STORAGE) / "report"
    md, _ = write_report(uri, dict.fromkeys(args.splits), refs, out, log=not args.no_log, report_run=not args.no_log)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
