"""The seam between fit loops and tracking: fit loops report here; `service/` plugs in Ray/MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trainers.zsl import ZSLCurve


class Reporter(Protocol):
    """What a fit loop tells the outside world."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Frequent scalars (training loss, learning rate)."""

    def log_evaluation(self, metrics: dict[str, float], step: int, curve: ZSLCurve | None,
                       checkpoint_dir: Path | None) -> None:
        """An evaluation point: scalar metrics, the full t_test curve (zero-shot fits; None for classifiers
        such as CoCoDiff), and the folder of the checkpoint just written."""


@dataclass
class ListReporter:
    """Keeps everything in lists: for tests and for callers that only want the history."""

    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    evaluations: list[tuple[int, dict[str, float], Any, Path | None]] = field(default_factory=list)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_evaluation(self, metrics: dict[str, float], step: int, curve: ZSLCurve | None,
                       checkpoint_dir: Path | None) -> None:
        self.evaluations.append((step, dict(metrics), curve, checkpoint_dir))


class NullReporter(ListReporter):
    """Discards everything."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_evaluation(self, metrics: dict[str, float], step: int, curve: ZSLCurve | None,
                       checkpoint_dir: Path | None) -> None:
        pass
