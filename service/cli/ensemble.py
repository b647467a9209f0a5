"""Score-level fusion of saved logits: `python -m service.ensemble SOURCE [SOURCE ...] [--weights W ...]`.

Each SOURCE is an MLflow run id (its `predictions/<split>_logits.npy` and `_labels.npy` artifacts, as logged by
`service.run cocodiff` and `service.final`) or a local folder holding those two files. Typically one run per
input stream (joint / bone / motion) of the same data: all sources must hold the same split in the same order
(identical labels) over the same classes. The fused logits are the weighted sum of the sources' logits
(`trainers.cocodiff_eval.ensemble_logits`). Prints one JSON line (each source's top-1/top-5 and stream, the fused
top-1/top-5) and logs an MLflow run whose predictions/ are the fused logits, so it can itself be a SOURCE.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from service.process import exits_cleanly
from trainers.errors import InputError

# service.tracking.ensemble.DEFAULT_EXPERIMENT, named here for --help (that module loads MLflow and torch)
DEFAULT_EXPERIMENT = "cocodiff-ensemble"

ENSEMBLE_EXAMPLES = """examples:
  python -m service.ensemble <joint_run_id> <bone_run_id> <motion_run_id> --weights 1 1 0.5
  python -m service.ensemble runs/joint-preds runs/bone-preds --out fused/   # folders of test_logits/labels.npy
  python -m service.ensemble <run_id_a> <run_id_b> --split val --names class_names.txt
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.ensemble", description=__doc__.splitlines()[0],
                                epilog=ENSEMBLE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="MLflow run id, or a folder holding <split>_logits.npy and <split>_labels.npy")
    p.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per SOURCE (default: all 1)")
    p.add_argument("--split", default="test", help="which saved predictions to fuse (default: test)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment-name",
                   help=f"MLflow experiment (default: the first run SOURCE's, else {DEFAULT_EXPERIMENT})")
    p.add_argument("--out", type=Path, help="also write the fused <split>_logits.npy and <split>_labels.npy here")
    p.add_argument("--names", type=Path, help="class names for the confusion plot, one per line (default: ids)")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    weights = args.weights or [1.0] * len(args.sources)
    if not all(math.isfinite(w) for w in weights):
        raise InputError(f"--weights {' '.join(map(str, weights))}: expected finite numbers")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise InputError(f"--weights {' '.join(map(str, weights))}: expected weights >= 0, at least one > 0 (all "
                         "zero would fuse to zero logits, a meaningless accuracy)")
    if len(weights) != len(args.sources):
        raise InputError(f"--weights: {len(weights)} weights for {len(args.sources)} sources (one per SOURCE)")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out}: is a file; expected a folder (created when missing)")
    from service.orchestration import ensemble as job  # torch, MLflow: only once the command line is known
    print(json.dumps(job.ensemble(args.sources, weights, args.split, tracking_uri=args.tracking_uri,
                                  experiment_name=args.experiment_name, out=args.out, names_file=args.names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
