"""The generated actions of `synthetic.py` laid out as a Kinetics-Skeleton or a PKU-MMD release.

For testing the two non-NTU protocols end to end (reader -> `service.prepare` -> split column -> CoCoDiff)
without the releases, which cannot be downloaded here. The motion is the same generated NTU-25 camera-space
skeleton; only the file layout and what a sensor of that dataset would see change:

- **Kinetics** (`write_kinetics_release`): `kinetics_train/` and `kinetics_val/` (X-Sub rule on the sample's
  performer) of ST-GCN JSON clips: the body projected to colour-image coordinates in [0, 1] (Kinect v2
  colour intrinsics, 1920 x 1080), mapped onto the OpenPose COCO-18 joints, a confidence per joint
  (a few joints undetected: score 0), people listed in random order per frame; `label_index` 0-based.
- **PKU-MMD** (`write_pku_release`): one long sequence per (performer, camera) named `NNNN-L|M|R` (cameras
  1, 2, 3 = left, middle, right views), the samples played one after another with short gaps of rest frames,
  150 numbers a frame (2 bodies x 25 joints x xyz; body 2 zero when absent), a label file per sequence
  (`action,start,end,confidence`, 0-based inclusive frames as `read_pku_segments` reads them) and the two
  official-format split lists `Split/cross-subject.txt` (X-Sub performers) and `Split/cross-view.txt` (the
  left view tests).

Both also write `class_names.txt`, `descriptions.txt` (the generated set's texts) and, last, `release.json`
(the options): a folder that already holds the same release is left untouched, so a later `service.prepare`
stays a no-op.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from trainers.errors import InputError
from trainers.io import atomic_write_text
from trainers.skeleton.ntu import parse_sample_name
from trainers.skeleton.splits import split_of
from trainers.skeleton.synthetic import (
    REST_POSE,
    SyntheticOptions,
    SyntheticSample,
    action_catalogue,
    check_set_size,
    generate_samples,
)

# OpenPose COCO-18 joint -> NTU-25 joint (0-based). Eyes and ears have no NTU joint: head plus an offset.
OPENPOSE_FROM_NTU = (3, 20, 8, 9, 10, 4, 5, 6, 16, 17, 18, 12, 13, 14, 3, 3, 3, 3)
HEAD_OFFSETS = {14: (0.03, 0.03), 15: (-0.03, 0.03), 16: (0.07, 0.0), 17: (-0.07, 0.0)}   # metres (x, y)
_COLOUR = (1060.0, 960.0, 540.0, 1920.0, 1080.0)       # focal, cx, cy, width, height (Kinect v2 colour camera)
PKU_VIEWS = {1: "L", 2: "M", 3: "R"}


RELEASE_VERSION = 1


def _stamp(kind: str, num_classes: int, per_class: int, seed: int) -> dict:
    return {"release": kind, "version": RELEASE_VERSION, "num_classes": num_classes, "per_class": per_class,
            "seed": seed}


def release_matches(folder: str | Path, kind: str, num_classes: int, per_class: int, seed: int = 0) -> bool:
    """True when `folder` holds a complete generated `kind` release made with these options."""
    path = Path(folder) / "release.json"
    try:
        return json.loads(path.read_text()) == _stamp(kind, num_classes, per_class, seed)
    except (OSError, json.JSONDecodeError):
        return False


def _start(folder: Path, kind: str, num_classes: int, per_class: int, seed: int) -> bool:
    """True when `folder` already holds this release; refuses a folder holding another one (its files would
    mix with the new ones) and bad sizes."""
    check_set_size(num_classes, per_class)
    if release_matches(folder, kind, num_classes, per_class, seed):
        return True
    if (folder / "release.json").is_file():
        raise InputError(f"{folder / 'release.json'}: this folder holds a generated release made with other "
                         "options; use another folder or delete it")
    return False


def _finish(folder: Path, kind: str, num_classes: int, per_class: int, seed: int) -> None:
    """The class texts, then release.json (last: marks the release complete)."""
    catalogue = action_catalogue()[:num_classes]
    atomic_write_text(folder / "class_names.txt", "".join(f"{c.name}\n" for c in catalogue))
    atomic_write_text(folder / "descriptions.txt", "".join(f"{c.description}\n" for c in catalogue))
    atomic_write_text(folder / "release.json", json.dumps(_stamp(kind, num_classes, per_class, seed)) + "\n")


# ----------------------------------------------------------------------------------------------
# Kinetics-Skeleton
# ----------------------------------------------------------------------------------------------

def to_openpose(xyz: np.ndarray, rng: np.random.Generator, miss_prob: float = 0.03) -> np.ndarray:
    """(T, 25, 3) camera-space metres -> (T, 18, 3) of image x, y in [0, 1] and a score; missed joints all 0."""
    pts = xyz[:, list(OPENPOSE_FROM_NTU)].copy()                                  # (T, 18, 3)
    for j, (dx, dy) in HEAD_OFFSETS.items():
        pts[:, j, 0] += dx
        pts[:, j, 1] += dy
    focal, cx, cy, width, height = _COLOUR
    z = np.maximum(pts[..., 2], 0.1)
    u = (cx + focal * pts[..., 0] / z) / width
    v = (cy - focal * pts[..., 1] / z) / height
    score = rng.uniform(0.55, 0.98, size=u.shape)
    out = np.stack([u, v, score], axis=-1)                                        # (T, 18, 3)
    missed = (rng.uniform(size=u.shape) < miss_prob) | (u < 0) | (u > 1) | (v < 0) | (v > 1)
    out[missed] = 0.0
    return out


def kinetics_clip(sample: SyntheticSample, label_name: str, rng: np.random.Generator) -> dict:
    """The sample as one ST-GCN Kinetics-skeleton JSON object (frame_index 1-based, people shuffled)."""
    frames: list[list[dict]] = [[] for _ in range(sample.num_frames)]
    for body in sample.bodies:
        for t, pose in zip(body.frames, to_openpose(body.xyz, rng)):
            frames[int(t)].append({"pose": [round(float(c), 3) for c in pose[:, :2].reshape(-1)],
                                   "score": [round(float(s), 3) for s in pose[:, 2]]})
    for people in frames:
        rng.shuffle(people)                       # OpenPose does not track: slot order means nothing
    return {"data": [{"frame_index": t + 1, "skeleton": people} for t, people in enumerate(frames)],
            "label": label_name, "label_index": sample.label}


def write_kinetics_release(folder: str | Path, num_classes: int, per_class: int, seed: int = 0) -> list[Path]:
    """kinetics_train/ and kinetics_val/ of JSON clips plus class_names.txt, descriptions.txt; returns the clips."""
    folder = Path(folder)
    if _start(folder, "kinetics", num_classes, per_class, seed):
        return sorted(folder.glob("kinetics_*/*.json"))
    catalogue = action_catalogue()
    rng = np.random.default_rng([seed, 17])
    paths = []
    for sample in generate_samples(SyntheticOptions(num_classes, per_class, seed)):
        split = "kinetics_train" if split_of(sample.name, "ntu60-xsub") == "train" else "kinetics_val"
        clip = kinetics_clip(sample, catalogue[sample.label].name, rng)
        paths.append(atomic_write_text(folder / split / f"{sample.name}.json", json.dumps(clip)))
    _finish(folder, "kinetics", num_classes, per_class, seed)
    return paths


# ----------------------------------------------------------------------------------------------
# PKU-MMD
# ----------------------------------------------------------------------------------------------

def _rest_frames(count: int, like: np.ndarray) -> np.ndarray:
    """`count` frames of body 1 standing at rest where `like` (T, 25, 3) starts; body 2 absent."""
    rest = REST_POSE - REST_POSE[0] + like[0, 0]
    out = np.zeros((count, 2, 25, 3))
    out[:, 0] = rest
    return out


def write_pku_release(folder: str | Path, num_classes: int, per_class: int, seed: int = 0,
                      gap: int = 8) -> list[Path]:
    """skeleton/NNNN-V.txt, label/NNNN-V.txt, Split/cross-subject.txt, Split/cross-view.txt, class texts;
    returns the skeleton files."""
    folder = Path(folder)
    if _start(folder, "pku", num_classes, per_class, seed):
        return sorted((folder / "skeleton").glob("*.txt"))
    groups: dict[tuple[int, int], list[SyntheticSample]] = defaultdict(list)
    for sample in generate_samples(SyntheticOptions(num_classes, per_class, seed)):
        parsed = parse_sample_name(sample.name)
        groups[(parsed.performer, parsed.camera)].append(sample)
    paths, split = [], {"xsub": defaultdict(list), "xview": defaultdict(list)}
    for number, ((_, camera), samples) in enumerate(sorted(groups.items()), start=1):
        name = f"{number:04d}-{PKU_VIEWS[camera]}"
        frames, labels = [], []
        for sample in samples:
            body = np.zeros((sample.num_frames, 2, 25, 3))
            for m, b in enumerate(sample.bodies[:2]):
                body[b.frames, m] = b.xyz
            start = sum(len(f) for f in frames) + gap
            frames += [_rest_frames(gap, sample.bodies[0].xyz), body]
            labels.append(f"{sample.label + 1},{start},{start + sample.num_frames - 1},2")
        seq = np.concatenate(frames + [_rest_frames(gap, samples[-1].bodies[0].xyz)]).reshape(-1, 150)
        text = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in seq) + "\n"
        paths.append(atomic_write_text(folder / "skeleton" / f"{name}.txt", text))
        atomic_write_text(folder / "label" / f"{name}.txt", "\n".join(labels) + "\n")
        split["xsub"][split_of(samples[0].name, "ntu60-xsub")].append(name)
        split["xview"]["test" if camera == 1 else "train"].append(name)
    for protocol, file in (("xsub", "cross-subject.txt"), ("xview", "cross-view.txt")):
        atomic_write_text(folder / "Split" / file,
                          f"Training videos: \n{', '.join(split[protocol]['train'])}\n"
                          f"Validataion videos: \n{', '.join(split[protocol]['test'])}\n")
    _finish(folder, "pku", num_classes, per_class, seed)
    return paths
