"""Rank actions for skeleton files with a registered zero-shot model:
`python -m service.predict --model models:/tdsm-<split>@final INPUTS... [--classes A B ... | --classes-file F]`.

INPUTS are NTU `.skeleton` files, Kinetics-skeleton `.json` clips, PKU-MMD `.txt` sequences (each read whole, through
the same readers and preprocessing as `service.prepare`), folders of them, prepared folders (`service.prepare`
output: every row of data.npy) or `.npy` arrays of model input rows. Files that cannot be read are listed and
skipped. Prints one row per sequence (best label, its score, the top k) and writes them to --out as CSV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.process import exits_cleanly
from trainers.errors import InputError
from trainers.io import atomic_write_text
from trainers.prompts import read_prompt_file

EXAMPLES = """examples:
  python -m service.predict --model models:/tdsm-synthetic-skeleton@final raw/S001C001P001R001A011.skeleton
  python -m service.predict --model models:/tdsm-synthetic-skeleton@final raw/ --classes "wave a hand" "jump up" \\
      --top-k 2 --out predictions.csv
  python -m service.predict --model models:/tdsm-ntu60-synse-55-5@final prepared/ --classes-file classes.txt \\
      --descriptions-file descriptions.txt
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.predict", description=__doc__.splitlines()[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="skeleton files, folders of them, prepared folders, .npy")
    p.add_argument("--model", required=True, help="a model URI: models:/NAME@ALIAS, runs:/ID/PATH or a folder")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--classes", nargs="+", metavar="NAME", help="candidate class names (default: the model's "
                                                                     "split's unseen classes)")
    names.add_argument("--classes-file", type=Path, help="candidate class names, one per line (or a CSV's label "
                                                         "column)")
    p.add_argument("--descriptions-file", type=Path, help="one description per candidate class, in the same order")
    p.add_argument("--top-k", type=int, default=5, help="labels listed per sequence (default 5)")
    p.add_argument("--out", type=Path, help="CSV of the predictions (default: only printed)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params: dict = {"top_k": args.top_k}
    if args.classes or args.classes_file:
        params["classes"] = args.classes or read_prompt_file(args.classes_file)
    if args.descriptions_file:
        if "classes" not in params:
            raise InputError("--descriptions-file: name the classes they describe (--classes or --classes-file)")
        params["descriptions"] = read_prompt_file(args.descriptions_file, expected_count=len(params["classes"]))
    missing = [p for p in args.inputs if not p.exists()]
    if missing:
        raise InputError(f"{missing[0]}: no such file or folder")
    from service.orchestration import predict as job  # torch, MLflow: only once the command line is known
    count, text = job.predict(args.model, args.inputs, params, args.tracking_uri)
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {count} predictions to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
