"""TDSM as the service runs it: zero-shot data, the trial loop, `service.run tdsm` and the final protocol.

Its spec (config, flags, names, selection) is `service.methods.tdsm_spec.TDSMSpec`.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.data.features import encoder_source, unseen_test_sequences
from service.data.splits import load_references, splits_file
from service.methods.base import FinalOptions, RunOptions, Trial
from service.methods.common import headline, open_run
from service.methods.tdsm_spec import OBJECTIVE, TDSMSpec
from service.storage import Storage
from service.tracking.artifacts import log_best_checkpoint, log_selection, log_zsl_plots
from service.tracking.registry import register_model
from service.tracking.report import write_report
from service.tracking.sources import source_tags
from service.tracking.store import MLflowReporter, resolve_tracking_uri, standard_tags
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

# Generalised zero-shot test metrics (trainers.tdsm_fit.evaluate_gzsl_split), logged when the data has a gtest.
GZSL_METRICS = ("test/gzsl_seen", "test/gzsl_unseen", "test/gzsl_h")


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



class TDSM(TDSMSpec):
    """What TDSM runs: a sweep trial's fit, `service.run tdsm` and the final protocol (seeds x noise draws, the
    paper table, the registered zero-shot chain)."""

    def prepare(self, cfg: TDSMConfig) -> TDSMInputs:
        """(task, class names, text features): shared by every trial of a split through the object store."""
        return prepare_tdsm(cfg)

    def trial_params(self, cfg: TDSMConfig, data: TDSMInputs) -> dict[str, Any]:
        task, _, text = data
        with torch.device("meta"):  # size only: no memory, no init
            n_params = count_parameters(tdsm_fit.build_model(cfg, task.feature_dim, text))
        return {"num_parameters": n_params, "seen_classes": len(task.seen)}

    def fit_trial(self, trial: Trial) -> None:
        """Trains on the seen classes minus the validation classes, evaluating on the validation classes (DDP
        through Ray Train when the trial has several workers)."""
        task, _, text = trial.data
        fit_train, val, fit_classes = task.tuning_split()
        tdsm_fit.fit_tdsm(trial.cfg, fit_train, fit_classes, val, task.val, text, trial.reporter, trial.run_dir,
                          eval_prefix="val", progress=False, wrap_model=trial.wrap_model, rank=trial.rank)

    def trial_artifacts(self, mlflow: MLflowReporter, artifacts: Artifacts, checkpoint_dir: Path | None,
                        data: TDSMInputs) -> None:
        """Validation t_test curve and confusion at the best t_test, and best.pt."""
        curve = artifacts["zsl_curve"]
        log_zsl_plots(mlflow, curve, data[1], curve.best().t_test, "val")
        log_best_checkpoint(mlflow, checkpoint_dir)

    def run(self, cfg: TDSMConfig, opts: RunOptions) -> dict:
        """Train, keep the best-on-validation weights, test the unseen classes once; returns the final metrics."""
        print("preparing data and text features ...", file=sys.stderr)
        task, names, text = prepare_tdsm(cfg)
        fit_train, val, fit_classes = task.tuning_split()
        run_dir, reporter = open_run(opts, self.split_name(cfg), training_fingerprint(cfg), cfg)
        with reporter:     # ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED
            reporter.log_params(flatten(to_plain(cfg)))
            reporter.log_params({"derived.seen_classes": len(task.seen), "derived.num_train_classes": len(fit_classes),
                                 "derived.val_classes": task.val,
                                 "derived.unseen_classes": task.unseen, "derived.train_samples": len(fit_train)})
            reporter.log_text(dump_yaml(cfg), "config.yaml")
            result = fit_tdsm(cfg, fit_train, fit_classes, val, task.val, text, reporter, run_dir,
                              eval_prefix="val", progress=opts.progress)
            reporter.log_params({"derived.num_parameters": count_parameters(result.model)})
            # One-line InputError when unreadable or not this model's (NaN weights, other shapes, a step past
            # train.steps)
            best = load_best(run_dir, result.model, cfg.train.steps) if (run_dir / BEST).is_file() else {}
            if best:
                result.model.load_state_dict(best["model"])
            val_metrics = best.get("metrics", result.last_metrics)
            test_metrics, test_curve = evaluate_split(cfg, result.model, task.test, task.unseen, text, "test")
            test_metrics.update(evaluate_gzsl_split(cfg, result.model, task, text))     # {} without a GZSL test set
            reporter.log_metrics(test_metrics, result.step)
            selection = log_selection(reporter, OBJECTIVE, val_metrics, int(best.get("step", result.step)), result.step,
                                      self.selection_tags(val_metrics))
            if result.last_curve is not None:
                log_zsl_plots(reporter, result.last_curve, names, cfg.eval.t_test, "val")
            log_zsl_plots(reporter, test_curve, names, cfg.eval.t_test, "test")
            if (run_dir / BEST).is_file():
                reporter.log_artifact(run_dir / BEST, "checkpoints")
        # seen_classes: the classes with training samples (training + validation); the negative pool is drawn from them.
        return {**selection, **headline(test_metrics), "seen_classes": len(task.seen),
                "mlflow_run_id": reporter.run_id, "run_dir": str(run_dir)}

    def final_split(self, opts: FinalOptions, split: str, tree: dict[str, Any]) -> dict[str, Any]:
        """All seeds of one split; returns the table row."""
        uri, draws = opts.tracking_uri, opts.extra["noise_draws"]
        overrides = dict(parse_override(item) for item in opts.overrides)
        cfg = build_config(TDSMConfig, tree, {**overrides, "eval.noise_draws": draws, "eval.tune_t_test": False})
        task, names, text = prepare_tdsm(cfg)
        train, test, seen = task.final_split()
        inputs, source = served_inputs(cfg, task)
        experiment = opts.experiment_name or f"tdsm-{split}"
        parent = MLflowReporter.start(uri, experiment, f"final-{split}",
                                      tags=standard_tags(split=split, phase="final", method="tdsm",
                                                         source_sweep_run_id=opts.sweep_run_id))
        with parent:     # ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED
            parent.log_params(flatten(to_plain(cfg)))
            parent.log_params({"final.seeds": opts.seeds, "final.noise_draws": draws,
                               "derived.seen_classes": len(seen)})
            parent.log_text(dump_yaml(cfg), "config.yaml")
            per_seed, per_draw, first = [], [], None
            for i in range(opts.seeds):
                seed_cfg = build_config(TDSMConfig, to_plain(cfg), {"train.seed": cfg.train.seed + i})
                child = MLflowReporter.start(uri, experiment, f"final-{split}-seed{i}", parent_run_id=parent.run_id,
                                             tags=standard_tags(split=split, phase="final", seed=seed_cfg.train.seed))
                with child:
                    print(f"[{split}] seed {i + 1}/{opts.seeds}: training on {len(seen)} seen classes ...",
                          file=sys.stderr)
                    result = fit_tdsm(seed_cfg, train, seen, None, [], text, child, None, progress=opts.progress)
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
                   "T": cfg.diffusion.num_train_timesteps, "seeds": opts.seeds, "draws": draws, **stats}
            table = markdown_table([row])
            (opts.out / f"table-{split}.md").write_text(table)      # a folder or object storage (service.storage)
            parent.log_text(table, f"table-{split}.md")
            if opts.register:
                tags = {"split": split, **source_tags(opts.source, uri), "test_top1": per_seed[0]["test/zsl_top1"],
                        "test_top1_mean_over_seeds": stats["test/zsl_top1_mean"],
                        "test_top1_std_over_seeds": stats["test/zsl_top1_std_seeds"], "seeds": opts.seeds,
                        "registered_seed": cfg.train.seed}
                row["registered_version"] = register_model(parent, uri, first, f"tdsm-{split}", inputs[:2], tags)
        row["parent_run_id"] = parent.run_id
        return row

    def final(self, opts: FinalOptions, targets: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """The final protocol on each (split, config tree), then the paper table (ours beside the paper's figure per
        split, logged on each final run); returns the JSON line."""
        print(f"[final] tables and report in {opts.out}", file=sys.stderr)
        rows = [self.final_split(opts, split, tree) for split, tree in targets]
        table = markdown_table(rows)
        print(table, file=sys.stderr)
        path = splits_file(self.name, opts.splits_file)
        refs = load_references(path, [r["split"] for r in rows]) if path.is_file() else {}
        report, _ = write_report(opts.tracking_uri, {r["split"]: r["parent_run_id"] for r in rows}, refs, opts.out)
        print(report, file=sys.stderr)
        return {"splits": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                "table": table}

    def report(self, tracking_uri: str | None, runs: dict[str, str | None], references: dict[str, dict[str, Any]],
               out: Storage, log: bool) -> str:
        """The paper's Table 1 across splits (service.tracking.report): ours beside the paper's figure."""
        md, _ = write_report(resolve_tracking_uri(tracking_uri), runs, references, out, log=log, report_run=log)
        return md
