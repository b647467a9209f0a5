"""Raw skeleton readers: NTU `.skeleton` (real samples, CRLF/LF, a third-party parse, broken copies), sample names,
missing lists, Kinetics-Skeleton JSON and PKU-MMD text. Real files come from ../shared/data (skipped when absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from trainers.errors import InputError
from trainers.skeleton.kinetics import read_kinetics
from trainers.skeleton.ntu import SampleName, load_missing_list, parse_sample_name, rank_bodies, read_skeleton, to_array
from trainers.skeleton.pku import read_pku_labels, read_pku_segments, read_pku_skeleton

NTU_RAW = SHARED_DATA / "ntu_skeleton" / "raw"
# (sample, frames, bodies per frame) as listed in shared/data/PROVENANCE.md §3a
NTU_SAMPLES = [
    ("S001C001P001R001A001", 103, 1), ("S001C001P001R001A002", 158, 1), ("S001C001P001R001A003", 104, 1),
    ("S001C001P001R001A004", 99, 1), ("S001C001P001R001A005", 54, 1), ("S001C001P001R001A011", 82, 1),
    ("S001C003P008R002A058", 70, 2), ("S002C001P003R001A003", 100, 1), ("S003C001P015R001A034", 71, 1),
    ("S004C002P003R001A017", 124, 1),
]
A001 = "S001C001P001R001A001"
PKU_FILE = ("pku_mmd", "part2_skeleton", "A10N08-L.txt")


def error_of(fn, *args, **kw) -> str:
    """The message of the InputError `fn` raises; always one line."""
    with pytest.raises(InputError) as err:
        fn(*args, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def skeleton_text(frames: list[list[tuple[str, np.ndarray]]]) -> str:
    """A `.skeleton` file: frames of [(tracking id, xyz (25, 3))]; the other joint fields are filler."""
    out = [str(len(frames))]
    for bodies in frames:
        out.append(str(len(bodies)))
        for tracking_id, xyz in bodies:
            out.append(f"{tracking_id} 0 1 1 1 1 0 0.01 -0.02 2")
            out.append("25")
            out += [f"{x:.7g} {y:.7g} {z:.7g} 300 200 1000 500 0.5 0.5 0.5 0.5 2" for x, y, z in xyz]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# NTU: real samples
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,frames,bodies", NTU_SAMPLES)
def test_real_ntu_sample_parses(shared_data, name, frames, bodies):
    seq = read_skeleton(NTU_RAW / f"{name}.skeleton")
    assert seq.num_frames == frames
    assert (seq.body_counts == bodies).all()
    assert len(seq.bodies) == bodies
    arr = to_array(seq)
    assert arr.shape == (2, frames, 25, 3) and arr.dtype == np.float32
    present = np.abs(arr).sum(axis=(2, 3)) > 0                                     # (M, T)
    assert present[0].all()
    assert present[1].all() == (bodies == 2) and present[1].any() == (bodies == 2)
    assert 0.5 < np.abs(arr[0, :, :, 2]).mean() < 6.0                              # depth in metres


def test_two_person_sample_keeps_both_bodies_by_motion(shared_data):
    seq = read_skeleton(NTU_RAW / "S001C003P008R002A058.skeleton")                # A058 handshaking
    ranked = rank_bodies(seq)
    assert [b.tracking_id for b in ranked] == ["72057594037944738", "72057594037944734"]
    assert ranked[0].motion_energy() >= ranked[1].motion_energy() > 0
    arr = to_array(seq)
    assert np.array_equal(arr[1], ranked[1].xyz.astype(np.float32))
    assert not np.allclose(arr[0], arr[1])


def test_first_body_and_joint_match_the_documented_sample(shared_data):
    seq = read_skeleton(NTU_RAW / f"{A001}.skeleton")
    (body,) = seq.bodies.values()
    assert body.tracking_id == "72057594037931101"
    np.testing.assert_array_equal(body.info[0], [0, 1, 1, 1, 1, 0, 0.02764709, 0.05745083, 2])
    np.testing.assert_array_equal(body.joints[0, 0, :3], [0.2181153, 0.1725972, 3.785547])
    assert body.joints.shape == (103, 25, 12) and (body.frames == np.arange(103)).all()


def test_crlf_duplicate_gives_identical_arrays(shared_data):
    lf, crlf = NTU_RAW / f"{A001}.skeleton", SHARED_DATA / "ntu_skeleton" / "raw_dup" / f"gardiens_{A001}.skeleton"
    assert b"\r\n" not in lf.read_bytes() and b"\r\n" in crlf.read_bytes()
    a, b = read_skeleton(lf), read_skeleton(crlf)
    assert np.array_equal(to_array(a), to_array(b))
    assert np.array_equal(next(iter(a.bodies.values())).joints, next(iter(b.bodies.values())).joints)


@pytest.mark.parametrize("name", [A001, "S001C003P008R002A058"])                  # one LF, one CRLF original
def test_line_ending_conversion_changes_nothing(shared_data, tmp_path, name):
    raw = (NTU_RAW / f"{name}.skeleton").read_bytes()
    lf = raw.replace(b"\r\n", b"\n")
    (tmp_path / "lf.skeleton").write_bytes(lf)
    (tmp_path / "crlf.skeleton").write_bytes(lf.replace(b"\n", b"\r\n"))
    ref = to_array(read_skeleton(NTU_RAW / f"{name}.skeleton"))
    assert np.array_equal(to_array(read_skeleton(tmp_path / "lf.skeleton")), ref)
    assert np.array_equal(to_array(read_skeleton(tmp_path / "crlf.skeleton")), ref)


@pytest.mark.parametrize("name", [A001, "S001C001P001R001A012"])
def test_xyz_matches_third_party_parse(shared_data, name):
    parsed = np.load(SHARED_DATA / "ntu_skeleton" / "parsed_npy" / f"{name}.skeleton.npy", allow_pickle=True).item()
    raw = NTU_RAW / f"{name}.skeleton"
    if not raw.is_file():
        pytest.skip(f"no raw file for {name} in shared data")
    seq = read_skeleton(raw)
    assert parsed["njoints"] == 25 and list(seq.body_counts) == list(parsed["nbodys"])
    (body,) = seq.bodies.values()
    np.testing.assert_allclose(body.xyz, parsed["skel_body0"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(to_array(seq)[0], parsed["skel_body0"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# NTU: body selection on synthetic files
# ----------------------------------------------------------------------------------------------

def test_to_array_picks_the_two_most_active_bodies_at_their_frames(tmp_path):
    rng = np.random.default_rng(0)
    static = np.full((25, 3), 2.0)                                   # a false detection that never moves
    walker = [rng.normal(scale=0.5, size=(25, 3)) for _ in range(6)]
    waver = [rng.normal(scale=0.1, size=(25, 3)) for _ in range(6)]
    frames = [
        [("100", static), ("200", walker[0])],
        [],                                                          # no body at all
        [("100", static), ("300", waver[2]), ("200", walker[2])],
        [("100", static), ("300", waver[3])],
        [("100", static), ("300", waver[4]), ("200", walker[4])],
    ]
    path = tmp_path / "S001C001P001R001A050.skeleton"
    path.write_text(skeleton_text(frames))
    seq = read_skeleton(path)
    assert list(seq.body_counts) == [2, 0, 3, 2, 3] and list(seq.bodies) == ["100", "200", "300"]
    assert seq.bodies["100"].motion_energy() == 0.0
    arr = to_array(seq)
    assert arr.shape == (2, 5, 25, 3)
    np.testing.assert_allclose(arr[0, [0, 2, 4]], np.stack([walker[0], walker[2], walker[4]]), atol=1e-6)
    np.testing.assert_allclose(arr[1, [2, 3, 4]], np.stack(waver[2:5]), atol=1e-6)
    assert not arr[0, [1, 3]].any() and not arr[1, [0, 1]].any()
    assert to_array(seq, max_bodies=3)[2, 0, 0, 0] == 2.0


def test_one_body_fills_slot_zero_and_leaves_slot_one_empty(tmp_path):
    path = tmp_path / "one.skeleton"
    path.write_text(skeleton_text([[("7", np.ones((25, 3)))]] * 3))
    arr = to_array(read_skeleton(path))
    assert arr[0].all() and not arr[1].any()


# ----------------------------------------------------------------------------------------------
# NTU: broken files
# ----------------------------------------------------------------------------------------------
# A001 layout: line 1 frame count, 2 body count, 3 info line, 4 joint count, 5-29 joints, 30 body count ...

def _set_field(lines, lineno, field, value):
    fields = lines[lineno - 1].split()
    fields[field] = value
    lines[lineno - 1] = " ".join(fields)
    return lines


BROKEN = {
    "truncated": (lambda ls: ls[:500], 501, "unexpected end of file"),
    "non-numeric joint": (lambda ls: _set_field(ls, 10, 1, "abc"), 10, "'abc'"),
    "nan joint": (lambda ls: _set_field(ls, 12, 0, "nan"), 12, "finite number"),
    "short joint line": (lambda ls: ls[:6] + [" ".join(ls[6].split()[:11])] + ls[7:], 7, "12 numbers"),
    "joint count 20": (lambda ls: _set_field(ls, 4, 0, "20"), 4, "joint count 25"),
    "non-numeric body count": (lambda ls: _set_field(ls, 30, 0, "x"), 30, "body count of frame 2"),
    "bad info line": (lambda ls: _set_field(ls, 3, 7, "lean?"), 3, "'lean?'"),
    "frame count says more": (lambda ls: ["104"] + ls[1:], 2886, "unexpected end of file"),
    "trailing content": (lambda ls: ls + ["", "1"], 2887, "after the last of 103 frames"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_file_error_names_file_and_line(shared_data, tmp_path, case):
    mutate, lineno, fragment = BROKEN[case]
    lines = (NTU_RAW / f"{A001}.skeleton").read_text().splitlines()
    assert len(lines) == 1 + 103 * (1 + 1 + 1 + 25)
    path = tmp_path / "broken.skeleton"
    path.write_text("\n".join(mutate(list(lines))) + "\n")
    msg = error_of(read_skeleton, path)
    assert msg.startswith(f"{path}:{lineno}: ") and fragment in msg


def test_missing_or_binary_file(tmp_path):
    assert "file not found" in error_of(read_skeleton, tmp_path / "nope.skeleton")
    (tmp_path / "bin.skeleton").write_bytes(b"1\n1\n\xff\n")
    assert error_of(read_skeleton, tmp_path / "bin.skeleton").startswith(f"{tmp_path / 'bin.skeleton'}:3: ")


# ----------------------------------------------------------------------------------------------
# NTU: names and missing lists
# ----------------------------------------------------------------------------------------------

def test_parse_sample_name():
    name = parse_sample_name("S001C002P003R002A013")
    assert name == SampleName(setup=1, camera=2, performer=3, replication=2, action=13)
    assert name.label0 == 12 and str(name) == "S001C002P003R002A013"
    assert parse_sample_name("S032C003P106R002A120").action == 120


@pytest.mark.parametrize("bad", ["S001C002P003R002A13", "s001C002P003R002A013", "S001C002P003R002A013.skeleton",
                                 "S001C002P003R002A000", "", "S001C002P003R002A013 "])
def test_bad_sample_name(bad):
    assert error_of(parse_sample_name, bad).startswith(f"sample name {bad!r}: ")
    assert error_of(parse_sample_name, bad, source="list.txt:3").startswith("list.txt:3: sample name")


def test_official_missing_lists(shared_data):
    meta = SHARED_DATA / "class_names" / "ntu_meta"
    ntu60 = load_missing_list(meta / "NTU_RGBD_samples_with_missing_skeletons.txt")
    ntu120 = load_missing_list(meta / "NTU_RGBD120_samples_with_missing_skeletons.txt")
    assert len(ntu60) == 302 and len(ntu120) == 535
    assert ntu60 <= ntu120 and "S001C002P005R002A008" in ntu60


def test_missing_list_errors(tmp_path):
    path = tmp_path / "missing.txt"
    path.write_text("3 of the captured samples are missing.\n\nS001C002P005R002A008\nS001C002P006R001A008\n")
    assert error_of(load_missing_list, path) == f"{path}:1: the header states 3 samples, the list holds 2"
    path.write_text("S001C002P005R002A008\nS001C002P006R001A08\n")
    assert error_of(load_missing_list, path).startswith(f"{path}:2: sample name 'S001C002P006R001A08'")
    path.write_text("nothing here\n")
    assert "found none" in error_of(load_missing_list, path)


# ----------------------------------------------------------------------------------------------
# Kinetics-Skeleton
# ----------------------------------------------------------------------------------------------

def test_real_kinetics_clip(shared_data):
    arr, label = read_kinetics(SHARED_DATA / "kinetics_skeleton" / "--33Lscn6sk.json")
    assert arr.shape == (2, 189, 18, 3) and arr.dtype == np.float32 and label == 129
    total = arr[..., 2].sum(axis=2)                                                  # (M, T) summed score
    assert (total[0] >= total[1]).all()
    assert (total[0] > 0).sum() == 163                                               # 26 frames list nobody
    assert arr[..., :2].min() >= 0 and arr[..., :2].max() < 1.05                     # normalised (OpenPose: ~1.011)


@pytest.mark.parametrize("name,label,frames", [("S004C002P003R001A055_rgb.json", 55, 76),
                                               ("S004C003P003R001A007_rgb.json", 7, 77)])
def test_ntu_derived_kinetics_clips(shared_data, name, label, frames):
    arr, label_index = read_kinetics(SHARED_DATA / "kinetics_skeleton" / "ntu_rgb_openpose_derived" / name)
    assert arr.shape == (2, frames, 18, 3) and label_index == label                 # 1-based NTU action
    assert not arr[..., 2].any() and np.abs(arr[0, :, :, :2]).sum() > 0              # these clips carry no scores


def _person(value: float, score: float) -> dict:
    return {"pose": [value] * 36, "score": [score] * 18}


def test_kinetics_keeps_top_people_by_score_per_frame(tmp_path):
    clip = {"data": [
        {"frame_index": 1, "skeleton": [_person(0.1, 0.2), _person(0.2, 0.9), _person(0.3, 0.5)]},
        {"frame_index": 2, "skeleton": [_person(0.4, 0.7)]},
        {"frame_index": 4, "skeleton": [_person(0.5, 0.3), _person(0.6, 0.3), _person(0.7, 0.1)]},   # a tie
    ], "label": "toy", "label_index": 3}
    path = tmp_path / "clip.json"
    path.write_text(json.dumps(clip))
    arr, label = read_kinetics(path)
    assert arr.shape == (2, 4, 18, 3) and label == 3
    np.testing.assert_allclose(arr[:, 0, 0], [[0.2, 0.2, 0.9], [0.3, 0.3, 0.5]])    # best two of three
    np.testing.assert_allclose(arr[:, 1, 0], [[0.4, 0.4, 0.7], [0, 0, 0]])
    assert not arr[:, 2].any()                                                      # frame 3 is absent
    np.testing.assert_allclose(arr[:, 3, 0, 0], [0.5, 0.6])                         # tie: file order
    assert read_kinetics(path, max_people=3)[0][2, 0, 0, 2] == pytest.approx(0.2)


@pytest.mark.parametrize("mutate,fragment", [
    (lambda c: c["data"][0]["skeleton"][1].update(pose=[0.1] * 34), "data[0].skeleton[1].pose: expected 36 numbers"),
    (lambda c: c["data"][0]["skeleton"][0].update(score=["0.5"] * 18), "data[0].skeleton[0].score"),
    (lambda c: c["data"][0].update(frame_index=0), "data[0].frame_index: expected an integer in 1..100000, got 0"),
    (lambda c: c["data"][0].update(frame_index=2), "data[1].frame_index: frame 2 already given by data[0]"),
    (lambda c: c.pop("label_index"), "label_index: expected an integer"),
])
def test_kinetics_errors_name_file_and_entry(tmp_path, mutate, fragment):
    clip = {"data": [{"frame_index": 1, "skeleton": [_person(0.1, 0.5), _person(0.2, 0.5)]},
                     {"frame_index": 2, "skeleton": []}], "label_index": 0}
    mutate(clip)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(clip))
    msg = error_of(read_kinetics, path)
    assert msg.startswith(f"{path}: ") and fragment in msg


def test_kinetics_invalid_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"data": [\n  {"frame_index": 1,,}\n]}')
    assert error_of(read_kinetics, path).startswith(f"{path}:2: not valid JSON")


# ----------------------------------------------------------------------------------------------
# PKU-MMD
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def pku_path(shared_data) -> Path:
    return shared_data.joinpath(*PKU_FILE)


def test_real_pku_sequence(pku_path):
    arr = read_pku_skeleton(pku_path)
    assert arr.shape == (2, 1040, 25, 3) and arr.dtype == np.float32
    np.testing.assert_allclose(arr[0, 0, 0], [-0.304560, 0.212575, 2.728912], rtol=0, atol=1e-6)
    assert (~arr[1].any(axis=(1, 2))).sum() == 312 and arr[0].any(axis=(1, 2)).all()   # PROVENANCE §3d


def test_pku_segments_from_a_label_file(pku_path, tmp_path):
    labels = tmp_path / "A10N08-L.txt"
    labels.write_text("1,0,9,1\r\n\n41,100,199,2\n")
    whole = read_pku_skeleton(pku_path)
    segments = read_pku_segments(pku_path, labels)
    assert [(s.data.shape, s.action) for s in segments] == [((2, 10, 25, 3), 1), ((2, 100, 25, 3), 41)]
    np.testing.assert_array_equal(segments[1].data, whole[:, 100:200])
    assert read_pku_labels(labels)[1].confidence == 2
    labels.write_text("7,1,10,1\n")                                                # frames counted from 1
    ((data, action),) = read_pku_segments(pku_path, labels, frame_base=1)          # unpacks as a pair
    assert action == 7
    np.testing.assert_array_equal(data, whole[:, 0:10])
    assert f"{labels}:1: frames 1..10 fall outside" in error_of(read_pku_segments, pku_path, labels, frame_base=2)


def test_pku_bad_frame_line_names_file_and_line(pku_path, tmp_path):
    lines = pku_path.read_text().splitlines()
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines[:6] + [" ".join(lines[6].split()[:149])] + lines[7:20]) + "\n")
    assert error_of(read_pku_skeleton, bad).startswith(f"{bad}:7: expected 150 numbers")
    fields = lines[3].split()
    bad.write_text("\n".join(lines[:3] + [" ".join(fields[:5] + ["1.0e"] + fields[6:])]) + "\n")
    assert error_of(read_pku_skeleton, bad).startswith(f"{bad}:4: expected 150 numbers, got '1.0e'")


def test_pku_bad_labels(pku_path, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("1,0,9,1\n2,5,1040,1\n")
    assert error_of(read_pku_segments, pku_path, labels).startswith(f"{labels}:2: frames 5..1040 fall outside")
    labels.write_text("1,0,9\n")
    assert error_of(read_pku_labels, labels).startswith(f"{labels}:1: expected 'action,start,end,confidence'")
    labels.write_text("1,9,0,1\n")
    assert "start <= end" in error_of(read_pku_labels, labels)
