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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

import torch
import yaml

from service.cli import DEFAULT_STORAGE, METHOD_CONFIGS, exits_cleanly
from service.cocodiff_data import prepare_cocodiff_inputs
from service.run import log_classification_outputs, log_zsl_plots
from service.splits import load_splits, resolve_chain, splits_file
from service.sweep import STATE_FILE, absolute_paths
from service.tracking import MLflowReporter, resolve_tracking_uri, standard_tags
from trainers import cocodiff_fit
from trainers.cocodiff import BackboneConfig, CoCoDiffConfig
from trainers.config import (
    TDSMConfig,
    build_config,
    dump_yaml,
    flatten,
    load_yaml,
    parse_override,
    to_plain,
)
from trainers.errors import InputError
from trainers.io import atomic_write_text
from trainers.tdsm_fit import evaluate_split, fit_tdsm
from trainers.tdsm_task import prepare_tdsm

STREAMS = get_args(BackboneConfig.model_fields["stream"].annotation)   # ('joint', 'bone', 'motion')


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
    p.add_argument("--noise-draws", type=int, default=10, help="tdsm: evaluation noise draws per seed (paper: 10)")
    p.add_argument("--ablation", action="store_true",
                   help="cocodiff: baseline (module.enabled=false) vs +CoCoDiff, same seeds and protocol")
    p.add_argument("--streams", nargs="+", metavar="STREAM",
                   help=f"cocodiff: one classifier per input stream ({', '.join(STREAMS)}) per arm and seed, and "
                        "their equal-weight score fusion per seed (an 'ensemble' row; the seed-0 stream classifiers are "
                        "registered as one fused model)")
    p.add_argument("--splits", nargs="+", help="re-target the config to named splits (default: its own data)")
    p.add_argument("--splits-file", type=Path, help="default: search_spaces/<method>_splits.yaml")
    p.add_argument("--storage-path", type=Path, default=DEFAULT_STORAGE,
                   help="where a split's cached skeleton chain lives and --out defaults under (as for service.sweep)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one dotted key of the --from config, e.g. --set train.steps=2000 (repeatable; "
                        "applied after --splits; tdsm: --noise-draws sets eval.noise_draws and t_test is never tuned)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment-name", help="MLflow experiment (default: <method>-<split>)")
    p.add_argument("--out", type=Path,
                   help="folder for the tables (default: <storage-path>/final/<method>-<splits>-<time>)")
    p.add_argument("--no-register", action="store_true", help="skip the model registry")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    if name == "config.yaml" and "best_t_test" in run.data.tags and tree.get("method", "tdsm") == "tdsm":
        tree["eval"].update(t_test=int(run.data.tags["best_t_test"]), tune_t_test=False)
    return tree, run.data.tags.get("split")


def source_sweep_run_id(source: str, uri: str) -> str | None:
    """The sweep parent run a --from came out of (best_config.yaml beside its state file, a sweep parent run or one
    of its trials), or None; tagged on the final run so that service.report pairs the two."""
    path = Path(source)
    if path.is_file():
        state = path.parent / STATE_FILE
        return json.loads(state.read_text()).get("parent_run_id") if state.is_file() else None
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(uri).get_run(source).data.tags    # load_source has checked that the run exists
    if tags.get("phase") != "sweep":
        return None
    return tags.get("mlflow.parentRunId") or source


def default_out(args, method: str, splits: list[str]) -> Path:
    """<storage-path>/final/<method>-<splits>-<time>: never a folder in the working directory (the repository)."""
    label = "+".join(splits) if len(splits) <= 3 else f"{splits[0]}-and-{len(splits) - 1}-more"
    return args.storage_path.expanduser().resolve() / "final" / f"{method}-{label}-{time.strftime('%Y%m%d-%H%M%S')}"


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


def source_tags(source: str, uri: str) -> dict[str, str]:
    """--from, the sweep parent run it leads back to (source_sweep_run_id) and, for a trial run, that run's id."""
    tags = {"source": source}
    sweep = source_sweep_run_id(source, uri)
    if sweep:
        tags["source_sweep_run_id"] = sweep
        if sweep != source and not Path(source).is_file():
            tags["source_run_id"] = source       # --from named one trial of that sweep
    return tags


def register_model(reporter: MLflowReporter, uri: str, cfg: TDSMConfig, model, task, names, text,
                   name: str, example=None, tags: dict[str, Any] | None = None) -> str:
    """Log the seed-0 model as an MLflow pyfunc zero-shot classifier and register it; returns the version."""
    import mlflow

    from service.registry import log_zero_shot_model

    mlflow.set_tracking_uri(uri)
    version = log_zero_shot_model(reporter.run_id, cfg, model, task.unseen, names, text, name, example, tags)
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
                                  tags=standard_tags(split=split, phase="final", method="tdsm",
                                                     source_sweep_run_id=getattr(args, "sweep_run_id", None)))
    parent.log_params(flatten(to_plain(cfg)))
    parent.log_params({"final.seeds": args.seeds, "final.noise_draws": args.noise_draws,
                       "derived.seen_classes": len(seen)})
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
        row = {"split": split, "seen": len(seen), "seen_classes": len(seen), "unseen": len(task.unseen),
               "t_test": cfg.eval.t_test,
               "T": cfg.diffusion.num_train_timesteps, "seeds": args.seeds, "draws": args.noise_draws, **stats}
        args.out.mkdir(parents=True, exist_ok=True)
        table = markdown_table([row])
        atomic_write_text(args.out / f"table-{split}.md", table)
        parent.log_artifact(args.out / f"table-{split}.md")
        if not args.no_register:
            tags = {"split": split, **source_tags(args.source, uri), "test_top1": per_seed[0]["test/zsl_top1"],
                    "test_top1_mean_over_seeds": stats["test/zsl_top1_mean"], "seeds": args.seeds}
            row["registered_version"] = register_model(parent, uri, cfg, first, task, names, text, f"tdsm-{split}",
                                                       test.features[:4].numpy(), tags)   # (4, D) real rows
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    row["parent_run_id"] = parent.run_id
    return row


# ----------------------------------------------------------------------------------------------
# CoCoDiff
# ----------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (0 for one value)."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def cocodiff_seeds(args, cfg: CoCoDiffConfig, data, texts, names: list[str], uri: str, experiment: str,
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
    for i in range(args.seeds):
        seed_cfg = cocodiff_fit.with_overrides(cfg, train={"seed": cfg.train.seed + i})
        child = MLflowReporter.start(uri, experiment, f"final-{split}-{label}-seed{i}", parent_run_id=parent.run_id,
                                     tags=standard_tags(split=split, phase="final", method="cocodiff", arm=arm,
                                                        stream=stream, seed=seed_cfg.train.seed))
        child.log_params({"train.seed": seed_cfg.train.seed, "module.enabled": seed_cfg.module.enabled,
                          **({"backbone.stream": stream} if stream is not None else {})})
        print(f"[{split}] {label} seed {i + 1}/{args.seeds}: training on {len(train_y)} sequences ...",
              file=sys.stderr)
        result = cocodiff_fit.fit_cocodiff(seed_cfg, train_x, train_y, None, None, fine, coarse, child, None,
                                           progress=not args.no_progress, num_classes=data.num_classes)
        classifier = cocodiff_fit.export_classifier(result, "last")        # nothing held out: the final weights
        metrics, logits = cocodiff_fit.evaluate_split(seed_cfg, classifier, data.test_x, data.test_y, "test")
        child.log_metrics(metrics, result.step)
        log_classification_outputs(child, logits, data.test_y, names, "test")
        child.finish()
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
        fused = cocodiff_fit.ensemble_logits(logits)                                         # (N, C)
        metrics = cocodiff_fit.accuracy_metrics(fused, data.test_y, "test")
        child = MLflowReporter.start(uri, experiment, f"final-{split}-{arm}-ensemble-seed{i}",
                                     parent_run_id=parent.run_id,
                                     tags=standard_tags(split=split, phase="final", method="cocodiff", arm=arm,
                                                        stream="ensemble", seed=seed))
        child.log_params({"train.seed": seed, "sources": ",".join(run_ids), "streams": ",".join(per_stream),
                          "weights": ",".join("1.0" for _ in per_stream)})
        child.log_metrics(metrics, 0)
        log_classification_outputs(child, fused, data.test_y, names, "test")
        child.finish()
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


def cocodiff_streams(args, cfg: CoCoDiffConfig, data, texts, names: list[str], uri: str, experiment: str,
                     parent: MLflowReporter, split: str, arm: str,
                     ) -> tuple[list[dict[str, float]], list[dict[str, Any]], list[tuple[CoCoDiffConfig, Any]]]:
    """One arm with --streams: every stream's seeds (cfg with backbone.stream overridden), then their per-seed
    fusion. Returns (the ensemble's per-seed metrics, one table row per stream plus the 'ensemble' row, the
    seed-0 (config, classifier) of each stream)."""
    per_stream, rows, members = {}, [], []
    for stream in args.streams:
        stream_cfg = cocodiff_fit.with_overrides(cfg, backbone={"stream": stream})
        per_seed, first, per_stream[stream] = cocodiff_seeds(args, stream_cfg, data, texts, names, uri, experiment,
                                                             parent, split, arm, stream)
        rows.append(cocodiff_row(split, arm, per_seed, stream_cfg, data, stream))
        members.append((stream_cfg, first))
    seeds = [int(m["seed"]) for m in per_seed]
    fused = cocodiff_stream_ensemble(per_stream, seeds, data, names, uri, experiment, parent, split, arm)
    rows.append(cocodiff_row(split, arm, fused, cfg, data, "ensemble"))
    return fused, rows, members


def run_cocodiff_split(args, split: str, tree: dict[str, Any], uri: str) -> list[dict[str, Any]]:
    """The final protocol for one config (and, with --ablation, for its baseline too; with --streams, for each
    stream and their ensemble); returns the table rows."""
    overrides = dict(parse_override(item) for item in args.overrides)
    cfg = build_config(CoCoDiffConfig, tree, overrides)
    arms = ([("baseline", False), ("cocodiff", True)] if args.ablation
            else [("cocodiff" if cfg.module.enabled else "baseline", cfg.module.enabled)])
    # Texts are encoded once for both arms (the baseline ignores them).
    data, names, fine, coarse = prepare_cocodiff_inputs(
        cocodiff_fit.with_overrides(cfg, module={"enabled": any(enabled for _, enabled in arms)}))
    experiment = args.experiment_name or f"cocodiff-{split}"
    phase = "ablation" if args.ablation else "final"
    suffix = f"-{'+'.join(args.streams)}" if args.streams else ""
    parent = MLflowReporter.start(uri, experiment, f"{phase}-{split}{suffix}",
                                  tags=standard_tags(split=split, phase=phase, method="cocodiff",
                                                     source_sweep_run_id=getattr(args, "sweep_run_id", None)))
    parent.log_params(flatten(to_plain(cfg)))
    parent.log_params({"final.seeds": args.seeds, "final.ablation": args.ablation,
                       **({"final.streams": ",".join(args.streams)} if args.streams else {})})
    parent.log_text(dump_yaml(cfg), "config.yaml")
    rows, per_arm = [], {}
    try:
        for arm, enabled in arms:
            arm_cfg = cocodiff_fit.with_overrides(cfg, module={"enabled": enabled})
            if args.streams:
                per_seed, arm_rows, members = cocodiff_streams(args, arm_cfg, data, (fine, coarse), names, uri,
                                                               experiment, parent, split, arm)
            else:
                per_seed, first, _ = cocodiff_seeds(args, arm_cfg, data, (fine, coarse), names, uri, experiment,
                                                    parent, split, arm)
                arm_rows, members = [cocodiff_row(split, arm, per_seed, arm_cfg, data)], [(arm_cfg, first)]
            per_arm[arm] = per_seed
            for row in arm_rows:
                key = f"{arm}/{row['stream']}" if "stream" in row else arm
                parent.log_metrics({f"{key}/{k}": v for k, v in row.items() if k.startswith("test/") and
                                    isinstance(v, float)}, 0)
            if not args.ablation and not args.no_register:     # the seed-0 classifier, or stream ensemble
                name = f"cocodiff-{split}" + "".join(f"-{s}" for s in args.streams or [])
                arm_rows[-1]["registered_version"] = register_classifier(parent, uri, members, data, names, name)
            rows.extend(arm_rows)
        if args.ablation:
            for k in ("top1", "top5"):
                deltas = [c[f"test/{k}"] - b[f"test/{k}"] for b, c in zip(per_arm["baseline"], per_arm["cocodiff"])]
                rows[-1][f"delta/{k}_mean"], rows[-1][f"delta/{k}_std_seeds"] = mean_std(deltas)
            parent.log_metrics({k: v for k, v in rows[-1].items() if k.startswith("delta/")}, 0)
        args.out.mkdir(parents=True, exist_ok=True)
        out = atomic_write_text(args.out / f"{phase}-cocodiff-{split}{suffix}.md", cocodiff_table(rows))
        parent.log_artifact(out)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    for row in rows:
        row["parent_run_id"] = parent.run_id
    return rows


def register_classifier(reporter: MLflowReporter, uri: str, members: list[tuple[CoCoDiffConfig, Any]], data,
                        names: list[str], name: str) -> str:
    """Log the seed-0 exported classifier (backbone + head; with --streams one per stream, fused with equal
    weights) as a pyfunc and register it; returns the version."""
    import mlflow

    from service.registry import log_classifier_model

    mlflow.set_tracking_uri(uri)
    version = log_classifier_model(reporter.run_id, members, data.num_classes, tuple(data.test_x.shape[1:]),
                                   names, name)
    reporter.set_tags({"registered_model": f"{name}/{version}"})
    return version


def check_streams(streams: list[str] | None) -> None:
    """--streams names each known stream at most once."""
    for i, stream in enumerate(streams or []):
        if stream not in STREAMS:
            raise InputError(f"--streams: unknown stream {stream!r} (expected {', '.join(STREAMS)})")
        if stream in streams[:i]:
            raise InputError(f"--streams: {stream} given twice")


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_streams(args.streams)
    uri = resolve_tracking_uri(args.tracking_uri)
    tree, split_name = load_source(args.source, uri)
    method = tree.get("method", "tdsm")
    if method not in METHOD_CONFIGS:
        raise InputError(f"--from {args.source}: method {method!r} is not one of {', '.join(METHOD_CONFIGS)}")
    cfg = build_config(METHOD_CONFIGS[method], tree, source=args.source)  # fail early, naming the offending key
    if args.seeds < 1:
        raise InputError(f"--seeds must be >= 1 (got {args.seeds})")
    args.sweep_run_id = source_sweep_run_id(args.source, uri)
    if method == "cocodiff":
        if args.splits:   # the same config on other data: search_spaces/cocodiff_splits.yaml
            targets = [(name, absolute_paths(build_config(CoCoDiffConfig, tree, ov).model_dump(mode="json"), method))
                       for name, ov in load_splits(splits_file(method, args.splits_file), args.splits)]
        else:
            targets = [(split_name or cocodiff_fit.dataset_label(cfg), tree)]
        args.out = args.out or default_out(args, method, [split for split, _ in targets])
        print(f"[final] tables in {args.out}", file=sys.stderr)
        rows = [row for split, t in targets for row in run_cocodiff_split(args, split, t, uri)]
        table = cocodiff_table(rows)
        print(table, file=sys.stderr)
        print(json.dumps({"method": method, "rows": [{k: (round(v, 3) if isinstance(v, float) else v)
                                                      for k, v in r.items()} for r in rows], "table": table}))
        return 0
    if args.ablation:
        raise InputError("--ablation: cocodiff only (baseline vs +CoCoDiff module)")
    if args.streams:
        raise InputError("--streams: cocodiff only (tdsm scores pre-extracted features, it has no input streams)")
    if args.splits:
        storage = args.storage_path.expanduser().resolve()
        targets = [(name, absolute_paths(build_config(TDSMConfig, tree, resolve_chain(ov, storage)).model_dump(mode="json")))
                   for name, ov in load_splits(splits_file(method, args.splits_file), args.splits)]
    else:
        name = split_name or (cfg.data.source if cfg.data.source == "synthetic" else Path(cfg.data.features_dir).name)
        targets = [(name, tree)]
    args.out = args.out or default_out(args, method, [split for split, _ in targets])
    print(f"[final] tables and report in {args.out}", file=sys.stderr)
    rows = [run_split(args, split, t, uri) for split, t in targets]
    table = markdown_table(rows)
    print(table, file=sys.stderr)
    from service.report import write_report   # ours beside the paper's figure per split, logged on each final run

    report, _ = write_report(uri, {r["split"]: r["parent_run_id"] for r in rows},
                             splits_file(method, args.splits_file), args.out)
    print(report, file=sys.stderr)
    print(json.dumps({"splits": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in rows], "table": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
