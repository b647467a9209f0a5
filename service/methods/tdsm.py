"""TDSM as the service runs it: zero-shot data, the trial loop, `service.run tdsm` and the final protocol.

The `TDSM` object at the end is what the CLIs, the sweep and the trials consult (`service.methods.METHODS`).
"""

from __future__ import annotations

import functools
import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.data.features import encoder_source, unseen_test_sequences
from service.data.splits import load_references, splits_file
from service.methods.base import TrialContext
from service.methods.common import absolute_fields, headline, open_run
from service.tracking.artifacts import log_best_checkpoint, log_selection, log_zsl_plots
from service.tracking.registry import register_model
from service.tracking.report import write_report
from service.tracking.sources import source_tags
from service.tracking.store import MLflowReporter, standard_tags
from trainers import tdsm_fit
from trainers.checkpoint import BEST
from trainers.config import build_config, dump_yaml, flatten, parse_override, to_plain
from trainers.configs import TDSMConfig
from trainers.errors import InputError
from trainers.layers import count_parameters
from trainers.tdsm_fit import evaluate_gzsl_split, evaluate_split, fit_tdsm, load_best, training_fingerprint
from trainers.tdsm_task import TDSMInputs, class_prompts, prepare_tdsm
from trainers.tracking import Artifacts
from trainers.zero_shot import chain_bundle, chain_from_bundle, served_top1

# The validation metric that chooses the kept (best.pt) weights; runs and sweep trials report its running maximum
# as `<metric>_max`, the name trials are ranked on, so the JSON line, the MLflow run and a sweep trial agree.
OBJECTIVE = "val/zsl_top1"
# Generalised zero-shot test metrics (trainers.tdsm_fit.evaluate_gzsl_split), logged when the data has a gtest.
GZSL_METRICS = ("test/gzsl_seen", "test/gzsl_unseen", "test/gzsl_h")


def absolute_paths(tree: dict[str, Any]) -> dict[str, Any]:
    """Resolve relative data/text paths: trials and Ray jobs run in other working directories."""
    cfg = build_config(TDSMConfig, tree)
    tree = to_plain(cfg)
    absolute_fields(tree["data"], cfg.data, ("features_dir", "unseen", "seen", "val_unseen"))
    absolute_fields(tree["text"], cfg.text, ("class_names", "descriptions", "cache_dir"))
    return tree


def prepare(cfg: TDSMConfig) -> TDSMInputs:
    """(task, class names, text features): shared by every trial of a split through the object store."""
    return prepare_tdsm(cfg)


def best_config(tree: dict[str, Any], tags: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fix the run's t_test to the one it chose on validation (its best_t_test tag), and tune it no more."""
    section = tree.setdefault("eval", {})
    if not isinstance(section, dict):
        raise InputError(f"eval: expected a mapping of evaluation settings, got {section!r}")
    if "best_t_test" in tags:
        section["t_test"] = int(tags["best_t_test"])
    section["tune_t_test"] = False
    return tree, ({"best_t_test": int(section["t_test"])} if "t_test" in section else {})


def split_name(cfg: TDSMConfig) -> str:
    """The one name of a config's data when no split names it: its features folder, or `synthetic` (the generated
    feature task); run dirs, MLflow experiments and tables of service.run, sweep and final all use it."""
    return Path(cfg.data.features_dir).name if cfg.data.source == "features" else "synthetic"


def final_artifacts(mlflow: MLflowReporter, artifacts: Artifacts, checkpoint_dir: Path | None, *,
                    names: list[str]) -> None:
    """Validation t_test curve and confusion at the best t_test, and best.pt."""
    curve = artifacts["zsl_curve"]
    log_zsl_plots(mlflow, curve, names, curve.best().t_test, "val")
    log_best_checkpoint(mlflow, checkpoint_dir)


def fit_trial(w: TrialContext) -> None:
    """Worker loop of a TDSM trial (DDP through Ray Train when the trial has several workers)."""
    task, names, text = w.data
    fit_train, val, fit_classes = task.tuning_split()
    with torch.device("meta"):  # size only: no memory, no init
        n_params = count_parameters(tdsm_fit.build_model(w.cfg, task.feature_dim, text))
    reporter = w.reporter({"num_parameters": n_params, "seen_classes": len(task.seen)},
                          functools.partial(final_artifacts, names=names))
    try:
        tdsm_fit.fit_tdsm(w.cfg, fit_train, fit_classes, val, task.val, text, reporter, w.run_dir, eval_prefix="val",
                          progress=False, wrap_model=w.wrap_model, rank=w.rank)
    finally:
        w.cleanup()
    w.close()


def run(cfg: TDSMConfig, args) -> dict:
    """Train, keep the best-on-validation weights, test the unseen classes once; returns the final metrics."""
    print("preparing data and text features ...", file=sys.stderr)
    task, names, text = prepare_tdsm(cfg)
    fit_train, val, fit_classes = task.tuning_split()
    run_dir, reporter = open_run(args, "tdsm", split_name(cfg), training_fingerprint(cfg), cfg)
    with reporter:     # ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED
        reporter.log_params(flatten(to_plain(cfg)))
        reporter.log_params({"derived.seen_classes": len(task.seen), "derived.num_train_classes": len(fit_classes),
                             "derived.val_classes": task.val,
                             "derived.unseen_classes": task.unseen, "derived.train_samples": len(fit_train)})
        reporter.log_text(dump_yaml(cfg), "config.yaml")
        result = fit_tdsm(cfg, fit_train, fit_classes, val, task.val, text, reporter, run_dir,
                          eval_prefix="val", progress=not args.no_progress)
        reporter.log_params({"derived.num_parameters": count_parameters(result.model)})
        # One-line InputError when unreadable or not this model's (NaN weights, other shapes, a step past train.steps)
        best = load_best(run_dir, result.model, cfg.train.steps) if (run_dir / BEST).is_file() else {}
        if best:
            result.model.load_state_dict(best["model"])
        val_metrics = best.get("metrics", result.last_metrics)
        test_metrics, test_curve = evaluate_split(cfg, result.model, task.test, task.unseen, text, "test")
        test_metrics.update(evaluate_gzsl_split(cfg, result.model, task, text))     # {} without a GZSL test set
        reporter.log_metrics(test_metrics, result.step)
        selection = log_selection(reporter, OBJECTIVE, val_metrics, int(best.get("step", result.step)), result.step)
        if result.last_curve is not None:
            log_zsl_plots(reporter, result.last_curve, names, cfg.eval.t_test, "val")
        log_zsl_plots(reporter, test_curve, names, cfg.eval.t_test, "test")
        if (run_dir / BEST).is_file():
            reporter.log_artifact(run_dir / BEST, "checkpoints")
    # seen_classes: the classes with training samples (training + validation); the negative pool is drawn from them.
    return {**selection, **headline(test_metrics), "seen_classes": len(task.seen),
            "mlflow_run_id": reporter.run_id, "run_dir": str(run_dir)}


def seed_stats(per_seed: list[dict[str, float]], per_draw: list[list[float]]) -> dict[str, float]:
    """Mean ± std over seeds (each seed's mean over draws) and over every (seed, draw) pair."""
    tops = [m["test/zsl_top1"] for m in per_seed]
    flat = [v for draws in per_draw for v in draws]
    out = {"test/zsl_top1_mean": statistics.fmean(tops),
           "test/zsl_top1_std_seeds": statistics.pstdev(tops) if len(tops) > 1 else 0.0,
           "test/zsl_top1_std_all": statistics.pstdev(flat) if len(flat) > 1 else 0.0}
    if all("test/zsl_top5" in m for m in per_seed):
        out["test/zsl_top5_mean"] = statistics.fmean(m["test/zsl_top5"] for m in per_seed)
    for key in GZSL_METRICS:        # generalised zero-shot, when the split has a GZSL test set
        if all(key in m for m in per_seed):
            values = [m[key] for m in per_seed]
            out[f"{key}_mean"] = statistics.fmean(values)
            out[f"{key}_std_seeds"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Paper-style Table 1: one row per split, top-1 on the unseen classes."""
    head = ("| split | seen/unseen | top-1 % (mean ± std over seeds) | ± std over seeds × draws | top-5 % | "
            "GZSL seen / unseen / H % | t_test | T | seeds × draws |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        top5 = f"{r['test/zsl_top5_mean']:.2f}" if "test/zsl_top5_mean" in r else "–"
        gzsl = (" / ".join(f"{r[f'{k}_mean']:.2f}" for k in GZSL_METRICS) if "test/gzsl_h_mean" in r else "–")
        lines.append(f"| {r['split']} | {r['seen']}/{r['unseen']} | {r['test/zsl_top1_mean']:.2f} ± "
                     f"{r['test/zsl_top1_std_seeds']:.2f} | {r['test/zsl_top1_std_all']:.2f} | {top5} | {gzsl} | "
                     f"{r['t_test']} | {r['T']} | {r['seeds']} × {r['draws']} |")
    return head + "\n".join(lines) + "\n"


def final_split(args, split: str, tree: dict[str, Any], uri: str) -> dict[str, Any]:
    """All seeds of one split; returns the table row."""
    overrides = dict(parse_override(item) for item in args.overrides)
    cfg = build_config(TDSMConfig, tree, {**overrides, "eval.noise_draws": args.noise_draws,
                                          "eval.tune_t_test": False})
    task, names, text = prepare_tdsm(cfg)
    train, test, seen = task.final_split()
    inputs, source = served_inputs(cfg, task)
    experiment = args.experiment_name or f"tdsm-{split}"
    parent = MLflowReporter.start(uri, experiment, f"final-{split}",
                                  tags=standard_tags(split=split, phase="final", method="tdsm",
                                                     source_sweep_run_id=getattr(args, "sweep_run_id", None)))
    with parent:     # ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED
        parent.log_params(flatten(to_plain(cfg)))
        parent.log_params({"final.seeds": args.seeds, "final.noise_draws": args.noise_draws,
                           "derived.seen_classes": len(seen)})
        parent.log_text(dump_yaml(cfg), "config.yaml")
        per_seed, per_draw, first = [], [], None
        for i in range(args.seeds):
            seed_cfg = build_config(TDSMConfig, to_plain(cfg), {"train.seed": cfg.train.seed + i})
            child = MLflowReporter.start(uri, experiment, f"final-{split}-seed{i}", parent_run_id=parent.run_id,
                                         tags=standard_tags(split=split, phase="final", seed=seed_cfg.train.seed))
            with child:
                print(f"[{split}] seed {i + 1}/{args.seeds}: training on {len(seen)} seen classes ...",
                      file=sys.stderr)
                result = fit_tdsm(seed_cfg, train, seen, None, [], text, child, None, progress=not args.no_progress)
                metrics, curve = evaluate_split(seed_cfg, result.model, test, task.unseen, text, "test")
                # The registered model's own answers: the chain from the model input, noise keyed by each input.
                blob = chain_bundle(seed_cfg, result.model, class_prompts(seed_cfg), text, task.unseen,
                                    source and source["state"])
                metrics["test/zsl_top1_served"] = served_top1(chain_from_bundle(blob), inputs, test.labels.tolist())
                metrics.update(evaluate_gzsl_split(seed_cfg, result.model, task, text))
                at = curve.at(seed_cfg.eval.t_test)
                per_seed.append(metrics)
                per_draw.append(at.top1_draws)
                child.log_metrics(metrics, result.step)
                log_zsl_plots(child, curve, names, seed_cfg.eval.t_test, "test")
            if first is None:
                first = blob
        stats = seed_stats(per_seed, per_draw)
        parent.log_metrics(stats, 0)
        row = {"split": split, "seen": len(seen), "seen_classes": len(seen), "unseen": len(task.unseen),
               "t_test": cfg.eval.t_test,
               "T": cfg.diffusion.num_train_timesteps, "seeds": args.seeds, "draws": args.noise_draws, **stats}
        table = markdown_table([row])
        (args.out / f"table-{split}.md").write_text(table)      # a folder or object storage (service.storage)
        parent.log_text(table, f"table-{split}.md")
        if not args.no_register:
            tags = {"split": split, **source_tags(args.source, uri), "test_top1": per_seed[0]["test/zsl_top1"],
                    "test_top1_mean_over_seeds": stats["test/zsl_top1_mean"],
                    "test_top1_std_over_seeds": stats["test/zsl_top1_std_seeds"], "seeds": args.seeds,
                    "registered_seed": cfg.train.seed}
            row["registered_version"] = register_model(parent, uri, first, f"tdsm-{split}", inputs[:2], tags)
    row["parent_run_id"] = parent.run_id
    return row


def served_inputs(cfg: TDSMConfig, task) -> tuple[np.ndarray, dict[str, Any] | None]:
    """(the unseen test samples as the registered model takes them, the features' encoder source or None):
    skeleton sequences when skeldiff's encoder made the features (its source.json), else the features."""
    source = encoder_source(cfg.data.features_dir) if cfg.data.source == "features" else None
    if source is None:
        return task.test.features.numpy(), None
    sequences, labels = unseen_test_sequences(source, task.unseen)
    if labels.tolist() != task.test.labels.tolist():
        raise InputError(f"{cfg.data.features_dir}: ztest.npy's samples are not the prepared folder's unseen test "
                         f"rows of {source['prepared']} (re-extract the features)")
    return sequences, source


def check_final(args) -> None:
    """`service.final` flags that only CoCoDiff has."""
    if args.ablation:
        raise InputError("--ablation: cocodiff only (baseline vs +CoCoDiff module)")
    if args.streams:
        raise InputError("--streams: cocodiff only (tdsm scores pre-extracted features, it has no input streams)")


def final(args, targets: list[tuple[str, dict[str, Any]]], uri: str) -> dict[str, Any]:
    """The final protocol on each (split, config tree), then the paper table (ours beside the paper's figure per
    split, logged on each final run); returns the JSON line."""
    print(f"[final] tables and report in {args.out}", file=sys.stderr)
    rows = [final_split(args, split, tree, uri) for split, tree in targets]
    table = markdown_table(rows)
    print(table, file=sys.stderr)
    path = splits_file("tdsm", args.splits_file)
    refs = load_references(path, [r["split"] for r in rows]) if path.is_file() else {}
    report, _ = write_report(uri, {r["split"]: r["parent_run_id"] for r in rows}, refs, args.out)
    print(report, file=sys.stderr)
    return {"splits": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
            "table": table}


class TDSM:
    """Zero-shot recognition of unseen actions (see service.methods.base.Method)."""

    name = "tdsm"
    config_cls = TDSMConfig
    objective = OBJECTIVE
    # Reported at every validation evaluation (trainers.tdsm_fit.zsl_metric_dict with selection=True); never test.
    rankable_metrics = (OBJECTIVE, "val/zsl_top1_ensemble", "val/zsl_top1_best")
    inference_grid = True                   # trials score a t_test grid (the search space's `inference:`)
    default_split: str | None = "synthetic-skeleton"
    data_shortcuts = True                   # --features / --unseen / --seen / --val-unseen
    split_name = staticmethod(split_name)
    absolute_paths = staticmethod(absolute_paths)
    prepare = staticmethod(prepare)
    best_config = staticmethod(best_config)
    fit_trial = staticmethod(fit_trial)
    run = staticmethod(run)
    check_final = staticmethod(check_final)
    final = staticmethod(final)
