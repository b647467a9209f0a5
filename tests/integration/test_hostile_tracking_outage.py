"""A tracking server that goes away mid-run (slow; run by .ci/run): a real `mlflow server` on loopback, killed while
`service.run` trains and started again 20 s later on the same store. The run rides it out (metrics buffered, the
rest waits, a warning and a note), ends FINISHED with every metric; past SKELDIFF_TRACKING_OUTAGE_S it gives up in
one line (exit 3), and re-running the same command once the server is back resumes and ends the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI_CLASS_NAMES as NAMES
from conftest import TINY_RUN_ARGS as TINY
from conftest import write_feature_folder
from mlflow.tracking import MlflowClient
from servers import free_port, wait_for_health  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MLFLOW = Path(sys.executable).with_name("mlflow")


class Server:
    """`mlflow server` on a fixed port and sqlite store: stop() kills it (SIGKILL), start() brings it back."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.root / 'store.db'}", "--artifacts-destination",
             str(self.root / "art"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
        wait_for_health(self.uri, self.root / "server.log", self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    s.stop()


def run_cmd(ws: Path, uri: str) -> list[str]:
    steps = [a.replace("train.steps=8", "train.steps=60") for a in TINY]
    return [sys.executable, "-m", "service.run", "tdsm", "--features", str(ws / "feats"), "--unseen",
            str(ws / "ru.npy"), "--val-unseen", "2", "--class-names", str(ws / "names.txt"), "--text-encoder",
            "minilm", *steps, "--tracking-uri", uri, "--run-dir", str(ws / "run")]


@pytest.fixture
def ws(tmp_path) -> Path:
    write_feature_folder(tmp_path / "feats", num_classes=len(NAMES), unseen=[2, 7])
    np.save(tmp_path / "ru.npy", np.array([2, 7]))
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    return tmp_path


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    out.pop("MLFLOW_TRACKING_URI", None)
    return out


def wait_for_first_metric(client: MlflowClient, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids) if ids else []
        if runs and runs[0].data.metrics:
            return runs[0].info.run_id
        time.sleep(0.3)
    raise AssertionError("no metric within 300 s")


def test_a_run_rides_out_a_tracking_server_restart(server, ws):
    proc = subprocess.Popen(run_cmd(ws, server.uri), cwd=ws, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run_id = wait_for_first_metric(MlflowClient(server.uri), proc)
    server.stop()
    time.sleep(20)
    server.start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "warning: tracking server" in err and "unreachable" in err and "back after" in err
    assert "Traceback" not in err
    run = MlflowClient(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(server.uri).get_metric_history(run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 60 and len(steps) == 20       # none lost, none twice


def test_a_run_gives_up_in_one_line_and_resumes_when_the_server_is_back(server, ws):
    cmd = run_cmd(ws, server.uri)
    proc = subprocess.Popen(cmd, cwd=ws, env=env(SKELDIFF_TRACKING_OUTAGE_S="6"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run_id = wait_for_first_metric(MlflowClient(server.uri), proc)
    server.stop()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: tracking server http://127.0.0.1:") and "unreachable for" in last
    assert "Traceback" not in err
    server.start()
    again = subprocess.run(cmd, cwd=ws, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"      # the same run, resumed and ended
