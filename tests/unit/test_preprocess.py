"""Skeleton preprocessing transforms: centring, the two-step alignment, resampling, body padding, streams."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA

from trainers.errors import InputError
from trainers.skeleton.ntu import read_skeleton, to_array
from trainers.skeleton.preprocess import (
    NTU_BONES,
    AlignAxes,
    CentreOnJoint,
    Compose,
    PadBodies,
    Resample,
    align_to_axes,
    alignment_matrix,
    bone_stream,
    centre_on_joint,
    drop_empty_frames,
    motion_stream,
    ntu_pipeline,
    pad_bodies,
    resample,
)

SPINE_BASE, SPINE_MID, SPINE_SHOULDER, L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = 0, 1, 20, 4, 8, 12, 16


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def upright_body(rng: np.random.Generator, frames: int = 6) -> np.ndarray:
    """(T, 25, 3): spine along +y, shoulders and hips along +x (right - left), other joints random."""
    body = rng.normal(scale=0.3, size=(frames, 25, 3))
    body[:, SPINE_BASE] = [0.0, 0.0, 0.0]
    body[:, SPINE_SHOULDER] = [0.0, 0.5, 0.0]
    body[:, L_SHOULDER], body[:, R_SHOULDER] = [-0.2, 0.45, 0.0], [0.2, 0.45, 0.0]
    body[:, L_HIP], body[:, R_HIP] = [-0.1, -0.02, 0.0], [0.1, -0.02, 0.0]
    return body


def pairwise(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x[:, None] - x[None], axis=-1)


def test_centring_puts_the_spine_middle_of_the_reference_frame_at_the_origin():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 25, 3)).astype(np.float32)
    x[:, 0] = 0                      # an empty first frame: the reference is frame 2 of body 1
    x[1, 3] = 0                      # body 2 absent in frame 4
    out = centre_on_joint(x)
    np.testing.assert_allclose(out[0, 1, SPINE_MID], 0, atol=1e-6)
    assert (out[:, 0] == 0).all() and (out[1, 3] == 0).all()          # absent stays exactly zero
    np.testing.assert_allclose(out[1, 2] - out[0, 1], x[1, 2] - x[0, 1], atol=1e-5)   # one shift for all


def test_alignment_puts_spine_on_y_and_shoulders_on_x_and_preserves_distances():
    rng = np.random.default_rng(1)
    body = upright_body(rng)
    rot, shift = random_rotation(rng), rng.normal(size=3)
    x = np.zeros((2, 6, 25, 3))
    x[0] = body @ rot.T + shift
    x[1] = (body + [1.0, 0, 0]) @ rot.T + shift                                # a second person beside
    out = align_to_axes(centre_on_joint(x))
    ref = out[0, 0]
    spine = ref[SPINE_SHOULDER] - ref[SPINE_BASE]
    np.testing.assert_allclose(spine / np.linalg.norm(spine), [0, 1, 0], atol=1e-5)
    np.testing.assert_allclose(ref[R_SHOULDER] - ref[L_SHOULDER], [0.4, 0, 0], atol=1e-5)   # along +x
    np.testing.assert_allclose(pairwise(out.reshape(-1, 3)), pairwise(x.reshape(-1, 3)), atol=1e-5)
    R = alignment_matrix(centre_on_joint(x))
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(R), 1.0)
    np.testing.assert_allclose(out[0], body - body[0, SPINE_MID], atol=1e-5)       # the rotation is undone


def test_alignment_on_hips_and_a_tilted_shoulder_line():
    rng = np.random.default_rng(2)
    body = upright_body(rng, frames=1)
    body[:, R_SHOULDER] += [0, 0.1, 0.05]                                         # not perpendicular to the spine
    x = (body @ random_rotation(rng).T)[None]
    R = alignment_matrix(x)
    side = R @ (x[0, 0, R_SHOULDER] - x[0, 0, L_SHOULDER])
    assert side[0] > 0 and abs(side[2]) < 1e-9                                   # in the x-y plane, +x half
    hips = R_HIP, L_HIP
    Rh = alignment_matrix(x, across="hips")
    np.testing.assert_allclose(Rh @ (x[0, 0, hips[0]] - x[0, 0, hips[1]]), [0.2, 0, 0], atol=1e-9)


def test_alignment_of_a_degenerate_skeleton_is_an_input_error():
    x = np.ones((1, 2, 25, 3))                    # every joint at one point: no spine
    with pytest.raises(InputError, match="spine"):
        align_to_axes(x)


def test_resample_length_endpoints_and_linearity():
    x = np.zeros((2, 12, 25, 3), dtype=np.float32)
    x[0, 2:10] = np.arange(1, 9, dtype=np.float32)[:, None, None]               # valid frames 2..9 hold 1..8
    out = resample(x, 64)
    assert out.shape == (2, 64, 25, 3) and out.dtype == np.float32
    assert out[0, 0, 0, 0] == 1 and out[0, -1, 0, 0] == 8                        # first and last valid frames
    np.testing.assert_allclose(out[0, :, 0, 0], np.linspace(1, 8, 64), atol=1e-6)
    assert (out[1] == 0).all()
    assert resample(x, 3)[0, :, 5, 1].tolist() == [1.0, 4.5, 8.0]
    assert (resample(x[:, 2:3], 5)[0] == 1).all()                               # one valid frame repeats


def test_resample_never_blends_a_body_with_its_absence():
    x = np.zeros((2, 10, 25, 3), dtype=np.float32)
    x[0] = 1.0
    x[1, 5:] = 2.0                                # the second person enters at frame 6
    out = resample(x, 37)
    assert set(np.unique(out[1])) <= {0.0, 2.0}
    assert (out[1, -1] == 2).all() and (out[1, 0] == 0).all()


def test_resample_of_an_empty_array_is_an_input_error():
    with pytest.raises(InputError, match="no frame holds a body"):
        resample(np.zeros((2, 4, 25, 3)), 8)


def test_drop_empty_frames_and_pad_bodies():
    x = np.zeros((1, 5, 25, 3))
    x[0, [1, 3]] = 1
    assert drop_empty_frames(x).shape == (1, 2, 25, 3)
    padded = pad_bodies(x, 2)
    assert padded.shape == (2, 5, 25, 3) and (padded[1] == 0).all() and (padded[0] == x[0]).all()
    assert pad_bodies(np.ones((3, 2, 25, 3)), 2).shape == (2, 2, 25, 3)


def test_bone_of_a_straight_chain():
    x = np.zeros((1, 2, 25, 3), dtype=np.float32)
    x[..., 1] = np.arange(25, dtype=np.float32) * 0.1                           # joint v at height v / 10
    bones = bone_stream(x)
    for child, parent in NTU_BONES:
        np.testing.assert_allclose(bones[0, :, child], [[0, 0.1 * (child - parent), 0]] * 2, atol=1e-6)
    assert (bones[:, :, SPINE_SHOULDER] == 0).all()                             # the root has no bone
    assert len(NTU_BONES) == 24 and len({c for c, _ in NTU_BONES}) == 24


def test_motion_is_the_frame_difference_with_a_zero_last_frame():
    x = np.random.default_rng(3).normal(size=(2, 7, 25, 3)).astype(np.float32)
    m = motion_stream(x)
    np.testing.assert_allclose(m[:, :-1], x[:, 1:] - x[:, :-1], atol=1e-6)
    assert (m[:, -1] == 0).all()


def test_bad_shapes_are_one_line_input_errors():
    for bad in (np.zeros((5, 25, 3)), np.zeros((2, 5, 25, 2))):
        with pytest.raises(InputError) as err:
            resample(bad)
        assert "\n" not in str(err.value) and "shape" in str(err.value)
    with pytest.raises(InputError, match="V=25"):
        align_to_axes(np.ones((2, 3, 18, 3)))


def test_callables_compose_like_the_functions():
    rng = np.random.default_rng(4)
    x = np.zeros((1, 9, 25, 3))
    x[0] = upright_body(rng, 9) @ random_rotation(rng).T
    pipe = Compose((PadBodies(2), CentreOnJoint(), AlignAxes(), Resample(16)))
    expected = resample(align_to_axes(centre_on_joint(pad_bodies(x, 2))), 16)
    np.testing.assert_array_equal(pipe(x), expected)
    np.testing.assert_array_equal(ntu_pipeline(16)(x), expected)


def test_real_sample_is_upright_after_the_pipeline(shared_data):
    x = to_array(read_skeleton(SHARED_DATA / "ntu_skeleton" / "raw" / "S001C003P008R002A058.skeleton"))
    out = ntu_pipeline(64)(x)
    assert out.shape == (2, 64, 25, 3)
    ref = out[0, 0]
    spine = ref[SPINE_SHOULDER] - ref[SPINE_BASE]
    assert abs(spine[0]) < 1e-5 and abs(spine[2]) < 1e-5 and spine[1] > 0.3
    shoulders = ref[R_SHOULDER] - ref[L_SHOULDER]
    assert shoulders[0] > 0.2 and abs(shoulders[2]) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(ref[5] - ref[4]), np.linalg.norm(x[0, 0, 5] - x[0, 0, 4]), rtol=1e-5)
