"""What both methods' runs share: absolute paths, the run dir with its MLflow run, headline metrics, mean ± std."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from service.process import lock_dir
from service.tracking.store import MLflowReporter, resolve_tracking_uri, standard_tags
from trainers.config import to_plain
from trainers.io import atomic_write_text, stable_hash


def absolute(p: Any) -> Any:
    """An absolute path string for a path-like value; None and non-paths (lists of ids, counts) unchanged."""
    return None if p is None else (str(Path(p).resolve()) if isinstance(p, (str, Path)) else p)


def absolute_fields(section: dict[str, Any], values: Any, names: tuple[str, ...]) -> None:
    """Set each named key of a config-tree section to its value in `values` (the validated config section) made
    absolute; a list (of files, or of class ids) element by element. Trials and Ray jobs run in other directories."""
    section.update({name: [absolute(v) for v in value] if isinstance(value := getattr(values, name), list)
                    else absolute(value) for name in names})


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics without the per-t_test grid points (those are in MLflow and the curve plot)."""
    return {k: round(v, 4) for k, v in metrics.items() if not re.search(r"_t\d+$", k)}


def open_run(args, method: str, dataset: str, fingerprint: str, cfg) -> tuple[Path, MLflowReporter]:
    """The run dir (keyed by the training config; --fresh empties it) and its MLflow run, re-opened on resume."""
    dataset = args.split or dataset             # a named split names the run dir and the experiment
    run_dir = args.run_dir or Path("runs") / f"{method}-{dataset}-{fingerprint[:8]}"
    lock = lock_dir(run_dir)                    # before reading or emptying it: one writer per run dir
    if args.fresh:
        for child in run_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            elif child != lock:
                child.unlink()
    uri = resolve_tracking_uri(args.tracking_uri)
    id_file = run_dir / "mlflow_run.json"
    try:
        previous = json.loads(id_file.read_text()) if id_file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"note: {id_file} is unreadable; starting a new MLflow run", file=sys.stderr)
        previous = {}
    if not isinstance(previous, dict) or not all(isinstance(previous.get(k, ""), str) for k in
                                                 ("run_id", "tracking_uri", "config_hash")):
        # Valid JSON of another shape (a list, a number as run_id): the same answer as a torn file.
        print(f"note: {id_file} does not hold a run id object; starting a new MLflow run", file=sys.stderr)
        previous = {}
    # The run dir is keyed by the training config only; MLflow params cannot change, so a resume under other
    # evaluation settings opens a new MLflow run (training still resumes from last.pt).
    config_hash = stable_hash(to_plain(cfg))
    same_run = previous.get("tracking_uri") == uri and previous.get("config_hash") == config_hash
    reporter = MLflowReporter.start(
        uri, args.experiment_name or f"{method}-{dataset}", run_dir.name,
        tags=standard_tags(split=dataset, phase="run", method=method),
        run_id=previous.get("run_id") if same_run else None)
    atomic_write_text(id_file, json.dumps({"run_id": reporter.run_id, "tracking_uri": uri, "config_hash": config_hash}))
    print(f"run dir {run_dir}  |  mlflow run {reporter.run_id} at {uri}", file=sys.stderr)
    return run_dir, reporter


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (0 for one value)."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0
