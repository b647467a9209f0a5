"""The paper's table across splits: `python -m service.report --splits A B ... [--tracking-uri URI] [--out DIR]`.

The table is the method's (`Method.report`; TDSM's columns: service.tracking.report); a method without one says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.cli.options import DEFAULT_STORAGE, storage_arg
from service.data.splits import load_references, splits_file
from service.methods import METHODS
from service.process import exits_cleanly
from service.storage import Storage
from trainers.config import load_yaml
from trainers.errors import InputError, short_repr

REPORT_EXAMPLES = """examples:
  python -m service.report --splits ntu60-synse-55-5 ntu60-synse-48-12 --tracking-uri http://mlflow:5000
  python -m service.report --splits synthetic-skeleton --out report/ --no-log
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.report", description=__doc__.splitlines()[0],
                                epilog=REPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=[m.name for m in METHODS.values() if m.report_table], default="tdsm",
                   help="whose final runs and table (default: %(default)s, the paper's Table 1)")
    p.add_argument("--splits", nargs="+", required=True, help="named splits (their latest final runs)")
    p.add_argument("--splits-file", type=Path, help="default: search_spaces/<method>_splits.yaml")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--out", type=storage_arg,
                   help="folder for the table (tdsm: paper_table.md / .csv; default: $SKELDIFF_RESULTS/report)")
    p.add_argument("--no-log", action="store_true",
                   help="do not attach the table to the final runs nor log it in experiment skeldiff-report")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    method = METHODS[args.method]
    path = splits_file(method.name, args.splits_file)
    if not path.is_file():
        raise InputError(f"--splits-file {path}: not found")
    known = load_yaml(path)
    unknown = [name for name in args.splits if name not in known]
    if unknown:    # a `not run` row with exit 0 said nothing about the typo
        raise InputError(f"--splits {short_repr(unknown[0])}: unknown split; known in {path}: {', '.join(known)}")
    refs = load_references(path, list(args.splits))
    out = args.out or Storage.parse(DEFAULT_STORAGE) / "report"
    from service.methods import implemented  # MLflow, torch: only once the command line is known
    print(implemented.implementation(method).report(args.tracking_uri, dict.fromkeys(args.splits), refs, out,
                                                    log=not args.no_log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
