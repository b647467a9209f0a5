"""One local run, no Ray: `python -m service.run {tdsm,cocodiff} [--config F] [--set k=v ...]`.

tdsm: trains on the seen classes minus the validation classes, keeps the best-on-validation weights, evaluates
the unseen test classes once at the end. cocodiff: trains the backbone (+ the CoCoDiff module) on the training
split, keeps the best-on-validation classifier, evaluates the test split once at the end with the exported
classifier (backbone + head only). Both log everything to MLflow and print one JSON line of final metrics.
Re-running the same command resumes from the run directory's last checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from service.cli import (
    DEFAULT_STORAGE,
    METHOD_CONFIGS,
    add_config_args,
    exits_cleanly,
    lock_dir,
    resolve_config,
)
from service.cocodiff_data import prepare_cocodiff_inputs
from service.encoder import train_encoder
from service.splits import default_splits, load_splits, resolve_chain, splits_file
from service.tracking import MLflowReporter, resolve_tracking_uri, standard_tags
from trainers import cocodiff_fit
from trainers.cocodiff import CoCoDiffConfig
from trainers.config import TDSMConfig, build_config, dump_yaml, flatten, to_plain
from trainers.io import atomic_write_text, stable_hash
from trainers.plots import plot_confusion, plot_t_curve
from trainers.tdsm_fit import (
    BEST,
    evaluate_split,
    fit_tdsm,
    load_best,
    training_fingerprint,
)
from trainers.tdsm_model import count_parameters
from trainers.tdsm_task import prepare_tdsm
from trainers.zsl import metrics_from_errors


EXAMPLES = """examples:
  python -m service.run tdsm                      # the embedded default: skeleton chain, then TDSM (= make demo)
  python -m service.run tdsm --print-config       # the config that would run (split and chain resolved), as YAML
  python -m service.run tdsm --split synthetic-u5 --set optim.lr=3e-4 --set model.preset=small
  python -m service.run tdsm --features DATA/shift_ntu60_5_r --unseen DATA/label_splits/ru5.npy \\
      --val-unseen DATA/label_splits/rv5_0.npy --class-names ntu60.csv --descriptions ntu60_llm.txt
  python -m service.run cocodiff --config service/configs/cocodiff_paper.yaml --split ntu60-xsub

The last stdout line is JSON: <objective>_max (the kept checkpoint's validation score: val/zsl_top1_max for
tdsm, val/top1_max for cocodiff), best_step, the test metrics, mlflow_run_id, run_dir; the MLflow run holds the
same values under the same names and a best_step tag.
"""

# The validation metric that chooses the kept (best.pt) weights; reported as `<metric>_max`, the name the sweep
# ranks trials on (its running maximum), so the JSON line, the MLflow run and a sweep trial agree.
OBJECTIVES = {"tdsm": "val/zsl_top1", "cocodiff": "val/top1"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.run", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=["tdsm", "cocodiff"],
                   help="tdsm: zero-shot (TDSM); cocodiff: supervised classification (CoCoDiff)")
    add_config_args(p)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment-name", help="MLflow experiment (default: <method>-<dataset>)")
    p.add_argument("--run-dir", type=Path, help="checkpoints here (default: runs/<method>-<dataset>-<config hash>)")
    p.add_argument("--fresh", action="store_true", help="delete the run dir first instead of resuming")
    p.add_argument("--split", help="a named split of --splits-file (default: the data flags, else the method's "
                                   "embedded default: tdsm = synthetic-skeleton)")
    p.add_argument("--splits-file", type=Path, help="default: search_spaces/<method>_splits.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def log_selection(reporter: MLflowReporter, method: str, best_metrics: dict[str, float], best_step: int,
                  step: int) -> dict[str, float | int]:
    """Log the kept checkpoint's objective as `<objective>_max` (at the last step) and a best_step tag; returns the
    JSON's selection keys (rounded like headline)."""
    objective = OBJECTIVES[method]
    if objective not in best_metrics:                 # no evaluation ran: nothing was selected
        return {}
    value = float(best_metrics[objective])
    reporter.log_metrics({f"{objective}_max": value}, step)
    tags: dict[str, int] = {"best_step": best_step}
    if "val/best_t_test" in best_metrics:             # as a sweep trial: service.final --from RUN_ID reads it
        tags["best_t_test"] = int(best_metrics["val/best_t_test"])
    reporter.set_tags(tags)
    return {f"{objective}_max": round(value, 4), "best_step": best_step}


def log_zsl_plots(reporter: MLflowReporter, curve, names: list[str], t_test: int, prefix: str) -> None:
    """t_test curve and confusion matrix of one split as PNG artifacts under plots/."""
    # The test curve is shown for reference; t_test comes from the config or validation, never from this plot.
    title = f"{prefix}: accuracy vs t_test" + (" (not used for selection)" if prefix == "test" else "")
    with tempfile.TemporaryDirectory() as tmp:
        curve_png = plot_t_curve(curve, Path(tmp) / f"{prefix}_t_test_curve.png", title, t_test)
        conf_png = plot_confusion(curve.at(t_test), names, Path(tmp) / f"{prefix}_confusion.png")
        reporter.log_artifact(curve_png, "plots")
        reporter.log_artifact(conf_png, "plots")


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics without the per-t_test grid points (those are in MLflow and the curve plot)."""
    return {k: round(v, 4) for k, v in metrics.items() if not re.search(r"_t\d+$", k)}


def log_classification_outputs(reporter: MLflowReporter, logits: torch.Tensor, labels: torch.Tensor,
                               names: list[str], prefix: str) -> None:
    """Logits (N, C) and labels (N,) as .npy under predictions/ (for stream ensembles), confusion PNG under plots/."""
    # A classifier's confusion is the zero-shot one with one "draw" whose error is -logit (argmin = argmax).
    metrics = metrics_from_errors(-logits.float()[None], labels.cpu(), list(range(logits.shape[1])), t_test=0)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / f"{prefix}_logits.npy", logits.float().cpu().numpy())
        np.save(Path(tmp) / f"{prefix}_labels.npy", labels.cpu().numpy())
        reporter.log_artifact(Path(tmp) / f"{prefix}_logits.npy", "predictions")
        reporter.log_artifact(Path(tmp) / f"{prefix}_labels.npy", "predictions")
        png = plot_confusion(metrics, names, Path(tmp) / f"{prefix}_confusion.png",
                             f"{prefix}: confusion (top-1 {metrics.top1:.1f}%)")
        reporter.log_artifact(png, "plots")


def open_run(args, method: str, dataset: str, fingerprint: str, cfg) -> tuple[Path, MLflowReporter]:
    """The run dir (keyed by the training config; --fresh empties it) and its MLflow run, re-opened on resume."""
    dataset = args.split or dataset             # a named split names the run dir and the experiment
    run_dir = args.run_dir or Path("runs") / f"{method}-{dataset}-{fingerprint[:8]}"
    lock = lock_dir(run_dir)                    # before reading or emptying it: one writer per run dir
    if args.fresh:
        for child in run_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            elif child != lock:
                child.unlink()
    uri = resolve_tracking_uri(args.tracking_uri)
    id_file = run_dir / "mlflow_run.json"
    try:
        previous = json.loads(id_file.read_text()) if id_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"note: {id_file} is unreadable; starting a new MLflow run", file=sys.stderr)
        previous = {}
    # The run dir is keyed by the training config only; MLflow params cannot change, so a resume under other
    # evaluation settings opens a new MLflow run (training still resumes from last.pt).
    config_hash = stable_hash(to_plain(cfg))
    same_run = previous.get("tracking_uri") == uri and previous.get("config_hash") == config_hash
    reporter = MLflowReporter.start(
        uri, args.experiment_name or f"{method}-{dataset}", run_dir.name,
        tags=standard_tags(split=dataset, phase="run", method=method),
        run_id=previous.get("run_id") if same_run else None)
    atomic_write_text(id_file, json.dumps({"run_id": reporter.run_id, "tracking_uri": uri, "config_hash": config_hash}))
    print(f"run dir {run_dir}  |  mlflow run {reporter.run_id} at {uri}", file=sys.stderr)
    return run_dir, reporter


def run_tdsm(args, cfg: TDSMConfig) -> dict:
    """Train, keep the best-on-validation weights, test the unseen classes once; returns the final metrics."""
    print("preparing data and text features ...", file=sys.stderr)
    task, names, text = prepare_tdsm(cfg)
    fit_train, val, fit_classes = task.tuning_split()
    run_dir, reporter = open_run(args, "tdsm", task.name, training_fingerprint(cfg), cfg)
    try:
        reporter.log_params(flatten(to_plain(cfg)))
        reporter.log_params({"derived.seen_classes": len(task.seen), "derived.num_train_classes": len(fit_classes),
                             "derived.val_classes": task.val,
                             "derived.unseen_classes": task.unseen, "derived.train_samples": len(fit_train)})
        reporter.log_text(dump_yaml(cfg), "config.yaml")
        result = fit_tdsm(cfg, fit_train, fit_classes, val, task.val, text, reporter, run_dir,
                          eval_prefix="val", progress=not args.no_progress)
        reporter.log_params({"derived.num_parameters": count_parameters(result.model)})
        best = load_best(run_dir) if (run_dir / BEST).is_file() else {}    # one-line InputError when unreadable
        if best:
            result.model.load_state_dict(best["model"])
        val_metrics = best.get("metrics", result.last_metrics)
        test_metrics, test_curve = evaluate_split(cfg, result.model, task.test, task.unseen, text, "test")
        reporter.log_metrics(test_metrics, result.step)
        selection = log_selection(reporter, "tdsm", val_metrics, int(best.get("step", result.step)), result.step)
        if result.last_curve is not None:
            log_zsl_plots(reporter, result.last_curve, names, cfg.eval.t_test, "val")
        log_zsl_plots(reporter, test_curve, names, cfg.eval.t_test, "test")
        if (run_dir / BEST).is_file():
            reporter.log_artifact(run_dir / BEST, "checkpoints")
    except BaseException:
        reporter.finish("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    reporter.finish()
    # seen_classes: the classes with training samples (training + validation); the negative pool is drawn from them.
    return {**selection, **headline(test_metrics), "seen_classes": len(task.seen),
            "mlflow_run_id": reporter.run_id, "run_dir": str(run_dir)}


def run_cocodiff(args, cfg: CoCoDiffConfig) -> dict:
    """Train backbone (+ module), keep the best-on-validation classifier, test it once; returns the final metrics."""
    print("preparing data and text features ...", file=sys.stderr)
    data, names, fine, coarse = prepare_cocodiff_inputs(cfg)
    text_dims = (fine.shape[1], coarse.shape[1]) if fine is not None else None
    fingerprint = cocodiff_fit.training_fingerprint(cfg, data.train_x, data.num_classes, text_dims)
    run_dir, reporter = open_run(args, "cocodiff", cocodiff_fit.dataset_label(cfg), fingerprint, cfg)
    try:
        reporter.log_params(flatten(to_plain(cfg)))
        reporter.log_params({"derived.num_classes": data.num_classes, "derived.train_samples": len(data.train_y),
                             "derived.val_samples": len(data.val_y), "derived.test_samples": len(data.test_y)})
        reporter.log_text(dump_yaml(cfg), "config.yaml")
        result = cocodiff_fit.fit_cocodiff(cfg, data.train_x, data.train_y, data.val_x, data.val_y, fine, coarse,
                                           reporter, run_dir, progress=not args.no_progress,
                                           num_classes=data.num_classes)
        classifier = cocodiff_fit.export_classifier(result)       # backbone + head, best-on-validation weights
        reporter.log_params({"derived.num_parameters_inference": count_parameters(classifier),
                             "derived.num_parameters_module": count_parameters(result.module) if result.module else 0})
        test_metrics, test_logits = cocodiff_fit.evaluate_split(cfg, classifier, data.test_x, data.test_y, "test")
        reporter.log_metrics(test_metrics, result.step)
        selection = log_selection(reporter, "cocodiff", result.best_metrics or {}, result.best_step, result.step)
        if result.val_logits is not None:
            log_classification_outputs(reporter, result.val_logits, data.val_y, names, "val")
        log_classification_outputs(reporter, test_logits, data.test_y, names, "test")
        if (run_dir / cocodiff_fit.BEST).is_file():
            reporter.log_artifact(run_dir / cocodiff_fit.BEST, "checkpoints")
    except BaseException:
        reporter.finish("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    reporter.finish()
    return {**selection, **headline(test_metrics), "mlflow_run_id": reporter.run_id, "run_dir": str(run_dir)}


RUNNERS = {"tdsm": run_tdsm, "cocodiff": run_cocodiff}
PENDING = "  # (built on first run)"


def resolved_config_yaml(method: str, cfg, split: str | None, overrides: dict | None, splits_path: Path,
                         storage: Path) -> str:
    """The config that will run, as YAML loadable by --config: the named (or default) split applied and a skeleton
    chain resolved to its cached outputs. Trains nothing: a chain not yet built shows the paths it will write."""
    if overrides is None:
        return dump_yaml(cfg)
    resolved = resolve_chain(overrides, storage, build=False)   # generate + prepare only (cached)
    cfg = build_config(METHOD_CONFIGS[method], to_plain(cfg), resolved)
    head = f"# split {split} of {splits_path}\n"
    text = dump_yaml(cfg)
    if "chain" not in overrides:
        return head + text
    features = resolved["data.features_dir"]
    head += f"# data and text: the skeleton chain's outputs under {storage / 'chain'}\n"
    if not (Path(features) / "done.json").is_file():   # done.json: written last by the chain's extract stage
        # The encoder is trained and the features extracted by the first run; the paths are fixed already.
        head += "# the features are not built yet: run without --print-config first, then --config this file\n"
        text = text.replace(f"  features_dir: {features}\n", f"  features_dir: {features}{PENDING}\n", 1)
    return head + text


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args.method, args)
    names = [args.split] if args.split else default_splits(args.method, args)
    overrides = None
    storage = DEFAULT_STORAGE.expanduser().resolve()
    if names:
        args.split = names[0]
        [(_, overrides)] = load_splits(splits_file(args.method, args.splits_file), names)
    if args.print_config:
        print(resolved_config_yaml(args.method, cfg, args.split, overrides,
                                   splits_file(args.method, args.splits_file), storage), end="")
        return 0
    args.tracking_uri = resolve_tracking_uri(args.tracking_uri)   # credentials out, server probed: before any work
    if overrides is not None:
        trainer = functools.partial(train_encoder, progress=not args.no_progress)     # in this process, no Ray
        cfg = build_config(METHOD_CONFIGS[args.method], to_plain(cfg), resolve_chain(overrides, storage, trainer))
    print(json.dumps(RUNNERS[args.method](args, cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
