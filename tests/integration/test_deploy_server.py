"""deploy/ for real: a PostgreSQL-backed `mlflow server` with basic auth, configured as deploy/ configures it, records
a sweep (slow; run by .ci/run).

PostgreSQL (Debian's server binaries) and `mlflow server --app-name basic-auth` start on loopback; the server must
refuse anonymous clients, then a two-trial sweep (local Ray) logs to it and its runs are read back as a user would.
The static checks of the same manifests: tests/component/test_deploy.py.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pytest
import yaml
from servers import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


# ----------------------------------------------------------------------------------------------
# PostgreSQL + mlflow server + a real sweep
# ----------------------------------------------------------------------------------------------

def postgres_bin() -> Path:
    """Newest /usr/lib/postgresql/<version>/bin holding `postgres` and `initdb` (Debian's layout)."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin")
             if (p / "postgres").is_file() and (p / "initdb").is_file()]
    if not found:
        pytest.skip("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                    "(apt-get install postgresql; .ci/run installs it)")
    return max(found, key=lambda p: float(p.parent.name) if p.parent.name.replace(".", "").isdigit() else 0)


def run_as() -> tuple[int, int] | None:
    """PostgreSQL refuses to run as root: use the `postgres` (else `nobody`) account when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            continue
    pytest.skip("running as root and no unprivileged account (postgres, nobody) to run PostgreSQL")


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: not ready after {timeout:.0f} s\n{log.read_text()[-3000:] if log else ''}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process group this test started (mlflow server forks uvicorn workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Postgres(NamedTuple):
    uri: str       # SQLAlchemy URI without a password, as deploy/ writes them
    password: str  # handed to libpq as PGPASSWORD, as deploy/ does


class MlflowServer(NamedTuple):
    url: str
    artifacts: Path
    username: str
    password: str


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL on 127.0.0.1 with database `mlflow` and a random password."""
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install -e '.[deploy]'")
    bin_dir, ids = postgres_bin(), run_as()
    # Not tmp_path: pytest's base folder is private to the invoking user, and PostgreSQL runs as another one.
    base = Path(tempfile.mkdtemp(prefix="skeldiff-pg-"))
    password = secrets.token_hex(16)
    (base / "pwfile").write_text(password + "\n")
    as_user: dict[str, Any] = {}
    if ids is not None:
        for p in (base, base / "pwfile"):
            os.chown(p, *ids)
        as_user = {"user": ids[0], "group": ids[1], "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "HOME": str(base)}
    data, log, port = base / "data", base / "postgres.log", free_port()
    subprocess.run([bin_dir / "initdb", "-D", data, "-U", "mlflow", f"--pwfile={base / 'pwfile'}",
                    "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"],
                   check=True, capture_output=True, cwd=base, env=env, **as_user)
    with open(log, "wb") as out:
        proc = subprocess.Popen([bin_dir / "postgres", "-D", data, "-k", base, "-h", "127.0.0.1", "-p", str(port),
                                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=base, env=env, start_new_session=True,
                                **as_user)
    admin = dict(host="127.0.0.1", port=port, user="mlflow", password=password, dbname="postgres")
    try:
        wait_until(lambda: psycopg.connect(**admin).close() is None, 60, "postgres", proc, log)
        with psycopg.connect(**admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
        # SQLAlchemy's URI naming the driver: `postgresql://` alone means psycopg2 before SQLAlchemy 2.1.
        yield Postgres(f"postgresql+psycopg://mlflow@127.0.0.1:{port}/mlflow", password)
    finally:
        stop(proc, signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory) -> Iterator[MlflowServer]:
    """`mlflow server --app-name basic-auth` on 127.0.0.1 as deploy/mlflow/mlflow.yaml runs it: PostgreSQL for
    runs and users (password in PGPASSWORD), deploy/mlflow/basic_auth.ini, a generated admin, proxied artifacts."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port, art, log = free_port(), tmp / "art", tmp / "mlflow-server.log"
    # The committed settings, with the database at this test's PostgreSQL instead of Service `postgres`.
    ini = re.sub(r"(?m)^database_uri\s*=.*$", f"database_uri = {postgres.uri}",
                 (DEPLOY / "mlflow" / "basic_auth.ini").read_text())
    (tmp / "basic_auth.ini").write_text(ini)
    username, password = "skeldiff", secrets.token_hex(16)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "PGPASSWORD": postgres.password, "MLFLOW_BACKEND_STORE_URI": postgres.uri,
           "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_USERNAME": username, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli) if mlflow_cli.is_file() else "mlflow", "server", "--app-name=basic-auth",
           "--artifacts-destination", str(art), "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        # /health answers without credentials: the probes of mlflow.yaml and docker-compose.yml rely on that.
        wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, 180, "mlflow server",
                   proc, log)
        yield MlflowServer(url, art, username, password)
    finally:
        stop(proc)


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    """Status of a GET, optionally with HTTP basic auth."""
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        return urllib.request.urlopen(request, timeout=120).status  # a PBKDF2 check on a loaded machine
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_mlflow_server_refuses_anonymous_clients_and_admits_the_secret(mlflow_server, postgres, monkeypatch):
    import psycopg
    from mlflow.tracking import MlflowClient

    api = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(api) == 401
    assert http_status(api, (mlflow_server.username, "wrong-" + mlflow_server.password)) == 401
    assert http_status(api, (mlflow_server.username, mlflow_server.password)) == 200
    # What a Ray pod does: credentials from the environment (the Secret), a URI without them.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server.password)
    client = MlflowClient(mlflow_server.url)
    run = client.create_run(client.create_experiment("deploy-auth-test"))
    client.log_metric(run.info.run_id, "val/x", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"val/x": 1.0}
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(Exception, match="401|Unauthorized|credentials"):
        MlflowClient(mlflow_server.url).get_run(run.info.run_id)
    # Users live beside the runs in PostgreSQL; only a hash of the password is stored.
    with psycopg.connect(postgres.uri.replace("+psycopg", ""), password=postgres.password) as conn:
        (hashed,) = conn.execute("SELECT password_hash FROM users WHERE username = %s",
                                 (mlflow_server.username,)).fetchone()
    assert mlflow_server.password not in hashed


@pytest.mark.slow
def test_sweep_logs_to_a_postgres_backed_mlflow_server(mlflow_server, postgres, tmp_path, monkeypatch):
    import psycopg
    from mlflow.tracking import MlflowClient

    url, art = mlflow_server.url, mlflow_server.artifacts
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_TRACKING_USERNAME=mlflow_server.username, MLFLOW_TRACKING_PASSWORD=mlflow_server.password)
    # The generated feature task (not the embedded skeleton chain): this test is about where the runs land.
    cmd = [sys.executable, "-m", "service.sweep", "tdsm", "--smoke", "--num-samples", "2", "--splits", "synthetic-u5",
           "--set", "train.steps=40", "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20",
           "--storage-path", str(tmp_path / "results"), "--tracking-uri", url, "--experiment-name", "deploy-test"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["tracking_uri"] == url
    sweep = summary["sweeps"][0]

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", mlflow_server.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", mlflow_server.password)
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("deploy-test")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), "artifacts should go through the server"
    parent = client.get_run(sweep["parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) >= 2
    for child in children:
        assert "loss.margin" in child.data.params
        assert "val/zsl_top1" in child.data.metrics
        assert child.info.status != "RUNNING", "the driver closes every trial run"
    config = Path(client.download_artifacts(children[0].info.run_id, "config.yaml", str(tmp_path)))
    assert yaml.safe_load(config.read_text())["loss"]["margin"] == pytest.approx(
        float(children[0].data.params["loss.margin"]))
    assert list(art.rglob("config.yaml")), "the server stores proxied artifacts under --artifacts-destination"
    assert Path(sweep["best_config"]).is_file()

    # The runs really live in PostgreSQL.
    with psycopg.connect(postgres.uri.replace("+psycopg", ""), password=postgres.password) as conn:
        count = conn.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
        assert count.fetchone()[0] == len(children) + 1
