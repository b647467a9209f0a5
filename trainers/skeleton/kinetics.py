"""Kinetics-Skeleton clips (ST-GCN release, docs/METHODS.md §3): one JSON per clip, OpenPose 18-joint 2-D poses.

`{"data": [{"frame_index": 1, "skeleton": [{"pose": [x0, y0, ..., x17, y17], "score": [s0, ..., s17]}]}],
"label": "...", "label_index": 129}`. frame_index is 1-based (OpenPose numbering): frame k lands at time k-1.
OpenPose does not track people, so a person slot means nothing across frames; as in ST-GCN's feeder we rank
the people of each frame by their summed joint score and keep the best `max_people` (ST-GCN first drops all
but the first 5 listed; we rank everyone). label_index is 0-based in the real release, but the two
NTU-derived clips in shared data use the 1-based NTU action number: it is returned as written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainers.errors import InputError

NUM_JOINTS = 18      # OpenPose COCO-18 layout
# Clips are 10 s (300 frames at 30 fps); 100,000 frames is ~55 minutes of video and (2 people) a 43 MB array.
# A larger frame_index is a corrupt file, and would otherwise be a MemoryError at allocation.
MAX_FRAME_INDEX = 100_000
# Poses are normalised to [0, 1] in the release and scores are in [0, 1]; 1e4 still admits raw pixel
# coordinates of 4K video. Anything larger is corruption (and overflows float32 once squared).
MAX_ABS_VALUE = 1e4


def read_kinetics(path: str | Path, max_people: int = 2, num_classes: int | None = None) -> tuple[np.ndarray, int]:
    """(array (M=max_people, T, V=18, C=3) float32 of x, y, score; label_index as written).

    num_classes: when given, label_index must lie in [0, num_classes) (else it must be >= 0)."""
    path = Path(path)
    if max_people < 1:
        raise InputError(f"max_people={max_people}: expected at least 1")
    clip = _load_json(path)
    label = _label_index(path, clip, num_classes)              # cheap: checked before the frames
    frames = _frames(path, clip)
    num_frames = max((t for t, _ in frames), default=-1) + 1                     # T = last frame_index
    out = np.zeros((max_people, num_frames, NUM_JOINTS, 3), dtype=np.float32)     # (M, T, V, C)
    for t, people in frames:
        if not people:
            continue
        people_arr = np.stack(people)                                               # (P, V, C)
        order = np.argsort(-people_arr[..., 2].sum(axis=1), kind="stable")          # best first, ties: file order
        keep = order[:max_people]
        out[:len(keep), t] = people_arr[keep]
    return out, label


def _load_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read as UTF-8 text ({err})") from None
    try:
        clip = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(clip, dict) or not isinstance(clip.get("data"), list):
        raise InputError(f"{path}: expected a JSON object with a 'data' list (Kinetics-skeleton clip)")
    return clip


def _frames(path: Path, clip: dict) -> list[tuple[int, list[np.ndarray]]]:
    """[(0-based time, [(V, C) array per person])] with every field checked."""
    out = []
    seen: dict[int, int] = {}
    for i, entry in enumerate(clip["data"]):
        where = f"data[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("skeleton"), list):
            raise InputError(f"{path}: {where}: expected an object with 'frame_index' and a 'skeleton' list")
        index = entry.get("frame_index")
        if not _is_int(index) or not 1 <= index <= MAX_FRAME_INDEX:
            raise InputError(f"{path}: {where}.frame_index: expected an integer in 1..{MAX_FRAME_INDEX}, "
                             f"got {str(index)[:40]}")
        if index in seen:
            raise InputError(f"{path}: {where}.frame_index: frame {index} already given by data[{seen[index]}]")
        seen[index] = i
        people = []
        for j, person in enumerate(entry["skeleton"]):
            pwhere = f"{where}.skeleton[{j}]"
            if not isinstance(person, dict):
                raise InputError(f"{path}: {pwhere}: expected an object with 'pose' and 'score'")
            pose = _numbers(path, person.get("pose"), 2 * NUM_JOINTS, f"{pwhere}.pose", "18 joints x (x, y)")
            score = _numbers(path, person.get("score"), NUM_JOINTS, f"{pwhere}.score", "one per joint")
            people.append(np.stack([pose[0::2], pose[1::2], score], axis=1))        # (V, C)
        out.append((index - 1, people))
    return out


def _numbers(path: Path, values, count: int, where: str, meaning: str) -> np.ndarray:
    if not isinstance(values, list) or len(values) != count or not all(_is_number(v) for v in values):
        got = f"{len(values)} items" if isinstance(values, list) else repr(values)[:40]
        raise InputError(f"{path}: {where}: expected {count} numbers ({meaning}), got {got}")
    try:
        arr = np.asarray(values, dtype=np.float64)
    except OverflowError:                          # an integer beyond float64's range
        raise InputError(f"{path}: {where}: expected numbers of magnitude <= {MAX_ABS_VALUE:g}") from None
    if not np.isfinite(arr).all():
        raise InputError(f"{path}: {where}: expected finite numbers")
    if np.abs(arr).max(initial=0.0) > MAX_ABS_VALUE:
        raise InputError(f"{path}: {where}: value {np.abs(arr).max():.3g} exceeds {MAX_ABS_VALUE:g} "
                         "(poses are normalised coordinates or pixels, scores in [0, 1])")
    return arr


def _label_index(path: Path, clip: dict, num_classes: int | None = None) -> int:
    label = clip.get("label_index")
    if not _is_int(label):
        raise InputError(f"{path}: label_index: expected an integer, got {str(label)[:40]}")
    if label < 0 or (num_classes is not None and label >= num_classes):
        want = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise InputError(f"{path}: label_index: expected an integer in {want}, got {str(label)[:40]}")
    return label


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
