"""The contended benchmark end to end (slow): `python -m service.bench contended` on the tiny size with one
competitor, its four arms and the goal line. The thread policy and the benchmark's table in process:
tests/component/test_threads.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_contended_bench_end_to_end(tmp_path):
    out = tmp_path / "c.json"
    proc = subprocess.run([sys.executable, "-m", "service.bench", "contended", "--sizes", "tiny", "--competitors",
                           "1", "--rounds", "1", "--iters", "1", "--warmup", "0", "--batch", "4", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    by_arm = {r["arm"]: r for r in report["rows"]}
    assert len(by_arm) == 4
    assert by_arm["torch default"]["wait_policy"] is None                 # torch loaded before `service`
    assert by_arm["auto"]["wait_policy"] == "PASSIVE" and by_arm["auto"]["threads"] == 1   # tiny width
    assert "goal (tiny, 1 competitor)" in proc.stdout
