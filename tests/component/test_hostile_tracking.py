"""Hostile tracking and lifecycle conditions, in process: credentials in the tracking URI, a silent server, a run
dir another run holds, a deleted MLflow run or a corrupt `mlflow_run.json` in the run dir, SIGTERM unwinding like
Ctrl-C. The same conditions through `python -m service.run` (an unreachable or a real `mlflow server`, SIGTERM
mid-training): tests/integration/test_hostile_tracking_cli.py."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import tiny_config

from service.methods import METHODS
from service.methods.base import RunOptions
from service.tracking import store as tracking
from service.tracking.store import move_credentials, redact_uri, resolve_tracking_uri
from trainers.errors import InputError

SECRET = "S3cretPW"

pytestmark = pytest.mark.usefixtures("no_ambient_credentials")


# ----------------------------------------------------------------------------------------------
# Credentials
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, expected", [
    ("http://alice:S3cretPW@host:5000", "http://host:5000"),
    ("https://alice@host/mlflow/", "https://host/mlflow/"),
    ("http://a%40b:p%3Aw@10.0.0.1:80/x?y=1", "http://10.0.0.1:80/x?y=1"),
    ("http://host:5000", "http://host:5000"),
    ("sqlite:////tmp/m.db", "sqlite:////tmp/m.db"),
    ("postgresql+psycopg://mlflow:S3cretPW@db:5432/mlflow", "postgresql+psycopg://db:5432/mlflow"),
])
def test_redact_uri_drops_userinfo(uri, expected):
    assert redact_uri(uri) == expected


def test_http_credentials_move_into_mlflow_env(monkeypatch):
    monkeypatch.setattr(tracking, "check_tracking_server", lambda uri: None)
    assert resolve_tracking_uri("http://a%40b:p%3AS3cretPW@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "a@b" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "p:S3cretPW"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"     # a lost server cannot stall a run for minutes


def test_credentials_in_env_uri_are_moved_too(monkeypatch):
    monkeypatch.setattr(tracking, "check_tracking_server", lambda uri: None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://bob:{SECRET}@tracking.example")
    assert resolve_tracking_uri() == "https://tracking.example"
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://tracking.example"     # children inherit no secret
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET


def test_database_passwords_go_to_pgpassword_or_are_refused():
    assert move_credentials(f"postgresql://mlflow:{SECRET}@db/mlflow") == "postgresql://mlflow@db/mlflow"
    assert os.environ["PGPASSWORD"] == SECRET
    with pytest.raises(InputError, match=r"mysql://db/m: a password in a mysql URI") as err:
        move_credentials(f"mysql://u:{SECRET}@db/m")
    assert SECRET not in str(err.value)


# ----------------------------------------------------------------------------------------------
# Unreachable server
# ----------------------------------------------------------------------------------------------

def test_silent_server_times_out():
    """A server that accepts connections and never answers (a black hole behind a proxy): the probe's timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)                     # the kernel completes the handshake; nobody ever reads or answers
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(InputError, match=f"{uri} is unreachable \\(timed out"):
            resolve_tracking_uri(uri)
        assert time.monotonic() - t0 < tracking.PROBE_TIMEOUT_S + 5


# ----------------------------------------------------------------------------------------------
# Run dir lock
# ----------------------------------------------------------------------------------------------

def open_run_args(tmp_path: Path, **kw) -> RunOptions:
    """What service.methods.common.open_run reads: service.run's options."""
    return RunOptions(**{"method": METHODS["tdsm"], "split": None, "run_dir": tmp_path / "run", "fresh": False,
                         "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "experiment_name": "hostile",
                         "progress": False, **kw})


def test_open_run_refuses_a_locked_run_dir(tmp_path):
    from service.methods.common import open_run

    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        with pytest.raises(InputError, match=f"{tmp_path / 'run'} is in use by pid {os.getpid()}"):
            open_run(open_run_args(tmp_path, fresh=True), "x", "0" * 16, tiny_config())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]     # --fresh emptied nothing


def test_lock_is_released_when_main_returns(tmp_path):
    from service.process import _held_locks, exits_cleanly, lock_dir

    @exits_cleanly
    def main(folder: Path) -> int:
        lock_dir(folder)
        lock_dir(folder)                     # re-entrant within one process
        return 0

    assert main(tmp_path) == 0 and main(tmp_path) == 0 and not _held_locks


# ----------------------------------------------------------------------------------------------
# Stale state in the run dir; SIGTERM
# ----------------------------------------------------------------------------------------------

def test_open_run_replaces_a_deleted_run_and_a_torn_run_file(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from service.methods.common import open_run
    from service.process import _held_locks

    args, cfg = open_run_args(tmp_path), tiny_config()
    try:
        _, first = open_run(args, "x", "0" * 16, cfg)
        first.finish()
        _, same = open_run(args, "x", "0" * 16, cfg)              # resume: the same run
        assert same.run_id == first.run_id
        MlflowClient(args.tracking_uri).delete_run(first.run_id)
        _, second = open_run(args, "x", "0" * 16, cfg)
        assert second.run_id != first.run_id
        assert f"note: MLflow run {first.run_id} is deleted" in capsys.readouterr().err
        (tmp_path / "run" / "mlflow_run.json").write_text('{"run_id": "')       # torn by an older, non-atomic write
        _, third = open_run(args, "x", "0" * 16, cfg)
        assert third.run_id != second.run_id and "mlflow_run.json is unreadable" in capsys.readouterr().err
        assert json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"] == third.run_id
        assert not list((tmp_path / "run").glob(".mlflow_run.json.*"))      # no temporary left behind
    finally:
        for fd in _held_locks.values():
            os.close(fd)
        _held_locks.clear()


def test_sigterm_unwinds_like_ctrl_c():
    from service.process import Terminated, exits_cleanly

    seen = []

    @exits_cleanly
    def main() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                                   # the handler raises here, in the main thread
        except KeyboardInterrupt as err:                    # the path that ends MLflow runs as KILLED
            seen.append(type(err))
            raise
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert main() == 128 + signal.SIGTERM and seen == [Terminated]
    assert signal.getsignal(signal.SIGTERM) is before        # restored for in-process callers
