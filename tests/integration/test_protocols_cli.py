"""The Kinetics-Skeleton and PKU-MMD protocols through the CLIs: `python -m service.prepare kinetics|pku` writing
their split columns (generated releases and the real samples in ../shared/data, read in place or copied into
tmp_path only), its one-line refusals, and CoCoDiff training on each generated protocol through `service.run`
(slow). Split rules, readers and the generated releases in process: tests/component/test_protocols.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RELEASE_CLASSES as CLASSES
from conftest import RELEASE_PER_CLASS as PER_CLASS
from conftest import read_index

from trainers.skeleton.kinetics import read_kinetics
from trainers.skeleton.splits import read_split_list

ROOT = Path(__file__).resolve().parents[2]


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# service.prepare
# ----------------------------------------------------------------------------------------------

def test_prepare_kinetics_writes_the_folder_split(kinetics_release, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(kinetics_release, raw)
    (raw / "kinetics_train_label.json").write_text("{}")                         # the release's label index
    empty = {"data": [{"frame_index": 1, "skeleton": []}], "label": "x", "label_index": 0}
    (raw / "kinetics_val" / "no-person.json").write_text(json.dumps(empty))      # has_skeleton = false
    res = run_cli("service.prepare", "kinetics", "--raw", str(raw), "--out", str(tmp_path / "out"),
                  "--workers", "1", "--no-progress")
    assert res.returncode == 0, res.stderr
    rows = read_index(tmp_path / "out" / "index.tsv")
    assert len(rows) == CLASSES * PER_CLASS
    for row in rows:
        folder = "kinetics_train" if row["kinetics"] == "train" else "kinetics_val"
        assert (raw / folder / f"{row['name']}.json").is_file()
        assert int(row["label"]) == int(row["name"][-3:]) - 1
    skipped = (tmp_path / "out" / "skipped.tsv").read_text()
    assert "no-person" in skipped and "no person detected" in skipped and "label.json" not in skipped
    data = np.load(tmp_path / "out" / "data.npy")
    assert data.shape == (len(rows), 3, 64, 18, 2)
    xy = data[:, :2][data[:, 2:3].repeat(2, axis=1) > 0]
    assert np.abs(xy).max() <= 0.5                                                # centred image coordinates


def test_prepare_pku_writes_the_official_list_splits(pku_release, tmp_path):
    split = pku_release / "Split"
    res = run_cli("service.prepare", "pku", "--raw", str(pku_release / "skeleton"), "--labels",
                  str(pku_release / "label"), "--split-list", f"pku-xsub={split / 'cross-subject.txt'}",
                  f"pku-xview={split / 'cross-view.txt'}", "--out", str(tmp_path / "out"), "--workers", "1",
                  "--no-progress")
    assert res.returncode == 0, res.stderr
    rows = read_index(tmp_path / "out" / "index.tsv")
    xsub = read_split_list(split / "cross-subject.txt")
    xview = read_split_list(split / "cross-view.txt")
    assert len(rows) == CLASSES * PER_CLASS
    for row in rows:
        sequence = row["name"].rsplit("_", 1)[0]
        assert (row["pku-xsub"], row["pku-xview"]) == (xsub[sequence], xview[sequence])
    assert {r["pku-xsub"] for r in rows} == {"train", "test"}
    assert sorted(int(r["label"]) for r in rows) == sorted(k for k in range(CLASSES) for _ in range(PER_CLASS))


@pytest.mark.parametrize("args, fragment", [
    (["--benchmark", "pku-xsub"], "needs its official list, --split-list pku-xsub=FILE"),
    (["--benchmark", "ntu60-xsub"], "not a pku benchmark"),
    (["--split-list", "kinetics=x.txt"], "pku takes lists for pku-xsub, pku-xview"),
    (["--split-list", "pku-xsub"], "expected BENCHMARK=FILE"),
    (["--split-list", "pku-xsub=a.txt", "pku-xsub=b.txt"], "pku-xsub already given (pku-xsub=a.txt)"),
])
def test_prepare_pku_bad_split_options_exit_2(pku_release, tmp_path, args, fragment):
    res = run_cli("service.prepare", "pku", "--raw", str(pku_release / "skeleton"), "--labels",
                  str(pku_release / "label"), "--out", str(tmp_path / "out"), *args)
    assert res.returncode == 2 and fragment in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert not (tmp_path / "out" / "data.npy").exists()


def test_real_kinetics_clip_in_shared_data(shared_data, tmp_path):
    clip = shared_data / "kinetics_skeleton" / "--33Lscn6sk.json"
    if not clip.is_file():
        pytest.skip(f"{clip} not in shared data")
    (tmp_path / "raw" / "kinetics_val").mkdir(parents=True)
    shutil.copy(clip, tmp_path / "raw" / "kinetics_val" / clip.name)
    res = run_cli("service.prepare", "kinetics", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                  "--workers", "1", "--no-progress")
    assert res.returncode == 0, res.stderr
    (row,) = read_index(tmp_path / "out" / "index.tsv")
    _, label = read_kinetics(clip)
    assert row == {"name": "--33Lscn6sk", "label": str(label), "setup": "", "camera": "", "performer": "",
                   "replication": "", "kinetics": "test"}


def test_real_pku_sequence_in_shared_data(shared_data, tmp_path):
    seq = shared_data / "pku_mmd" / "part2_skeleton" / "A10N08-L.txt"
    if not seq.is_file():
        pytest.skip(f"{seq} not in shared data")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / seq.name).write_text("10,0,299,2\n3,400,799,1\n")        # two made-up instances
    lists = tmp_path / "cross-view.txt"
    lists.write_text("Training videos: \nA10N08-M, A10N08-R\nValidataion videos: \nA10N08-L\n")
    res = run_cli("service.prepare", "pku", "--raw", str(seq.parent), "--labels", str(tmp_path / "labels"),
                  "--split-list", f"pku-xview={lists}", "--out", str(tmp_path / "out"), "--workers", "1",
                  "--no-progress")
    assert res.returncode == 0, res.stderr
    rows = read_index(tmp_path / "out" / "index.tsv")
    assert [(r["name"], r["label"], r["pku-xview"]) for r in rows] == [("A10N08-L_001", "9", "test"),
                                                                       ("A10N08-L_002", "2", "test")]
    assert np.load(tmp_path / "out" / "data.npy").shape == (2, 3, 64, 25, 2)


# ----------------------------------------------------------------------------------------------
# CoCoDiff on the protocols
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("split, joints", [("synthetic-kinetics", 18), ("synthetic-pku-xview", 25)])
def test_cocodiff_runs_on_each_generated_protocol(tmp_path, split, joints):
    env = {"SKELDIFF_CACHE": str(tmp_path / "cache")}
    res = run_cli("service.run", "cocodiff", "--split", split, "--set", "data.synthetic.per_class=4",
                  "--set", "train.steps=20", "--set", "train.eval_every=10", "--tracking-uri",
                  f"sqlite:///{tmp_path / 'mlflow.db'}", "--run-dir", str(tmp_path / "run"), "--no-progress",
                  env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 <= metrics["test/top1"] <= metrics["test/top5"] <= 100
    prepared = next((tmp_path / "cache" / "synthetic").glob("prepared-*"))
    assert np.load(prepared / "data.npy", mmap_mode="r").shape[3] == joints
    column = "kinetics" if joints == 18 else "pku-xview"
    assert {r[column] for r in read_index(prepared / "index.tsv")} == {"train", "test"}
