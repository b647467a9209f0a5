"""What a method is to the service: the `Method` base class, the typed options every command passes down, and
the `Trial` a method's sweep-trial fit gets from its Ray trial (service.orchestration.trial builds it).

A method is in two parts. Its *spec* (`service/methods/<name>_spec.py`) is light (no torch, MLflow or Ray): the
config class, the objective, its own command-line flags and options, how its data and best config are named. The
CLIs build their parsers and `--print-config` from specs alone, so `--help` answers before any heavy import. Its
*implementation* (`service/methods/<name>.py`, a subclass of the spec) adds what it runs: the sweep trial's fit,
`service.run`, `service.final` (and `service.report`). `service.methods.implemented.implementation` joins the two.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from trainers.errors import InputError

if TYPE_CHECKING:
    from service.storage import Storage
    from service.tracking.store import MLflowReporter
    from trainers.tracking import Artifacts, Reporter

@dataclass(frozen=True)
class RunOptions:
    """`service.run`: one local run (no Ray)."""

    method: Method
    split: str | None              # the named (or default) split the data comes from; None: the config's own
    tracking_uri: str | None       # as given (None: $MLFLOW_TRACKING_URI or ./mlflow.db); resolved by the job
    experiment_name: str | None
    run_dir: Path | None
    fresh: bool
    progress: bool
    extra: Mapping[str, Any] = field(default_factory=dict)     # the method's own flags (Method.options)


@dataclass(frozen=True)
class SweepOptions:
    """`service.sweep`: one Ray Tune sweep per split."""

    method: Method
    space: Any                     # the SearchSpace (service.methods.search_space)
    num_samples: int
    smoke: bool
    scheduler: str                 # asha | fifo
    search: str                    # random | optuna
    seed: int
    max_concurrent: int | None
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float
    trial_retries: int
    trial_driver: str              # auto | direct | train
    experiment_name: str | None
    name: str | None
    tracking_uri: str | None       # as given; resolved by the job
    storage: Storage
    address: str | None
    resume: bool
    ray_logs: bool
    extra: Mapping[str, Any] = field(default_factory=dict)     # reaches each trial as Trial.options


@dataclass(frozen=True)
class FinalOptions:
    """`service.final`: retrain a chosen config over seeds and test once per seed."""

    method: Method
    source: str                    # what --from named (a best_config.yaml or an MLflow run id)
    sweep_run_id: str | None       # the sweep parent run the config came from, if any
    seeds: int
    overrides: tuple[str, ...]     # --set KEY=VALUE items, applied after --splits
    tracking_uri: str              # resolved (service.orchestration.final.read_source)
    experiment_name: str | None
    out: Storage | None            # None: <storage-path>/final/<method>-<splits>-<time>, set by the job
    register: bool
    progress: bool
    splits_file: Path | None
    extra: Mapping[str, Any] = field(default_factory=dict)


def trial_driver(choice: str, workers_per_trial: int) -> str:
    """`auto`: the Tune trial runs its one worker itself (`direct`); a TorchTrainer (`train`) only for DDP."""
    if choice == "direct" and workers_per_trial > 1:
        raise InputError(f"--trial-driver direct runs one worker per trial, not --workers-per-trial "
                         f"{workers_per_trial}: use --trial-driver train (or auto)")
    return choice if choice != "auto" else ("direct" if workers_per_trial == 1 else "train")


# (MLflow run, the last evaluation's artifacts, checkpoint folder or None): what a trial logs before its last report.
FinalArtifacts = Callable[["MLflowReporter", "Artifacts", "Path | None"], None]


@dataclass(frozen=True)
class Trial:
    """What a method's sweep-trial fit gets: the trial's config (seed and device applied), the sweep's shared
    inputs, a fresh run dir holding the restored checkpoint, the reporter, and its place in DDP."""

    cfg: Any
    data: Any
    reporter: Reporter
    run_dir: Path
    rank: int = 0
    world: int = 1
    wrap_model: Callable | None = None      # the DDP wrapper (None for one worker)
    options: Mapping[str, Any] = field(default_factory=dict)    # the method's own sweep flags (SweepOptions.extra)


class Method:
    """Everything the CLIs, the sweep and the trials know about one method; nothing else branches on it.

    Class attributes and the light hooks (flags, options, names, selection) are the spec; `prepare`, `trial_params`,
    `fit_trial`, `trial_artifacts`, `run`, `final` and `report` are the implementation."""

    name: ClassVar[str]                         # the config's `method:`, CLI choices, MLflow tags
    config_cls: ClassVar[type]                  # its pydantic config (trainers/)
    objective: ClassVar[str]                    # validation metric choosing the kept weights; ranked as <objective>_max
    rankable_metrics: ClassVar[tuple[str, ...]]  # validation metrics of every evaluation: what a sweep may rank on
    about: ClassVar[str] = ""                   # one line for the CLIs' method choices
    default_split: ClassVar[str | None] = None  # the split a command runs when it names no data (None: the config's)
    inference_grid: ClassVar[bool] = False      # its search space scores an inference-time grid (`inference:`)
    chosen_tags: ClassVar[tuple[str, ...]] = ()  # the tags `selection_tags` sets: columns of the sweep's trial tables
    flags_hint: ClassVar[str] = ""              # what its own flags are, for the refusal when another method gets one
    report_table: ClassVar[bool] = False        # implements `report` (service.report's cross-split table)

    # -- spec: command line --------------------------------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser, command: str) -> None:
        """Add this method's own flags to `command`'s parser (run, sweep, final); help text names the method."""

    def options(self, given: Mapping[str, Any], command: str) -> dict[str, Any]:
        """This method's own options from the parsed flags (`given`: flag dest -> value, as cli/ parsed them),
        checked (InputError names the flag); they travel as `*Options.extra`."""
        return {}

    def config_overrides(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Dotted config overrides implied by this method's shortcut flags (run, sweep)."""
        return {}

    # -- spec: names and selection -------------------------------------------------------------------------------

    def split_name(self, cfg: Any) -> str:
        """The one name of a config's data when no split names it (run dirs, experiments, tables)."""
        raise NotImplementedError

    def absolute_paths(self, tree: dict[str, Any]) -> dict[str, Any]:
        """The config tree with its data/text paths absolute (trials and Ray jobs run in other directories)."""
        return tree

    def best_config(self, tree: dict[str, Any], tags: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A winning run's config for final runs, from its config tree and MLflow tags; and notes for the summary."""
        return tree, {"best_step": int(tags.get("best_step", 0))}

    def selection_tags(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """Tags set on a run when an evaluation is its best so far, beside best_step: what it chose on validation
        that `best_config` reads back."""
        return {}

    def trial_overrides(self, space: Any, sampled: Mapping[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        """A trial's dotted overrides: its sampled params, plus what the method derives from them and its base
        config tree (e.g. an inference grid that depends on a sampled value)."""
        return dict(sampled)

    def check_space(self, space: Any, base: dict[str, Any], path: Path) -> None:
        """Method-specific checks of a search space against the base config (after every key was checked)."""

    # -- implementation ------------------------------------------------------------------------------------------

    def prepare(self, cfg: Any) -> Any:
        """The inputs every trial of a split shares (put once in Ray's object store)."""
        raise NotImplementedError(f"{self.name}: a spec only")

    def trial_params(self, cfg: Any, data: Any) -> dict[str, Any]:
        """`derived.*` params of a sweep trial's run (model sizes, class counts)."""
        return {}

    def fit_trial(self, trial: Trial) -> None:
        """A sweep trial's fit (Ray-free: orchestration opens and closes the run and reports)."""
        raise NotImplementedError(f"{self.name}: a spec only")

    def trial_artifacts(self, mlflow: MLflowReporter, artifacts: Artifacts, checkpoint_dir: Path | None,
                        data: Any) -> None:
        """What a trial's run logs after its last evaluation (plots, the kept checkpoint)."""

    def run(self, cfg: Any, opts: RunOptions) -> dict[str, Any]:
        """`service.run`: train, select on validation, test once; returns the JSON line."""
        raise NotImplementedError(f"{self.name}: a spec only")

    def final(self, opts: FinalOptions, targets: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """`service.final` on each (split, config tree); returns the JSON line."""
        raise NotImplementedError(f"{self.name}: a spec only")

    def report(self, tracking_uri: str | None, runs: dict[str, str | None], references: dict[str, dict[str, Any]],
               out: Storage, log: bool) -> str:
        """`service.report`: the cross-split table of final runs ({split: final parent run id, None: its latest}),
        beside each split's paper reference; written under `out` (and logged unless `log` is false); returns it."""
        raise InputError(f"--method {self.name}: no cross-split report for this method (service.report)")

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def absolute(p: Any) -> Any:
    """An absolute path string for a path-like value; None and non-paths (lists of ids, counts) unchanged."""
    return None if p is None else (str(Path(p).resolve()) if isinstance(p, (str, Path)) else p)


def absolute_fields(section: dict[str, Any], values: Any, names: tuple[str, ...]) -> None:
    """Set each named key of a config-tree section to its value in `values` (the validated config section) made
    absolute; a list (of files, or of class ids) element by element. Trials and Ray jobs run in other directories."""
    section.update({name: [absolute(v) for v in value] if isinstance(value := getattr(values, name), list)
                    else absolute(value) for name in names})
