"""Reading a prepared folder (`python -m service.prepare` output): data.npy, label.npy and index.tsv.

index.tsv has one row per sample in data.npy order: name, label, setup, camera, performer, replication, then
one train/test column per benchmark ('-' where a sample is outside it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainers.errors import InputError
from trainers.guards import check_finite_rows
from trainers.io import load_npy

FILES = ("data.npy", "label.npy", "index.tsv")
SAMPLE_COLUMNS = 6                     # name, label, setup, camera, performer, replication


@dataclass
class PreparedSet:
    """A prepared folder seen through one benchmark column."""

    folder: Path
    data: np.ndarray                   # (N, C, T, V, M), memory-mapped
    labels: np.ndarray                 # (N,) int64, 0-based class ids
    split: np.ndarray                  # (N,) 'train' / 'test' / '-' under `benchmark`
    benchmark: str
    names: np.ndarray | None = None    # (N,) sample names from index.tsv

    def rows(self, index: np.ndarray | None = None) -> np.ndarray:
        """float32 copy of data[index] (all rows by default; only the selected rows are read from disk).

        The rows read are checked: a NaN, inf or absurd value (a corrupted or hand-edited data.npy) is a one-line
        error naming the sample, never a silently NaN-trained model."""
        index = np.arange(len(self.data)) if index is None else np.asarray(index)
        out = np.ascontiguousarray(self.data[index], dtype=np.float32)
        names = None if self.names is None else [f"{self.names[i]}, row {int(i)}" for i in index]
        check_finite_rows(out, str(self.folder / "data.npy"), names)
        return out


def read_prepared(folder: Path, benchmark: str | None = None) -> PreparedSet:
    """The folder's arrays and the split column `benchmark` (default: the first one); one-line errors."""
    folder = Path(folder)
    for name in FILES:
        if not (folder / name).is_file():
            raise InputError(f"{folder / name}: missing (expected the output of `python -m service.prepare`)")
    try:
        lines = [line.split("\t") for line in (folder / "index.tsv").read_text(encoding="utf-8").splitlines() if line]
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{folder / 'index.tsv'}: cannot read as UTF-8 text ({type(err).__name__})") from None
    if not lines:
        raise InputError(f"{folder / 'index.tsv'}: empty (expected a header and one row per sample)")
    header, *rows = lines
    columns = header[SAMPLE_COLUMNS:]
    if not columns:
        raise InputError(f"{folder / 'index.tsv'}: no benchmark split columns (PKU-MMD: prepare it with "
                         "--split-list pku-xsub=cross-subject.txt pku-xview=cross-view.txt)")
    benchmark = benchmark or columns[0]
    if benchmark not in columns:
        raise InputError(f"{folder / 'index.tsv'}: no {benchmark!r} column (has: {', '.join(columns)})")
    col = header.index(benchmark)
    verify_prepared(folder)
    try:
        data = load_npy(folder / "data.npy", mmap_mode="r")
        labels = load_npy(folder / "label.npy").astype(np.int64)
    except InputError:
        raise                                             # names the file (e.g. a .npz archive)
    except (ValueError, OSError, EOFError) as err:       # a truncated file: the header promises more bytes
        raise InputError(f"{folder}: data.npy or label.npy unreadable ({type(err).__name__}: truncated or "
                         "corrupt); re-run `python -m service.prepare`") from None
    if data.ndim != 5 or not np.issubdtype(data.dtype, np.floating):
        raise InputError(f"{folder / 'data.npy'}: expected a float (N, C, T, V, M) array, got {data.dtype} "
                         f"shape {data.shape}")
    if not len(data) == len(labels) == len(rows):
        raise InputError(f"{folder}: data.npy, label.npy and index.tsv disagree on the sample count "
                         f"({len(data)}, {len(labels)}, {len(rows)})")
    short = [i for i, r in enumerate(rows) if len(r) <= col]
    if short:
        raise InputError(f"{folder / 'index.tsv'}:{short[0] + 2}: expected {len(header)} tab-separated fields")
    return PreparedSet(folder, data, labels, np.array([r[col] for r in rows]), benchmark,
                       np.array([r[0] for r in rows]))


# ----------------------------------------------------------------------------------------------
# Content record: prepare.json's "files" (size, mtime, sha256 of each output), so a truncated or overwritten
# data.npy is never taken for the prepared one
# ----------------------------------------------------------------------------------------------

def file_record(path: Path) -> dict[str, int | str]:
    """size, mtime_ns and sha256 of one file (read in 16 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest()}


def content_record(folder: Path) -> dict[str, dict[str, int | str]]:
    """file_record of data.npy, label.npy and index.tsv."""
    return {name: file_record(Path(folder) / name) for name in FILES}


def content_problem(folder: Path, record: dict | None, full: bool = True) -> str | None:
    """Why the folder's outputs differ from `record` (None when they match). Sizes are always compared; the
    sha256 too when `full`, else only for a file whose mtime is not the recorded one (reading a big data.npy
    in full at every load would cost seconds per GB)."""
    if not isinstance(record, dict) or set(record) != set(FILES):
        return "prepare.json has no size/sha256 record of its outputs (written by an older prepare)"
    for name, want in record.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        st = os.stat(path)
        if st.st_size != want.get("size"):
            return f"{name} is {st.st_size} bytes, prepare wrote {want.get('size')} (truncated or replaced)"
        if (full or st.st_mtime_ns != want.get("mtime_ns")) and file_record(path)["sha256"] != want.get("sha256"):
            return f"{name} differs from what prepare wrote (sha256 mismatch: overwritten or corrupt)"
    return None


def verify_prepared(folder: Path) -> None:
    """One-line InputError when prepare.json records outputs the folder no longer holds (no-op without a
    prepare.json: a folder assembled by hand)."""
    meta = Path(folder) / "prepare.json"
    if not meta.is_file():
        return
    try:
        record = json.loads(meta.read_text()).get("files")
    except (json.JSONDecodeError, AttributeError):
        raise InputError(f"{meta}: not valid JSON; re-run `python -m service.prepare`") from None
    if record is None:                     # an older prepare: nothing recorded to verify against
        return
    problem = content_problem(folder, record, full=False)
    if problem is not None:
        raise InputError(f"{folder}: {problem}; re-run `python -m service.prepare` (it rebuilds the folder)")
