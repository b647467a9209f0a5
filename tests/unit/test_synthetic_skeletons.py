"""Synthetic NTU-25 actions: the class catalogue, rigid kinematics, part specificity, real `.skeleton` files that
the NTU reader parses back to the generated coordinates, and seeded determinism."""

from __future__ import annotations

import numpy as np
import pytest

from trainers.errors import InputError
from trainers.skeleton.ntu import parse_sample_name, read_skeleton
from trainers.skeleton.preprocess import NTU_BONES
from trainers.skeleton.synthetic import (
    PART_JOINTS,
    PRIMITIVES,
    REST_POSE,
    SyntheticOptions,
    Variation,
    action_catalogue,
    animate,
    generate_samples,
    synthesize_sample,
    write_synthetic_dataset,
)

CATALOGUE = action_catalogue()
BY_NAME = {c.name: c for c in CATALOGUE}


def bone_lengths(pose: np.ndarray) -> np.ndarray:
    """(T, 24) lengths of the NTU bones."""
    return np.stack([np.linalg.norm(pose[:, c] - pose[:, p], axis=-1) for c, p in NTU_BONES], axis=1)


def test_catalogue_has_30_plus_classes_named_from_primitive_and_part():
    assert len(CATALOGUE) >= 30
    assert len({c.name for c in CATALOGUE}) == len(CATALOGUE)
    assert len({c.description for c in CATALOGUE}) == len(CATALOGUE)
    assert [c.index for c in CATALOGUE] == list(range(len(CATALOGUE)))
    for c in CATALOGUE:
        assert c.primitive in PRIMITIVES and c.part in PART_JOINTS
        assert "\n" not in c.description and c.description.endswith(".") and c.description.count(".") == 1
        assert c.part.split()[-1].rstrip("s") in (c.name + " " + c.description)
    assert BY_NAME["raise left arm"].description.startswith("A person lifts the left arm")
    # most primitives act on several parts, so a held-out class is a new combination of seen pieces
    parts_per_primitive = {p: {c.part for c in CATALOGUE if c.primitive == p} for p in PRIMITIVES}
    assert sum(len(v) >= 2 for v in parts_per_primitive.values()) >= 10


def test_rest_pose_is_a_plausible_standing_adult():
    height = REST_POSE[3, 1] - REST_POSE[[15, 19], 1].min()
    assert 1.5 < height < 1.8
    lengths = dict(zip(NTU_BONES, bone_lengths(REST_POSE[None])[0]))
    assert 0.22 < lengths[(5, 4)] < 0.35 and 0.35 < lengths[(13, 12)] < 0.5     # upper arm, thigh
    mirrored = REST_POSE * [-1, 1, 1]
    left, right = [4, 5, 6, 7, 12, 13, 14, 15], [8, 9, 10, 11, 16, 17, 18, 19]
    np.testing.assert_allclose(mirrored[left], REST_POSE[right], atol=1e-9)


@pytest.mark.parametrize("action", CATALOGUE, ids=lambda c: c.name.replace(" ", "_"))
def test_every_class_moves_rigidly_and_only_its_part(action):
    pose = animate(action, 60)
    np.testing.assert_allclose(bone_lengths(pose), bone_lengths(REST_POSE[None]).repeat(60, 0), atol=1e-9)
    moved = np.linalg.norm(pose - REST_POSE, axis=-1).max(axis=0) > 0.02                    # (V,)
    assert moved.any()
    if action.part not in ("torso", "both legs"):                                          # those carry the body
        assert set(np.flatnonzero(moved)) <= set(action.moved_joints)
    np.testing.assert_allclose(pose[[0, -1]], REST_POSE[None].repeat(2, 0), atol=1e-6)     # starts, ends at rest


def test_two_classes_differing_only_in_the_part_move_different_joints():
    left, right = BY_NAME["raise left arm"], BY_NAME["raise right arm"]
    assert (left.primitive, right.primitive) == ("raise", "raise")
    var = Variation(second_person_prob=0.0, empty_lead_prob=0.0)
    energy = {}
    for action in (left, right):
        sample = synthesize_sample(action, 1, 2, 1, 1, np.random.default_rng(5), var=var)
        (body,) = sample.bodies
        energy[action.name] = body.xyz.var(axis=0).sum(axis=1)                              # (V,) per joint
    l_hand, r_hand = 7, 11
    assert energy["raise left arm"][l_hand] > 50 * energy["raise left arm"][r_hand]
    assert energy["raise right arm"][r_hand] > 50 * energy["raise right arm"][l_hand]
    moved_l = set(np.flatnonzero(np.ptp(animate(left, 40), axis=0).max(axis=1) > 0.01))
    moved_r = set(np.flatnonzero(np.ptp(animate(right, 40), axis=0).max(axis=1) > 0.01))
    assert moved_l and moved_r and not moved_l & moved_r


def test_written_files_parse_with_the_ntu_reader_and_round_trip(tmp_path):
    paths = write_synthetic_dataset(tmp_path, num_classes=3, per_class=2, seed=3,
                                    variation=Variation(second_person_prob=0.5, empty_lead_prob=0.5))
    assert len(paths) == 6 and all(p.is_file() for p in paths)
    names = (tmp_path / "class_names.txt").read_text().splitlines()
    assert names == [c.name for c in CATALOGUE[:3]]
    assert (tmp_path / "descriptions.txt").read_text().splitlines() == [c.description for c in CATALOGUE[:3]]
    options = SyntheticOptions(3, 2, 3, Variation(second_person_prob=0.5, empty_lead_prob=0.5))
    bodies_seen = set()
    for path, sample in zip(paths, generate_samples(options)):
        assert path.name == f"{sample.name}.skeleton"
        name = parse_sample_name(sample.name)
        assert name.label0 == sample.label and 1 <= name.camera <= 3 and name.setup <= 17
        seq = read_skeleton(path)
        assert seq.num_frames == sample.num_frames
        assert sorted(seq.bodies) == sorted(b.tracking_id for b in sample.bodies)
        for body in sample.bodies:
            assert len(body.tracking_id) == 17
            track = seq.bodies[body.tracking_id]
            np.testing.assert_array_equal(track.frames, body.frames)
            np.testing.assert_allclose(track.xyz, body.xyz, rtol=1e-6, atol=1e-7)      # 7 printed digits
            assert (track.joints[..., 11] == 2).all()                                   # tracking state
        bodies_seen.add(len(sample.bodies))
        assert (seq.body_counts[:body.frames[0]] == 0).all()                            # any empty lead frames
    assert bodies_seen == {1, 2}


def test_generation_is_seeded_and_deterministic(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", num_classes=2, per_class=2, seed=11)
    b = write_synthetic_dataset(tmp_path / "b", num_classes=2, per_class=2, seed=11)
    c = write_synthetic_dataset(tmp_path / "c", num_classes=2, per_class=2, seed=12)
    assert [p.name for p in a] == [p.name for p in b]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a, b))
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]


def test_same_set_is_not_rewritten_and_another_is_refused(tmp_path):
    paths = write_synthetic_dataset(tmp_path, num_classes=2, per_class=1)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert write_synthetic_dataset(tmp_path, num_classes=2, per_class=1) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    with pytest.raises(InputError, match="other options"):
        write_synthetic_dataset(tmp_path, num_classes=3, per_class=1)
    with pytest.raises(InputError, match="num_classes"):
        write_synthetic_dataset(tmp_path / "x", num_classes=len(CATALOGUE) + 1)


def test_variation_changes_size_view_and_timing():
    action = BY_NAME["wave right arm"]
    var = Variation(second_person_prob=0.0, empty_lead_prob=0.0)
    samples = [synthesize_sample(action, 1, cam, perf, 1, np.random.default_rng(k), var=var)
               for k, (cam, perf) in enumerate([(1, 1), (2, 2), (3, 3), (2, 4)])]
    assert len({s.num_frames for s in samples}) > 1
    heights = [np.ptp(s.bodies[0].xyz[0, :, 1]) for s in samples]
    assert np.std(heights) > 0.01
    facing = []                                    # yaw of the shoulder line seen by each camera
    for s in samples[:3]:
        shoulder = s.bodies[0].xyz[0, 8] - s.bodies[0].xyz[0, 4]
        facing.append(np.degrees(np.arctan2(-shoulder[2], shoulder[0])))
    assert facing[0] > facing[1] > facing[2]       # cameras 1, 2, 3 see the performer from +45, 0, -45 degrees
