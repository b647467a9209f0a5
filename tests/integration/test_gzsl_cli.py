"""Generalised zero-shot (GZSL, issue #20 §4) end to end: `python -m service.run tdsm` on a features folder with a
gtest logs test/gzsl_seen, test/gzsl_unseen and test/gzsl_h to MLflow. The metric maths, the loader and the scoring
path in process: tests/component/test_gzsl.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI_CLASS_NAMES as NAMES
from conftest import TINY_RUN_ARGS as TINY
from conftest import write_feature_folder, write_gtest

from trainers.zsl import harmonic_mean

ROOT = Path(__file__).resolve().parents[2]
NUM_CLASSES = 12
UNSEEN = [2, 7]


# ----------------------------------------------------------------------------------------------
# End to end: service.run tdsm on a features folder with a gtest
# ----------------------------------------------------------------------------------------------

def test_service_run_logs_gzsl_metrics_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    feats = write_gtest(write_feature_folder(tmp_path / "feats", num_classes=NUM_CLASSES, unseen=UNSEEN))
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "service.run", "tdsm", "--features", str(feats), "--class-names",
                           str(tmp_path / "names.txt"), "--val-unseen", "2", "--text-encoder", "minilm",
                           "--tracking-uri", uri, *TINY], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = MlflowClient(uri).get_run(summary["mlflow_run_id"]).data.metrics
    for key in ("test/gzsl_seen", "test/gzsl_unseen", "test/gzsl_h"):
        assert 0.0 <= metrics[key] <= 100.0 and round(metrics[key], 4) == summary[key], key
    assert metrics["test/gzsl_h"] == pytest.approx(harmonic_mean(metrics["test/gzsl_seen"],
                                                                 metrics["test/gzsl_unseen"]))
