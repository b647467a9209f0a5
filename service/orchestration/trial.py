"""One Tune trial: the worker loops, their Reporter, and the Tune function that runs them.

Two trial drivers run the same worker loop:
- `direct` (the default for one worker per trial): the Tune function trainable runs the loop itself and reports
  with `ray.tune.report`. No TorchTrainer, no Train controller, no second placement group: on 2 CPUs a trial's
  first metric comes ~4x sooner (docs/benchmarks.md).
- `train` (needed for DDP, `--workers-per-trial > 1`): Ray 2.60 (Train V2) supports Train inside Tune as a Tune
  function trainable that builds a TorchTrainer and calls fit(); TuneReportCallback forwards rank-0 metrics to
  Tune, where ASHA acts.
The trial's lifecycle is this module's (as Ray's `setup_mlflow` at rank 0): `run_worker` builds the config, reads
the data from the object store, restores the checkpoint, opens the MLflow child run with every config param, runs
the method's fit (`Method.fit_trial`) with a `TrialReporter`, logs the method's last artifacts before the last
report, then closes the run and cleans up. A method supplies only what to fit and what to log; how a result and a
checkpoint reach Tune is the `TrialSession`. Typed frozen objects cross the Ray boundary:
`TrialSettings` (driver -> each trial) and `TrialLoop` (trial -> each worker).
"""

from __future__ import annotations

import functools
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from service.methods.base import FinalArtifacts, Method, Trial
from service.methods.search_space import SearchSpace
from service.orchestration.cluster import input_error_cause
from service.storage import Storage
from service.tracking.store import MLflowReporter, standard_tags
from service.tracking.trials import find_or_start_child_run, trial_label
from trainers.checkpoint import LAST, copy_run_files
from trainers.config import build_config, dump_yaml, flatten, to_plain
from trainers.errors import InputError
from trainers.io import load_torch
from trainers.runtime import apply_thread_policy
from trainers.tracking import Artifacts


@dataclass(frozen=True)
class ParentRun:
    """The sweep's MLflow parent run of a split, which every trial run nests under."""

    tracking_uri: str
    experiment: str
    run_id: str


@dataclass(frozen=True)
class TrialResources:
    """What one trial reserves: `direct` runs its single worker in the Tune trial, `train` a TorchTrainer."""

    driver: str                   # direct | train
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float


@dataclass(frozen=True)
class TrialSettings:
    """Everything a sweep's trials share (driver side -> each Tune trial, through tune.with_parameters)."""

    method: Method                # the implementation (service.methods.implemented)
    base: dict[str, Any]          # the split's config tree, paths absolute
    space: SearchSpace
    seed: int
    resources: TrialResources
    parent: ParentRun
    split: str
    sweep: str
    storage_path: str             # the trials' Ray Train storage and input_error.txt markers (a folder or a URI)
    data_ref: Any                 # ObjectRef of the method's prepared inputs (ray.put once per split)
    options: Mapping[str, Any] = field(default_factory=dict)    # the method's own sweep flags (Trial.options)


@dataclass(frozen=True)
class TrialLoop:
    """What one trial's worker loop gets (Ray Train passes it inside its train_loop_config dict)."""

    method: Method
    base: dict[str, Any]
    overrides: dict[str, Any]     # the trial's sampled params (+ what the method derives: Method.trial_overrides)
    seed: int
    threads: int                  # torch threads of a worker: its Ray CPUs
    gpus: float
    data_ref: Any
    parent: ParentRun
    trial_id: str
    trial_name: str
    run_name: str                 # the MLflow run's name: what differs between trials
    split: str
    sweep: str
    metric: str                   # the search space's validation metric (its running max is the objective)
    options: Mapping[str, Any] = field(default_factory=dict)


class TrainSession:
    """A Ray Train worker of a TorchTrainer (driver `train`): results and checkpoints go through Ray Train."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    @staticmethod
    def get_checkpoint():
        return ray.train.get_checkpoint()

    @staticmethod
    def report(result: dict[str, Any], checkpoint_dir: str | None) -> None:
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                         if checkpoint_dir else None)


class TuneSession:
    """The Tune trial itself runs the loop (driver `direct`, one worker): results and checkpoints go to Tune."""

    rank, world = 0, 1

    def get_checkpoint(self):
        return tune.get_checkpoint()

    def report(self, result: dict[str, Any], checkpoint_dir: str | None) -> None:
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


TrialSession = TrainSession | TuneSession


class TrialReporter:
    """Reporter of a trial's worker: every rank reports to its session; rank 0 also logs to MLflow and checkpoints.

    Tracks the running maximum of `metric` as `<metric>_max`: the sweep ranks trials on it (an ASHA-stopped or
    restored trial's last value is not its best). Also measures its own cost: each result carries the wall time of
    the trial's first logged metric and the seconds the fit loop spent outside this reporter (`compute_s`), from
    which the driver derives the trial's Ray + MLflow overhead (service.orchestration.sweep.MLflowTrialCloser).
    """

    def __init__(self, session: TrialSession, mlflow: MLflowReporter | None, final_step: int, metric: str,
                 final_artifacts: FinalArtifacts, method: Method):
        self.session = session
        self.method = method
        self.rank = session.rank
        self.mlflow = mlflow
        self.final_step = final_step
        self.metric = metric
        self.final_artifacts = final_artifacts
        self.best = float("-inf")
        self.fit_start = time.time()
        self.first_metric_time: float | None = None
        self.reporting_s = 0.0              # wall time inside this reporter (MLflow calls, Tune reports, copies)

    def _timed(self) -> float:
        now = time.time()
        if self.first_metric_time is None:
            self.first_metric_time = now
        return now

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # Frequent scalars go to MLflow only: each report to Ray costs a round trip (Train: to the controller).
        t0 = self._timed()
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step)
        self.reporting_s += time.time() - t0

    def log_evaluation(self, metrics: dict[str, float], step: int, artifacts: Artifacts,
                       checkpoint_dir: Path | None) -> None:
        t0 = self._timed()
        try:
            self._log_evaluation(metrics, step, artifacts, checkpoint_dir, t0)
        finally:
            self.reporting_s += time.time() - t0

    def _log_evaluation(self, metrics: dict[str, float], step: int, artifacts: Artifacts,
                        checkpoint_dir: Path | None, t0: float) -> None:
        self.best = max(self.best, metrics[self.metric])
        objective = {f"{self.metric}_max": self.best}
        if self.mlflow is not None:
            self.mlflow.log_metrics({**metrics, **objective}, step)
            if metrics[self.metric] >= self.best:
                self.mlflow.set_tags({"best_step": step, **self.method.selection_tags(metrics)})
            if step >= self.final_step:
                # Before the last report: once Tune has it, the scheduler may stop the trial at once.
                self.final_artifacts(self.mlflow, artifacts, checkpoint_dir)
        out = self.tune_result(metrics, step)
        # Time inside this reporter up to here is overhead; the loop's own time (now - fit_start - reporting) is not.
        out.update(first_metric_time=self.first_metric_time, compute_s=t0 - self.fit_start - self.reporting_s)
        if self.rank == 0 and checkpoint_dir is not None:
            with tempfile.TemporaryDirectory() as tmp:
                copy_run_files(checkpoint_dir, Path(tmp))
                self.session.report(out, tmp)
        else:
            self.session.report(out, None)

    def tune_result(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        """What Tune sees (its status table, ASHA, the closer): the objective first, the metric, what the evaluation
        chose (Method.selection_tags). Every other metric goes to MLflow only, so Tune's result boxes stay short."""
        chosen = self.method.selection_tags(metrics)
        outage = self.mlflow.outage if self.mlflow is not None else None
        # A tracking outage the trial rode out: the driver says so (workers' warnings stay in Ray's node logs).
        seen = {} if outage is None or not outage.seconds() else {
            "tracking_outage_s": round(outage.seconds(), 1), "tracking_buffered": outage.buffered}
        return {f"{self.metric}_max": self.best, self.metric: metrics[self.metric], **chosen, "step": step, **seen}


# ----------------------------------------------------------------------------------------------
# Worker loops
# ----------------------------------------------------------------------------------------------

class TrialWorker:
    """One worker of a trial: its config, the sweep's data, the latest checkpoint restored into a fresh run dir,
    and (rank 0) the trial's MLflow child run with every flattened config param."""

    def __init__(self, loop: TrialLoop, session: TrialSession | None = None):
        self.session = session or TrainSession()
        self.loop = loop
        self.method = loop.method
        self.rank, self.world = self.session.rank, self.session.world
        self.wrap_model = ray.train.torch.prepare_model if self.world > 1 else None
        apply_thread_policy(cpus=loop.threads)   # the worker's Ray CPUs, less if its cores are fewer
        # A trial that reserved no GPU trains on the CPU even where one is visible (Ray 2.60 no longer hides the
        # GPUs from a process that reserved none).
        cpu_only = {"train.device": "cpu"} if not loop.gpus and loop.base.get("train", {}).get(
            "device", "auto") == "auto" else {}
        self.cfg = build_config(self.method.config_cls, loop.base,
                                {**loop.overrides, **cpu_only, "train.seed": loop.seed})   # same on every rank
        self.data = ray.get(loop.data_ref)  # prepared once per sweep by the driver (object store)
        self.mlflow: MLflowReporter | None = None
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{self.method.name}-trial-"))
        self.restored_step: int | None = None
        checkpoint = self.session.get_checkpoint()
        if checkpoint is not None:  # a retried or resumed trial continues from its latest checkpoint
            with checkpoint.as_directory() as d:
                copy_run_files(Path(d), self.run_dir)
            self.restored_step = checkpoint_step(self.run_dir / LAST)

    def open_run(self, derived: dict[str, Any]) -> TrialReporter:
        """Open (or find, on a retry) the MLflow child run on rank 0; derived.* params describe the model."""
        loop = self.loop
        if self.rank == 0:
            # Named by what differs between trials (the Ray names stay as tags, for `--resume` and Ray's logs).
            self.mlflow = find_or_start_child_run(
                loop.parent.tracking_uri, loop.parent.experiment, loop.parent.run_id, loop.trial_id, loop.run_name,
                standard_tags(split=loop.split, phase="sweep", method=self.method.name, sweep=loop.sweep,
                              ray_trial_name=loop.trial_name))
            # Where it runs: a trial restarted after its node was lost keeps its run and adds the new node.
            node, host = ray.get_runtime_context().get_node_id(), socket.gethostname()
            seen = self.mlflow.client.get_run(self.mlflow.run_id).data.tags.get("ray_node_ids", "")
            self.mlflow.set_tags({"ray_node_id": node, "host": host, "ray_node_ids": ",".join(
                [*filter(None, seen.split(",")), *([node] if node not in seen else [])])})
            if self.restored_step is not None:
                self.mlflow.set_tags({"resumed_from_step": self.restored_step})
            self.mlflow.log_params({**flatten(to_plain(self.cfg)), "derived.workers": self.world,
                                    **{f"derived.{k}": v for k, v in derived.items()}})
            self.mlflow.log_text(dump_yaml(self.cfg), "config.yaml")
        final_artifacts = functools.partial(self.method.trial_artifacts, data=self.data)
        return TrialReporter(self.session, self.mlflow, self.cfg.train.steps, loop.metric, final_artifacts,
                             self.method)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.finish()
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the local run dir (its checkpoints went to Ray with each report), also when the scheduler stops
        the trial: Ray then ends the loop inside its report call (SystemExit)."""
        shutil.rmtree(self.run_dir, ignore_errors=True)


def checkpoint_step(path: Path) -> int | None:
    """The step a restored last.pt continues from (tagged on the trial's run: what a restart re-trains)."""
    try:
        step = load_torch(path).get("step")
    except (InputError, AttributeError):
        return None
    return int(step) if isinstance(step, int) else None


# ----------------------------------------------------------------------------------------------
# The Tune function trainable
# ----------------------------------------------------------------------------------------------

def trial_resources(resources: TrialResources) -> dict[str, float]:
    """What a trial reserves. `direct`: the worker's own CPUs/GPUs. `train`: the trial function only launches a
    TorchTrainer and needs almost no CPU of its own, so trials x workers x cpus_per_worker is the whole reservation
    (a full CPU per trial driver deadlocks 2-CPU machines; Ray rejects a plain {"cpu": 0}, hence the memory)."""
    if resources.driver == "direct":
        gpus = resources.gpus_per_worker
        return {"cpu": resources.cpus_per_worker, **({"gpu": gpus} if gpus else {})}
    return {"cpu": 0, "memory": 64 * 1024**2}


def run_worker(train_loop_config: dict[str, TrialLoop], session: TrialSession | None = None) -> None:
    """One worker of a trial, start to end: open its run, the method's fit (`Method.fit_trial`), close. Ray Train
    calls it with its train_loop_config dict (driver `train`); the Tune trial itself with its own session (driver
    `direct`). The run dir is removed also when the scheduler stops the trial inside a report (SystemExit); the
    MLflow run of a stopped or failed trial is closed by the driver (sweep.MLflowTrialCloser)."""
    loop = train_loop_config["loop"]
    worker = TrialWorker(loop, session)
    method = loop.method
    reporter = worker.open_run(method.trial_params(worker.cfg, worker.data))
    try:
        method.fit_trial(Trial(worker.cfg, worker.data, reporter, worker.run_dir, worker.rank, worker.world,
                               worker.wrap_model, loop.options))
    finally:
        worker.cleanup()
    worker.close()


def tune_trial(config: dict[str, Any], *, settings: TrialSettings) -> None:
    """Tune function trainable: run the method's worker loop here (`direct`) or on a TorchTrainer (`train`)."""
    ctx = tune.get_context()
    res = settings.resources
    overrides = settings.method.trial_overrides(settings.space, dict(config), settings.base)   # sampled + derived
    loop = TrialLoop(method=settings.method, base=settings.base, overrides=overrides, seed=settings.seed,
                     threads=max(1, int(res.cpus_per_worker)), gpus=res.gpus_per_worker,
                     data_ref=settings.data_ref, parent=settings.parent, trial_id=ctx.get_trial_id(),
                     trial_name=ctx.get_trial_name(), run_name=trial_label(config) or ctx.get_trial_name(),
                     split=settings.split, sweep=settings.sweep, metric=settings.space.metric,
                     options=settings.options)
    # Tune retries every trial error; bad input or a diverged loss (an InputError) fails the same way again, so a
    # retry re-raises the first attempt's one-line message (kept beside the trial's Train storage) instead of
    # training again.
    marker = Storage.parse(settings.storage_path) / f"train-{ctx.get_trial_id()}" / "input_error.txt"
    if marker.is_file():
        raise InputError(marker.read_text())
    try:
        if res.driver == "direct":
            run_worker({"loop": loop}, TuneSession())
        else:
            train_trial(loop, settings, ctx.get_trial_id())
    except Exception as err:
        cause = input_error_cause(err)
        if cause is None:
            raise
        marker.write_text(str(cause))
        raise type(cause)(str(cause)) from None


def train_trial(loop: TrialLoop, settings: TrialSettings, trial_id: str) -> None:
    """The `train` driver: a TorchTrainer of `workers_per_trial` workers runs the loop (DDP when > 1)."""
    res = settings.resources
    gpus = res.gpus_per_worker
    resources = {"CPU": res.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        run_worker,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers_per_trial, use_gpu=bool(gpus),
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",       # stable name: a restarted trial finds its checkpoints
            storage_path=settings.storage_path,
            callbacks=[TuneReportCallback()],
            # Retries happen at the Tune level (a new TorchTrainer with this name resumes from the checkpoint). A
            # Train-level retry would also fire when the scheduler stops the trial, and its new worker group
            # then holds resources that the next trial waits for.
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()
