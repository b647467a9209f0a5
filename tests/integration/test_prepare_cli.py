"""`python -m service.prepare` as a user runs it: a tiny synthetic set end to end (arrays, index, class files),
a truncated file reported and skipped, the no-op re-run, resuming from cached shards, the missing list, and
the real NTU samples in ../shared/data (read in place, never copied)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.benchmarks.prepare import bench_prepare
from trainers.skeleton.ntu import parse_sample_name
from trainers.skeleton.prepare import prepare
from trainers.skeleton.splits import split_of
from trainers.skeleton.synthetic import action_catalogue

ROOT = Path(__file__).resolve().parents[2]
CLASSES, PER_CLASS = 3, 2


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "service.prepare", *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=120)


def read_index(path: Path) -> list[dict[str, str]]:
    header, *rows = path.read_text().splitlines()
    return [dict(zip(header.split("\t"), row.split("\t"))) for row in rows]


def read_skipped(path: Path) -> list[dict[str, str]]:
    return read_index(path)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """Generate 3 classes x 2 samples into raw/ and prepare them with 2 workers, shards kept."""
    root = tmp_path_factory.mktemp("prepare")
    res = run_prepare("synthetic", "--raw", str(root / "raw"), "--out", str(root / "out"), "--classes",
                      str(CLASSES), "--per-class", str(PER_CLASS), "--seed", "1", "--workers", "2",
                      "--chunk-size", "2", "--keep-parts")
    assert res.returncode == 0, res.stderr
    return root, res


def test_synthetic_set_is_prepared_into_arrays_and_an_index(synthetic_run):
    root, res = synthetic_run
    out = root / "out"
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["samples"] == CLASSES * PER_CLASS and summary["skipped"] == 0
    data, labels = np.load(out / "data.npy"), np.load(out / "label.npy")
    assert data.shape == (CLASSES * PER_CLASS, 3, 64, 25, 2) and data.dtype == np.float32
    assert labels.dtype == np.int64 and sorted(set(labels.tolist())) == list(range(CLASSES))
    assert np.isfinite(data).all() and (data[:, :, :, :, 0] != 0).any(axis=(1, 2, 3)).all()
    rows = read_index(out / "index.tsv")
    assert list(rows[0]) == ["name", "label", "setup", "camera", "performer", "replication", "ntu60-xsub",
                             "ntu60-xview"]
    for row, label in zip(rows, labels):
        name = parse_sample_name(row["name"])
        assert int(row["label"]) == label == name.label0
        assert (int(row["setup"]), int(row["camera"]), int(row["performer"])) == (name.setup, name.camera,
                                                                                 name.performer)
        assert row["ntu60-xsub"] == split_of(name, "ntu60-xsub") and row["ntu60-xview"] == split_of(name, "ntu60-xview")
    assert (out / "class_names.txt").read_text().splitlines() == [c.name for c in action_catalogue()[:CLASSES]]
    assert len((out / "descriptions.txt").read_text().splitlines()) == CLASSES
    assert "prepare synthetic" in res.stderr                                         # the progress bar
    assert read_skipped(out / "skipped.tsv") == []
    spine = data[:, :, 0, 20, 0] - data[:, :, 0, 0, 0]                               # first frame, body 1
    np.testing.assert_allclose(spine[:, [0, 2]], 0, atol=1e-5)                       # aligned to +y


def test_a_truncated_file_is_reported_skipped_and_the_rest_prepared(synthetic_run, tmp_path):
    root, _ = synthetic_run
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    for p in (root / "raw").glob("*.skeleton"):
        os.symlink(p, raw / p.name)                                   # the generated set, by reference
    good = min((root / "raw").glob("*.skeleton")).read_text().splitlines()
    bad = raw / "S017C003P040R002A001.skeleton"
    bad.write_text("\n".join(good[:len(good) // 2]) + "\n")
    res = run_prepare("ntu60", "--raw", str(raw), "--out", str(out), "--workers", "1", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert f"skipped: {bad}" in res.stderr and "unexpected end of file" in res.stderr
    (skip,) = read_skipped(out / "skipped.tsv")
    assert skip["name"] == bad.stem and skip["path"] == str(bad) and "unexpected end of file" in skip["reason"]
    assert np.load(out / "label.npy").shape == (CLASSES * PER_CLASS,)
    assert bad.stem not in (out / "index.tsv").read_text()


def test_a_second_run_with_the_same_inputs_is_a_no_op(synthetic_run):
    root, _ = synthetic_run
    before = (root / "out" / "data.npy").stat().st_mtime_ns
    res = run_prepare("synthetic", "--raw", str(root / "raw"), "--out", str(root / "out"), "--classes",
                      str(CLASSES), "--per-class", str(PER_CLASS), "--seed", "1", "--keep-parts")
    assert res.returncode == 0, res.stderr
    assert "up to date" in res.stderr and json.loads(res.stdout.splitlines()[-1])["up_to_date"] is True
    assert (root / "out" / "data.npy").stat().st_mtime_ns == before


def test_an_interrupted_run_resumes_from_cached_shards(synthetic_run, tmp_path):
    root, _ = synthetic_run
    out = tmp_path / "out"
    logs: list[str] = []
    first = prepare("synthetic", root / "raw", out, chunk_size=2, keep_parts=True, progress=False,
                    log=logs.append)
    shards = sorted((out / ".parts").glob("*.npz"))
    assert len(shards) == 3
    (out / "prepare.json").unlink()                                   # as if it crashed before finishing
    shards[1].unlink()
    logs.clear()
    again = prepare("synthetic", root / "raw", out, chunk_size=2, keep_parts=False, progress=False,
                    log=logs.append)
    assert any("2 cached, 1 to parse" in line for line in logs)
    assert again["samples"] == first["samples"] and not (out / ".parts").exists()
    np.testing.assert_array_equal(np.load(out / "data.npy"), np.load(root / "out" / "data.npy"))


def test_missing_list_drops_samples_and_float16(synthetic_run, tmp_path):
    root, _ = synthetic_run
    name = read_index(root / "out" / "index.tsv")[0]["name"]
    missing = tmp_path / "missing.txt"
    missing.write_text(f"1 of the captured samples have missing skeletons\n\n{name}\n")
    logs: list[str] = []
    summary = prepare("synthetic", root / "raw", tmp_path / "out", missing=missing, dtype="float16",
                      progress=False, log=logs.append)
    assert summary["samples"] == CLASSES * PER_CLASS - 1
    assert any("dropped 1 samples" in line for line in logs)
    assert np.load(tmp_path / "out" / "data.npy").dtype == np.float16
    assert name not in (tmp_path / "out" / "index.tsv").read_text()


def test_real_ntu_samples_in_shared_data(shared_data, tmp_path):
    res = run_prepare("ntu60", "--raw", str(shared_data / "ntu_skeleton" / "raw"), "--out", str(tmp_path),
                      "--no-progress", "--workers", "1")
    assert res.returncode == 0, res.stderr
    rows = read_index(tmp_path / "index.tsv")
    labels = np.load(tmp_path / "label.npy")
    assert len(rows) == 10 and labels.tolist() == [int(r["name"][-3:]) - 1 for r in rows]
    assert labels.tolist() == [0, 1, 2, 3, 4, 10, 57, 2, 33, 16]
    assert [r["ntu60-xview"] for r in rows].count("train") == 2                      # cameras 2 and 3
    data = np.load(tmp_path / "data.npy")
    assert data.shape == (10, 3, 64, 25, 2)
    two_person = [r["name"] for r in rows].index("S001C003P008R002A058")
    assert [bool((data[i, ..., 1] != 0).any()) for i in range(10)] == [i == two_person for i in range(10)]


def test_bad_input_exits_2_with_one_line(tmp_path):
    res = run_prepare("ntu60", "--raw", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "nowhere" in res.stderr and "not a folder" in res.stderr


def test_bench_prepare_reports_throughput():
    result = bench_prepare(3, 1)
    assert result["files"] == 3 == result["ok"] and result["files_per_s"] > 0
    assert result["files_per_s_per_core"] == result["files_per_s"]
