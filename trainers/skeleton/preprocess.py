"""Skeleton preprocessing as small pure transforms on (M persons, T frames, V joints, C=3) arrays.

Conventions (NTU-25, 0-based joint indices; the NTU documentation numbers them 1..25):
- A *body-frame* is present when any of its V x C values is non-zero; absent ones are all zeros and every
  transform keeps them exactly zero (nothing is ever zero-filled into a present body or vice versa).
- The *reference* body-frame is the first present frame of body 0 (of body 1 when body 0 never appears).
- Centring subtracts joint 1 (NTU joint 2, "spine middle") of the reference body-frame from every present
  body-frame, as most NTU pipelines do.
- Alignment is the usual two-step NTU rotation, about the origin, fixed by the reference body-frame: first
  the spine (joint 0 spine base -> joint 20 spine shoulder) onto +y, then a rotation about y that takes the
  horizontal part of the shoulder vector (joint 4 left shoulder -> joint 8 right shoulder; or the hips,
  12 -> 16) onto +x. The result is one orthonormal, right-handed matrix (det +1) applied to all frames, so
  distances are preserved. In Kinect camera space (x to the sensor's left, y up, z away from the sensor) a
  person facing the camera already has right - left along +x, so frontal views change little.
- Resampling drops all-empty frames (no body present), then linearly interpolates over the remaining
  frames to a fixed length; the first and last output frames are the first and last valid frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from trainers.errors import InputError

SPINE_BASE, SPINE_MID, NECK, SPINE_SHOULDER = 0, 1, 2, 20
LEFT_SHOULDER, RIGHT_SHOULDER, LEFT_HIP, RIGHT_HIP = 4, 8, 12, 16

# The standard NTU-25 bone list, (child, parent), 1-based as in the NTU documentation; directed towards the
# spine shoulder (joint 21), which is the root and has no bone of its own. Defined here so preprocessing does
# not depend on the GCN graph module.
NTU_BONES_1BASED: tuple[tuple[int, int], ...] = (
    (1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10), (12, 11),
    (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19), (22, 23), (23, 8),
    (24, 25), (25, 12),
)
NTU_BONES: tuple[tuple[int, int], ...] = tuple((c - 1, p - 1) for c, p in NTU_BONES_1BASED)
ACROSS_JOINTS = {"shoulders": (LEFT_SHOULDER, RIGHT_SHOULDER), "hips": (LEFT_HIP, RIGHT_HIP)}

_EPS = 1e-6      # metres: shorter reference vectors cannot define an axis


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def check_skeleton(x: np.ndarray, joints: int | None = None) -> np.ndarray:
    """`x` as a float array (M, T, V, C=3), or an InputError stating the shape found."""
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3 or (joints is not None and x.shape[2] != joints):
        want = f"(M, T, V={joints}, C=3)" if joints is not None else "(M, T, V, C=3)"
        raise InputError(f"skeleton array: expected shape {want}, got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return x


def present_mask(x: np.ndarray) -> np.ndarray:
    """(M, T) bool: the body-frames holding any non-zero value."""
    return np.any(x != 0, axis=(2, 3))


def reference_index(x: np.ndarray) -> tuple[int, int]:
    """(body, frame) of the first present frame of the first body that appears at all."""
    present = present_mask(x)                                             # (M, T)
    for m in range(present.shape[0]):
        frames = np.flatnonzero(present[m])
        if frames.size:
            return m, int(frames[0])
    raise InputError("skeleton array: no frame holds a body (all zeros)")


# ----------------------------------------------------------------------------------------------
# Transforms as functions
# ----------------------------------------------------------------------------------------------

def drop_empty_frames(x: np.ndarray) -> np.ndarray:
    """(M, T', V, C): the frames where at least one body is present, in order."""
    x = check_skeleton(x)
    return x[:, present_mask(x).any(axis=0)]


def centre_on_joint(x: np.ndarray, joint: int = SPINE_MID) -> np.ndarray:
    """Subtract joint `joint` of the reference body-frame from every present body-frame; float32."""
    x = check_skeleton(x)
    if not 0 <= joint < x.shape[2]:
        raise InputError(f"centre joint {joint}: expected 0..{x.shape[2] - 1}")
    m, t = reference_index(x)
    origin = x[m, t, joint].astype(np.float64)                             # (C,)
    keep = present_mask(x)[..., None, None]                                # (M, T, 1, 1)
    return np.where(keep, x - origin, 0.0).astype(np.float32)


def alignment_matrix(x: np.ndarray, across: Literal["shoulders", "hips"] = "shoulders") -> np.ndarray:
    """(3, 3) rotation R (rows: new x, y, z axes in old coordinates) fixed by the reference body-frame.

    R @ spine is along +y; R @ (right - left) has zero z and positive x. Equals step 1 (the smallest
    rotation taking the spine to +y) followed by step 2 (a rotation about y).
    """
    x = check_skeleton(x, joints=25)
    if across not in ACROSS_JOINTS:
        raise InputError(f"across={across!r}: expected one of {', '.join(ACROSS_JOINTS)}")
    m, t = reference_index(x)
    pose = x[m, t].astype(np.float64)                                      # (V, C)
    spine = pose[SPINE_SHOULDER] - pose[SPINE_BASE]
    left, right = ACROSS_JOINTS[across]
    side = pose[right] - pose[left]
    if np.linalg.norm(spine) < _EPS:
        raise InputError(f"cannot align: the spine vector of body {m + 1}, frame {t + 1} has zero length")
    y_axis = spine / np.linalg.norm(spine)
    side_h = side - side.dot(y_axis) * y_axis                              # part of the side vector orthogonal to y
    if np.linalg.norm(side_h) < _EPS:
        raise InputError(f"cannot align: the {across} of body {m + 1}, frame {t + 1} are parallel to the spine")
    x_axis = side_h / np.linalg.norm(side_h)
    z_axis = np.cross(x_axis, y_axis)                                      # right-handed: x cross y = z
    return np.stack([x_axis, y_axis, z_axis])


def align_to_axes(x: np.ndarray, across: Literal["shoulders", "hips"] = "shoulders") -> np.ndarray:
    """Rotate every frame about the origin by `alignment_matrix(x, across)`; float32. Centre first."""
    x = check_skeleton(x, joints=25)
    rot = alignment_matrix(x, across)
    return np.einsum("ij,mtvj->mtvi", rot, x.astype(np.float64)).astype(np.float32)


def resample(x: np.ndarray, frames: int = 64) -> np.ndarray:
    """(M, frames, V, C) float32: all-empty frames dropped, then linear interpolation over the valid ones.

    Output frame k sits at source position k (T' - 1) / (frames - 1). A body present at both neighbouring
    source frames is interpolated; otherwise (it appears or disappears there) it takes the nearest source
    frame as is, so a body is never blended with the zeros of its absence.
    """
    if frames < 1:
        raise InputError(f"frames={frames}: expected at least 1")
    x = drop_empty_frames(x)
    num = x.shape[1]
    if num == 0:
        raise InputError("skeleton array: no frame holds a body (all zeros)")
    pos = np.linspace(0.0, num - 1, frames) if frames > 1 else np.zeros(1)   # (F,)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, num - 1)
    w = (pos - lo)[None, :, None, None]                                      # (1, F, 1, 1)
    src = x.astype(np.float64)
    linear = (1.0 - w) * src[:, lo] + w * src[:, hi]                         # (M, F, V, C)
    nearest = src[:, np.floor(pos + 0.5).astype(np.int64)]
    present = present_mask(x)
    both = (present[:, lo] & present[:, hi])[..., None, None]                # (M, F, 1, 1)
    return np.where(both, linear, nearest).astype(np.float32)


def pad_bodies(x: np.ndarray, bodies: int = 2) -> np.ndarray:
    """(bodies, T, V, C): missing body slots as zeros, extra ones (the least active, last) dropped."""
    x = check_skeleton(x)
    if bodies < 1:
        raise InputError(f"bodies={bodies}: expected at least 1")
    if x.shape[0] >= bodies:
        return x[:bodies]
    pad = np.zeros((bodies - x.shape[0], *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, pad], axis=0)


# ----------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------

def joint_stream(x: np.ndarray) -> np.ndarray:
    """The joint positions themselves (a float32 copy)."""
    return check_skeleton(x).astype(np.float32, copy=True)


def bone_stream(x: np.ndarray, bones: tuple[tuple[int, int], ...] = NTU_BONES) -> np.ndarray:
    """out[..., child, :] = x[..., child, :] - x[..., parent, :]; joints that are no child (the root) are 0."""
    x = check_skeleton(x)
    out = np.zeros(x.shape, dtype=np.float32)
    children = np.array([c for c, _ in bones])
    parents = np.array([p for _, p in bones])
    if children.size and max(children.max(), parents.max()) >= x.shape[2]:
        raise InputError(f"bone list names joint {max(children.max(), parents.max())}, the array has "
                         f"{x.shape[2]} joints")
    out[:, :, children] = x[:, :, children] - x[:, :, parents]
    return out


def motion_stream(x: np.ndarray) -> np.ndarray:
    """out[:, t] = x[:, t + 1] - x[:, t]; the last frame is zero."""
    x = check_skeleton(x)
    out = np.zeros(x.shape, dtype=np.float32)
    out[:, :-1] = x[:, 1:] - x[:, :-1]
    return out


STREAMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "joint": joint_stream, "bone": bone_stream, "motion": motion_stream,
}


# ----------------------------------------------------------------------------------------------
# Transforms as callables
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PadBodies:
    """(M, T, V, C) -> (bodies, T, V, C): zero slots added, or the last ones dropped."""

    bodies: int = 2

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return pad_bodies(x, self.bodies)


@dataclass(frozen=True)
class CentreOnJoint:
    """Shape kept: joint `joint` of the reference body-frame moves to the origin; absent frames stay 0."""

    joint: int = SPINE_MID

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return centre_on_joint(x, self.joint)


@dataclass(frozen=True)
class AlignAxes:
    """Shape kept (V = 25): spine onto +y, `across` (right - left) onto the +x half of the x-y plane."""

    across: Literal["shoulders", "hips"] = "shoulders"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return align_to_axes(x, self.across)


@dataclass(frozen=True)
class Resample:
    """(M, T, V, C) -> (M, frames, V, C): empty frames dropped, linear interpolation over the rest."""

    frames: int = 64

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return resample(x, self.frames)


@dataclass(frozen=True)
class CentreImage:
    """Shape kept (C = x, y, score in [0, 1] image coordinates): x, y - 0.5 where the joint was detected
    (score > 0); undetected joints become all zeros, as in ST-GCN's Kinetics feeder."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = check_skeleton(x)
        detected = x[..., 2:3] > 0                                                  # (M, T, V, 1)
        centred = np.concatenate([x[..., :2] - 0.5, x[..., 2:]], axis=-1)
        return np.where(detected, centred, 0).astype(x.dtype)


@dataclass(frozen=True)
class Compose:
    """Apply the transforms in order."""

    transforms: tuple[Callable[[np.ndarray], np.ndarray], ...]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for transform in self.transforms:
            x = transform(x)
        return x


def ntu_pipeline(frames: int = 64, bodies: int = 2, across: Literal["shoulders", "hips"] = "shoulders") -> Compose:
    """NTU/PKU 3-D skeletons: pad bodies, centre on the spine middle, align, resample; (bodies, frames, 25, 3)."""
    return Compose((PadBodies(bodies), CentreOnJoint(SPINE_MID), AlignAxes(across), Resample(frames)))


def image_pipeline(frames: int = 64, bodies: int = 2) -> Compose:
    """2-D image poses with a score channel (Kinetics-Skeleton): pad bodies, centre the image, resample."""
    return Compose((PadBodies(bodies), CentreImage(), Resample(frames)))
