"""`service.predict` after its command line is parsed: load the registered zero-shot model, read the inputs
(skeleton files, folders of them, prepared folders, `.npy` rows) and rank the candidate classes of each sequence.
Imported by service.cli.predict only once the arguments are known (its start-up stays light)."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from service.tracking.registry import load_served
from service.tracking.store import resolve_tracking_uri
from trainers.errors import InputError
from trainers.io import load_npy
from trainers.runtime import apply_thread_policy
from trainers.skeleton.prepare import RAW_SUFFIXES, read_unlabelled
from trainers.skeleton.prepared import read_prepared

CALL_ROWS = 64            # sequences per model call


def gather(inputs: list[Path], frames: int | None) -> tuple[list[str], list[np.ndarray], list[tuple[str, str]]]:
    """(sample names, model input rows, skipped (path, reason)) of the inputs, in the order given (folders:
    sorted). frames: the model's prepared length (None: the model takes features, raw files are refused)."""
    names, rows, skipped = [], [], []
    for path in inputs:
        if path.is_dir() and (path / "data.npy").is_file():
            prepared = read_prepared(path)
            names += [f"{path}/{n}" for n in prepared.names]
            rows += list(prepared.rows())
            continue
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in RAW_SUFFIXES) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise InputError(f"{path}: no .skeleton, .json or .txt files and no data.npy")
        for f in files:
            try:
                if f.suffix == ".npy":
                    array = load_npy(f)
                    names += [f"{f}[{i}]" for i in range(len(array))]
                    rows += list(np.asarray(array, dtype=np.float32))
                    continue
                if frames is None:
                    raise InputError(f"{f}: this model takes pooled features (.npy rows), not skeleton files")
                rows.append(read_unlabelled(f, frames).transpose(3, 1, 2, 0))       # (M, T, V, C) -> (C, T, V, M)
                names.append(str(f))
            except (InputError, OSError) as err:
                skipped.append((str(f), str(err).splitlines()[0]))
    return names, rows, skipped


def table(names: list[str], frame, top_k: int) -> str:
    """CSV text: sample, label, score, error, top_k ('label:score; ...')."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["sample", "label", "score", "error", f"top_{top_k}"])
    for name, (_, r) in zip(names, frame.iterrows()):
        top = "; ".join(f"{label}:{score:.4f}" for label, score in zip(r["top_k_labels"], r["top_k_scores"]))
        out.writerow([name, r["label"], f"{r['score']:.6f}", f"{r['error']:.6f}", top])
    return buf.getvalue()


def predict(model_uri: str, inputs: list[Path], params: dict[str, Any], tracking_uri: str | None) -> tuple[int, str]:
    """(sequences ranked, the CSV text) of the inputs with the model at `model_uri`; params: the model's call
    parameters (top_k, and classes / descriptions when given). Skipped files and progress go to stderr."""
    apply_thread_policy()   # CPU threads sized to this process's cores, before any parallel work
    model, chain = load_served(model_uri, resolve_tracking_uri(tracking_uri))
    names, rows, skipped = gather(inputs, chain.layout.frames if chain.layout is not None else None)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not rows:
        raise InputError(f"no readable sequence among the inputs ({len(skipped)} skipped)")
    frames_out = []
    for s in range(0, len(rows), CALL_ROWS):
        batch = rows[s:s + CALL_ROWS]
        lengths = {r.shape for r in batch}
        calls = [np.stack([r]) for r in batch] if len(lengths) > 1 else [np.stack(batch)]   # ragged: one by one
        frames_out += [model(x, params) for x in calls]
        print(f"predict: {min(s + CALL_ROWS, len(rows))}/{len(rows)} sequences", file=sys.stderr)
    return len(names), table(names, pd.concat(frames_out, ignore_index=True), params["top_k"])
