"""Final runs from a sweep's best config: `python -m service.final --from PATH_OR_RUN_ID [--seeds N] [--ablation]`.

The method is the config's own (`method:`).
- tdsm: retrains on all seen classes (training + validation classes) once per seed, evaluates the unseen test
  classes once per seed over K evaluation noise draws (the paper averages 10), reports mean ± std, writes a
  markdown table per split (like the paper's Table 1) and registers the seed-0 model in the MLflow registry.
- cocodiff: retrains on training + validation data once per seed for train.steps steps (nothing is held out,
  so the final weights are used), evaluates the test split once per seed with the exported classifier
  (backbone + head only), reports mean ± std, writes a markdown table and registers the seed-0 classifier.
  `--ablation` trains the same config twice per seed, module.enabled=false (baseline) and true (+CoCoDiff),
  under the same protocol, and reports both and their paired difference (nothing is registered).
  `--streams joint bone motion` trains one classifier per input stream (backbone.stream) for each arm and seed,
  fuses the streams' test logits per seed (equal weights, as `service.ensemble`), logs the fused predictions as a
  child run, and reports a row per stream plus an 'ensemble' row per arm; the seed-0 classifiers of the streams
  are registered together as one model (`cocodiff-<split>-joint-bone-motion`) that fuses their logits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.cli.options import DEFAULT_STORAGE, MethodFlags, storage_arg
from service.methods import METHODS
from service.methods.base import FinalOptions
from service.process import exits_cleanly
from trainers.errors import InputError

FINAL_EXAMPLES = """examples:
  python -m service.final --from ~/skeldiff_results/<sweep>/best_config.yaml --seeds 3 --noise-draws 10
  python -m service.final --from RUN_ID --set train.steps=2000 --no-register   # a sweep's parent or trial run
  python -m service.final --from <best_config.yaml> --ablation --seeds 5     # cocodiff: backbone alone vs +CoCoDiff
  python -m service.final --from <best_config.yaml> --streams joint bone motion --splits ntu60-xsub ntu60-xview
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.final", description=__doc__.splitlines()[0],
                                epilog=FINAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True,
                   help="best_config.yaml written by a sweep, or an MLflow run id (sweep parent or trial)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    p.add_argument("--splits", nargs="+", help="re-target the config to named splits (default: its own data)")
    p.add_argument("--splits-file", type=Path, help="default: search_spaces/<method>_splits.yaml")
    p.add_argument("--storage-path", type=storage_arg, default=DEFAULT_STORAGE,
                   help="where a split's cached skeleton chain lives and --out defaults under (as for service.sweep: "
                        "a folder or an s3:// / gs:// URI)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one dotted key of the --from config, e.g. --set train.steps=2000 (repeatable; "
                        "applied after --splits; tdsm: --noise-draws sets eval.noise_draws and t_test is never tuned)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment-name", help="MLflow experiment (default: <method>-<split>)")
    p.add_argument("--out", type=storage_arg,
                   help="folder for the tables (default: <storage-path>/final/<method>-<splits>-<time>)")
    p.add_argument("--no-register", action="store_true", help="skip the model registry")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.method_flags = MethodFlags(p, "final")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.method_flags.check_values(args)          # e.g. --streams names: before the source is read
    from service.orchestration import final as job  # torch, MLflow: only once the command line is known
    source = job.read_source(args.source, args.tracking_uri, args.out or args.storage_path)
    name = source.tree.get("method", "tdsm")
    if name not in METHODS:
        raise InputError(f"--from {args.source}: method {name!r} is not one of {', '.join(METHODS)}")
    method = METHODS[name]
    if args.seeds < 1:
        raise InputError(f"--seeds must be >= 1 (got {args.seeds})")
    opts = FinalOptions(
        method=method, source=args.source, sweep_run_id=source.sweep_run_id, seeds=args.seeds,
        overrides=tuple(args.overrides), tracking_uri=source.tracking_uri, experiment_name=args.experiment_name,
        out=args.out, register=not args.no_register, progress=not args.no_progress, splits_file=args.splits_file,
        extra=parser.method_flags.options(args, method))
    print(json.dumps(job.final(opts, source, args.splits, args.storage_path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
