"""The seam between fit loops and tracking: fit loops report here; `service/` plugs in Ray/MLflow."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# What an evaluation produced besides its scalars, by name: a zero-shot fit's t_test curve ("zsl_curve", a
# trainers.zsl.ZSLCurve); empty for the classifiers and the encoder. Whoever logs them knows the names it reads.
Artifacts = Mapping[str, Any]


class Reporter(Protocol):
    """What a fit loop tells the outside world."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Frequent scalars (training loss, learning rate)."""

    def log_evaluation(self, metrics: dict[str, float], step: int, artifacts: Artifacts,
                       checkpoint_dir: Path | None) -> None:
        """An evaluation point: scalar metrics, what else it produced (`Artifacts`), and the folder of the
        checkpoint just written."""


@dataclass
class ListReporter:
    """Keeps everything in lists: for tests and for callers that only want the history."""

    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    evaluations: list[tuple[int, dict[str, float], dict[str, Any], Path | None]] = field(default_factory=list)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_evaluation(self, metrics: dict[str, float], step: int, artifacts: Artifacts,
                       checkpoint_dir: Path | None) -> None:
        self.evaluations.append((step, dict(metrics), dict(artifacts), checkpoint_dir))


class NullReporter(ListReporter):
    """Discards everything."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_evaluation(self, metrics: dict[str, float], step: int, artifacts: Artifacts,
                       checkpoint_dir: Path | None) -> None:
        pass
