"""Score-level fusion of saved logits (the core of `python -m service.ensemble`).

Each SOURCE is an MLflow run id (its `predictions/<split>_logits.npy` and `_labels.npy` artifacts, as logged by
`service.run cocodiff` and `service.final`) or a local folder holding those two files. Typically one run per
input stream (joint / bone / motion) of the same data: all sources must hold the same split in the same order
(identical labels) over the same classes. The fused logits are the weighted sum of the sources' logits
(`trainers.cocodiff_eval.ensemble_logits`). `log_ensemble` logs an MLflow run whose predictions/ are the fused
logits, so it can itself be a SOURCE; the CLI (service.cli.ensemble) prints the summary as one JSON line.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from service.tracking.artifacts import log_classification_outputs
from service.tracking.store import MLflowReporter, standard_tags
from trainers.cocodiff_eval import accuracy_metrics, ensemble_logits
from trainers.errors import InputError
from trainers.io import load_npy

DEFAULT_EXPERIMENT = "cocodiff-ensemble"   # when no SOURCE is a run (otherwise: the first run's experiment)


# ----------------------------------------------------------------------------------------------
# Reading the saved predictions
# ----------------------------------------------------------------------------------------------

@dataclass
class SavedPredictions:
    """One SOURCE's logits and labels on a split."""

    source: str                 # as given on the command line
    stream: str | None          # backbone.stream of the run when it is known (never guessed for a folder)
    experiment_id: str | None   # the run's experiment; None for a folder
    logits: torch.Tensor        # (N, C) float32
    labels: torch.Tensor        # (N,) int64 class ids


def read_arrays(source: str, logits_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C), labels (N,)) from two .npy files, checked for shape and range; errors name the source."""
    arrays = []
    for path in (logits_path, labels_path):
        try:
            arrays.append(load_npy(path))
        except InputError as err:
            raise InputError(f"{source}: {err}") from None
    logits, labels = arrays
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise InputError(f"{source}: {logits_path.name} {logits.shape} and {labels_path.name} {labels.shape} "
                         "are not (N, C) logits and (N,) labels")
    if len(labels) == 0:
        raise InputError(f"{source}: {labels_path.name} holds no samples")
    if not np.isfinite(logits).all():
        raise InputError(f"{source}: {logits_path.name} holds non-finite logits (NaN or inf)")
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and (labels.min() < 0 or
                                                                        labels.max() >= logits.shape[1])):
        raise InputError(f"{source}: {labels_path.name} holds labels outside 0..{logits.shape[1] - 1}")
    return torch.from_numpy(logits.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))


def read_folder(source: str, split: str) -> SavedPredictions:
    folder = Path(source)
    names = (folder / f"{split}_logits.npy", folder / f"{split}_labels.npy")
    missing = [p.name for p in names if not p.is_file()]
    if missing:
        raise InputError(f"{source}: folder has no {' or '.join(missing)}")
    return SavedPredictions(source, None, None, *read_arrays(source, *names))


def run_stream(client: MlflowClient, run) -> str | None:
    """backbone.stream of a run: its param, its `stream` tag (fused runs), or its parent's param (service.final)."""
    stream = run.data.params.get("backbone.stream") or run.data.tags.get("stream")
    parent = run.data.tags.get("mlflow.parentRunId")
    if stream is None and parent:
        stream = client.get_run(parent).data.params.get("backbone.stream")
    return stream


def read_run(source: str, client: MlflowClient, split: str) -> SavedPredictions:
    try:
        run = client.get_run(source)
    except MlflowException:
        raise InputError(f"{source}: neither a folder nor a run id in {client.tracking_uri}") from None
    wanted = [f"predictions/{split}_logits.npy", f"predictions/{split}_labels.npy"]
    present = {a.path for a in client.list_artifacts(source, "predictions")}
    missing = [name for name in wanted if name not in present]
    if missing:
        raise InputError(f"{source}: run has no {' or '.join(missing)} artifact")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(client.download_artifacts(source, name, tmp)) for name in wanted]
        logits, labels = read_arrays(source, *paths)
    return SavedPredictions(source, run_stream(client, run), run.info.experiment_id, logits, labels)


def load_predictions(sources: list[str], split: str, uri: str) -> list[SavedPredictions]:
    """Every SOURCE's predictions: a folder when one exists at that path, else a run id (the store is opened only
    then: a bad folder is refused before MLflow creates anything)."""
    client = MlflowClient(uri) if any(not Path(s).is_dir() for s in sources) else None
    return [read_folder(s, split) if Path(s).is_dir() else read_run(s, client, split) for s in sources]


def check_aligned(saved: list[SavedPredictions], split: str) -> None:
    """All sources predict the same samples in the same order over the same classes, else name the odd one."""
    first = saved[0]
    n, c = first.logits.shape
    for s in saved[1:]:
        if s.logits.shape[1] != c:
            raise InputError(f"{s.source}: {s.logits.shape[1]} classes, but {first.source} has {c}")
        if len(s.labels) != n:
            raise InputError(f"{s.source}: {len(s.labels)} {split} samples, but {first.source} has {n} "
                             f"(not the same {split} set)")
        differ = int((s.labels != first.labels).sum())
        if differ:
            raise InputError(f"{s.source}: labels differ from {first.source}'s at {differ} of {n} positions "
                             f"(not the same {split} set in the same order)")


# ----------------------------------------------------------------------------------------------
# Fusion and logging
# ----------------------------------------------------------------------------------------------

def top_k(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{top1, top5} in % (top-5 is top-min(5, C))."""
    return {k.split("/")[1]: v for k, v in accuracy_metrics(logits, labels, "split").items()}


def fuse(saved: list[SavedPredictions], weights: list[float]) -> tuple[dict, torch.Tensor]:
    """(summary with each source's and the fused top-1/top-5, fused logits (N, C))."""
    labels = saved[0].labels
    fused = ensemble_logits([s.logits for s in saved], weights)                    # (N, C)
    per_source = [{"source": s.source, "stream": s.stream, "weight": w, **top_k(s.logits, labels)}
                  for s, w in zip(saved, weights)]
    return {"sources": per_source, "ensemble": top_k(fused, labels)}, fused


def log_ensemble(uri: str, experiment: str, split: str, saved: list[SavedPredictions], summary: dict,
                 fused: torch.Tensor, names: list[str]) -> str:
    """One MLflow run: sources and weights as params, per-source and fused metrics, fused predictions; its id."""
    streams = [s.stream or f"source{i}" for i, s in enumerate(saved)]
    reporter = MLflowReporter.start(uri, experiment, f"ensemble-{split}-{'+'.join(streams)}",
                                    tags=standard_tags(phase="ensemble", stream="ensemble"))
    with reporter:     # ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED
        reporter.log_params({"sources": ",".join(s.source for s in saved),
                             "weights": ",".join(str(p["weight"]) for p in summary["sources"]),
                             "streams": ",".join(s.stream or "unknown" for s in saved), "split": split,
                             "num_classes": fused.shape[1], "num_samples": fused.shape[0]})
        metrics = {f"ensemble/{k}": v for k, v in summary["ensemble"].items()}
        for i, p in enumerate(summary["sources"]):
            metrics.update({f"source{i}/top1": p["top1"], f"source{i}/top5": p["top5"]})
        reporter.log_metrics(metrics, 0)
        log_classification_outputs(reporter, fused, saved[0].labels, names, split)
    return reporter.run_id


def default_experiment(saved: list[SavedPredictions], uri: str) -> str:
    first_run = next((s for s in saved if s.experiment_id is not None), None)
    return MlflowClient(uri).get_experiment(first_run.experiment_id).name if first_run else DEFAULT_EXPERIMENT

