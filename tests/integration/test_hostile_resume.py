"""`service.sweep --resume` never unpickles Tune state the sweep did not write (slow; a real local Ray and sqlite
MLflow store): a tuner.pkl whose __reduce__ would create a marker file, an experiment state replaced by another,
a sweep whose MLflow record is gone and a sweep folder other users can write are each refused in one line, before
Tune loads anything; the sweep's own state resumes."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
from pathlib import Path

import pytest
from test_hostile_sweep import env, sweep_cmd

from service.orchestration.tune_state import LEDGER

pytestmark = pytest.mark.slow


class Crafted:
    """What an attacker with write access to the storage would leave there: unpickling it runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cmd = [*sweep_cmd(tmp, [1e-3, 2e-3]), "--num-samples", "2", "--tracking-uri", uri, "--name", "s1"]
    out = subprocess.run(cmd, cwd=tmp, env=env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp, cmd


def resume(tmp: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, "--resume"], cwd=tmp, env=env(), capture_output=True, text=True, timeout=900)


def one_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    return out.stderr.strip().splitlines()[-1]


def test_its_own_state_resumes_and_the_ledger_holds_every_state_file(finished_sweep):
    tmp, cmd = finished_sweep
    out = resume(tmp, cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stderr
    ledger = next((tmp / "mlartifacts").rglob(LEDGER))
    assert {"tuner.pkl"} <= set(json.loads(ledger.read_text()))


def test_a_crafted_tuner_pkl_is_refused_before_it_is_unpickled(finished_sweep):
    tmp, cmd = finished_sweep
    sweep = tmp / "results" / "s1"
    original = (sweep / "tuner.pkl").read_bytes()
    marker = tmp / "pwned"
    (sweep / "tuner.pkl").write_bytes(pickle.dumps(Crafted(marker)))
    try:
        line = one_error(resume(tmp, cmd))
        assert "tuner.pkl is not a file this sweep wrote" in line and "refusing to unpickle" in line
        assert not marker.exists()                                   # nothing ran
    finally:
        (sweep / "tuner.pkl").write_bytes(original)


def test_a_replaced_experiment_state_is_refused(finished_sweep):
    tmp, cmd = finished_sweep
    [state] = sorted((tmp / "results" / "s1").glob("experiment_state-*.json"))[-1:]
    original = state.read_bytes()
    state.write_bytes(original + b"\n")                    # still valid JSON, another content
    try:
        assert f"{state.name} is not a file this sweep wrote" in one_error(resume(tmp, cmd))
    finally:
        state.write_bytes(original)


def test_a_sweep_folder_others_can_write_is_refused(finished_sweep):
    tmp, cmd = finished_sweep
    sweep = tmp / "results" / "s1"
    mode = sweep.stat().st_mode
    sweep.chmod(mode | stat.S_IWOTH)
    try:
        assert "is writable by other users" in one_error(resume(tmp, cmd))
    finally:
        sweep.chmod(mode)


def test_a_sweep_without_its_record_is_refused(finished_sweep):
    tmp, cmd = finished_sweep
    ledger = next((tmp / "mlartifacts").rglob(LEDGER))
    saved = ledger.read_bytes()
    ledger.unlink()
    try:
        assert f"has no {LEDGER}" in one_error(resume(tmp, cmd))
    finally:
        ledger.write_bytes(saved)

