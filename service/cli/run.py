"""One local run, no Ray: `python -m service.run {tdsm,cocodiff} [--config F] [--set k=v ...]`.

tdsm: trains on the seen classes minus the validation classes, keeps the best-on-validation weights, evaluates
the unseen test classes once at the end. cocodiff: trains the backbone (+ the CoCoDiff module) on the training
split, keeps the best-on-validation classifier, evaluates the test split once at the end with the exported
classifier (backbone + head only). Both log everything to MLflow and print one JSON line of final metrics.
Re-running the same command resumes from the run directory's last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.cli.options import (
    DEFAULT_STORAGE,
    MethodFlags,
    add_config_args,
    default_splits,
    resolve_config,
    searched_keys_comment,
)
from service.data.splits import REPO_SPACES, load_splits, splits_file
from service.methods import METHODS
from service.methods.base import RunOptions
from service.methods.search_space import load_search_space
from service.process import exits_cleanly
from service.storage import Storage
from trainers.config import dump_yaml

EXAMPLES = """examples:
  python -m service.run tdsm                      # the embedded default: skeleton chain, then TDSM (= make demo)
  python -m service.run tdsm --print-config       # the config that would run (split and chain resolved), as YAML
  python -m service.run tdsm --split synthetic-u5 --set optim.lr=3e-4 --set model.preset=small
  python -m service.run tdsm --features DATA/shift_ntu60_5_r --unseen DATA/label_splits/ru5.npy \\
      --val-unseen DATA/label_splits/rv5_0.npy --class-names ntu120.csv --descriptions ntu120_llm.txt \\
      --set text.num_classes=60                   # NTU-60: the first 60 rows of the NTU-120 prompts
  python -m service.run cocodiff --config service/configs/cocodiff_paper.yaml --split ntu60-xsub

The last stdout line is JSON: <objective>_max (the kept checkpoint's validation score: val/zsl_top1_max for
tdsm, val/top1_max for cocodiff), best_step, the test metrics, mlflow_run_id, run_dir; the MLflow run holds the
same values under the same names and a best_step tag.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.run", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=list(METHODS),
                   help="; ".join(f"{m.name}: {m.about}" for m in METHODS.values()))
    add_config_args(p)
    p.method_flags = MethodFlags(p, "run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment-name", help="MLflow experiment (default: <method>-<dataset>)")
    p.add_argument("--run-dir", type=Path, help="checkpoints here (default: runs/<method>-<dataset>-<config hash>)")
    p.add_argument("--fresh", action="store_true", help="delete the run dir first instead of resuming")
    p.add_argument("--split", help="a named split of --splits-file (default: the data flags, else the method's "
                                   "embedded default: tdsm = synthetic-skeleton)")
    p.add_argument("--splits-file", type=Path, help="default: search_spaces/<method>_splits.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    method = METHODS[args.method]
    extra = parser.method_flags.options(args, method)
    cfg = resolve_config(method, args, flags=parser.method_flags)
    split = args.split or (default_splits(method, args, parser.method_flags) or [None])[0]
    overrides = None if split is None else load_splits(splits_file(method.name, args.splits_file), [split])[0][1]
    storage = Storage.parse(DEFAULT_STORAGE)
    searched = ""
    if args.print_config:
        space_path = REPO_SPACES / f"{method.name}.yaml"
        searched = searched_keys_comment(method, load_search_space(space_path), space_path)
        if overrides is None:     # nothing to resolve: answered before anything heavy is imported
            print(searched + dump_yaml(cfg), end="")
            return 0
    from service.orchestration import run as job  # torch, MLflow: only once the command line is known
    if args.print_config:
        print(job.resolved_config_yaml(method.config_cls, cfg, split, overrides,
                                       splits_file(method.name, args.splits_file), storage, searched), end="")
        return 0
    opts = RunOptions(method=method, split=split, tracking_uri=args.tracking_uri,
                      experiment_name=args.experiment_name, run_dir=args.run_dir, fresh=args.fresh,
                      progress=not args.no_progress, extra=extra)
    print(json.dumps(job.run(opts, cfg, overrides, storage)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
