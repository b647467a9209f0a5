"""Score-level stream ensembles in process: `service.ensemble` on local folders and on MLflow runs of a sqlite store
(fusion, refusals, what it logs), the stream column of the final table and what `service.final --streams` refuses.
A real `service.final --streams` (a classifier per stream, fused per seed): tests/integration/test_ensemble_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from service.cli import ensemble as ensemble_cli
from service.ensemble import main
from service.methods.cocodiff import cocodiff_table
from service.tracking import ensemble as tracking_ensemble
from service.tracking.artifacts import log_classification_outputs
from service.tracking.store import MLflowReporter

# Four samples, three classes, built so that each stream alone gets two right and their equal-weight sum all four.
LABELS = np.array([0, 1, 2, 0])
JOINT = np.array([[3, 0, 0], [2, 1, 0], [0, 0, 1], [0, 2, 0]], dtype=np.float32)     # right on 0, 2: 50 %
BONE = np.array([[0, 1, 0], [0, 3, 0], [0, 1.5, 1], [3, 0, 0]], dtype=np.float32)    # right on 1, 3: 50 %


def write_predictions(folder: Path, logits: np.ndarray, labels: np.ndarray, split: str = "test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_logits.npy", logits)
    np.save(folder / f"{split}_labels.npy", labels)
    return folder


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating its tables is the slow part)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def run_cli(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]) if code == 0 else None, err


# ----------------------------------------------------------------------------------------------
# Local folders
# ----------------------------------------------------------------------------------------------

def test_fuses_local_folders_and_logs_the_fused_predictions(tmp_path, capsys, uri):
    joint = write_predictions(tmp_path / "joint", JOINT, LABELS)
    bone = write_predictions(tmp_path / "bone", BONE, LABELS)
    code, out, _ = run_cli(capsys, str(joint), str(bone), "--tracking-uri", uri, "--out", str(tmp_path / "fused"))
    assert code == 0
    assert [(s["source"], s["stream"], s["weight"], s["top1"]) for s in out["sources"]] == [
        (str(joint), None, 1.0, 50.0), (str(bone), None, 1.0, 50.0)]
    assert out["ensemble"] == {"top1": 100.0, "top5": 100.0}                     # top-5 is top-3 with 3 classes
    np.testing.assert_array_equal(np.load(tmp_path / "fused" / "test_logits.npy"), JOINT + BONE)
    np.testing.assert_array_equal(np.load(tmp_path / "fused" / "test_labels.npy"), LABELS)

    client = MlflowClient(uri)
    run = client.get_run(out["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "cocodiff-ensemble"   # no run among the sources
    assert ensemble_cli.DEFAULT_EXPERIMENT == tracking_ensemble.DEFAULT_EXPERIMENT        # what --help names
    assert run.data.params["sources"] == f"{joint},{bone}" and run.data.params["weights"] == "1.0,1.0"
    assert run.data.metrics["ensemble/top1"] == 100.0 and run.data.metrics["source1/top1"] == 50.0
    assert run.data.tags["stream"] == "ensemble" and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "predictions")} == {
        "predictions/test_logits.npy", "predictions/test_labels.npy"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/test_confusion.png"]


def test_weights_scale_each_source(tmp_path, capsys, uri):
    joint = write_predictions(tmp_path / "joint", JOINT, LABELS)
    bone = write_predictions(tmp_path / "bone", BONE, LABELS)
    code, out, _ = run_cli(capsys, str(joint), str(bone), "--weights", "0.5", "2", "--tracking-uri", uri,
                           "--out", str(tmp_path / "fused"))
    fused = 0.5 * JOINT + 2 * BONE
    assert code == 0 and [s["weight"] for s in out["sources"]] == [0.5, 2.0]
    np.testing.assert_allclose(np.load(tmp_path / "fused" / "test_logits.npy"), fused)
    assert out["ensemble"]["top1"] == pytest.approx((fused.argmax(1) == LABELS).mean() * 100) == 50.0


@pytest.mark.parametrize("change,message", [
    (lambda lg, y: (lg, y[[1, 0, 2, 3]]), "labels differ from {first}'s at 2 of 4 positions"),
    (lambda lg, y: (lg[:3], y[:3]), "3 test samples, but {first} has 4"),
    (lambda lg, y: (np.hstack([lg, lg]), y), "6 classes, but {first} has 3"),
    (lambda lg, y: (lg, y + 3), "test_labels.npy holds labels outside 0..2"),
    (lambda lg, y: (lg[:, :, None], y), "are not (N, C) logits and (N,) labels"),
])
def test_refuses_sources_that_do_not_line_up_naming_the_source(tmp_path, capsys, change, message):
    first = write_predictions(tmp_path / "joint", JOINT, LABELS)
    odd = write_predictions(tmp_path / "bone", *change(BONE, LABELS))
    code, _, err = run_cli(capsys, str(first), str(odd), "--tracking-uri", f"sqlite:///{tmp_path / 'unused.db'}")
    assert code == 2
    assert err.startswith(f"error: {odd}: ") and message.format(first=first) in err and err.count("\n") == 1
    assert not (tmp_path / "unused.db").exists()                             # refused before touching MLflow


def test_refuses_a_weight_count_that_is_not_one_per_source(tmp_path, capsys):
    joint = write_predictions(tmp_path / "joint", JOINT, LABELS)
    code, _, err = run_cli(capsys, str(joint), str(joint), "--weights", "1", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'unused.db'}")
    assert code == 2 and err == "error: --weights: 1 weights for 2 sources (one per SOURCE)\n"


def test_refuses_empty_or_non_finite_predictions_and_weights(tmp_path, capsys):
    unused = f"sqlite:///{tmp_path / 'unused.db'}"
    empty = write_predictions(tmp_path / "empty", JOINT[:0], LABELS[:0])
    code, _, err = run_cli(capsys, str(empty), "--tracking-uri", unused)
    assert code == 2 and err == f"error: {empty}: test_labels.npy holds no samples\n"
    nan = write_predictions(tmp_path / "nan", np.where(JOINT > 0, np.nan, JOINT), LABELS)
    code, _, err = run_cli(capsys, str(nan), "--tracking-uri", unused)
    assert code == 2 and err == f"error: {nan}: test_logits.npy holds non-finite logits (NaN or inf)\n"
    joint = write_predictions(tmp_path / "joint", JOINT, LABELS)
    code, _, err = run_cli(capsys, str(joint), "--weights", "nan", "--tracking-uri", unused)
    assert code == 2 and err == "error: --weights nan: expected finite numbers\n"


def test_refuses_a_folder_without_the_split_and_an_unknown_run(tmp_path, capsys, uri):
    joint = write_predictions(tmp_path / "joint", JOINT, LABELS)
    code, _, err = run_cli(capsys, str(joint), "--split", "val", "--tracking-uri", uri)
    assert code == 2 and err == f"error: {joint}: folder has no val_logits.npy or val_labels.npy\n"
    code, _, err = run_cli(capsys, str(joint), "0123abcd", "--tracking-uri", uri)
    assert code == 2 and err == f"error: 0123abcd: neither a folder nor a run id in {uri}\n"


# ----------------------------------------------------------------------------------------------
# MLflow runs
# ----------------------------------------------------------------------------------------------

def logged_run(uri: str, name: str, logits: np.ndarray, params: dict, parent: str | None = None) -> str:
    """A finished run with predictions/test_*.npy, as service.run / service.final log them."""

    reporter = MLflowReporter.start(uri, "cocodiff-streams", name, parent_run_id=parent)
    reporter.log_params(params)
    log_classification_outputs(reporter, torch.from_numpy(logits), torch.from_numpy(LABELS), ["a", "b", "c"], "test")
    reporter.finish()
    return reporter.run_id


def test_fuses_mlflow_runs_tagging_each_with_its_stream(tmp_path, capsys, uri):
    joint = logged_run(uri, "joint", JOINT, {"backbone.stream": "joint"})
    parent = MLflowReporter.start(uri, "cocodiff-streams", "final")     # service.final: the parent has the config
    parent.log_params({"backbone.stream": "bone"})
    bone = logged_run(uri, "bone-seed0", BONE, {"train.seed": 0}, parent=parent.run_id)
    names = tmp_path / "names.txt"
    names.write_text("wave\nkick\nclap\n")
    code, out, _ = run_cli(capsys, joint, bone, "--tracking-uri", uri, "--names", str(names))
    assert code == 0
    assert [(s["source"], s["stream"], s["top1"]) for s in out["sources"]] == [(joint, "joint", 50.0),
                                                                               (bone, "bone", 50.0)]
    assert out["ensemble"]["top1"] == 100.0

    client = MlflowClient(uri)
    fused_run = client.get_run(out["mlflow_run_id"])
    assert client.get_experiment(fused_run.info.experiment_id).name == "cocodiff-streams"   # beside its sources
    assert fused_run.data.params["streams"] == "joint,bone" and fused_run.info.run_name == "ensemble-test-joint+bone"
    fused = np.load(client.download_artifacts(fused_run.info.run_id, "predictions/test_logits.npy", str(tmp_path)))
    np.testing.assert_array_equal(fused, JOINT + BONE)

    # The fused run is a source in turn (its stream: 'ensemble'); a folder and a run mix freely.
    folder = write_predictions(tmp_path / "joint", JOINT, LABELS)
    code, out, _ = run_cli(capsys, out["mlflow_run_id"], str(folder), "--weights", "1", "0", "--tracking-uri", uri,
                           "--experiment-name", "mixed")
    assert code == 0 and out["sources"][0]["stream"] == "ensemble" and out["ensemble"]["top1"] == 100.0
    assert client.get_experiment(client.get_run(out["mlflow_run_id"]).info.experiment_id).name == "mixed"


def test_refuses_a_run_without_saved_predictions(capsys, uri):
    bare = MLflowReporter.start(uri, "cocodiff-streams", "no-predictions")
    bare.finish()
    code, _, err = run_cli(capsys, bare.run_id, "--tracking-uri", uri)
    assert code == 2
    assert err == (f"error: {bare.run_id}: run has no predictions/test_logits.npy or "
                   "predictions/test_labels.npy artifact\n")


# ----------------------------------------------------------------------------------------------
# service.final --streams
# ----------------------------------------------------------------------------------------------

def test_table_has_a_stream_column_only_with_streams():
    row = {"split": "s", "arm": "baseline", "classes": 3, "seeds": 2, "steps": 10, "train_samples": 8,
           "test_samples": 4, "test/top1_mean": 50.0, "test/top1_std_seeds": 0.0, "test/top5_mean": 100.0,
           "test/top5_std_seeds": 0.0, "test/top1_per_seed": [50.0, 50.0]}
    plain = cocodiff_table([row]).splitlines()
    assert plain[0].startswith("| split | arm | classes |") and plain[2].startswith("| s | baseline | 3 |")
    streams = cocodiff_table([{**row, "stream": "joint"}, {**row, "stream": "ensemble"}]).splitlines()
    assert streams[0].startswith("| split | arm | stream | classes |") and streams[1].count("---") == 10
    assert streams[3].startswith("| s | baseline | ensemble | 3 | 50.00 ± 0.00 |")


@pytest.mark.parametrize("streams,message", [
    (["joint", "hand"], "--streams: unknown stream 'hand' (expected joint, bone, motion)"),
    (["bone", "bone"], "--streams: bone given twice"),
])
def test_final_refuses_unknown_or_repeated_streams(tmp_path, capsys, streams, message):
    from service.final import main as final_main

    assert final_main(["--from", str(tmp_path / "never-read.yaml"), "--streams", *streams]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_final_refuses_streams_for_tdsm(tmp_path, capsys):
    from service.final import main as final_main

    config = tmp_path / "tdsm.yaml"
    config.write_text("method: tdsm\n")
    assert final_main(["--from", str(config), "--streams", "joint", "--tracking-uri",
                       f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    assert capsys.readouterr().err.startswith("error: --streams: cocodiff only")
