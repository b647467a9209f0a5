"""What a method is to the service: the `Method` protocol (one object per method, `service.methods.METHODS`) and the
`TrialContext` a method's trial loop gets from its Ray trial (service.orchestration.trial implements it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from service.tracking.store import MLflowReporter
from trainers.tracking import Artifacts, Reporter

# (MLflow run, the last evaluation's artifacts, checkpoint folder or None): what is logged before the last report.
FinalArtifacts = Callable[[MLflowReporter, Artifacts, "Path | None"], None]


class TrialContext(Protocol):
    """What a trial's worker loop gets: its config (seed and device applied), the sweep's shared inputs, its rank,
    a fresh run dir holding the restored checkpoint, and the DDP wrapper (None for one worker)."""

    cfg: Any
    data: Any
    rank: int
    world: int
    run_dir: Path
    wrap_model: Callable[[nn.Module], nn.Module] | None

    def reporter(self, derived: dict[str, Any], final_artifacts: FinalArtifacts) -> Reporter:
        """Open the trial's MLflow child run (rank 0) with every config param and `derived.*`."""

    def cleanup(self) -> None:
        """Remove the run dir (also when the scheduler stops the trial mid-report)."""

    def close(self) -> None:
        """Finish the MLflow run, then clean up."""


class Method(Protocol):
    """Everything the CLIs, the sweep and the trials need to know about one method; nothing else branches on it."""

    name: str                            # "tdsm" | "cocodiff": the config's `method:`, CLI choices, MLflow tags
    config_cls: type                     # its pydantic config (trainers/)
    objective: str                       # validation metric choosing the kept weights; ranked as f"{objective}_max"
    rankable_metrics: tuple[str, ...]    # validation metrics reported at every evaluation: what a sweep may rank on
    inference_grid: bool                 # its search space scores an inference-time grid (`inference.t_test`)
    default_split: str | None            # the split a command runs when it names no data (None: the config's data)
    data_shortcuts: bool                 # accepts --features / --unseen / --seen / --val-unseen

    def split_name(self, cfg: Any) -> str:
        """The one name of a config's data when no split names it (run dirs, experiments, tables)."""

    def absolute_paths(self, tree: dict[str, Any]) -> dict[str, Any]:
        """The config tree with its data/text paths absolute (trials and Ray jobs run in other directories)."""

    def prepare(self, cfg: Any) -> tuple:
        """The inputs every trial of a split shares, a NamedTuple (put once in Ray's object store)."""

    def best_config(self, tree: dict[str, Any], tags: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A winning run's config for final runs, from its config tree and MLflow tags; and notes for the summary."""

    def fit_trial(self, trial: TrialContext) -> None:
        """A sweep trial's worker loop (Ray-free: the trial context carries what Ray provides)."""

    def run(self, cfg: Any, args: Any) -> dict[str, Any]:
        """`service.run`: train, select on validation, test once; returns the JSON line."""

    def check_final(self, args: Any) -> None:
        """Refuse `service.final` flags the method has no use for."""

    def final(self, args: Any, targets: list[tuple[str, dict[str, Any]]], uri: str) -> dict[str, Any]:
        """`service.final` on each (split, config tree); returns the JSON line."""
