"""What a run logs besides metrics: the selection (`<objective>_max`, best_step), plots and predictions, best.pt."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.tracking.store import MLflowReporter
from trainers.checkpoint import BEST
from trainers.plots import confusion_figure, t_curve_figure
from trainers.zsl import metrics_from_errors


def log_best_checkpoint(mlflow: MLflowReporter, checkpoint_dir: Path | None) -> None:
    """The kept weights (best.pt of either fit loop) under checkpoints/."""
    if checkpoint_dir is not None and (checkpoint_dir / BEST).is_file():
        mlflow.log_artifact(checkpoint_dir / BEST, "checkpoints")


def log_selection(reporter: MLflowReporter, objective: str, best_metrics: dict[str, float], best_step: int,
                  step: int, chosen: dict[str, Any]) -> dict[str, float | int]:
    """Log the kept checkpoint's objective as `<objective>_max` (at the last step), a best_step tag and the tags of
    what it chose on validation (`chosen`: Method.selection_tags, as a sweep trial sets them); returns the JSON's
    selection keys (rounded like headline)."""
    if objective not in best_metrics:                 # no evaluation ran: nothing was selected
        return {}
    value = float(best_metrics[objective])
    reporter.log_metrics({f"{objective}_max": value}, step)
    reporter.set_tags({"best_step": best_step, **chosen})     # service.final --from RUN_ID reads them
    return {f"{objective}_max": round(value, 4), "best_step": best_step}


def log_zsl_plots(reporter: MLflowReporter, curve, names: list[str], t_test: int, prefix: str) -> None:
    """t_test curve and confusion matrix of one split as PNG artifacts under plots/."""
    # The test curve is shown for reference; t_test comes from the config or validation, never from this plot.
    title = f"{prefix}: accuracy vs t_test" + (" (not used for selection)" if prefix == "test" else "")
    reporter.log_figure(t_curve_figure(curve, title, t_test), f"plots/{prefix}_t_test_curve.png")
    reporter.log_figure(confusion_figure(curve.at(t_test), names), f"plots/{prefix}_confusion.png")


def log_classification_outputs(reporter: MLflowReporter, logits: torch.Tensor, labels: torch.Tensor,
                               names: list[str], prefix: str) -> None:
    """Logits (N, C) and labels (N,) as .npy under predictions/ (for stream ensembles; MLflow has no array logger),
    confusion PNG under plots/."""
    # A classifier's confusion is the zero-shot one with one "draw" whose error is -logit (argmin = argmax).
    metrics = metrics_from_errors(-logits.float()[None], labels.cpu(), list(range(logits.shape[1])), t_test=0)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / f"{prefix}_logits.npy", logits.float().cpu().numpy())
        np.save(Path(tmp) / f"{prefix}_labels.npy", labels.cpu().numpy())
        reporter.log_artifact(Path(tmp) / f"{prefix}_logits.npy", "predictions")
        reporter.log_artifact(Path(tmp) / f"{prefix}_labels.npy", "predictions")
    reporter.log_figure(confusion_figure(metrics, names, f"{prefix}: confusion (top-1 {metrics.top1:.1f}%)"),
                        f"plots/{prefix}_confusion.png")

