"""CoCoDiff as the service runs it: the prepared data, the trial loop, `service.run cocodiff` and the final protocol
(seeds, `--ablation` baseline vs +CoCoDiff, `--streams` with their score fusion).

Its spec (config, flags, names) is `service.methods.cocodiff_spec.CoCoDiffSpec`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from service.data.generated import prepare_cocodiff_inputs
from service.methods.base import FinalOptions, RunOptions, Trial
from service.methods.cocodiff_spec import OBJECTIVE, CoCoDiffSpec
from service.methods.common import headline, mean_std, open_run
from service.tracking.artifacts import log_best_checkpoint, log_classification_outputs, log_selection
from service.tracking.registry import register_classifier
from service.tracking.store import MLflowReporter, standard_tags
from trainers import cocodiff_classifier, cocodiff_eval, cocodiff_fit
from trainers.checkpoint import BEST
from trainers.cocodiff import build_module
from trainers.cocodiff_data import CoCoDiffInputs
from trainers.config import build_config, dump_yaml, flatten, parse_override, to_plain
from trainers.configs import CoCoDiffConfig
from trainers.io import load_checkpoint
from trainers.layers import count_parameters
from trainers.tracking import Artifacts


def cocodiff_seeds(opts: FinalOptions, cfg: CoCoDiffConfig, data, texts, names: list[str], uri: str, experiment: str,
                   parent: MLflowReporter, split: str, arm: str, stream: str | None = None,
                   ) -> tuple[list[dict[str, float]], object, list[tuple[str, torch.Tensor]]]:
    """Train on training + validation data once per seed, test once per seed.

    Returns (per-seed metrics, seed-0 classifier, per-seed (child run id, test logits (N, C))). `stream` (with
    --streams; cfg already trains on it) names the child runs and is logged as their backbone.stream.
    """
    fine, coarse = texts
    train_x = torch.cat([data.train_x, data.val_x])
    train_y = torch.cat([data.train_y, data.val_y])
    label = arm if stream is None else f"{arm}-{stream}"
    per_seed, first, outputs = [], None, []
    for i in range(opts.seeds):
        seed_cfg = cocodiff_fit.with_overrides(cfg, train={"seed": cfg.train.seed + i})
        child = MLflowReporter.start(uri, experiment, f"final-{split}-{label}-seed{i}", parent_run_id=parent.run_id,
                                     tags=standard_tags(split=split, phase="final", method="cocodiff", arm=arm,
                                                        stream=stream, seed=seed_cfg.train.seed))
        with child:
            child.log_params({"train.seed": seed_cfg.train.seed, "module.enabled": seed_cfg.module.enabled,
                              **({"backbone.stream": stream} if stream is not None else {})})
            print(f"[{split}] {label} seed {i + 1}/{opts.seeds}: training on {len(train_y)} sequences ...",
                  file=sys.stderr)
            result = cocodiff_fit.fit_cocodiff(seed_cfg, train_x, train_y, None, None, fine, coarse, child, None,
                                               progress=opts.progress, num_classes=data.num_classes)
            classifier = cocodiff_classifier.export_classifier(result, "last")   # nothing held out: the final weights
            metrics, logits = cocodiff_eval.evaluate_split(seed_cfg, classifier, data.test_x, data.test_y, "test")
            child.log_metrics(metrics, result.step)
            log_classification_outputs(child, logits, data.test_y, names, "test")
        per_seed.append({"seed": seed_cfg.train.seed, **metrics})
        outputs.append((child.run_id, logits))
        first = classifier if first is None else first
    return per_seed, first, outputs


def cocodiff_stream_ensemble(per_stream: dict[str, list[tuple[str, torch.Tensor]]], seeds: list[int], data,
                             names: list[str], uri: str, experiment: str, parent: MLflowReporter, split: str,
                             arm: str) -> list[dict[str, float]]:
    """Equal-weight score fusion of the streams' test logits, per seed, each logged as a child run with the
    fused predictions (as service.ensemble would on the streams' child runs); returns the per-seed metrics."""
    per_seed = []
    for i, seed in enumerate(seeds):
        run_ids, logits = zip(*(outputs[i] for outputs in per_stream.values()))
        fused = cocodiff_eval.ensemble_logits(logits)                                         # (N, C)
        metrics = cocodiff_eval.accuracy_metrics(fused, data.test_y, "test")
        child = MLflowReporter.start(uri, experiment, f"final-{split}-{arm}-ensemble-seed{i}",
                                     parent_run_id=parent.run_id,
                                     tags=standard_tags(split=split, phase="final", method="cocodiff", arm=arm,
                                                        stream="ensemble", seed=seed))
        with child:
            child.log_params({"train.seed": seed, "sources": ",".join(run_ids), "streams": ",".join(per_stream),
                              "weights": ",".join("1.0" for _ in per_stream)})
            child.log_metrics(metrics, 0)
            log_classification_outputs(child, fused, data.test_y, names, "test")
        per_seed.append({"seed": seed, **metrics})
    return per_seed


def cocodiff_row(split: str, arm: str, per_seed: list[dict[str, float]], cfg: CoCoDiffConfig, data,
                 stream: str | None = None) -> dict[str, Any]:
    """One table row: mean ± std over seeds of test top-1 / top-5 (of one stream or their ensemble, with --streams)."""
    top1, top1_std = mean_std([m["test/top1"] for m in per_seed])
    top5, top5_std = mean_std([m["test/top5"] for m in per_seed])
    return {"split": split, "arm": arm, **({"stream": stream} if stream is not None else {}),
            "classes": data.num_classes, "seeds": len(per_seed),
            "steps": cfg.train.steps, "train_samples": len(data.train_y) + len(data.val_y),
            "test_samples": len(data.test_y), "test/top1_mean": top1, "test/top1_std_seeds": top1_std,
            "test/top5_mean": top5, "test/top5_std_seeds": top5_std,
            "test/top1_per_seed": [round(m["test/top1"], 3) for m in per_seed]}


def cocodiff_table(rows: list[dict[str, Any]]) -> str:
    """One row per (split, arm) (and stream, with --streams); a paired-difference row when both arms of a split are
    present (with --streams: of their ensembles)."""
    streams = any("stream" in r for r in rows)

    def stream_cell(r: dict[str, Any]) -> str:
        return f"{r.get('stream', '')} | " if streams else ""

    head = (f"| split | arm | {'stream | ' if streams else ''}classes | top-1 % (mean ± std over seeds) | top-5 % | "
            f"per-seed top-1 | seeds | steps | train / test sequences |\n"
            f"|---|---|{'---|' if streams else ''}---|---|---|---|---|---|---|\n")
    lines = [f"| {r['split']} | {r['arm']} | {stream_cell(r)}{r['classes']} | "
             f"{r['test/top1_mean']:.2f} ± {r['test/top1_std_seeds']:.2f} "
             f"| {r['test/top5_mean']:.2f} ± {r['test/top5_std_seeds']:.2f} | "
             f"{', '.join(f'{v:.1f}' for v in r['test/top1_per_seed'])} | {r['seeds']} | {r['steps']} | "
             f"{r['train_samples']} / {r['test_samples']} |" for r in rows]
    for r in rows:
        if "delta/top1_mean" in r:
            lines.append(f"| {r['split']} | Δ +CoCoDiff − baseline (paired by seed) | {stream_cell(r)}| "
                         f"{r['delta/top1_mean']:+.2f} ± {r['delta/top1_std_seeds']:.2f} | "
                         f"{r['delta/top5_mean']:+.2f} ± {r['delta/top5_std_seeds']:.2f} | | {r['seeds']} | | |")
    return head + "\n".join(lines) + "\n"


def cocodiff_streams(opts: FinalOptions, cfg: CoCoDiffConfig, data, texts, names: list[str], uri: str, experiment: str,
                     parent: MLflowReporter, split: str, arm: str,
                     ) -> tuple[list[dict[str, float]], list[dict[str, Any]], list[tuple[CoCoDiffConfig, Any]]]:
    """One arm with --streams: every stream's seeds (cfg with backbone.stream overridden), then their per-seed
    fusion. Returns (the ensemble's per-seed metrics, one table row per stream plus the 'ensemble' row, the
    seed-0 (config, classifier) of each stream)."""
    per_stream, rows, members = {}, [], []
    for stream in opts.extra["streams"]:
        stream_cfg = cocodiff_fit.with_overrides(cfg, backbone={"stream": stream})
        per_seed, first, per_stream[stream] = cocodiff_seeds(opts, stream_cfg, data, texts, names, uri, experiment,
                                                             parent, split, arm, stream)
        rows.append(cocodiff_row(split, arm, per_seed, stream_cfg, data, stream))
        members.append((stream_cfg, first))
    seeds = [int(m["seed"]) for m in per_seed]
    fused = cocodiff_stream_ensemble(per_stream, seeds, data, names, uri, experiment, parent, split, arm)
    rows.append(cocodiff_row(split, arm, fused, cfg, data, "ensemble"))
    return fused, rows, members


class CoCoDiff(CoCoDiffSpec):
    """What CoCoDiff runs: a sweep trial's fit, `service.run cocodiff` and the final protocol."""

    def prepare(self, cfg: CoCoDiffConfig) -> CoCoDiffInputs:
        """(data, class names, fine text, coarse text); names are read even when no text is encoded (baseline)."""
        return prepare_cocodiff_inputs(cfg)

    def trial_params(self, cfg: CoCoDiffConfig, data: CoCoDiffInputs) -> dict[str, Any]:
        data, _, fine, coarse = data
        with torch.device("meta"):  # sizes only
            classifier = cocodiff_classifier.build_classifier(cfg.backbone, data.num_classes, data.train_x.shape[1])
            module_params = (count_parameters(build_module(cfg.module, classifier.encoder.feature_dim, fine.shape[1],
                                                           coarse.shape[1])) if cfg.module.enabled else 0)
        return {"num_parameters_inference": count_parameters(classifier), "num_parameters_module": module_params}


    def fit_trial(self, trial: Trial) -> None:
        """With several workers, DDP through Ray Train: every rank trains on its own shard of each global batch
        (one seed on every rank: fit_cocodiff shards a common batch order by rank), gradients are averaged, and all
        ranks evaluate the same weights."""
        data, _, fine, coarse = trial.data
        cocodiff_fit.fit_cocodiff(trial.cfg, data.train_x, data.train_y, data.val_x, data.val_y, fine, coarse,
                                  trial.reporter, trial.run_dir, progress=False, num_classes=data.num_classes,
                                  wrap_model=trial.wrap_model, rank=trial.rank, world_size=trial.world)

    def trial_artifacts(self, mlflow: MLflowReporter, artifacts: Artifacts, checkpoint_dir: Path | None,
                        data: CoCoDiffInputs) -> None:
        """The best classifier's validation logits/labels and confusion (read back from best.pt), and best.pt."""
        best = checkpoint_dir / BEST if checkpoint_dir is not None else None
        if best is not None and best.is_file():
            ckpt = load_checkpoint(best, keys=("val_logits", "val_labels"))
            log_classification_outputs(mlflow, ckpt["val_logits"], ckpt["val_labels"], data[1], "val")
        log_best_checkpoint(mlflow, checkpoint_dir)

    def run(self, cfg: CoCoDiffConfig, opts: RunOptions) -> dict:
        """Train backbone (+ module), keep the best-on-validation classifier, test it once; returns the metrics."""
        print("preparing data and text features ...", file=sys.stderr)
        data, names, fine, coarse = prepare_cocodiff_inputs(cfg)
        text_dims = (fine.shape[1], coarse.shape[1]) if fine is not None else None
        fingerprint = cocodiff_fit.training_fingerprint(cfg, data.train_x, data.num_classes, text_dims)
        run_dir, reporter = open_run(opts, self.split_name(cfg), fingerprint, cfg)
        with reporter:     # ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED
            reporter.log_params(flatten(to_plain(cfg)))
            reporter.log_params({"derived.num_classes": data.num_classes, "derived.train_samples": len(data.train_y),
                                 "derived.val_samples": len(data.val_y), "derived.test_samples": len(data.test_y)})
            reporter.log_text(dump_yaml(cfg), "config.yaml")
            result = cocodiff_fit.fit_cocodiff(cfg, data.train_x, data.train_y, data.val_x, data.val_y, fine, coarse,
                                               reporter, run_dir, progress=opts.progress,
                                               num_classes=data.num_classes)
            classifier = cocodiff_classifier.export_classifier(result)   # backbone + head, best-on-validation weights
            reporter.log_params({"derived.num_parameters_inference": count_parameters(classifier),
                                 "derived.num_parameters_module":
                                     count_parameters(result.module) if result.module else 0})
            test_metrics, test_logits = cocodiff_eval.evaluate_split(cfg, classifier, data.test_x, data.test_y, "test")
            reporter.log_metrics(test_metrics, result.step)
            selection = log_selection(reporter, OBJECTIVE, result.best_metrics or {}, result.best_step, result.step, {})
            if result.val_logits is not None:
                log_classification_outputs(reporter, result.val_logits, data.val_y, names, "val")
            log_classification_outputs(reporter, test_logits, data.test_y, names, "test")
            if (run_dir / BEST).is_file():
                reporter.log_artifact(run_dir / BEST, "checkpoints")
        return {**selection, **headline(test_metrics), "mlflow_run_id": reporter.run_id, "run_dir": str(run_dir)}

    def final_split(self, opts: FinalOptions, split: str, tree: dict[str, Any]) -> list[dict[str, Any]]:
        """The final protocol for one config (and, with --ablation, for its baseline too; with --streams, for each
        stream and their ensemble); returns the table rows."""
        uri, ablation, streams = opts.tracking_uri, opts.extra["ablation"], opts.extra["streams"]
        overrides = dict(parse_override(item) for item in opts.overrides)
        cfg = build_config(CoCoDiffConfig, tree, overrides)
        arms = ([("baseline", False), ("cocodiff", True)] if ablation
                else [("cocodiff" if cfg.module.enabled else "baseline", cfg.module.enabled)])
        # Texts are encoded once for both arms (the baseline ignores them).
        data, names, fine, coarse = prepare_cocodiff_inputs(
            cocodiff_fit.with_overrides(cfg, module={"enabled": any(enabled for _, enabled in arms)}))
        experiment = opts.experiment_name or f"cocodiff-{split}"
        phase = "ablation" if ablation else "final"
        suffix = f"-{'+'.join(streams)}" if streams else ""
        parent = MLflowReporter.start(uri, experiment, f"{phase}-{split}{suffix}",
                                      tags=standard_tags(split=split, phase=phase, method="cocodiff",
                                                         source_sweep_run_id=opts.sweep_run_id))
        with parent:     # ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED
            parent.log_params(flatten(to_plain(cfg)))
            parent.log_params({"final.seeds": opts.seeds, "final.ablation": ablation,
                               **({"final.streams": ",".join(streams)} if streams else {})})
            parent.log_text(dump_yaml(cfg), "config.yaml")
            rows, per_arm = [], {}
            for arm, enabled in arms:
                arm_cfg = cocodiff_fit.with_overrides(cfg, module={"enabled": enabled})
                if streams:
                    per_seed, arm_rows, members = cocodiff_streams(opts, arm_cfg, data, (fine, coarse), names, uri,
                                                                   experiment, parent, split, arm)
                else:
                    per_seed, first, _ = cocodiff_seeds(opts, arm_cfg, data, (fine, coarse), names, uri, experiment,
                                                        parent, split, arm)
                    arm_rows, members = [cocodiff_row(split, arm, per_seed, arm_cfg, data)], [(arm_cfg, first)]
                per_arm[arm] = per_seed
                for row in arm_rows:
                    key = f"{arm}/{row['stream']}" if "stream" in row else arm
                    parent.log_metrics({f"{key}/{k}": v for k, v in row.items() if k.startswith("test/") and
                                        isinstance(v, float)}, 0)
                if not ablation and opts.register:     # the seed-0 classifier, or stream ensemble
                    name = f"cocodiff-{split}" + "".join(f"-{s}" for s in streams)
                    arm_rows[-1]["registered_version"] = register_classifier(parent, uri, members, data, names, name)
                rows.extend(arm_rows)
            if ablation:
                for k in ("top1", "top5"):
                    deltas = [c[f"test/{k}"] - b[f"test/{k}"] for b, c in zip(per_arm["baseline"], per_arm["cocodiff"])]
                    rows[-1][f"delta/{k}_mean"], rows[-1][f"delta/{k}_std_seeds"] = mean_std(deltas)
                parent.log_metrics({k: v for k, v in rows[-1].items() if k.startswith("delta/")}, 0)
            table_name, table = f"{phase}-cocodiff-{split}{suffix}.md", cocodiff_table(rows)
            (opts.out / table_name).write_text(table)      # a folder or object storage (service.storage)
            parent.log_text(table, table_name)
        for row in rows:
            row["parent_run_id"] = parent.run_id
        return rows

    def final(self, opts: FinalOptions, targets: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """The final protocol on each (split, config tree); returns the JSON line."""
        print(f"[final] tables in {opts.out}", file=sys.stderr)
        rows = [row for split, tree in targets for row in self.final_split(opts, split, tree)]
        table = cocodiff_table(rows)
        print(table, file=sys.stderr)
        return {"method": "cocodiff", "rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                               for r in rows], "table": table}
