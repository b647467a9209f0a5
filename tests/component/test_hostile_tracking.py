"""Hostile tracking and lifecycle conditions: credentials in the tracking URI, an unreachable or silent server,
a deleted MLflow run or a corrupt `mlflow_run.json` in the run dir, SIGTERM mid-training, two runs on one run dir.

Every CLI failure here is one `error: ...` line on stderr with exit code 2 (143 for SIGTERM, like a shell)."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLI_CLASS_NAMES as NAMES
from conftest import TINY_RUN_ARGS as TINY
from conftest import tiny_config, write_feature_folder

from service.tracking import store as tracking
from service.tracking.store import move_credentials, redact_uri, resolve_tracking_uri
from trainers.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
SECRET = "S3cretPW"


@pytest.fixture(autouse=True)
def _no_ambient_credentials():
    """In-process tests move credentials into os.environ: start without them, leave none to other tests."""
    keys = ("MLFLOW_TRACKING_URI", *tracking.CREDENTIAL_VARS, *tracking.HTTP_DEFAULTS)
    saved = {key: os.environ.pop(key, None) for key in keys}
    yield
    for key, value in saved.items():
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A generated SA-DVAE folder (12 classes, 2 unseen) and its class names."""
    root = tmp_path_factory.mktemp("hostile")
    write_feature_folder(root / "feats", num_classes=len(NAMES), unseen=[2, 7])
    np.save(root / "ru.npy", np.array([2, 7]))
    (root / "names.txt").write_text("\n".join(NAMES) + "\n")
    return root


def data_args(ws: Path) -> list[str]:
    return ["--features", str(ws / "feats"), "--unseen", str(ws / "ru.npy"), "--val-unseen", "2",
            "--class-names", str(ws / "names.txt"), "--text-encoder", "minilm"]


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", *tracking.CREDENTIAL_VARS):
        out.pop(key, None)
    return out


def run_cli(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.run", "tdsm", *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]) and "Traceback" not in stderr, stderr
    return errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

def test_unreachable_server_fails_fast_naming_the_redacted_uri(ws, tmp_path):
    t0 = time.monotonic()
    out = run_cli(tmp_path, *data_args(ws), *TINY, "--tracking-uri", f"http://alice:{SECRET}@127.0.0.1:9",
                  timeout=120)
    elapsed = time.monotonic() - t0
    assert out.returncode == 2, out.stderr
    line = one_error_line(out.stderr)
    assert "http://127.0.0.1:9 is unreachable" in line and SECRET not in out.stderr + out.stdout
    # The goal is 30 s (typically 8 s: interpreter + torch/mlflow imports + one refused connect); the bound
    # is wider so a busy CI machine cannot flake it, and still far below the 250 s of retries it replaces.
    assert elapsed < 90
    assert not (tmp_path / "runs").exists()                  # checked before any data or training


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

@pytest.mark.slow
def test_second_run_on_a_locked_run_dir_is_refused(ws, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as held:           # what a live run holds (pid inside)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        out = run_cli(tmp_path, *data_args(ws), *TINY, "--run-dir", str(run_dir),
                      "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    assert out.returncode == 2, out.stderr
    assert f"{run_dir} is in use by pid {os.getpid()}" in one_error_line(out.stderr)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]          # nothing written by the refused run


def open_run_args(tmp_path: Path, **kw) -> argparse.Namespace:
    """What service.methods.common.open_run reads from the command line."""
    return argparse.Namespace(**{"split": None, "run_dir": tmp_path / "run", "fresh": False,
                                 "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "experiment_name": "hostile", **kw})


def test_open_run_refuses_a_locked_run_dir(tmp_path):
    from service.methods.common import open_run

    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        with pytest.raises(InputError, match=f"{tmp_path / 'run'} is in use by pid {os.getpid()}"):
            open_run(open_run_args(tmp_path, fresh=True), "tdsm", "x", "0" * 16, tiny_config())
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
        _, first = open_run(args, "tdsm", "x", "0" * 16, cfg)
        first.finish()
        _, same = open_run(args, "tdsm", "x", "0" * 16, cfg)              # resume: the same run
        assert same.run_id == first.run_id
        MlflowClient(args.tracking_uri).delete_run(first.run_id)
        _, second = open_run(args, "tdsm", "x", "0" * 16, cfg)
        assert second.run_id != first.run_id
        assert f"note: MLflow run {first.run_id} is deleted" in capsys.readouterr().err
        (tmp_path / "run" / "mlflow_run.json").write_text('{"run_id": "')       # torn by an older, non-atomic write
        _, third = open_run(args, "tdsm", "x", "0" * 16, cfg)
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


@pytest.mark.slow
def test_deleted_run_or_corrupt_run_file_starts_a_new_run(ws, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    args = [*data_args(ws), *TINY, "--tracking-uri", uri, "--run-dir", str(tmp_path / "run")]
    first = run_cli(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    first_id = json.loads(first.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    MlflowClient(uri).delete_run(first_id)

    second = run_cli(tmp_path, *args)
    assert second.returncode == 0, second.stderr
    second_id = json.loads(second.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    assert second_id != first_id
    assert f"note: MLflow run {first_id} is deleted" in second.stderr and "starting a new run" in second.stderr
    assert MlflowClient(uri).get_run(second_id).info.status == "FINISHED"

    (tmp_path / "run" / "mlflow_run.json").write_text('{"run_id": "')          # a torn write of an older version
    third = run_cli(tmp_path, *args)
    assert third.returncode == 0, third.stderr
    assert "mlflow_run.json is unreadable; starting a new MLflow run" in third.stderr
    assert json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"] == \
        json.loads(third.stdout.strip().splitlines()[-1])["mlflow_run_id"]


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_keeps_the_checkpoint(ws, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    run_dir = tmp_path / "run"
    long = [*TINY, "--set", "train.steps=100000", "--set", "train.eval_every=100000",
            "--set", "train.checkpoint_every=2"]
    proc = subprocess.Popen([sys.executable, "-m", "service.run", "tdsm", *data_args(ws), *long,
                             "--tracking-uri", uri, "--run-dir", str(run_dir)],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "last.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"
    assert torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["step"] >= 2


# ----------------------------------------------------------------------------------------------
# A real `mlflow server` with credentials in the URI
# ----------------------------------------------------------------------------------------------

ADMIN_PASSWORD = f"{SECRET}-alice"      # MLflow's basic auth wants >= 12 characters


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server --app-name basic-auth` on 127.0.0.1 (sqlite backend, user admin): its URL.

    With auth on, every request without the right credentials gets HTTP 401: a run that finishes proves MLflow
    received them (from MLFLOW_TRACKING_USERNAME/PASSWORD, not from the URI it was given)."""
    port, log = free_port(), tmp_path / "server.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli) if mlflow_cli.is_file() else "mlflow", "server", "--app-name", "basic-auth",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
           str(tmp_path / "art"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server_env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                  "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only",
                  "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini")}
    (tmp_path / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\n"
                                       f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
                                       f"admin_username = admin\nadmin_password = {ADMIN_PASSWORD}\n")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                                env=server_env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_password_in_uri_is_stored_and_printed_nowhere(ws, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "work"
    work.mkdir()
    host = mlflow_server.split("://", 1)[1]
    refused = run_cli(work, *data_args(ws), *TINY, "--tracking-uri", f"http://admin:{SECRET}-wrong@{host}")
    assert refused.returncode == 2, refused.stderr
    assert f"{mlflow_server} refused the credentials (HTTP 401)" in one_error_line(refused.stderr)
    assert SECRET not in refused.stderr

    out = run_cli(work, *data_args(ws), *TINY, "--tracking-uri", f"http://admin:{ADMIN_PASSWORD}@{host}",
                  "--experiment-name", "creds")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert SECRET not in out.stdout + out.stderr
    assert mlflow_server in out.stderr                                      # the redacted URI is what is shown
    assert json.loads((work / summary["run_dir"] / "mlflow_run.json").read_text())["tracking_uri"] == mlflow_server
    cache = Path(os.environ["SKELDIFF_CACHE"])
    for root in (work, tmp_path / "art", cache):
        assert not files_containing(root, SECRET.encode()), root
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
    assert MlflowClient(mlflow_server).get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
