"""What the methods' runs share (the run dir with its MLflow run, headline metrics, mean ± std), and the skeleton
chain's encoder trained in this process as an MLflow run (service.run, service.final, service.encoder --in-process)."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from service.data.features import train_encoder
from service.methods.base import RunOptions
from service.process import lock_dir
from service.storage import Storage
from service.tracking.store import MLflowReporter, resolve_tracking_uri, standard_tags, start_encoder_run
from trainers.config import to_plain
from trainers.configs import EncoderConfig
from trainers.io import atomic_write_text, stable_hash


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics without the per-t_test grid points (those are in MLflow and the curve plot)."""
    return {k: round(v, 4) for k, v in metrics.items() if not re.search(r"_t\d+$", k)}


def open_run(opts: RunOptions, dataset: str, fingerprint: str, cfg) -> tuple[Path, MLflowReporter]:
    """The run dir (keyed by the training config; --fresh empties it) and its MLflow run, re-opened on resume."""
    method = opts.method.name
    dataset = opts.split or dataset             # a named split names the run dir and the experiment
    run_dir = opts.run_dir or Path("runs") / f"{method}-{dataset}-{fingerprint[:8]}"
    lock = lock_dir(run_dir)                    # before reading or emptying it: one writer per run dir
    if opts.fresh:
        for child in run_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            elif child != lock:
                child.unlink()
    uri = resolve_tracking_uri(opts.tracking_uri)      # as given or resolved already: the same URI, probed
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
        uri, opts.experiment_name or f"{method}-{dataset}", run_dir.name,
        tags=standard_tags(split=dataset, phase="run", method=method),
        run_id=previous.get("run_id") if same_run else None)
    atomic_write_text(id_file, json.dumps({"run_id": reporter.run_id, "tracking_uri": uri, "config_hash": config_hash}))
    print(f"run dir {run_dir}  |  mlflow run {reporter.run_id} at {uri}", file=sys.stderr)
    return run_dir, reporter


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (0 for one value)."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def train_encoder_logged(prepared: Path | Storage, unseen: list[int], cfg: EncoderConfig, out: Path, *,
                         tracking_uri: str, benchmark: str | None = None, progress: bool = True) -> Path:
    """Train an encoder in this process as an MLflow run (`service.encoder train --in-process`, the skeleton chain
    of service.run and service.final): run `<name>-<out folder>` of experiment `encoder-<prepared folder>`
    (`start_encoder_run`); metrics: encoder/loss, encoder/train_top1, encoder/lr by step and, at the end,
    encoder/held_out_top1 on the seen classes' test sequences; encoder.pt as an artifact. Returns out/encoder.pt."""
    prepared = prepared if isinstance(prepared, Storage) else Storage.parse(str(Path(prepared).resolve()))
    with start_encoder_run(tracking_uri, prepared.name, cfg.model_dump(mode="json"), out, list(unseen),
                           prepared=str(prepared), benchmark=benchmark or "") as reporter, \
            tempfile.TemporaryDirectory() as tmp:     # a bucket's copy (a chain cached in object storage) read here
        folder = prepared.local if prepared.is_local else prepared.download(Path(tmp) / "prepared")
        path = train_encoder(folder, unseen, cfg, out, benchmark, reporter, progress)
        reporter.log_artifact(path, "checkpoints")
    return path
