"""Hyper-parameter sweeps: `python -m service.sweep {tdsm,cocodiff} [--smoke] [--splits NAME ...]`.

Ray Tune samples configs from search_spaces/<method>.yaml; each trial trains in its Tune trial process (one
worker) or on a Ray Train TorchTrainer (N workers, DDP) and is ranked on validation data (TDSM: classes carved
from the seen ones; CoCoDiff: a draw of the training split), never on test. Every trial is a nested MLflow run
under one parent run per split; the best config is written as YAML for `python -m service.final`. This module
checks the command line (every split and the space before Ray starts) and prints the summaries; the sweep itself
is service.orchestration.sweep.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from service.cli.options import (
    DEFAULT_STORAGE,
    MethodFlags,
    add_config_args,
    default_splits,
    resolve_config,
    searched_keys_comment,
    storage_arg,
)
from service.data.splits import REPO_SPACES, load_splits, splits_file
from service.methods import METHODS
from service.methods.base import SweepOptions, trial_driver
from service.methods.search_space import check_against_config, load_search_space
from service.process import exits_cleanly
from trainers.config import build_config, dump_yaml, to_plain
from trainers.errors import InputError

SWEEP_EXAMPLES = """examples:
  python -m service.sweep tdsm --smoke                  # embedded default: skeleton chain + 4 trials, minutes on 2 CPUs
  python -m service.sweep tdsm --splits synthetic-skeleton synthetic-u12 --num-samples 32 \\
      --workers-per-trial 2 --gpus-per-worker 1 --tracking-uri http://mlflow:5000
  python -m service.sweep cocodiff --splits ntu60-xsub --config service/configs/cocodiff_paper.yaml --search optuna
  python -m service.sweep tdsm --smoke --resume         # continue the latest such sweep after a crash or Ctrl-C

Trials are ranked on <metric>_max of the search space (e.g. val/zsl_top1_max: the best validation score a trial
reached, the value of the checkpoint it keeps), never on test; then: python -m service.final --from <best_config.yaml>
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.sweep", description=__doc__.splitlines()[0],
                                epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=list(METHODS),
                   help="; ".join(f"{m.name}: {m.about}" for m in METHODS.values()))
    p.add_argument("--space", type=Path, help="search space YAML (default: search_spaces/<method>.yaml)")
    p.add_argument("--num-samples", type=int, help="trials per split (default: 16, or the space's smoke count)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                   help="asha (default): stop weak trials early at their evaluations (reduction factor 2); "
                        "fifo: every trial trains all train.steps")
    p.add_argument("--search", choices=["random", "optuna"], default="random",
                   help="random (default): independent draws from the space; optuna: TPE guided by finished "
                        "trials (needs the optuna extra: pip install -e '.[optuna]')")
    p.add_argument("--max-concurrent", type=int, help="concurrent trials (default: fit the cluster's CPUs/GPUs)")
    p.add_argument("--workers-per-trial", type=int, default=1,
                   help="Ray Train workers per trial (DDP when > 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per Ray Train worker (default 0: CPU; fractions share a GPU, e.g. 0.5); also used by "
                        "the skeleton chain's encoder")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="also the torch thread count per worker")
    p.add_argument("--trial-retries", type=int, default=1, help="restarts of a crashed trial (from its checkpoint)")
    p.add_argument("--trial-driver", choices=["auto", "direct", "train"], default="auto",
                   help="auto (default): direct for one worker per trial, else train; direct: the Tune trial runs "
                        "its worker loop itself (starts in seconds); train: a Ray Train TorchTrainer per trial "
                        "(needed for DDP)")
    p.add_argument("--splits", nargs="+",
                   help="named splits from --splits-file (default: the data flags, else the method's embedded default)")
    p.add_argument("--splits-file", type=Path, help="default: search_spaces/<method>_splits.yaml")
    p.add_argument("--experiment-name", help="MLflow experiment (default: <method>-<split>-sweeps)")
    p.add_argument("--name", help="sweep name (default: <method>-<split>[-smoke]-<time>; --resume: the latest)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--storage-path", type=storage_arg, default=DEFAULT_STORAGE,
                   help="Ray Tune/Train results, checkpoints and the cached skeleton chain: a folder (shared by every "
                        "node on a cluster) or an object-store URI such as s3://bucket/prefix (AWS_ENDPOINT_URL for "
                        "MinIO and other S3-compatible stores)"),
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local one)")
    p.add_argument("--resume", action="store_true", help="continue the sweep named by --name (or the latest one)")
    p.add_argument("--smoke", action="store_true", help="a tiny sweep that finishes in minutes on 2 CPU cores")
    p.add_argument("--ray-logs", action="store_true",
                   help="also print everything Ray's workers print (default: only our own lines; the rest stays in "
                        "Ray's log files, path printed at start)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the search (the same command samples the same configs) and of trial training")
    add_config_args(p)
    p.method_flags = MethodFlags(p, "sweep")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a bar per download reads as noise
    method = METHODS[args.method]
    extra = parser.method_flags.options(args, method)
    trial_driver(args.trial_driver, args.workers_per_trial)          # direct with DDP: refused before Ray starts
    space_path = args.space or REPO_SPACES / f"{method.name}.yaml"
    space = load_search_space(space_path)
    if space.method != method.name:
        raise InputError(f"{space_path}: a search space for {space.method}, not {method.name}")
    smoke_cfg = space.smoke.config if (args.smoke and space.smoke) else {}
    if args.smoke:
        space = space.for_smoke()
    num_samples = args.num_samples or (space.smoke.num_samples if args.smoke and space.smoke else 16)
    cfg = resolve_config(method, args, extra=smoke_cfg, flags=parser.method_flags)
    searched = [item.split("=", 1)[0].strip() for item in args.overrides
                if item.split("=", 1)[0].strip() in space.params]
    if searched:     # each trial's sampled value would silently replace it
        raise InputError(f"--set {searched[0]}: {space_path} searches this key (params.{searched[0]}); fix it there "
                         "(e.g. {choice: [VALUE]}) or pass a --space without it")
    names = args.splits or default_splits(method, args, parser.method_flags)
    splits = (load_splits(splits_file(method.name, args.splits_file), names) if names
              else [(method.split_name(cfg), {})])
    comment = searched_keys_comment(method, space, space_path)
    if args.print_config and not names:     # nothing to resolve: answered before anything heavy is imported
        print(comment + dump_yaml(cfg), end="")
        return 0

    def split_tree(overrides: dict[str, Any]) -> dict[str, Any]:
        tree = method.absolute_paths(build_config(method.config_cls, to_plain(cfg), overrides).model_dump(mode="json"))
        check_against_config(space, method.config_cls, tree, space_path)
        return tree

    if not args.print_config:
        for _, overrides in splits:      # every config and space checked before Ray starts or a chain trains
            split_tree({k: v for k, v in overrides.items() if k != "chain"})
    from service.orchestration import sweep as job  # Ray, torch, MLflow: only once the command line is known
    if args.print_config:    # as service.run: each split applied, its chain resolved to cached paths, nothing trained
        print(job.config_yamls(method.config_cls, cfg, splits, splits_file(method.name, args.splits_file),
                               args.storage_path, comment), end="")
        return 0
    opts = SweepOptions(
        method=method, space=space, num_samples=num_samples, smoke=args.smoke,
        scheduler=args.scheduler, search=args.search, seed=args.seed, max_concurrent=args.max_concurrent,
        workers_per_trial=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker, trial_retries=args.trial_retries, trial_driver=args.trial_driver,
        experiment_name=args.experiment_name, name=args.name, tracking_uri=args.tracking_uri,
        storage=args.storage_path, address=args.address, resume=args.resume, ray_logs=args.ray_logs, extra=extra)
    return job.sweep(opts, splits, split_tree)


if __name__ == "__main__":
    sys.exit(main())
