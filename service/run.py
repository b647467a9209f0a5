"""One local run, no Ray: `python -m service.run tdsm [--config F] [--set k=v ...]`.

Trains on the seen classes minus the validation classes, keeps the best-on-validation weights, evaluates the
unseen test classes once at the end, logs everything to MLflow, and prints one JSON line of final metrics.
Re-running the same command resumes from the run directory's last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from service.cli import add_config_args, exits_cleanly, resolve_config
from service.tracking import MLflowReporter, resolve_tracking_uri, standard_tags
from trainers.config import dump_yaml, flatten, to_plain
from trainers.errors import InputError
from trainers.io import stable_hash
from trainers.plots import plot_confusion, plot_t_curve
from trainers.tdsm_fit import (BEST, evaluate_split, fit_tdsm, load_best_weights, training_fingerprint)
from trainers.tdsm_model import count_parameters
from trainers.tdsm_task import prepare_tdsm


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.run", description=__doc__.splitlines()[0])
    p.add_argument("method", choices=["tdsm", "cocodiff"])
    add_config_args(p)
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--experiment-name", help="MLflow experiment (default: <method>-<dataset>)")
    p.add_argument("--run-dir", type=Path, help="checkpoints here (default: runs/<method>-<dataset>-<config hash>)")
    p.add_argument("--fresh", action="store_true", help="delete the run dir first instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def log_zsl_plots(reporter: MLflowReporter, curve, names: list[str], t_test: int, prefix: str) -> None:
    """t_test curve and confusion matrix of one split as PNG artifacts under plots/."""
    with tempfile.TemporaryDirectory() as tmp:
        curve_png = plot_t_curve(curve, Path(tmp) / f"{prefix}_t_test_curve.png", f"{prefix}: accuracy vs t_test", t_test)
        conf_png = plot_confusion(curve.at(t_test), names, Path(tmp) / f"{prefix}_confusion.png")
        reporter.log_artifact(curve_png, "plots")
        reporter.log_artifact(conf_png, "plots")


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics without the per-t_test grid points (those are in MLflow and the curve plot)."""
    return {k: round(v, 4) for k, v in metrics.items() if not re.search(r"_t\d+$", k)}


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.method == "cocodiff":
        raise InputError("method 'cocodiff' is not available yet (tracked in issue 5); use 'tdsm'")
    cfg = resolve_config(args.method, args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0

    print("preparing data and text features ...", file=sys.stderr)
    task, names, text = prepare_tdsm(cfg)
    fit_train, val, fit_classes = task.tuning_split()
    run_dir = args.run_dir or Path("runs") / f"tdsm-{task.name}-{training_fingerprint(cfg)[:8]}"
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    uri = resolve_tracking_uri(args.tracking_uri)
    id_file = run_dir / "mlflow_run.json"
    previous = json.loads(id_file.read_text()) if id_file.is_file() else {}
    # The run dir is keyed by the training config only; MLflow params cannot change, so a resume under other
    # evaluation settings opens a new MLflow run (training still resumes from last.pt).
    config_hash = stable_hash(to_plain(cfg))
    same_run = previous.get("tracking_uri") == uri and previous.get("config_hash") == config_hash
    reporter = MLflowReporter.start(
        uri, args.experiment_name or f"tdsm-{task.name}", run_dir.name,
        tags=standard_tags(split=task.name, phase="run", method="tdsm"),
        run_id=previous.get("run_id") if same_run else None)
    id_file.write_text(json.dumps({"run_id": reporter.run_id, "tracking_uri": uri, "config_hash": config_hash}))
    print(f"run dir {run_dir}  |  mlflow run {reporter.run_id} at {uri}", file=sys.stderr)
    try:
        reporter.log_params(flatten(to_plain(cfg)))
        reporter.log_params({"derived.num_train_classes": len(fit_classes), "derived.val_classes": task.val,
                             "derived.unseen_classes": task.unseen, "derived.train_samples": len(fit_train)})
        reporter.log_text(dump_yaml(cfg), "config.yaml")
        result = fit_tdsm(cfg, fit_train, fit_classes, val, task.val, text, reporter, run_dir,
                          eval_prefix="val", progress=not args.no_progress)
        reporter.log_params({"derived.num_parameters": count_parameters(result.model)})
        load_best_weights(result.model, run_dir)
        best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False) if (run_dir / BEST).is_file() else {}
        val_metrics = best.get("metrics", result.last_metrics)
        test_metrics, test_curve = evaluate_split(cfg, result.model, task.test, task.unseen, text, "test")
        reporter.log_metrics(test_metrics, result.step)
        if result.last_curve is not None:
            log_zsl_plots(reporter, result.last_curve, names, cfg.eval.t_test, "val")
        log_zsl_plots(reporter, test_curve, names, cfg.eval.t_test, "test")
        if (run_dir / BEST).is_file():
            reporter.log_artifact(run_dir / BEST, "checkpoints")
    except BaseException:
        reporter.finish("FAILED" if not isinstance(sys.exc_info()[1], KeyboardInterrupt) else "KILLED")
        raise
    reporter.finish()
    final = {**headline(val_metrics), **headline(test_metrics), "mlflow_run_id": reporter.run_id,
             "run_dir": str(run_dir)}
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
