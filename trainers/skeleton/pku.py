"""PKU-MMD sequences (docs/METHODS.md §3): a skeleton text file and a label file per long, untrimmed sequence.

Skeleton file: one frame a line, 150 numbers = 2 bodies x 25 joints x (x, y, z); body 2 is all zeros when
only one person is in view. Label file: one action instance a line, `action,start,end,confidence` (action
1..51 as written; confidence 1 = slight, 2 = strong). The dataset's README does not say how frames are
numbered; we read start and end as inclusive row numbers counted from `frame_base` (0 by default: the
first line of the skeleton file is frame 0), and reject any segment that falls outside the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from trainers.errors import InputError

NUM_BODIES = 2
NUM_JOINTS = 25
FRAME_VALUES = NUM_BODIES * NUM_JOINTS * 3      # 150
# Kinect v2 positions in metres (a few metres at most); above 1 km a value is corruption, not a reading.
MAX_ABS_XYZ = 1e3


class PKULabel(NamedTuple):
    """One labelled action instance, fields as written in the label file."""

    action: int          # 1-based action id
    start: int           # first frame (inclusive)
    end: int             # last frame (inclusive)
    confidence: int      # 1 slight, 2 strong


class PKUSegment(NamedTuple):
    """One trimmed clip: unpacks as (data, action)."""

    data: np.ndarray     # (M=2, T_seg, V=25, C=3) float32
    action: int          # 1-based action id, as in the label file


def read_pku_skeleton(path: str | Path) -> np.ndarray:
    """(M=2, T, V=25, C=3) float32 joint positions of a whole sequence."""
    path = Path(path)
    lines = _read_lines(path)
    while lines and not lines[-1].strip():          # blank lines at the end only
        lines.pop()
    rows = []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if len(fields) != FRAME_VALUES:
            raise InputError(f"{path}:{lineno}: expected {FRAME_VALUES} numbers (2 bodies x 25 joints x xyz), "
                             f"got {len(fields)}")
        rows.append(fields)
    if not rows:
        raise InputError(f"{path}: expected at least one frame line of {FRAME_VALUES} numbers, the file is empty")
    try:
        values = np.array(rows, dtype=np.float64)                                   # (T, 150)
    except ValueError:
        values = np.stack([_floats(path, lineno, fields) for lineno, fields in enumerate(rows, start=1)])
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        lineno = int(np.argmax(bad)) + 1
        raise InputError(f"{path}:{lineno}: expected finite numbers, got {_first_bad(rows[lineno - 1])!r}")
    far = (np.abs(values) > MAX_ABS_XYZ).any(axis=1)
    if far.any():
        lineno = int(np.argmax(far)) + 1
        raise InputError(f"{path}:{lineno}: a coordinate of {np.abs(values[lineno - 1]).max():.3g} m "
                         f"(more than {MAX_ABS_XYZ:g} m: not a Kinect reading)")
    frames = values.reshape(len(rows), NUM_BODIES, NUM_JOINTS, 3)                   # (T, M, V, C)
    return np.ascontiguousarray(frames.transpose(1, 0, 2, 3), dtype=np.float32)     # (M, T, V, C)


def read_pku_labels(path: str | Path) -> list[PKULabel]:
    """The action instances of a label file, in file order (blank lines skipped)."""
    return [label for _, label in _numbered_labels(Path(path))]


def read_pku_segments(skeleton_path: str | Path, label_path: str | Path,
                      frame_base: int = 0) -> list[PKUSegment]:
    """One (data (2, T_seg, 25, 3), action) clip per labelled instance; frames [start, end] inclusive."""
    skeleton = read_pku_skeleton(skeleton_path)                                     # (M, T, V, C)
    num_frames = skeleton.shape[1]
    out = []
    for lineno, label in _numbered_labels(Path(label_path)):
        first, last = label.start - frame_base, label.end - frame_base
        if first < 0 or last >= num_frames:
            raise InputError(f"{label_path}:{lineno}: frames {label.start}..{label.end} fall outside "
                             f"{skeleton_path} (frames {frame_base}..{num_frames - 1 + frame_base})")
        out.append(PKUSegment(skeleton[:, first:last + 1].copy(), label.action))      # (M, T_seg, V, C)
    return out


def _numbered_labels(path: Path) -> list[tuple[int, PKULabel]]:
    """[(line number, label)] with every line checked."""
    out = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4 or not all(_is_int(f) for f in fields):
            raise InputError(f"{path}:{lineno}: expected 'action,start,end,confidence' (4 integers), "
                             f"got {line.strip()[:60]!r}")
        label = PKULabel(*(int(f) for f in fields))
        if label.action < 1 or label.start > label.end:
            raise InputError(f"{path}:{lineno}: expected action >= 1 and start <= end, got {line.strip()!r}")
        out.append((lineno, label))
    return out


def _read_lines(path: Path) -> list[str]:
    """Lines without LF/CRLF endings; a final newline adds no empty line."""
    try:
        text = path.read_bytes().decode("ascii")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: expected ASCII text, got a non-ASCII byte at offset {err.start}") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _floats(path: Path, lineno: int, fields: list[str]) -> np.ndarray:
    try:
        return np.array([float(f) for f in fields])
    except ValueError:
        raise InputError(f"{path}:{lineno}: expected {FRAME_VALUES} numbers, got {_first_bad(fields)!r}") from None


def _first_bad(fields: list[str]) -> str:
    for f in fields:
        try:
            if np.isfinite(float(f)):
                continue
        except ValueError:
            pass
        return f
    return ""


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()
