"""Kinetics-Skeleton clips (ST-GCN release, METHODS.md §3): one JSON per clip, OpenPose 18-joint 2-D poses.

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


def read_kinetics(path: str | Path, max_people: int = 2) -> tuple[np.ndarray, int]:
    """(array (M=max_people, T, V=18, C=3) float32 of x, y, score; label_index as written)."""
    path = Path(path)
    if max_people < 1:
        raise InputError(f"max_people={max_people}: expected at least 1")
    clip = _load_json(path)
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
    return out, _label_index(path, clip)


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
        if not _is_int(index) or index < 1:
            raise InputError(f"{path}: {where}.frame_index: expected an integer >= 1, got {index!r}")
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
    arr = np.asarray(values, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise InputError(f"{path}: {where}: expected finite numbers")
    return arr


def _label_index(path: Path, clip: dict) -> int:
    label = clip.get("label_index")
    if not _is_int(label):
        raise InputError(f"{path}: label_index: expected an integer, got {label!r}")
    return label


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
