"""The GCN encoder on Ray Train workers (`service.encoder train`, the sweep's skeleton chain): a TorchTrainer of N
workers (DDP when N > 1), checkpointed through Ray Train and logged to MLflow by rank 0. Also `service.encoder`'s
commands after its command line is parsed (`train`: on Ray or in this process, `extract`); service.cli.encoder
imports this module only once the arguments are known (its start-up stays light)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
from ray.train.torch import TorchTrainer

from service.data.features import FEATURE_FILES, extract_to_folder, parse_classes, seen_class_data
from service.methods.common import train_encoder_logged
from service.orchestration.cluster import connect_ray, input_error_cause
from service.storage import Storage
from service.tracking.store import MLflowReporter, encoder_experiment, resolve_tracking_uri, start_encoder_run
from trainers.checkpoint import ENCODER, LAST, copy_run_files
from trainers.configs import EncoderConfig
from trainers.encoder_fit import fit_encoder
from trainers.errors import InputError
from trainers.io import atomic_write, stable_hash
from trainers.runtime import apply_thread_policy
from trainers.tracking import Artifacts


@dataclass(frozen=True)
class EncoderLoop:
    """What each encoder worker gets (Ray Train passes it inside its train_loop_config dict)."""

    config: EncoderConfig
    prepared: str
    unseen: tuple[int, ...]
    benchmark: str | None
    threads: int                      # torch threads of a worker: its Ray CPUs
    tracking_uri: str | None
    experiment: str
    run_id: str | None                # the MLflow run rank 0 logs to (opened by the driver)
    input_error_file: str             # a worker's InputError, so that Ray Train's retry re-raises it


class EncoderWorkerReporter:
    """Reporter of an encoder Train worker: rank 0 logs to MLflow and prints a progress line; every rank
    reports each checkpoint to Ray Train (rank 0 with the files, so a restarted run resumes from them)."""

    def __init__(self, rank: int, mlflow, total_steps: int):
        self.rank, self.mlflow, self.total_steps = rank, mlflow, total_steps

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step)
        if self.rank == 0:   # through logging: Ray forwards a Train worker's print()s twice, log records once
            logging.getLogger("skeldiff.encoder").info(
                "encoder step %d/%d: loss %.3f, train top-1 %.1f %%", step, self.total_steps,
                metrics["encoder/loss"], metrics["encoder/train_top1"])

    def log_evaluation(self, metrics: dict[str, float], step: int, artifacts: Artifacts,
                       checkpoint_dir: Path | None) -> None:
        if self.mlflow is not None and metrics:        # the held-out top-1 at the last step
            self.mlflow.log_metrics(metrics, step)
        if self.rank == 0 and checkpoint_dir is not None:
            with tempfile.TemporaryDirectory() as tmp:
                copy_run_files(checkpoint_dir, Path(tmp), (LAST, ENCODER))
                ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report({**metrics, "step": step})


def encoder_worker(train_loop_config: dict[str, EncoderLoop]) -> None:
    """Ray Train worker loop: DDP over the workers (gloo on CPU, NCCL on GPU) when there are several."""
    loop = train_loop_config["loop"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    apply_thread_policy(cpus=loop.threads)   # the worker's Ray CPUs, less if its cores are fewer
    cfg = loop.config
    run_dir = Path(tempfile.mkdtemp(prefix="encoder-"))
    prepared = Storage.parse(loop.prepared)
    # A node without the driver's files reads the prepared folder from object storage (a local copy per worker).
    folder = prepared.local if prepared.is_local else prepared.download(run_dir / "prepared")
    x, y, seen, held_out = seen_class_data(folder, list(loop.unseen), loop.benchmark)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:                      # a restarted run continues from its latest checkpoint
        with checkpoint.as_directory() as d:
            copy_run_files(Path(d), run_dir, (LAST,))
    mlflow = (MLflowReporter.start(loop.tracking_uri, loop.experiment, "", run_id=loop.run_id)
              if rank == 0 and loop.run_id else None)
    wrap = ray.train.torch.prepare_model if world > 1 else None
    # Ray Train retries every worker error; bad input or a diverged loss fails the same way again, so a retry
    # re-raises the first attempt's message instead of training again.
    marker = Storage.parse(loop.input_error_file)
    try:
        if marker.is_file():
            raise InputError(marker.read_text())
        fit_encoder(cfg, x, y, seen, EncoderWorkerReporter(rank, mlflow, cfg.steps), run_dir, progress=False,
                    held_out=held_out, wrap_model=wrap, rank=rank, world=world)
    except InputError as err:
        if not marker.is_file():
            marker.write_text(str(err))
        raise
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def train_encoder_on_ray(prepared: Path | Storage, unseen: list[int], cfg: EncoderConfig, out: Path, *,
                         storage: Storage,
                         benchmark: str | None = None, workers: int = 1, cpus_per_worker: float = 1.0,
                         gpus_per_worker: float = 0.0, tracking_uri: str | None = None,
                         experiment: str | None = None, retries: int = 1) -> Path:
    """Train on Ray Train workers (a TorchTrainer; DDP when workers > 1) and write out/encoder.pt.

    The prepared folder must be readable by every worker: a shared folder, or a copy in object storage (each
    worker downloads it). The Train run is
    named after `out`, so re-running after a crash resumes from its latest checkpoint; with a tracking URI
    the run is an MLflow run (params = the encoder config, metrics by step, encoder.pt as an artifact).
    """
    out = Path(out).resolve()
    prepared = prepared if isinstance(prepared, Storage) else Storage.parse(prepared)
    experiment = experiment or encoder_experiment(prepared.name)
    mlflow = (start_encoder_run(tracking_uri, prepared.name, cfg.model_dump(mode="json"), out, list(unseen), experiment,
                                prepared=str(prepared), benchmark=benchmark or "", workers=workers)
              if tracking_uri else None)
    run_name = f"encoder-{stable_hash(str(out))[:12]}"
    loop = EncoderLoop(config=cfg, prepared=str(prepared), unseen=tuple(unseen), benchmark=benchmark,
                       threads=max(1, int(cpus_per_worker)), tracking_uri=tracking_uri, experiment=experiment,
                       run_id=mlflow.run_id if mlflow else None,
                       input_error_file=str(storage / run_name / "input_error.txt"))
    Storage.parse(loop.input_error_file).remove()     # from an earlier call, maybe with another config
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    trainer = TorchTrainer(
        encoder_worker, train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=bool(gpus_per_worker),
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=run_name, storage_path=str(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=retries)))
    with mlflow or contextlib.nullcontext():      # the run ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED
        try:
            result = trainer.fit()
        except Exception as err:   # a worker's bad input or divergence: its one-line message, not Ray's traceback
            cause = input_error_cause(err)
            if cause is None:
                raise
            raise type(cause)(str(cause)) from None
        if result.checkpoint is None:
            raise RuntimeError("encoder training reported no checkpoint")
        with result.checkpoint.as_directory() as d:
            atomic_write(out / ENCODER, lambda tmp: shutil.copyfile(Path(d) / ENCODER, tmp))
        if mlflow is not None:
            mlflow.log_artifact(out / ENCODER, "checkpoints")
    return out / ENCODER


# ----------------------------------------------------------------------------------------------
# `service.encoder train` / `extract` once their command lines are parsed
# ----------------------------------------------------------------------------------------------

def unseen_classes(prepared: Path, spec: str) -> list[int]:
    """--unseen (a ru*.npy file or a comma list) checked against the class count of the prepared folder's
    label.npy (which the CLI has found)."""
    labels = np.load(prepared / "label.npy")
    return parse_classes(spec, int(labels.max()) + 1)


def train(prepared: Path, unseen: list[int], cfg: EncoderConfig, out: Path, *, benchmark: str | None,
          tracking_uri: str | None, in_process: bool, progress: bool, address: str | None, storage: Storage,
          workers: int, cpus_per_worker: float, gpus_per_worker: float) -> dict[str, str]:
    """`service.encoder train`: in this process (`in_process`) or on Ray Train workers (the prepared folder copied
    to `storage` first when that is an object store); returns the JSON line (encoder.pt, the tracking URI)."""
    apply_thread_policy()   # CPU threads sized to this process's cores, before any parallel work
    uri = resolve_tracking_uri(tracking_uri)
    if in_process:    # the run ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED
        path = train_encoder_logged(prepared, unseen, cfg, out, tracking_uri=uri, benchmark=benchmark,
                                    progress=progress)
    else:
        connect_ray(address)
        data = (prepared if storage.is_local else   # workers on other nodes read it from the bucket
                (storage / f"prepared-{stable_hash(str(prepared.resolve()))[:12]}").upload(prepared))
        path = train_encoder_on_ray(data, unseen, cfg, out, benchmark=benchmark, storage=storage, workers=workers,
                                    cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                    tracking_uri=uri)
        ray.shutdown()
    return {"encoder": str(path), "tracking_uri": uri}


def extract(prepared: Path, encoder: Path, unseen: list[int], out: Path, benchmark: str | None) -> dict[str, Any]:
    """`service.encoder extract`: the SA-DVAE feature files of the prepared folder with a trained encoder; returns
    the JSON line (the folder, each file's shape)."""
    apply_thread_policy()   # CPU threads sized to this process's cores, before any parallel work
    folder = extract_to_folder(prepared, encoder, unseen, out, benchmark)
    shapes = {f: list(np.load(folder / f"{f}.npy", mmap_mode="r").shape) for f in FEATURE_FILES}
    return {"features": str(folder), "shapes": shapes}
