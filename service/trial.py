"""One Tune trial = one Ray Train run: the worker loop, its Reporter, and the Tune function that launches it.

Ray 2.60 (Train V2) supports Train inside Tune as a Tune *function* trainable that builds a TorchTrainer and
calls fit(); TuneReportCallback forwards rank-0 metrics (and the checkpoint path) to Tune, where ASHA acts.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint

from service.tracking import MLflowReporter, standard_tags
from trainers.config import TDSMConfig, build_config, dump_yaml, flatten, to_plain
from trainers.tdsm_fit import BEST, LAST, build_model, fit_tdsm
from trainers.tdsm_model import count_parameters
from trainers.zsl import ZSLCurve

TRIAL_TAG = "ray_trial_id"


def find_or_start_child_run(uri: str, experiment: str, parent_run_id: str, trial_id: str, run_name: str,
                            tags: dict[str, str]) -> MLflowReporter:
    """The trial's MLflow run, found by its Ray trial id so a retried or resumed trial never duplicates it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.{TRIAL_TAG} = '{trial_id}'",
                                   max_results=1)
        if found:
            return MLflowReporter.start(uri, experiment, run_name, run_id=found[0].info.run_id)
    return MLflowReporter.start(uri, experiment, run_name, tags={**tags, TRIAL_TAG: trial_id},
                                parent_run_id=parent_run_id)


class RayTrainReporter:
    """Reporter for a Train worker: every rank reports to Ray Train; rank 0 also logs to MLflow and checkpoints."""

    def __init__(self, rank: int, mlflow: MLflowReporter | None, final_step: int, names: list[str]):
        self.rank = rank
        self.mlflow = mlflow
        self.final_step = final_step
        self.names = names
        self.best = float("-inf")
        self.last_curve: ZSLCurve | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # Frequent scalars go to MLflow only: each ray.train.report costs a controller round trip.
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step)

    def log_evaluation(self, metrics: dict[str, float], step: int, curve: ZSLCurve,
                       checkpoint_dir: Path | None) -> None:
        self.last_curve = curve
        self.best = max(self.best, metrics["val/zsl_top1"])
        out = {**metrics, "val/zsl_top1_max": self.best, "step": step}
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: v for k, v in out.items() if k != "step"}, step)
            if metrics["val/zsl_top1"] >= self.best:
                self.mlflow.set_tags({"best_t_test": int(metrics["val/best_t_test"]), "best_step": step})
        if self.mlflow is not None and step >= self.final_step:
            # Before the last report: once Tune has it, the scheduler may stop the trial at once.
            self._log_final_artifacts(curve, checkpoint_dir)
        if self.rank == 0 and checkpoint_dir is not None:
            with tempfile.TemporaryDirectory() as tmp:
                for name in (LAST, BEST):
                    if (checkpoint_dir / name).is_file():
                        shutil.copy2(checkpoint_dir / name, Path(tmp) / name)
                ray.train.report(out, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(out)


    def _log_final_artifacts(self, curve: ZSLCurve, checkpoint_dir: Path | None) -> None:
        from service.run import log_zsl_plots

        log_zsl_plots(self.mlflow, curve, self.names, curve.best().t_test, "val")
        if checkpoint_dir is not None and (checkpoint_dir / BEST).is_file():
            self.mlflow.log_artifact(checkpoint_dir / BEST, "checkpoints")


def tdsm_worker(loop: dict[str, Any]) -> None:
    """Ray Train worker loop: rebuild the trial's config, restore the latest checkpoint, fit, log artifacts."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop["threads"])
    cfg: TDSMConfig = build_config(TDSMConfig, loop["base"], {**loop["overrides"], "train.seed": loop["seed"] + rank})
    task, names, text = ray.get(loop["data"])  # prepared once per sweep by the driver (object store)
    fit_train, val, fit_classes = task.tuning_split()

    mlflow = None
    if rank == 0:
        mlflow = find_or_start_child_run(
            loop["tracking_uri"], loop["experiment"], loop["parent_run_id"], loop["trial_id"], loop["trial_name"],
            standard_tags(split=loop["split"], phase="sweep", method="tdsm", ray_trial_name=loop["trial_name"]))
        with torch.device("meta"):  # size only: no memory, no init
            n_params = count_parameters(build_model(cfg, task.feature_dim, text))
        mlflow.log_params({**flatten(to_plain(cfg)), "derived.workers": world, "derived.num_parameters": n_params})
        mlflow.log_text(dump_yaml(cfg), "config.yaml")
    reporter = RayTrainReporter(rank, mlflow, cfg.train.steps, names)

    run_dir = Path(tempfile.mkdtemp(prefix="tdsm-trial-"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a retried or resumed trial continues from its latest checkpoint
        with checkpoint.as_directory() as d:
            for name in (LAST, BEST):
                if (Path(d) / name).is_file():
                    shutil.copy2(Path(d) / name, run_dir / name)
    wrap = ray.train.torch.prepare_model if world > 1 else None
    fit_tdsm(cfg, fit_train, fit_classes, val, task.val, text, reporter, run_dir, eval_prefix="val",
                      progress=False, wrap_model=wrap)
    if mlflow is not None:
        mlflow.finish()
    shutil.rmtree(run_dir, ignore_errors=True)


def tdsm_trial(config: dict[str, Any], *, settings: dict[str, Any]) -> None:
    """Tune function trainable: launch a TorchTrainer for this trial's config and wait for it."""
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    ctx = tune.get_context()
    overrides = trial_overrides_from_config(config, settings)
    workers, gpus = settings["workers_per_trial"], settings["gpus_per_worker"]
    resources = {"CPU": settings["cpus_per_worker"], **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        tdsm_worker,
        train_loop_config={
            "base": settings["base"], "overrides": overrides, "seed": settings["seed"],
            "threads": max(1, int(settings["cpus_per_worker"])), "data": settings["data_ref"],
            "tracking_uri": settings["tracking_uri"], "experiment": settings["experiment"],
            "parent_run_id": settings["parent_run_id"], "trial_id": ctx.get_trial_id(),
            "trial_name": ctx.get_trial_name(), "split": settings["split"],
        },
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=bool(gpus), resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"train-{ctx.get_trial_id()}",       # stable name: a restarted trial finds its checkpoints
            storage_path=settings["storage_path"],
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=settings["trial_retries"]),
        ),
    )
    trainer.fit()


def trial_overrides_from_config(config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Sampled params -> full dotted overrides for this trial (adds the t_test grid below the trial's T)."""
    from service.search_space import SearchSpace, trial_overrides

    space = SearchSpace.model_validate(settings["space"])
    T = int(config.get("diffusion.num_train_timesteps", settings["default_T"]))
    return trial_overrides(space, dict(config), T)
