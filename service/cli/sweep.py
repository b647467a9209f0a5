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
import json
import os
import sys
from pathlib import Path
from typing import Any

from service.cli.options import (
    DEFAULT_STORAGE,
    add_config_args,
    default_splits,
    resolve_config,
    resolved_config_yaml,
    searched_keys_comment,
    storage_arg,
)
from service.data.splits import REPO_SPACES, load_splits, splits_file
from service.methods import METHODS
from service.methods.search_space import check_against_config, load_search_space
from service.orchestration.sweep import run_sweeps
from service.orchestration.trial import trial_driver
from service.process import exits_cleanly
from service.tracking.store import resolve_tracking_uri
from service.tracking.trials import ui_command
from trainers.config import build_config, to_plain
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
                   help="tdsm: zero-shot (TDSM); cocodiff: supervised classification (CoCoDiff)")
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
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a bar per download reads as noise
    method = METHODS[args.method]
    trial_driver(args.trial_driver, args.workers_per_trial)          # direct with DDP: refused before Ray starts
    space_path = args.space or REPO_SPACES / f"{args.method}.yaml"
    space = load_search_space(space_path)
    if space.method != args.method:
        raise InputError(f"{space_path}: a search space for {space.method}, not {args.method}")
    smoke_cfg = space.smoke.config if (args.smoke and space.smoke) else {}
    if args.smoke:
        space = space.for_smoke()
    num_samples = args.num_samples or (space.smoke.num_samples if args.smoke and space.smoke else 16)
    cfg = resolve_config(args.method, args, extra=smoke_cfg)
    searched = [item.split("=", 1)[0].strip() for item in args.overrides
                if item.split("=", 1)[0].strip() in space.params]
    if searched:     # each trial's sampled value would silently replace it
        raise InputError(f"--set {searched[0]}: {space_path} searches this key (params.{searched[0]}); fix it there "
                         "(e.g. {choice: [VALUE]}) or pass a --space without it")
    names = args.splits or default_splits(args.method, args)
    splits = (load_splits(splits_file(args.method, args.splits_file), names) if names
              else [(method.split_name(cfg), {})])
    if args.print_config:    # as service.run: each split applied, its chain resolved to cached paths, nothing trained
        searched = searched_keys_comment(args.method, space, space_path)
        print("---\n".join(resolved_config_yaml(args.method, cfg, split, overrides if names else None,
                                              splits_file(args.method, args.splits_file),
                                              args.storage_path, searched)
                             for split, overrides in splits), end="")
        return 0
    uri = resolve_tracking_uri(args.tracking_uri)
    args.storage_path.check_writable()      # a missing bucket or credentials: one line now, not inside Ray later
    config_cls = method.config_cls

    def split_tree(overrides: dict[str, Any]) -> dict[str, Any]:
        tree = method.absolute_paths(build_config(config_cls, to_plain(cfg), overrides).model_dump(mode="json"))
        check_against_config(space, config_cls, tree, space_path)
        return tree

    for _, overrides in splits:      # every config and space checked before Ray starts or a chain trains
        split_tree({k: v for k, v in overrides.items() if k != "chain"})
    summaries = run_sweeps(args, args.method, splits, split_tree, space, num_samples, uri)
    for s in summaries:
        at = f" at t_test={s['best_t_test']}" if "best_t_test" in s else ""
        print(f"[{s['split']}] best trial {s.get('best_trial')} ({s.get('best_run_id')}): "
              f"{s.get('metric')}={s.get('best_metric')}{at}; "
              f"{s.get('children')} trial runs in {s.get('fit_s')} s", file=sys.stderr)
        print(f"[{s['split']}] best config: {s.get('best_config')}", file=sys.stderr)
        if s.get("trials_csv"):
            print(f"[{s['split']}] ranked trials: {s['trials_csv']}; MLflow runs table of this sweep (experiment "
                  f"{s.get('experiment')}): {s.get('mlflow_view')}", file=sys.stderr)
            print(f"[{s['split']}] its charts, objective first: {s.get('mlflow_charts')}", file=sys.stderr)
        print(f"[{s['split']}] final runs: python -m service.final --from {s.get('best_config')}", file=sys.stderr)
    print(f"browse: {ui_command(uri)}", file=sys.stderr)
    print(json.dumps({"sweeps": summaries, "tracking_uri": uri}))
    failed = [s for s in summaries if not s.get("best_run_id")]
    for s in failed:      # last on stderr; exit 2 when the trials failed on bad input (e.g. a diverging config)
        print(f"error: {s.get('error') or s['split'] + ': no best trial'}", file=sys.stderr)
    return 0 if not failed else (2 if all(s.get("input_error") for s in failed) else 1)
