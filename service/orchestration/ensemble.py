"""`service.ensemble` after its command line is parsed: read each SOURCE's saved predictions (a folder or an MLflow
run), check they are aligned, fuse them (service.tracking.ensemble) and log the fused run. Imported by
service.cli.ensemble only once the arguments are known (its start-up stays light)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.tracking.ensemble import check_aligned, default_experiment, fuse, load_predictions, log_ensemble
from service.tracking.store import resolve_tracking_uri
from trainers.io import atomic_save_npy
from trainers.prompts import read_prompt_file
from trainers.runtime import apply_thread_policy


def ensemble(sources: list[str], weights: list[float], split: str, *, tracking_uri: str | None,
             experiment_name: str | None, out: Path | None, names_file: Path | None) -> dict[str, Any]:
    """Fuse the sources' `split` logits with `weights` (one per source, checked by the CLI), write them to `out`
    when given, log the ensemble run; returns the JSON line (each source's and the fused top-1/top-5)."""
    apply_thread_policy()   # CPU threads sized to this process's cores, before any parallel work
    uri = resolve_tracking_uri(tracking_uri)
    saved = load_predictions(sources, split, uri)
    check_aligned(saved, split)
    num_classes = saved[0].logits.shape[1]
    names = (read_prompt_file(names_file, expected_count=num_classes) if names_file
             else [str(c) for c in range(num_classes)])
    summary, fused = fuse(saved, weights)
    if out is not None:
        atomic_save_npy(fused.numpy(), out / f"{split}_logits.npy")
        atomic_save_npy(saved[0].labels.numpy(), out / f"{split}_labels.npy")
    run_id = log_ensemble(uri, experiment_name or default_experiment(saved, uri), split, saved, summary, fused,
                          names)
    rounded = {"sources": [{k: round(v, 3) if k in ("top1", "top5") else v for k, v in p.items()}
                           for p in summary["sources"]],
               "ensemble": {k: round(v, 3) for k, v in summary["ensemble"].items()}}
    return {"split": split, **rounded, "mlflow_run_id": run_id, **({"out": str(out)} if out is not None else {})}
