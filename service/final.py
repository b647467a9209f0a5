"""Final runs from a sweep's best config: `python -m service.final --from PATH_OR_RUN_ID [--seeds N]`.

Retrains on all seen classes (training + validation classes) once per seed, evaluates the unseen test classes
once per seed over K evaluation noise draws (the paper averages 10), reports mean ± std, writes a markdown
table per split (like the paper's Table 1) and registers the seed-0 model in the MLflow model registry.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from service.cli import exits_cleanly
from service.run import log_zsl_plots
from service.sweep import REPO_SPACES, STATE_FILE, absolute_paths, load_splits
from service.tracking import MLflowReporter, resolve_tracking_uri, standard_tags
from trainers.config import TDSMConfig, build_config, dump_yaml, flatten, load_yaml, parse_override, to_plain
from trainers.errors import InputError
from trainers.io import atomic_write_text
from trainers.tdsm_fit import evaluate_split, fit_tdsm
from trainers.tdsm_task import prepare_tdsm


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.final", description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="source", required=True,
                   help="best_config.yaml written by a sweep, or an MLflow run id (sweep parent or trial)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    p.add_argument("--noise-draws", type=int, default=10, help="evaluation noise draws per seed (paper: 10)")
    p.add_argument("--splits", nargs="+", help="re-target the config to named splits (default: its own data)")
    p.add_argument("--splits-file", type=Path, default=REPO_SPACES / "splits.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment-name", help="MLflow experiment (default: tdsm-<split>)")
    p.add_argument("--out", type=Path, default=Path("final"), help="folder for tables and checkpoints")
    p.add_argument("--no-register", action="store_true", help="skip the model registry")
    p.add_argument("--no-progress", action="store_true")
    return p


def load_source(source: str, uri: str) -> tuple[dict[str, Any], str | None]:
    """(config tree, split name if known) from a YAML path or an MLflow run (a sweep parent or a trial)."""
    path = Path(source)
    if path.is_file():
        tree = load_yaml(path)
        state = path.parent / STATE_FILE   # written beside best_config.yaml by the sweep
        return tree, json.loads(state.read_text()).get("split") if state.is_file() else None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        run = client.get_run(source)
    except MlflowException:
        raise InputError(f"--from {source}: neither a config file nor a run id in {uri}") from None
    with tempfile.TemporaryDirectory() as tmp:
        names = {a.path for a in client.list_artifacts(source)}
        name = "best_config.yaml" if "best_config.yaml" in names else "config.yaml"
        if name not in names:
            raise InputError(f"--from {source}: run has no best_config.yaml or config.yaml artifact")
        tree = yaml.safe_load(Path(client.download_artifacts(source, name, tmp)).read_text())
    if name == "config.yaml" and "best_t_test" in run.data.tags:
        tree["eval"].update(t_test=int(run.data.tags["best_t_test"]), tune_t_test=False)
    return tree, run.data.tags.get("split")


def seed_stats(per_seed: list[dict[str, float]], per_draw: list[list[float]]) -> dict[str, float]:
    """Mean ± std over seeds (each seed's mean over draws) and over every (seed, draw) pair."""
    tops = [m["test/zsl_top1"] for m in per_seed]
    flat = [v for draws in per_draw for v in draws]
    out = {"test/zsl_top1_mean": statistics.fmean(tops),
           "test/zsl_top1_std_seeds": statistics.pstdev(tops) if len(tops) > 1 else 0.0,
           "test/zsl_top1_std_all": statistics.pstdev(flat) if len(flat) > 1 else 0.0}
    if all("test/zsl_top5" in m for m in per_seed):
        out["test/zsl_top5_mean"] = statistics.fmean(m["test/zsl_top5"] for m in per_seed)
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Paper-style Table 1: one row per split, top-1 on the unseen classes."""
    head = ("| split | seen/unseen | top-1 % (mean ± std over seeds) | ± std over seeds × draws | top-5 % | "
            "t_test | T | seeds × draws |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        top5 = f"{r['test/zsl_top5_mean']:.2f}" if "test/zsl_top5_mean" in r else "–"
        lines.append(f"| {r['split']} | {r['seen']}/{r['unseen']} | {r['test/zsl_top1_mean']:.2f} ± "
                     f"{r['test/zsl_top1_std_seeds']:.2f} | {r['test/zsl_top1_std_all']:.2f} | {top5} | "
                     f"{r['t_test']} | {r['T']} | {r['seeds']} × {r['draws']} |")
    return head + "\n".join(lines) + "\n"


def register_model(reporter: MLflowReporter, uri: str, cfg: TDSMConfig, model, task, names, text,
                   name: str) -> str:
    """Log the seed-0 model as an MLflow pyfunc zero-shot classifier and register it; returns the version."""
    import mlflow

    from service.registry import log_zero_shot_model

    mlflow.set_tracking_uri(uri)
    version = log_zero_shot_model(reporter.run_id, cfg, model, task.unseen, names, text, name)
    reporter.set_tags({"registered_model": f"{name}/{version}"})
    return version


def run_split(args, split: str, tree: dict[str, Any], uri: str) -> dict[str, Any]:
    """All seeds of one split; returns the table row."""
    overrides = dict(parse_override(item) for item in args.overrides)
    cfg = build_config(TDSMConfig, tree, {**overrides, "eval.noise_draws": args.noise_draws,
                                          "eval.tune_t_test": False})
    task, names, text = prepare_tdsm(cfg)
    train, test, seen = task.final_split()
    experiment = args.experiment_name or f"tdsm-{split}"
    parent = MLflowReporter.start(uri, experiment, f"final-{split}",
                                  tags=standard_tags(split=split, phase="final", method="tdsm"))
    parent.log_params(flatten(to_plain(cfg)))
    parent.log_params({"final.seeds": args.seeds, "final.noise_draws": args.noise_draws})
    parent.log_text(dump_yaml(cfg), "config.yaml")
    per_seed, per_draw, first = [], [], None
    try:
        for i in range(args.seeds):
            seed_cfg = build_config(TDSMConfig, to_plain(cfg), {"train.seed": cfg.train.seed + i})
            child = MLflowReporter.start(uri, experiment, f"final-{split}-seed{i}", parent_run_id=parent.run_id,
                                         tags=standard_tags(split=split, phase="final", seed=seed_cfg.train.seed))
            print(f"[{split}] seed {i + 1}/{args.seeds}: training on {len(seen)} seen classes ...", file=sys.stderr)
            result = fit_tdsm(seed_cfg, train, seen, None, [], text, child, None, progress=not args.no_progress)
            metrics, curve = evaluate_split(seed_cfg, result.model, test, task.unseen, text, "test")
            at = curve.at(seed_cfg.eval.t_test)
            per_seed.append(metrics)
            per_draw.append(at.top1_draws)
            child.log_metrics(metrics, result.step)
            log_zsl_plots(child, curve, names, seed_cfg.eval.t_test, "test")
            child.finish()
            if first is None:
                first = result.model
        stats = seed_stats(per_seed, per_draw)
        parent.log_metrics(stats, 0)
        row = {"split": split, "seen": len(seen), "unseen": len(task.unseen), "t_test": cfg.eval.t_test,
               "T": cfg.diffusion.num_train_timesteps, "seeds": args.seeds, "draws": args.noise_draws, **stats}
        args.out.mkdir(parents=True, exist_ok=True)
        table = markdown_table([row])
        atomic_write_text(args.out / f"table-{split}.md", table)
        parent.log_artifact(args.out / f"table-{split}.md")
        if not args.no_register:
            row["registered_version"] = register_model(parent, uri, cfg, first, task, names, text, f"tdsm-{split}")
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    row["parent_run_id"] = parent.run_id
    return row


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    tree, split_name = load_source(args.source, uri)
    cfg = build_config(TDSMConfig, tree, source=args.source)  # fail early, naming the offending key
    if args.splits:
        targets = [(name, absolute_paths(build_config(TDSMConfig, tree, ov).model_dump(mode="json")))
                   for name, ov in load_splits(args.splits_file, args.splits)]
    else:
        name = split_name or (cfg.data.source if cfg.data.source == "synthetic" else Path(cfg.data.features_dir).name)
        targets = [(name, tree)]
    rows = [run_split(args, split, t, uri) for split, t in targets]
    table = markdown_table(rows)
    print(table, file=sys.stderr)
    print(json.dumps({"splits": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in rows], "table": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
