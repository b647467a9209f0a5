"""NTU RGB+D raw `.skeleton` files (docs/METHODS.md §3): a strict reader, sample names, missing-skeleton lists.

A file is: the frame count; per frame a body count; per body a 10-field info line (tracking id first), the
joint count (25), then 25 joint lines of 12 numbers. LF and CRLF endings read the same. Anything else (a
non-numeric field, fewer lines than the counts promise, a joint count other than 25, trailing content)
raises InputError naming `file:line`; nothing is ever zero-filled to paper over a broken file.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainers.errors import InputError

NUM_JOINTS = 25
JOINT_FIELDS = 12    # x y z, depthX depthY, colorX colorY, orientationW X Y Z, trackingState
INFO_FIELDS = 10     # trackingId, clipedEdges, handLeft{Confidence,State}, handRight{Confidence,State},
                     # isRestricted, leanX, leanY, trackingState
# Camera-space positions are metres from a Kinect v2 (depth range 0.5-4.5 m, 8 m at most); a coordinate above
# 1 km is no reading but a corrupted file, and would overflow float32 once squared in preprocessing and losses.
MAX_ABS_XYZ = 1e3

SAMPLE_NAME_RE = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")


# ----------------------------------------------------------------------------------------------
# Sample names
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleName:
    """The fields of an `SsssCcccPpppRrrrAaaa` name; all 1-based as written (action 1 = A001)."""

    setup: int
    camera: int
    performer: int
    replication: int
    action: int

    @property
    def label0(self) -> int:
        """0-based class id (what split files and models use)."""
        return self.action - 1

    def __str__(self) -> str:
        return (f"S{self.setup:03d}C{self.camera:03d}P{self.performer:03d}"
                f"R{self.replication:03d}A{self.action:03d}")


def parse_sample_name(name: str, source: str | Path | None = None) -> SampleName:
    """'S001C002P003R002A013' -> SampleName(1, 2, 3, 2, 13); `source` (a file) is named in errors."""
    where = f"{source}: " if source is not None else ""
    match = SAMPLE_NAME_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise InputError(f"{where}sample name {name!r}: expected SsssCcccPpppRrrrAaaa, e.g. S001C002P003R002A013")
    fields = [int(g) for g in match.groups()]
    if 0 in fields:
        raise InputError(f"{where}sample name {name!r}: setup, camera, performer, replication and action "
                         "are 1-based, got a 000 field")
    return SampleName(*fields)


def load_missing_list(path: str | Path) -> set[str]:
    """The official list of samples with missing skeletons (302 for NTU-60, 535 for NTU-120).

    The files open with a prose header ("302 of the captured samples ... have missing ..."), a blank line,
    then one name a line. Every line after the first name must be a name; a count stated in the header
    must match the names read.
    """
    path = Path(path)
    lines = _read_lines(path)
    names: list[str] = []
    declared: tuple[int, int] | None = None       # (count, line number)
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        looks_like_name = text[0] == "S" and text[1:2].isdigit()
        if names or looks_like_name:                # past the header: every line must be a valid name
            names.append(str(parse_sample_name(text, source=f"{path}:{lineno}")))
            continue
        head = re.match(r"(\d+)\s", text)           # header prose, e.g. "302 of the captured samples ..."
        if head and declared is None:
            declared = (int(head.group(1)), lineno)
    if not names:
        raise InputError(f"{path}: expected sample names (SsssCcccPpppRrrrAaaa, one a line), found none")
    unique = set(names)
    if len(unique) != len(names):
        dup = next(n for n, c in Counter(names).items() if c > 1)
        raise InputError(f"{path}: sample {dup} is listed more than once")
    if declared is not None and declared[0] != len(unique):
        raise InputError(f"{path}:{declared[1]}: the header states {declared[0]} samples, "
                         f"the list holds {len(unique)}")
    return unique


# ----------------------------------------------------------------------------------------------
# Skeleton files
# ----------------------------------------------------------------------------------------------

@dataclass
class BodyTrack:
    """One tracked body (one Kinect tracking id): the frames it appears in and its raw fields there."""

    tracking_id: str
    frames: np.ndarray       # (T_b,) int64, 0-based frame indices, increasing
    info: np.ndarray         # (T_b, 9) float64: the info line after the id (clipedEdges ... trackingState)
    joints: np.ndarray       # (T_b, 25, 12) float64: every joint field as written

    @property
    def xyz(self) -> np.ndarray:
        """Camera-space joint positions in metres, (T_b, 25, 3)."""
        return self.joints[..., :3]

    def motion_energy(self) -> float:
        """Sum over joints and x/y/z of the variance over this body's frames (0 for a single frame).

        Per-joint-coordinate variance is large for a person who moves and near zero for a static
        false detection (a chair, a coat), which is what picking "the two actors" needs.
        """
        return float(self.xyz.var(axis=0).sum())


@dataclass
class SkeletonSequence:
    """A parsed `.skeleton` file: bodies keyed by tracking id, in order of first appearance."""

    path: Path
    num_frames: int
    body_counts: np.ndarray              # (T,) int64: bodies listed in each frame
    bodies: dict[str, BodyTrack]


def read_skeleton(path: str | Path) -> SkeletonSequence:
    """Parse one NTU RGB+D `.skeleton` file strictly (see the module docstring)."""
    path = Path(path)
    cursor = _Cursor(path, _read_lines(path))
    num_frames = cursor.count("the frame count")
    # The frame count sizes an array: it is bounded by the file itself (a frame costs at least its body-count
    # line), so a corrupt count is an error here, not a MemoryError at allocation.
    cursor.check_fits(num_frames, 1, "frame count")
    body_counts = np.zeros(num_frames, dtype=np.int64)
    tracks: dict[str, dict[str, list]] = {}
    for t in range(num_frames):
        n_bodies = cursor.count(f"the body count of frame {t + 1}")   # allocates nothing: a lie ends at EOF
        body_counts[t] = n_bodies
        seen: set[str] = set()
        for b in range(n_bodies):
            where = f"body {b + 1} of frame {t + 1}"
            tracking_id, info = cursor.info_line(where)
            if tracking_id in seen:
                raise InputError(f"{path}:{cursor.lineno}: tracking id {tracking_id} appears twice in "
                                 f"frame {t + 1}")
            seen.add(tracking_id)
            n_joints = cursor.count(f"the joint count of {where}")
            if n_joints != NUM_JOINTS:
                raise InputError(f"{path}:{cursor.lineno}: expected joint count {NUM_JOINTS} for {where}, "
                                 f"got {n_joints}")
            joints = cursor.joint_block(where)
            track = tracks.setdefault(tracking_id, {"frames": [], "info": [], "joints": []})
            track["frames"].append(t)
            track["info"].append(info)
            track["joints"].append(joints)
    cursor.expect_end(num_frames)
    bodies = {tid: BodyTrack(tid, np.asarray(tr["frames"], dtype=np.int64), np.stack(tr["info"]),
                             np.stack(tr["joints"]))
              for tid, tr in tracks.items()}
    return SkeletonSequence(path, num_frames, body_counts, bodies)


def rank_bodies(seq: SkeletonSequence) -> list[BodyTrack]:
    """Bodies by decreasing motion energy; ties go to the body seen in more frames, then to the earlier one."""
    return sorted(seq.bodies.values(), key=lambda b: (-b.motion_energy(), -len(b.frames)))


def to_array(seq: SkeletonSequence, max_bodies: int = 2) -> np.ndarray:
    """(M=max_bodies, T, V=25, C=3) float32 xyz of the most active bodies, most active first.

    Each body's frames sit at their own frame indices; frames where a body is absent, and the slots of
    bodies that do not exist (one-person samples), are zeros. Tracking-id fragments of one person are not
    merged (no CTR-GCN-style denoising here).
    """
    if max_bodies < 1:
        raise InputError(f"max_bodies={max_bodies}: expected at least 1")
    out = np.zeros((max_bodies, seq.num_frames, NUM_JOINTS, 3), dtype=np.float32)   # (M, T, V, C)
    for m, body in enumerate(rank_bodies(seq)[:max_bodies]):
        out[m, body.frames] = body.xyz                                                # (T_b, V, C)
    return out


# ----------------------------------------------------------------------------------------------
# Line-level parsing
# ----------------------------------------------------------------------------------------------

def _read_lines(path: Path) -> list[str]:
    """The file's lines without their LF or CRLF endings (a final newline adds no empty line)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: expected ASCII text, got byte 0x{raw[err.start]:02x}") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _show(text: str, limit: int = 60) -> str:
    """A line for an error message, shortened."""
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


class _Cursor:
    """Walks the lines of one file; every failure is an InputError naming `file:line`."""

    def __init__(self, path: Path, lines: list[str]):
        self.path = path
        self.lines = lines
        self.lineno = 0          # 1-based number of the last line consumed

    def _next(self, what: str) -> str:
        if self.lineno >= len(self.lines):
            raise InputError(f"{self.path}:{self.lineno + 1}: unexpected end of file, expected {what}")
        self.lineno += 1
        return self.lines[self.lineno - 1]

    def count(self, what: str) -> int:
        """A line holding one non-negative integer."""
        line = self._next(what)
        fields = line.split()
        if len(fields) != 1 or not fields[0].isdigit():
            raise InputError(f"{self.path}:{self.lineno}: expected {what} (one integer), got {_show(line)}")
        return int(fields[0])

    def check_fits(self, count: int, lines_each: int, what: str) -> None:
        """`count` items of at least `lines_each` lines must fit in the lines left after the current one."""
        left = len(self.lines) - self.lineno
        if count * lines_each > left:
            raise InputError(f"{self.path}:{self.lineno}: {what} {count} needs at least {count * lines_each} "
                             f"more lines, the file has {left}")

    def info_line(self, where: str) -> tuple[str, np.ndarray]:
        """The 10-field body info line: (tracking id, the 9 numbers after it)."""
        line = self._next(f"the info line of {where}")
        fields = line.split()
        if len(fields) != INFO_FIELDS or not fields[0].isdigit():
            raise InputError(f"{self.path}:{self.lineno}: expected the info line of {where} ({INFO_FIELDS} "
                             f"fields, a numeric tracking id first), got {_show(line)}")
        return fields[0], self._floats(fields[1:], self.lineno, f"the info line of {where}", first_field=2)

    def joint_block(self, where: str) -> np.ndarray:
        """The 25 joint lines of one body, (25, 12) float64."""
        rows = []
        for j in range(NUM_JOINTS):
            line = self._next(f"joint line {j + 1} of {NUM_JOINTS} of {where}")
            fields = line.split()
            if len(fields) != JOINT_FIELDS:
                raise InputError(f"{self.path}:{self.lineno}: expected joint line {j + 1} of {where} "
                                 f"({JOINT_FIELDS} numbers), got {len(fields)} fields: {_show(line)}")
            rows.append(fields)
        first = self.lineno - NUM_JOINTS + 1
        block = None
        try:                                   # fast path: one conversion for the whole block
            values = np.array(list(map(float, itertools.chain.from_iterable(rows))), dtype=np.float64)
            if np.isfinite(values).all():
                block = values.reshape(NUM_JOINTS, JOINT_FIELDS)                   # (25, 12)
        except ValueError:
            pass
        if block is not None:
            far = np.flatnonzero((np.abs(block[:, :3]) > MAX_ABS_XYZ).any(axis=1))
            if far.size:
                j = int(far[0])
                raise InputError(f"{self.path}:{first + j}: joint {j + 1} of {where} is "
                                 f"{np.abs(block[j, :3]).max():.3g} m from the camera (more than "
                                 f"{MAX_ABS_XYZ:g} m: not a Kinect reading)")
            return block
        for j, fields in enumerate(rows):      # slow path: find the offending line
            self._floats(fields, first + j, f"joint line {j + 1} of {where}")
        raise AssertionError("unreachable: a bad joint block always has a bad line")

    def _floats(self, fields: list[str], lineno: int, what: str, first_field: int = 1) -> np.ndarray:
        out = np.empty(len(fields), dtype=np.float64)
        for k, field in enumerate(fields):
            try:
                out[k] = float(field)
            except ValueError:
                out[k] = np.nan
            if not np.isfinite(out[k]):
                raise InputError(f"{self.path}:{lineno}: expected a finite number in field {k + first_field} "
                                 f"of {what}, got {field!r}")
        return out

    def expect_end(self, num_frames: int) -> None:
        """Only blank lines may follow the last frame."""
        for k in range(self.lineno, len(self.lines)):
            if self.lines[k].strip():
                raise InputError(f"{self.path}:{k + 1}: unexpected content after the last of {num_frames} "
                                 f"frames (frame count on line 1): {_show(self.lines[k])}")
