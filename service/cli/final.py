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
import functools
import json
import sys
import time
from pathlib import Path

from service.cli.options import DEFAULT_STORAGE, storage_arg, train_encoder_logged
from service.data.chain import resolve_chain
from service.data.splits import load_splits, splits_file
from service.methods import METHODS
from service.methods.cocodiff import STREAMS, check_streams
from service.process import exits_cleanly
from service.storage import Storage
from service.tracking.sources import load_source, source_sweep_run_id
from service.tracking.store import resolve_tracking_uri
from trainers.config import build_config
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
    p.add_argument("--noise-draws", type=int, default=10,
                   help="tdsm: evaluation noise draws per seed (default: %(default)s, the paper's)")
    p.add_argument("--ablation", action="store_true",
                   help="cocodiff: baseline (module.enabled=false) vs +CoCoDiff, same seeds and protocol")
    p.add_argument("--streams", nargs="+", metavar="STREAM",
                   help=f"cocodiff: one classifier per input stream ({', '.join(STREAMS)}) per arm and seed, and "
                        "their equal-weight score fusion per seed (an 'ensemble' row; the seed-0 stream classifiers "
                        "are registered as one fused model)")
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
    return p


def default_out(args, method: str, splits: list[str]) -> Storage:
    """<storage-path>/final/<method>-<splits>-<time>: never a folder in the working directory (the repository)."""
    label = "+".join(splits) if len(splits) <= 3 else f"{splits[0]}-and-{len(splits) - 1}-more"
    return args.storage_path / "final" / f"{method}-{label}-{time.strftime('%Y%m%d-%H%M%S')}"


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_streams(args.streams)
    uri = resolve_tracking_uri(args.tracking_uri)
    (args.out or args.storage_path).check_writable()
    tree, split_name, run_tags = load_source(args.source, uri)
    name = tree.get("method", "tdsm")
    if name not in METHODS:
        raise InputError(f"--from {args.source}: method {name!r} is not one of {', '.join(METHODS)}")
    method = METHODS[name]
    if run_tags is not None:        # a run's own config.yaml: what that run chose on validation (TDSM: its t_test)
        tree, _ = method.best_config(tree, run_tags)
    cfg = build_config(method.config_cls, tree, source=args.source)  # fail early, naming the offending key
    if args.seeds < 1:
        raise InputError(f"--seeds must be >= 1 (got {args.seeds})")
    method.check_final(args)
    args.sweep_run_id = source_sweep_run_id(args.source, uri)
    if args.splits:   # the same config on other data (a split's skeleton chain built in this process if needed)
        storage = args.storage_path
        trainer = functools.partial(train_encoder_logged, tracking_uri=uri)    # an MLflow run, as in service.run
        targets = [(split, method.absolute_paths(build_config(method.config_cls, tree,
                                                              resolve_chain(ov, storage, trainer))
                                                 .model_dump(mode="json")))
                   for split, ov in load_splits(splits_file(name, args.splits_file), args.splits)]
    else:
        targets = [(split_name or method.split_name(cfg), tree)]
    args.out = args.out or default_out(args, name, [split for split, _ in targets])
    print(json.dumps(method.final(args, targets, uri)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
