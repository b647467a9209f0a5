"""Catalogue of small hostile inputs (issue 22 §5): each was a traceback or a meaningless number with exit 0, and is
now one `error:` line with exit code 2 (or, for a torn state file, a note and a fresh MLflow run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_feature_folder

from service.cli.ensemble import main as ensemble_main
from service.cli.report import main as report_main
from service.cli.run import main as run_main
from service.tracking.ensemble import read_arrays
from service.tracking.store import resolve_tracking_uri
from trainers.cocodiff_eval import ensemble_logits
from trainers.data import load_array
from trainers.errors import InputError


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return line


@pytest.mark.parametrize("weights", [["0", "0"], ["1", "-1"]])
def test_ensemble_refuses_all_zero_or_negative_weights(tmp_path, capsys, weights):
    assert ensemble_main([str(tmp_path / "a"), str(tmp_path / "b"), "--weights", *weights]) == 2
    assert "expected weights >= 0, at least one > 0" in one_error_line(capsys)
    with pytest.raises(InputError, match="at least one > 0"):
        ensemble_logits([np.zeros((2, 3))] * 2, [0.0, 0.0])


def test_report_refuses_an_unknown_split(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert report_main(["--splits", "bogus", "--no-log", "--out", str(tmp_path / "r")]) == 2
    assert one_error_line(capsys).startswith("error: --splits 'bogus': unknown split; known in ")
    assert not (tmp_path / "r").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("uri", ["http://[::1", "http://user:secret@[::1", "http://host:99999999"])
def test_an_unparsable_tracking_uri_is_one_line(uri, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(InputError, match="--tracking-uri .*not a valid URI") as info:
        resolve_tracking_uri(uri)
    assert "secret" not in str(info.value)
    monkeypatch.chdir(tmp_path)
    assert report_main(["--splits", "synthetic-skeleton", "--tracking-uri", uri]) == 2
    assert "not a valid URI" in one_error_line(capsys)


def test_a_zip_archive_named_npy_is_one_line(tmp_path):
    path = tmp_path / "train.npy"
    with open(path, "wb") as f:
        np.savez(f, x=np.zeros((3, 4)))                       # a zip archive under a .npy name
    with pytest.raises(InputError, match=r"train.npy: a NpzFile \(a zip archive of arrays, .npz\)"):
        load_array(path, 2, "features")
    np.save(tmp_path / "labels.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(InputError, match="run-1: .*train.npy: a NpzFile"):
        read_arrays("run-1", path, tmp_path / "labels.npy")


TINY = ["--set", "model.preset=tiny", "--set", "train.steps=2", "--set", "train.eval_every=2",
        "--set", "train.checkpoint_every=2", "--set", "optim.batch_size=8", "--set", "optim.warmup_steps=1",
        "--set", "eval.noise_draws=1", "--set", "eval.t_test_grid=[10, 25]", "--set", "train.threads=1",
        "--no-progress"]


def test_an_mlflow_run_json_holding_a_list_starts_a_new_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_feature_folder(tmp_path / "feats", num_classes=12, unseen=(2, 7))
    (tmp_path / "names.txt").write_text("\n".join(f"action number {i}" for i in range(12)) + "\n")
    argv = ["tdsm", "--features", str(tmp_path / "feats"), "--class-names", str(tmp_path / "names.txt"),
            "--val-unseen", "2", "--run-dir", str(tmp_path / "run"), *TINY]
    assert run_main(argv) == 0
    (tmp_path / "run" / "mlflow_run.json").write_text(json.dumps(["not", "an", "object"]))
    capsys.readouterr()
    assert run_main(argv) == 0
    err = capsys.readouterr().err
    assert "does not hold a run id object; starting a new MLflow run" in err and "Traceback" not in err
    assert isinstance(json.loads((tmp_path / "run" / "mlflow_run.json").read_text()), dict)
