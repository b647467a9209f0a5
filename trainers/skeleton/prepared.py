"""Reading a prepared folder (`python -m service.prepare` output): data.npy, label.npy and index.tsv.

index.tsv has one row per sample in data.npy order: name, label, setup, camera, performer, replication, then
one train/test column per benchmark ('-' where a sample is outside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainers.errors import InputError

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

    def rows(self, index: np.ndarray | None = None) -> np.ndarray:
        """float32 copy of data[index] (all rows by default; only the selected rows are read from disk)."""
        return np.ascontiguousarray(self.data if index is None else self.data[index], dtype=np.float32)


def read_prepared(folder: Path, benchmark: str | None = None) -> PreparedSet:
    """The folder's arrays and the split column `benchmark` (default: the first one); one-line errors."""
    folder = Path(folder)
    for name in FILES:
        if not (folder / name).is_file():
            raise InputError(f"{folder / name}: missing (expected the output of `python -m service.prepare`)")
    header, *rows = [line.split("\t") for line in (folder / "index.tsv").read_text().splitlines() if line]
    columns = header[SAMPLE_COLUMNS:]
    if not columns:
        raise InputError(f"{folder / 'index.tsv'}: no benchmark split columns (PKU-MMD: prepare it with "
                         "--split-list pku-xsub=cross-subject.txt pku-xview=cross-view.txt)")
    benchmark = benchmark or columns[0]
    if benchmark not in columns:
        raise InputError(f"{folder / 'index.tsv'}: no {benchmark!r} column (has: {', '.join(columns)})")
    col = header.index(benchmark)
    data = np.load(folder / "data.npy", mmap_mode="r")
    labels = np.load(folder / "label.npy").astype(np.int64)
    if not len(data) == len(labels) == len(rows):
        raise InputError(f"{folder}: data.npy, label.npy and index.tsv disagree on the sample count "
                         f"({len(data)}, {len(labels)}, {len(rows)})")
    return PreparedSet(folder, data, labels, np.array([r[col] for r in rows]), benchmark)
