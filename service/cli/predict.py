"""Rank actions for skeleton files with a registered zero-shot model:
`python -m service.predict --model models:/tdsm-<split>@final INPUTS... [--classes A B ... | --classes-file F]`.

INPUTS are NTU `.skeleton` files, Kinetics-skeleton `.json` clips, PKU-MMD `.txt` sequences (each read whole, through
the same readers and preprocessing as `service.prepare`), folders of them, prepared folders (`service.prepare`
output: every row of data.npy) or `.npy` arrays of model input rows. Files that cannot be read are listed and
skipped. Prints one row per sequence (best label, its score, the top k) and writes them to --out as CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from service.process import exits_cleanly
from service.tracking.registry import load_served
from service.tracking.store import resolve_tracking_uri
from trainers.errors import InputError
from trainers.io import atomic_write_text, load_npy
from trainers.runtime import apply_thread_policy
from trainers.skeleton.prepare import RAW_SUFFIXES, read_unlabelled
from trainers.skeleton.prepared import read_prepared
from trainers.text import read_prompt_file

EXAMPLES = """examples:
  python -m service.predict --model models:/tdsm-synthetic-skeleton@final raw/S001C001P001R001A011.skeleton
  python -m service.predict --model models:/tdsm-synthetic-skeleton@final raw/ --classes "wave a hand" "jump up" \\
      --top-k 2 --out predictions.csv
  python -m service.predict --model models:/tdsm-ntu60-synse-55-5@final prepared/ --classes-file classes.txt \\
      --descriptions-file descriptions.txt
"""
CALL_ROWS = 64            # sequences per model call


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.predict", description=__doc__.splitlines()[0],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="skeleton files, folders of them, prepared folders, .npy")
    p.add_argument("--model", required=True, help="a model URI: models:/NAME@ALIAS, runs:/ID/PATH or a folder")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--classes", nargs="+", metavar="NAME", help="candidate class names (default: the model's "
                                                                     "split's unseen classes)")
    names.add_argument("--classes-file", type=Path, help="candidate class names, one per line (or a CSV's label "
                                                         "column)")
    p.add_argument("--descriptions-file", type=Path, help="one description per candidate class, in the same order")
    p.add_argument("--top-k", type=int, default=5, help="labels listed per sequence (default 5)")
    p.add_argument("--out", type=Path, help="CSV of the predictions (default: only printed)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    return p


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


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    apply_thread_policy()   # CPU threads sized to this process's cores, before any parallel work
    args = build_parser().parse_args(argv)
    params: dict = {"top_k": args.top_k}
    if args.classes or args.classes_file:
        params["classes"] = args.classes or read_prompt_file(args.classes_file)
    if args.descriptions_file:
        if "classes" not in params:
            raise InputError("--descriptions-file: name the classes they describe (--classes or --classes-file)")
        params["descriptions"] = read_prompt_file(args.descriptions_file, expected_count=len(params["classes"]))
    missing = [p for p in args.inputs if not p.exists()]
    if missing:
        raise InputError(f"{missing[0]}: no such file or folder")
    model, chain = load_served(args.model, resolve_tracking_uri(args.tracking_uri))
    names, rows, skipped = gather(args.inputs, chain.layout.frames if chain.layout is not None else None)
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
    text = table(names, pd.concat(frames_out, ignore_index=True), args.top_k)
    print(text, end="")
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {len(names)} predictions to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
