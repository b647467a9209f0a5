"""The cross-split report end to end (slow): a real (tiny) `python -m service.final --splits` on two generated
splits writes the paper table and logs it to MLflow. The named splits and `service.report` in process:
tests/component/test_report.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_final_over_two_splits_writes_the_paper_table(tmp_path):
    """A real (tiny) `service.final --splits` on two generated splits: one table, one row per split, logged."""
    from mlflow.tracking import MlflowClient

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"method": "tdsm", "model": {"preset": "tiny"}, "optim": {"batch_size": 16},
                                      "train": {"steps": 10, "eval_every": 10, "device": "cpu"}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "service.final", "--from", str(config), "--splits", "synthetic-u5",
                           "synthetic-u12", "--seeds", "2", "--noise-draws", "2", "--no-register", "--no-progress",
                           "--tracking-uri", uri, "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "out" / "paper_table.md").read_text()
    assert "paper top-1 %" in md and md in proc.stderr
    rows = [line for line in md.splitlines() if line.startswith("| synthetic-")]
    assert [r.split(" | ")[0] for r in rows] == ["| synthetic-u5", "| synthetic-u12"]
    assert all("2 × 2 | 25 / 50 |" in r for r in rows)
    client = MlflowClient(uri)
    for row in json.loads(proc.stdout.strip().splitlines()[-1])["splits"]:
        assert {a.path for a in client.list_artifacts(row["parent_run_id"], "report")} == \
            {"report/paper_table.md", "report/paper_table.csv"}
