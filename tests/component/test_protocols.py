"""The Kinetics-Skeleton and PKU-MMD protocols in process: split rules (release folders, official lists), the
generated releases, prepare writing their split columns, and the configs that tie a benchmark to its layout.
`service.prepare kinetics|pku` as a user runs it, the real samples in ../shared/data and CoCoDiff training on each
protocol through `service.run`: tests/integration/test_protocols_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import RELEASE_CLASSES as CLASSES
from conftest import RELEASE_PER_CLASS as PER_CLASS
from conftest import read_index
from pydantic import ValidationError

from trainers.configs import CoCoDiffConfig
from trainers.errors import InputError
from trainers.skeleton.kinetics import read_kinetics
from trainers.skeleton.pku import read_pku_segments
from trainers.skeleton.preprocess import CentreImage, image_pipeline
from trainers.skeleton.splits import NTU60_XSUB_TRAIN_PERFORMERS, kinetics_split, read_split_list, split_of
from trainers.skeleton.synthetic import SyntheticOptions, action_catalogue, generate_samples
from trainers.skeleton.synthetic_release import (
    OPENPOSE_FROM_NTU,
    release_matches,
    write_kinetics_release,
    write_pku_release,
)

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# Split rules
# ----------------------------------------------------------------------------------------------

def test_official_split_list_format(tmp_path):
    path = tmp_path / "cross-subject.txt"
    path.write_text("Training videos: \n0002-L, 0002-M,\n0002-R, 0003-L\nValidataion videos: \n0291-L, 0291-M\n")
    assert read_split_list(path) == {"0002-L": "train", "0002-M": "train", "0002-R": "train", "0003-L": "train",
                                     "0291-L": "test", "0291-M": "test"}
    path.write_text("Training videos: 0002-L\r\nValidation videos: 0003-L\r\n")         # spelling, CRLF, one line
    assert read_split_list(path) == {"0002-L": "train", "0003-L": "test"}


@pytest.mark.parametrize("text, fragment", [
    ("0002-L, 0003-L\nValidataion videos: \n0004-L\n", "names before"),
    ("Training videos: \n0002-L\nValidataion videos: \n0002-L\n", "0002-L is listed for both"),
    ("Training videos: \n0002-L\n", "sections with names"),
])
def test_bad_split_lists_name_the_file(tmp_path, text, fragment):
    path = tmp_path / "cross-view.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=fragment) as err:
        read_split_list(path)
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="not found"):
        read_split_list(tmp_path / "absent.txt")


def test_split_list_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "cross-view.txt"
    path.write_bytes("Training videos: 0002-M\nValidataion videos: 0002-L\n".encode("utf-8-sig"))
    assert read_split_list(path) == {"0002-M": "train", "0002-L": "test"}


def test_kinetics_split_from_the_release_folder(tmp_path):
    assert kinetics_split(tmp_path / "kinetics_train" / "a.json", tmp_path) == "train"
    assert kinetics_split(tmp_path / "kinetics_val" / "sub" / "b.json", tmp_path) == "test"
    with pytest.raises(InputError, match="kinetics_train / kinetics_val"):
        kinetics_split(tmp_path / "other" / "c.json", tmp_path)
    with pytest.raises(InputError, match="official list file"):
        split_of("S001C001P001R001A001", "pku-xsub")


def test_centre_image_shifts_detected_joints_and_zeroes_the_rest():
    x = np.zeros((1, 2, 18, 3), np.float32)
    x[0, 0, :, :] = (0.7, 0.2, 0.9)
    x[0, 0, 5] = (0.4, 0.6, 0.0)                         # undetected: OpenPose still wrote coordinates
    out = CentreImage()(x)
    np.testing.assert_allclose(out[0, 0, 0], (0.2, -0.3, 0.9), atol=1e-6)
    assert (out[0, 0, 5] == 0).all() and (out[0, 1] == 0).all()                # frame 1 stays empty
    assert image_pipeline(frames=8)(x).shape == (2, 8, 18, 3)


# ----------------------------------------------------------------------------------------------
# Generated releases
# ----------------------------------------------------------------------------------------------

def test_kinetics_release_is_readable_and_split_by_performer(kinetics_release):
    clips = sorted((kinetics_release / "kinetics_train").glob("*.json")) + \
        sorted((kinetics_release / "kinetics_val").glob("*.json"))
    assert len(clips) == CLASSES * PER_CLASS and release_matches(kinetics_release, "kinetics", CLASSES, PER_CLASS, 3)
    for path in clips:
        performer = int(path.stem[9:12])
        assert (path.parent.name == "kinetics_train") == (performer in NTU60_XSUB_TRAIN_PERFORMERS)
        arr, label = read_kinetics(path)
        assert label == int(path.stem[-3:]) - 1 and arr.shape[2:] == (18, 3)
        detected = arr[0][arr[0, ..., 2] > 0]
        assert ((detected[:, :2] >= 0) & (detected[:, :2] <= 1)).all()            # image coordinates
    clip = json.loads(clips[0].read_text())
    assert clip["label"] == action_catalogue()[clip["label_index"]].name
    arr, _ = read_kinetics(clips[0])
    person = arr[0][arr[0, :, 1, 2] > 0]                                          # frames with the neck seen
    assert (person[:, 0, 1] < person[:, 1, 1]).mean() > 0.9                       # nose above the neck (v down)
    assert OPENPOSE_FROM_NTU[2] == 8 and OPENPOSE_FROM_NTU[5] == 4                 # right / left shoulder
    mtimes = [p.stat().st_mtime_ns for p in clips]
    write_kinetics_release(kinetics_release, CLASSES, PER_CLASS, seed=3)           # same options: untouched
    assert [p.stat().st_mtime_ns for p in clips] == mtimes


def test_release_writers_refuse_another_release_and_bad_sizes(kinetics_release, tmp_path):
    with pytest.raises(InputError, match="made with other options"):
        write_kinetics_release(kinetics_release, CLASSES, PER_CLASS + 1, seed=3)
    with pytest.raises(InputError, match="per_class=5000"):
        write_pku_release(tmp_path / "pku", 2, 5000)
    with pytest.raises(InputError, match="num_classes=47"):
        write_kinetics_release(tmp_path / "kin", 47, 2)


def test_pku_release_segments_are_the_generated_samples(pku_release):
    samples = list(generate_samples(SyntheticOptions(CLASSES, PER_CLASS, 3)))
    seqs = sorted((pku_release / "skeleton").glob("*.txt"))
    segments = [s for seq in seqs for s in read_pku_segments(seq, pku_release / "label" / seq.name)]
    assert len(segments) == len(samples)
    by_key = {}
    for s in samples:
        body = s.bodies[0]
        by_key[(s.label + 1, len(s.bodies[0].frames), round(float(body.xyz[0, 0, 0]), 4))] = body.xyz
    for seg in segments:
        first = seg.data[0][np.abs(seg.data[0]).sum(axis=(1, 2)) > 0]               # body 1, leading empties cut
        xyz = by_key[(seg.action, len(first), round(float(first[0, 0, 0]), 4))]
        np.testing.assert_allclose(first, xyz, atol=1e-5)
    xsub = read_split_list(pku_release / "Split" / "cross-subject.txt")
    xview = read_split_list(pku_release / "Split" / "cross-view.txt")
    assert set(xsub) == set(xview) == {p.stem for p in seqs}
    assert all((xview[name] == "test") == name.endswith("-L") for name in xview)


# ----------------------------------------------------------------------------------------------
# trainers.skeleton.prepare in process (the CLI: tests/integration/test_protocols_cli.py)
# ----------------------------------------------------------------------------------------------

def test_kinetics_columns_follow_raw_and_invalidate_the_stamp(kinetics_release, tmp_path):
    from trainers.skeleton.prepare import prepare

    out = tmp_path / "out"
    prepare("kinetics", kinetics_release, out, progress=False, log=lambda msg: None)
    assert {r["kinetics"] for r in read_index(out / "index.tsv")} == {"train", "test"}
    # the same clips seen from inside kinetics_train/: no release folder above them, so no split
    summary = prepare("kinetics", kinetics_release / "kinetics_train", out, progress=False, log=lambda msg: None)
    assert not summary.get("up_to_date") and {r["kinetics"] for r in read_index(out / "index.tsv")} == {"-"}


def test_pku_without_lists_prepares_but_cannot_be_split(pku_release, tmp_path):
    from trainers.skeleton.prepare import prepare
    from trainers.skeleton.prepared import read_prepared

    logged = []
    prepare("pku", pku_release / "skeleton", tmp_path / "out", labels=pku_release / "label", progress=False,
            log=logged.append)
    assert any("no --split-list given" in line for line in logged)
    with pytest.raises(InputError, match="--split-list pku-xsub="):
        read_prepared(tmp_path / "out", "pku-xsub")


# ----------------------------------------------------------------------------------------------
# CoCoDiff on the protocols
# ----------------------------------------------------------------------------------------------

def test_config_ties_the_kinetics_benchmark_to_the_openpose_layout():
    with pytest.raises(ValidationError, match="set backbone.layout=openpose"):
        CoCoDiffConfig.model_validate({"data": {"benchmark": "kinetics"}})
    with pytest.raises(ValidationError, match="set backbone.layout=ntu-rgb\\+d"):
        CoCoDiffConfig.model_validate({"data": {"benchmark": "pku-xsub"}, "backbone": {"layout": "openpose"}})
    cfg = CoCoDiffConfig.model_validate({"data": {"benchmark": "kinetics"}, "backbone": {"layout": "openpose"}})
    assert cfg.data.num_classes == 46                                    # the synthetic catalogue, not 400
    # every named set names its layout, so a Kinetics config moves to an NTU-25 set and back
    from service.data.splits import load_splits
    from trainers.config import build_config

    splits = ROOT / "search_spaces" / "cocodiff_splits.yaml"
    kinetics_tree = {"data": {"benchmark": "kinetics"}, "backbone": {"layout": "openpose"}}
    for _name, overrides in load_splits(splits, ["synthetic-pku-xsub", "synthetic-skeleton", "synthetic-kinetics"]):
        assert build_config(CoCoDiffConfig, kinetics_tree, overrides).data.benchmark == overrides["data.benchmark"]
    prepared = {"source": "prepared", "prepared_dir": "x", "benchmark": "kinetics"}
    assert CoCoDiffConfig.model_validate({"data": prepared, "backbone": {"layout": "openpose"}}).data.num_classes == 400
