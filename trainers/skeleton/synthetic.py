"""Synthetic but structured NTU-25 actions, written as real NTU `.skeleton` files.

Each class is a motion primitive applied to a body part ("raise" x "left arm" -> "raise left arm"), with a
one-sentence description built from the same two pieces, so a held-out class is a new combination of seen
primitives and parts. A sample animates a standing rest pose by forward kinematics (rotations of joint
chains about their proximal joint), then varies body size, speed, amplitude, viewpoint (yaw about the
vertical axis, set by the camera id as in NTU's -45/0/+45 degree cameras), placement and joint noise, and
sometimes adds a second person who stands still or mirrors the action.

Body frame (metres, as Kinect camera space seen from the front): +x the performer's right, +y up, +z the
performer's back (they face -z, towards the camera). Joints are 0-based NTU indices.

Files: `SsssCcccPpppRrrrAaaa.skeleton` (setups 1..17, cameras 1..3, performers 1..40, replications 1..2,
action = 1-based class id), plus `class_names.txt`, `descriptions.txt` (one line per class) and
`synthetic.json` (the options used).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trainers.errors import InputError
from trainers.io import atomic_write_text

NUM_JOINTS = 25
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Rest pose and joint groups
# ----------------------------------------------------------------------------------------------

# A 1.75 m adult standing with arms hanging, feet on y = 0 (body frame above).
REST_POSE = np.array([
    [0.00, 0.98, 0.00],     # 0 spine base
    [0.00, 1.22, 0.01],     # 1 spine mid
    [0.00, 1.50, 0.00],     # 2 neck
    [0.00, 1.63, -0.05],    # 3 head (centre, a little forward of the neck)
    [-0.19, 1.44, 0.01],    # 4 left shoulder
    [-0.23, 1.17, 0.03],    # 5 left elbow
    [-0.25, 0.93, 0.00],    # 6 left wrist
    [-0.25, 0.86, -0.01],   # 7 left hand
    [0.19, 1.44, 0.01],     # 8 right shoulder
    [0.23, 1.17, 0.03],     # 9 right elbow
    [0.25, 0.93, 0.00],     # 10 right wrist
    [0.25, 0.86, -0.01],    # 11 right hand
    [-0.09, 0.94, 0.00],    # 12 left hip
    [-0.10, 0.52, -0.01],   # 13 left knee
    [-0.10, 0.09, 0.02],    # 14 left ankle
    [-0.11, 0.03, -0.09],   # 15 left foot
    [0.09, 0.94, 0.00],     # 16 right hip
    [0.10, 0.52, -0.01],    # 17 right knee
    [0.10, 0.09, 0.02],     # 18 right ankle
    [0.11, 0.03, -0.09],    # 19 right foot
    [0.00, 1.45, 0.01],     # 20 spine shoulder
    [-0.25, 0.78, -0.01],   # 21 left hand tip
    [-0.22, 0.85, -0.04],   # 22 left thumb
    [0.25, 0.78, -0.01],    # 23 right hand tip
    [0.22, 0.85, -0.04],    # 24 right thumb
])
REST_HEIGHT = 1.75

SIDES = {"left": -1, "right": +1}     # sign of x on that side
# (pivot, moved joints) per chain; moved = everything distal to the pivot.
ARM = {"left": (4, [5, 6, 7, 21, 22]), "right": (8, [9, 10, 11, 23, 24])}
FOREARM = {"left": (5, [6, 7, 21, 22]), "right": (9, [10, 11, 23, 24])}
LEG = {"left": (12, [13, 14, 15]), "right": (16, [17, 18, 19])}
SHIN = {"left": (13, [14, 15]), "right": (17, [18, 19])}
HEAD = (2, [3])
UPPER_BODY = (0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24])
ANKLES = [14, 18]
MIRROR = np.array([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14, 15, 20, 23, 24, 21, 22])

PART_JOINTS = {   # the joints a part's primitives move (used by tests and descriptions)
    "left arm": ARM["left"][1], "right arm": ARM["right"][1], "both arms": ARM["left"][1] + ARM["right"][1],
    "left leg": LEG["left"][1], "right leg": LEG["right"][1], "both legs": LEG["left"][1] + LEG["right"][1],
    "torso": UPPER_BODY[1], "head": HEAD[1],
}


# ----------------------------------------------------------------------------------------------
# Kinematics
# ----------------------------------------------------------------------------------------------

def rotation(axis: str, angle: np.ndarray) -> np.ndarray:
    """(T, 3, 3) rotations by `angle` (T,) radians about the body-frame axis 'x', 'y' or 'z'."""
    angle = np.asarray(angle, dtype=np.float64)
    c, s = np.cos(angle), np.sin(angle)
    one, zero = np.ones_like(angle), np.zeros_like(angle)
    rows = {"x": [[one, zero, zero], [zero, c, -s], [zero, s, c]],
            "y": [[c, zero, s], [zero, one, zero], [-s, zero, c]],
            "z": [[c, -s, zero], [s, c, zero], [zero, zero, one]]}[axis]
    return np.moveaxis(np.array(rows), -1, 0)                                  # (T, 3, 3)


def rotate_chain(pose: np.ndarray, chain: tuple[int, list[int]], rot: np.ndarray) -> None:
    """In place: rotate the chain's joints of `pose` (T, V, 3) about its pivot joint by `rot` (T, 3, 3)."""
    pivot, joints = chain
    centre = pose[:, pivot:pivot + 1]                                           # (T, 1, 3)
    pose[:, joints] = centre + np.einsum("tij,tvj->tvi", rot, pose[:, joints] - centre)


def keep_feet_on_floor(pose: np.ndarray) -> None:
    """In place: shift each frame vertically so the lower ankle is at its rest height (squats, bends)."""
    drop = pose[:, ANKLES, 1].min(axis=1) - REST_POSE[ANKLES, 1].min()       # (T,)
    pose[:, :, 1] -= drop[:, None]


def hold(s: np.ndarray, ramp: float = 0.3) -> np.ndarray:
    """0 -> 1 -> hold -> 0 over the phase s in [0, 1], smooth ramps of length `ramp`."""
    up = np.clip(s / ramp, 0, 1)
    down = np.clip((1 - s) / ramp, 0, 1)
    u = np.minimum(up, down)
    return u * u * (3 - 2 * u)                                                    # smoothstep


def wave(s: np.ndarray, cycles: float, phase: float = 0.0) -> np.ndarray:
    """sin(2 pi cycles s + phase), faded in and out so the action starts and ends at rest."""
    return np.sin(2 * np.pi * cycles * s + phase) * hold(s, 0.15)


def pulses(s: np.ndarray, cycles: float, width: float = 0.35) -> np.ndarray:
    """`cycles` smooth 0 -> 1 -> 0 bumps, each lasting `width` of its period (fast strikes)."""
    u = (s * cycles) % 1.0
    return np.where(u < width, np.sin(np.pi * u / width) ** 2, 0.0)


# ----------------------------------------------------------------------------------------------
# Motion primitives: (pose (T, V, 3) in place, part, phase s (T,), amplitude, cycles) -> None
# ----------------------------------------------------------------------------------------------

Primitive = Callable[[np.ndarray, str, np.ndarray, float, float], None]


def _sides(part: str) -> list[str]:
    return ["left", "right"] if part.startswith("both") else [part.split()[0]]


def _raise(pose, part, s, amp, cycles):
    e = hold(s)
    if part == "head":                                                           # look up
        rotate_chain(pose, HEAD, rotation("x", 0.5 * amp * e))
        return
    for side in _sides(part):
        if "arm" in part:                                                        # forward and overhead
            rotate_chain(pose, ARM[side], rotation("x", 0.95 * np.pi * amp * e))
        else:                                                                    # knee up
            rotate_chain(pose, SHIN[side], rotation("x", -1.5 * amp * e))
            rotate_chain(pose, LEG[side], rotation("x", 1.5 * amp * e))


def _wave(pose, part, s, amp, cycles):
    e = hold(s, 0.2)
    for k, side in enumerate(_sides(part)):
        sign = SIDES[side]
        rotate_chain(pose, FOREARM[side], rotation("z", sign * (0.5 + 0.45 * amp * wave(s, cycles, k * np.pi)) * e))
        rotate_chain(pose, ARM[side], rotation("z", sign * 2.2 * e))


def _circle(pose, part, s, amp, cycles):
    a, b = np.cos(2 * np.pi * cycles * s), np.sin(2 * np.pi * cycles * s)
    e = hold(s, 0.15)
    if part in ("head", "torso"):
        chain, size = (HEAD, 0.35) if part == "head" else (UPPER_BODY, 0.3)
        rotate_chain(pose, chain, rotation("x", -size * amp * a * e))
        rotate_chain(pose, chain, rotation("z", size * amp * b * e))
        if part == "torso":
            keep_feet_on_floor(pose)
        return
    is_arm = "arm" in part
    for side in _sides(part):
        sign = SIDES[side]
        chain = ARM[side] if is_arm else LEG[side]
        size = 0.9 if is_arm else 0.35
        rotate_chain(pose, chain, rotation("x", size * amp * (1.2 - a) * e))                 # forward offset
        rotate_chain(pose, chain, rotation("z", sign * size * amp * (0.6 + b) * e))          # sideways


def _push(pose, part, s, amp, cycles, fast: bool = False):
    for k, side in enumerate(_sides(part)):
        if fast:                                            # punch: fast strikes, both arms alternate
            p = pulses((s + 0.5 * k / cycles) % 1.0, cycles)
            guard = hold(s, 0.15)
        else:                                               # push: slow, both arms together
            p = hold(s, 0.45)
            guard = hold(s, 0.15)
        rotate_chain(pose, FOREARM[side], rotation("x", (1.9 * guard - 1.8 * amp * p).clip(0)))   # elbow
        rotate_chain(pose, ARM[side], rotation("x", 0.6 * guard + 0.9 * amp * p))                  # shoulder
        rotate_chain(pose, ARM[side], rotation("y", SIDES[side] * 0.25 * guard))                  # towards midline


def _punch(pose, part, s, amp, cycles):
    _push(pose, part, s, amp, cycles, fast=True)


def _swing(pose, part, s, amp, cycles):
    for k, side in enumerate(_sides(part)):
        chain = ARM[side] if "arm" in part else LEG[side]
        size = 0.8 if "arm" in part else 0.55
        rotate_chain(pose, chain, rotation("x", size * amp * wave(s, cycles, k * np.pi)))


def _bend(pose, part, s, amp, cycles):
    if part == "torso":                                       # bow forward from the hips
        rotate_chain(pose, UPPER_BODY, rotation("x", -1.0 * amp * hold(s)))
        return
    if part == "head":                                        # tilt the head towards the right shoulder and back
        rotate_chain(pose, HEAD, rotation("z", -0.45 * amp * hold(s)))
        return
    if part == "both legs":                                   # squat: hips and knees flex, feet stay down
        e = hold(s)
        for side in ("left", "right"):
            rotate_chain(pose, SHIN[side], rotation("x", -2.0 * amp * e))
            rotate_chain(pose, LEG[side], rotation("x", 1.0 * amp * e))
        rotate_chain(pose, UPPER_BODY, rotation("x", -0.35 * amp * e))
        keep_feet_on_floor(pose)
        return
    for side in _sides(part):
        if "arm" in part:                                     # curls at the elbow
            rotate_chain(pose, FOREARM[side], rotation("x", 2.1 * amp * np.abs(wave(s, cycles / 2))))
        else:                                                 # heel towards the buttock
            rotate_chain(pose, SHIN[side], rotation("x", -1.7 * amp * hold(s)))


def _stretch(pose, part, s, amp, cycles):
    e = hold(s)
    for side in _sides(part):
        chain, size = (ARM[side], 1.5) if "arm" in part else (LEG[side], 0.6)
        rotate_chain(pose, chain, rotation("z", SIDES[side] * size * amp * e))


def _kick(pose, part, s, amp, cycles):
    for side in _sides(part):
        p = pulses(s, cycles, width=0.45)
        rotate_chain(pose, SHIN[side], rotation("x", -1.2 * hold(s, 0.15) * (1 - p)))
        rotate_chain(pose, LEG[side], rotation("x", 0.3 * hold(s, 0.15) + 1.0 * amp * p))


def _clap(pose, part, s, amp, cycles):
    e = hold(s, 0.2)
    closing = 0.5 - 0.5 * np.cos(2 * np.pi * cycles * s)         # 0 open, 1 hands together
    for side in ("left", "right"):
        sign = SIDES[side]
        rotate_chain(pose, FOREARM[side], rotation("x", 0.5 * e))
        rotate_chain(pose, ARM[side], rotation("x", 1.1 * e))
        rotate_chain(pose, ARM[side], rotation("y", sign * (-0.45 + 0.8 * amp * closing) * e))


def _turn(pose, part, s, amp, cycles):
    chain, size = (HEAD, 1.0) if part == "head" else (UPPER_BODY, 0.8)
    rotate_chain(pose, chain, rotation("y", size * amp * hold(s)))


def _lean(pose, part, s, amp, cycles):
    rotate_chain(pose, UPPER_BODY, rotation("z", 0.35 * amp * wave(s, cycles)))
    keep_feet_on_floor(pose)


def _nod(pose, part, s, amp, cycles):
    rotate_chain(pose, HEAD, rotation("x", -0.3 * amp * (1 - np.cos(2 * np.pi * cycles * s)) * hold(s, 0.15)))


def _shake(pose, part, s, amp, cycles):
    rotate_chain(pose, HEAD, rotation("y", 0.7 * amp * wave(s, cycles)))


def _jump(pose, part, s, amp, cycles):
    u = (s * cycles) % 1.0                                       # per jump: crouch [0, .3), air [.3, .7), land
    crouch = np.where(u < 0.3, np.sin(np.pi * u / 0.3) ** 2, 0.0) + np.where(
        u >= 0.7, np.sin(np.pi * (u - 0.7) / 0.3) ** 2, 0.0)
    air = np.where((u >= 0.3) & (u < 0.7), np.sin(np.pi * (u - 0.3) / 0.4), 0.0)
    for side in ("left", "right"):
        rotate_chain(pose, SHIN[side], rotation("x", -1.2 * crouch))
        rotate_chain(pose, LEG[side], rotation("x", 0.6 * crouch))
    keep_feet_on_floor(pose)
    pose[:, :, 1] += (0.25 * amp * air * hold(s, 0.05))[:, None]


@dataclass(frozen=True)
class PrimitiveSpec:
    """A motion primitive: its kinematics, class-name verb, and a description template ({part})."""

    motion: Primitive
    cycles: float                      # repetitions over the clip at normal speed
    name: str                          # "{part}" is replaced by the part, e.g. "raise {part}"
    sentence: str


PRIMITIVES: dict[str, PrimitiveSpec] = {
    "raise": PrimitiveSpec(_raise, 1, "raise {part}", "A person lifts {the_part} up, holds {it} there "
                           "briefly, then lowers {it} back to rest."),
    "wave": PrimitiveSpec(_wave, 3, "wave {part}", "A person holds {the_part} up to the side and waves the "
                          "{forearm} back and forth several times."),
    "circle": PrimitiveSpec(_circle, 2, "circle {part}", "A person moves {the_part} around in slow circles."),
    "push": PrimitiveSpec(_push, 1, "push with {part}", "A person draws {the_part} back to the chest and slowly "
                          "pushes forward to full reach, as if pushing something away."),
    "punch": PrimitiveSpec(_punch, 3, "punch with {part}", "A person throws several quick straight punches "
                           "forward with {the_part}."),
    "swing": PrimitiveSpec(_swing, 2, "swing {part}", "A person swings {the_part} forward and backward like "
                           "a pendulum."),
    "bend": PrimitiveSpec(_bend, 2, "bend {part}", "A person bends {the_part} at the {elbow} and "
                          "straightens {it} again, several times."),
    "stretch": PrimitiveSpec(_stretch, 1, "stretch {part} sideways", "A person stretches {the_part} out to "
                             "the side, holds {it}, and brings {it} back down."),
    "kick": PrimitiveSpec(_kick, 2, "kick with {part}", "A person kicks forward with {the_part}, swinging the "
                          "foot up quickly, and puts it back down."),
    "clap": PrimitiveSpec(_clap, 4, "clap hands", "A person raises {the_part} in front of the chest and claps "
                          "the hands together several times."),
    "turn": PrimitiveSpec(_turn, 1, "turn {part}", "A person turns {the_part} to one side, holds, and turns "
                          "back to face forward."),
    "lean": PrimitiveSpec(_lean, 1, "lean {part} side to side", "A person leans {the_part} to one side and "
                          "then to the other while the feet stay in place."),
    "nod": PrimitiveSpec(_nod, 3, "nod {part}", "A person nods {the_part} down and up several times."),
    "shake": PrimitiveSpec(_shake, 3, "shake {part}", "A person shakes {the_part} from side to side several "
                           "times."),
    "jump": PrimitiveSpec(_jump, 2, "jump on {part}", "A person crouches on {the_part} and jumps straight up, "
                          "landing in place."),
}

# (primitive, part) in class order; descriptions of "bend" differ by part, so those get their own sentence.
_CLASS_PLAN: list[tuple[str, str]] = (
    [(p, a) for p in ("raise", "wave", "circle", "push", "punch", "swing", "bend", "stretch")
     for a in ("left arm", "right arm", "both arms")]
    + [("clap", "both arms")]
    + [(p, a) for p in ("raise", "kick", "swing", "bend", "stretch") for a in ("left leg", "right leg")]
    + [("bend", "both legs"), ("jump", "both legs")]
    + [(p, "torso") for p in ("bend", "turn", "lean", "circle")]
    + [(p, "head") for p in ("nod", "shake", "turn", "raise", "circle")]
)
_SPECIAL_SENTENCES = {
    ("bend", "torso"): "A person bows the torso forward from the hips and straightens up again.",
    ("bend", "head"): "A person tilts the head sideways towards the right shoulder and back upright.",
    ("bend", "both legs"): "A person bends both legs into a squat, keeping the feet on the floor, and stands "
                           "back up.",
    ("bend", "left leg"): "A person bends the left leg at the knee, lifting the heel behind, then puts it "
                          "back down.",
    ("bend", "right leg"): "A person bends the right leg at the knee, lifting the heel behind, then puts it "
                           "back down.",
    ("raise", "head"): "A person tilts the head back to look up, then looks straight ahead again.",
}


@dataclass(frozen=True)
class ActionClass:
    """One synthetic class: a primitive applied to a part."""

    index: int                # 0-based class id (the file's action number minus 1)
    primitive: str
    part: str
    name: str
    description: str

    @property
    def moved_joints(self) -> list[int]:
        return PART_JOINTS[self.part]


def action_catalogue() -> list[ActionClass]:
    """All synthetic classes in a fixed order (class id = position)."""
    out = []
    for k, (prim, part) in enumerate(_CLASS_PLAN):
        spec = PRIMITIVES[prim]
        both = part.startswith("both")
        words = {"the_part": part if both else f"the {part}", "it": "them" if both else "it",
                 "forearm": "forearms" if both else "forearm", "elbow": "elbows" if both else "elbow"}
        sentence = _SPECIAL_SENTENCES.get((prim, part), spec.sentence.format(**words))
        out.append(ActionClass(k, prim, part, spec.name.format(part=part), sentence))
    return out


NUM_CLASSES = len(_CLASS_PLAN)


def animate(action: ActionClass, num_frames: int, amplitude: float = 1.0, speed: float = 1.0) -> np.ndarray:
    """(T, 25, 3) body-frame poses of one noise-free performance at rest-pose size."""
    s = np.linspace(0.0, 1.0, num_frames)
    pose = np.repeat(REST_POSE[None], num_frames, axis=0).copy()                # (T, V, 3)
    spec = PRIMITIVES[action.primitive]
    cycles = spec.cycles if spec.cycles == 1 else max(1, round(spec.cycles * speed))   # whole repetitions
    spec.motion(pose, action.part, s, amplitude, cycles)
    return pose


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variation:
    """Per-sample variation; every field is a range (low, high) drawn uniformly unless stated."""

    frames: tuple[int, int] = (50, 110)              # clip length at 30 fps
    speed: tuple[float, float] = (0.7, 1.4)          # scales repetitions of oscillating primitives
    amplitude: tuple[float, float] = (0.75, 1.15)
    height: tuple[float, float] = (1.50, 1.90)       # metres, fixed per performer id
    yaw_jitter_deg: float = 15.0                     # around the camera's base angle
    distance: tuple[float, float] = (2.5, 3.6)       # metres from the camera
    camera_height: tuple[float, float] = (0.7, 1.1)  # metres above the floor
    noise_std: float = 0.004                         # metres, per joint and frame
    second_person_prob: float = 0.2                  # half stand still, half mirror the action
    empty_lead_prob: float = 0.1                     # 1-3 leading frames with no body (as in real files)


CAMERA_YAW_DEG = {1: 45.0, 2: 0.0, 3: -45.0}      # NTU's three cameras see the performer from +-45 and 0 degrees


@dataclass
class SyntheticBody:
    """One tracked person: 17-digit tracking id, the frames it is in, camera-space xyz (T_b, 25, 3)."""

    tracking_id: str
    frames: np.ndarray
    xyz: np.ndarray


@dataclass
class SyntheticSample:
    name: str                                   # SsssCcccPpppRrrrAaaa
    label: int                                  # 0-based class id
    num_frames: int
    bodies: list[SyntheticBody] = field(default_factory=list)


def synthesize_sample(action: ActionClass, setup: int, camera: int, performer: int, replication: int,
                      rng: np.random.Generator, seed: int = 0, var: Variation = Variation()) -> SyntheticSample:
    """One sample of `action` seen from `camera`; all randomness from `rng` (and the performer's height)."""
    num_frames = int(rng.integers(var.frames[0], var.frames[1] + 1))
    amp = rng.uniform(*var.amplitude)
    speed = rng.uniform(*var.speed)
    u = np.random.default_rng([seed, 7919, performer]).uniform()          # one height per performer id
    scale = (var.height[0] + u * (var.height[1] - var.height[0])) / REST_HEIGHT
    main = animate(action, num_frames, amp, speed) * scale                       # (T, V, 3) body frame

    yaw = np.radians(CAMERA_YAW_DEG.get(camera, 0.0) + rng.uniform(-var.yaw_jitter_deg, var.yaw_jitter_deg))
    floor = -rng.uniform(*var.camera_height)
    origin = np.array([rng.uniform(-0.3, 0.3), floor, rng.uniform(*var.distance)])
    sway = 0.01 * np.sin(2 * np.pi * (np.arange(num_frames) / 90.0 + rng.uniform()))[:, None]   # (T, 1)
    people = [(main, 0.0)]

    if rng.uniform() < var.second_person_prob:
        other_scale = rng.uniform(*var.height) / REST_HEIGHT
        if rng.uniform() < 0.5:                                                  # stands still
            other = np.repeat(REST_POSE[None], num_frames, axis=0) * other_scale
        else:                                                                    # mirror image of the action
            other = animate(action, num_frames, amp, speed)[:, MIRROR] * np.array([-1.0, 1.0, 1.0]) * other_scale
        people.append((other, rng.choice([-1.0, 1.0]) * rng.uniform(0.9, 1.3)))

    lead = int(rng.integers(1, 4)) if rng.uniform() < var.empty_lead_prob else 0
    sample = SyntheticSample("", action.index, lead + num_frames)
    rot = rotation("y", np.array([yaw]))[0]
    used_ids: set[str] = set()
    for pose, offset in people:
        pose = pose + np.array([offset, 0.0, 0.0])                               # side by side, same facing
        pose[..., 0] += sway
        world = pose @ rot.T + origin                                             # (T, V, 3) camera space
        world = world + rng.normal(0.0, var.noise_std, size=world.shape)
        tid = _tracking_id(rng, used_ids)
        sample.bodies.append(SyntheticBody(tid, np.arange(lead, lead + num_frames), world))
    sample.name = f"S{setup:03d}C{camera:03d}P{performer:03d}R{replication:03d}A{action.index + 1:03d}"
    return sample


def _tracking_id(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        tid = f"72057594037{int(rng.integers(0, 10 ** 6)):06d}"                # 17 digits, Kinect-like
        if tid not in used:
            used.add(tid)
            return tid


# ----------------------------------------------------------------------------------------------
# NTU text format
# ----------------------------------------------------------------------------------------------

# Kinect v2 projections (approximate intrinsics) for the depth/colour placeholder fields.
_DEPTH = (365.0, 256.0, 212.0)
_COLOUR = (1060.0, 960.0, 540.0)


def skeleton_text(sample: SyntheticSample) -> str:
    """The sample as NTU `.skeleton` text: xyz printed with 7 significant digits, tracking state 2."""
    per_frame: list[list[tuple[str, np.ndarray]]] = [[] for _ in range(sample.num_frames)]
    for body in sample.bodies:
        for t, xyz in zip(body.frames, body.xyz):
            per_frame[int(t)].append((body.tracking_id, xyz))
    lines = [str(sample.num_frames)]
    row = " ".join(["%.7g"] * 7) + " 0 0 0 0 2"            # x y z depthX depthY colorX colorY, orientation, state
    for bodies in per_frame:
        lines.append(str(len(bodies)))
        for tid, xyz in bodies:
            lines.append(f"{tid} 0 1 1 1 1 0 0 0 2")
            lines.append(str(NUM_JOINTS))
            z = np.maximum(xyz[:, 2], 0.1)
            fields = np.column_stack([xyz,
                                      _DEPTH[1] + _DEPTH[0] * xyz[:, 0] / z, _DEPTH[2] - _DEPTH[0] * xyz[:, 1] / z,
                                      _COLOUR[1] + _COLOUR[0] * xyz[:, 0] / z, _COLOUR[2] - _COLOUR[0] * xyz[:, 1] / z])
            lines.extend(row % tuple(r) for r in fields.tolist())
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SyntheticOptions:
    """What a synthetic set is generated from (stored as synthetic.json next to the files)."""

    num_classes: int = NUM_CLASSES
    per_class: int = 10
    seed: int = 0
    variation: Variation = Variation()

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, **asdict(self)}


def sample_names(options: SyntheticOptions) -> list[tuple[int, int, int, int, int]]:
    """(class id, setup, camera, performer, replication) per sample, class-major; unique per class."""
    out = []
    for k in range(options.num_classes):
        rng = np.random.default_rng([options.seed, k, 104729])
        seen: set[tuple[int, ...]] = set()
        while len(seen) < options.per_class:
            key = (int(rng.integers(1, 18)), int(rng.integers(1, 4)), int(rng.integers(1, 41)),
                   int(rng.integers(1, 3)))
            if key not in seen:
                seen.add(key)
                out.append((k, *key))
    return out


def generate_samples(options: SyntheticOptions):
    """Yield every SyntheticSample of the set, deterministically (each seeded by (seed, class, index))."""
    catalogue = action_catalogue()
    counters: dict[int, int] = {}
    for k, setup, camera, performer, replication in sample_names(options):
        i = counters[k] = counters.get(k, -1) + 1
        rng = np.random.default_rng([options.seed, k, i])
        yield synthesize_sample(catalogue[k], setup, camera, performer, replication, rng, options.seed,
                                options.variation)


def synthetic_set_matches(folder: str | Path, options: SyntheticOptions) -> bool:
    """True when `folder` holds a complete synthetic set generated with exactly `options`."""
    stamp = Path(folder) / "synthetic.json"
    if not stamp.is_file():
        return False
    try:
        return json.loads(stamp.read_text()) == json.loads(json.dumps(options.to_json()))
    except json.JSONDecodeError:
        return False


def check_set_size(num_classes: int, per_class: int) -> None:
    """InputError unless 1..46 classes and 1..4080 samples per class (the unique setup x camera x performer x
    replication names a class has)."""
    if not 1 <= num_classes <= NUM_CLASSES:
        raise InputError(f"num_classes={num_classes}: expected 1..{NUM_CLASSES} (the synthetic catalogue size)")
    if not 1 <= per_class <= 17 * 3 * 40 * 2:
        raise InputError(f"per_class={per_class}: expected 1..{17 * 3 * 40 * 2} (unique sample names)")


def write_synthetic_dataset(folder: str | Path, num_classes: int = NUM_CLASSES, per_class: int = 10,
                            seed: int = 0, variation: Variation = Variation(), on_sample=None) -> list[Path]:
    """Write the `.skeleton` files, class_names.txt, descriptions.txt and synthetic.json into `folder`;
    on_sample(1) after each file written (a progress bar's update).

    A folder that already holds the same set (same options) is left untouched (files keep their mtimes, so
    a later `service.prepare` stays a no-op); one holding another set or other .skeleton files is refused.
    Returns the sample paths in generation order.
    """
    folder = Path(folder)
    check_set_size(num_classes, per_class)
    options = SyntheticOptions(num_classes, per_class, seed, variation)
    names = [f"S{s:03d}C{c:03d}P{p:03d}R{r:03d}A{k + 1:03d}" for k, s, c, p, r in sample_names(options)]
    if synthetic_set_matches(folder, options):
        return [folder / f"{n}.skeleton" for n in names]
    if (folder / "synthetic.json").is_file():
        raise InputError(f"{folder / 'synthetic.json'}: this folder holds a synthetic set made with other "
                         "options; use another folder or delete it")
    foreign = sorted({p.name[:-len(".skeleton")] for p in folder.glob("*.skeleton")} - set(names))
    if foreign:                   # files of this set left by an interrupted run are fine: they are rewritten
        raise InputError(f"{folder}: holds .skeleton files that are not part of this synthetic set "
                         f"(e.g. {foreign[0]}); use an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    catalogue = action_catalogue()[:num_classes]
    atomic_write_text(folder / "class_names.txt", "".join(f"{c.name}\n" for c in catalogue))
    atomic_write_text(folder / "descriptions.txt", "".join(f"{c.description}\n" for c in catalogue))
    paths = []
    for sample in generate_samples(options):
        paths.append(atomic_write_text(folder / f"{sample.name}.skeleton", skeleton_text(sample)))
        on_sample and on_sample(1)
    atomic_write_text(folder / "synthetic.json", json.dumps(options.to_json(), indent=1) + "\n")   # last: complete
    return paths
