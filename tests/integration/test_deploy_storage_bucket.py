"""deploy/ object storage for real: moto's S3 server on loopback stands in for the bucket of the manifests
(skipped without moto and boto3). deploy/stage_data.py copies a data prefix from it as the init container runs it,
and `mlflow server` configured from deploy/mlflow/mlflow.yaml (slow) proxies a client's artifact into it. The
static checks of the same manifests: tests/component/test_deploy_storage.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from deploy_manifests import (
    BUCKET_SECRET,
    DEPLOY,
    IMAGE_HOME,
    artifacts_destination,
    default_objects,
    env_file_keys,
    find,
    mlflow_server,
)
from servers import S3Server, free_port, wait_for_health

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# A real S3 API (moto) on loopback: stage_data.py and MLflow's proxied artifacts
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


def bucket_env(s3, tmp_path: Path) -> dict[str, str]:
    """The variables a pod gets from Secret skeldiff-bucket, through make-secrets.sh as a user runs it."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    out = tmp_path / "secrets"
    out.mkdir()
    given = {k: v for k, v in s3.env().items() if k.startswith("AWS_")}
    subprocess.run(["sh", str(DEPLOY / "make-secrets.sh"), str(out)], env={**base, **given}, check=True,
                   capture_output=True)
    return env_file_keys(out / "bucket.env", commented=False)


def container_env(container: dict[str, Any], secret: dict[str, str], config: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: its ConfigMaps, then `env` (Secret refs resolved)."""
    env = dict(config) if container.get("envFrom") else {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif (ref := e.get("valueFrom", {}).get("secretKeyRef")) and ref["name"] == BUCKET_SECRET:
            if ref["key"] in secret:
                env[e["name"]] = secret[ref["key"]]
            else:
                assert ref.get("optional"), f"{e['name']}: {ref} missing from the Secret"
    return env


def test_stage_data_copies_the_bucket_prefix_as_the_init_container_runs_it(s3, tmp_path):
    s3.create_bucket("skeldiff-stage")
    client = s3.client()
    files = {"shift_ntu60_5_r/train.npy": b"\x93NUMPY" + os.urandom(64), "label_splits/ru5.npy": b"ru5",
             "class_lists/ntu60.csv": b"idx,label\n0,drink water\n"}
    for key, body in files.items():
        client.put_object(Bucket="skeldiff-stage", Key=f"data/{key}", Body=body)
    objects = default_objects()
    config = dict(find(objects, "ConfigMap", "skeldiff-config")["data"])
    dest = tmp_path / "scratch" / "data"
    config.update(SKELDIFF_DATA_URI="s3://skeldiff-stage/data", SKELDIFF_DATA=str(dest))
    head = find(objects, "RayCluster", "skeldiff")["spec"]["headGroupSpec"]["template"]["spec"]
    (stage,) = head["initContainers"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **container_env(stage, bucket_env(s3, tmp_path), config)}
    assert "MLFLOW_TRACKING_PASSWORD" not in env and env["AWS_ENDPOINT_URL"] == s3.endpoint
    command = [sys.executable, str(ROOT / stage["command"][-1][len(IMAGE_HOME) + 1:])]

    def run() -> str:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert "3 files copied" in run()
    assert {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == files
    assert "0 files copied, 3 kept" in run(), "a restarted pod copies nothing again"
    client.put_object(Bucket="skeldiff-stage", Key="data/label_splits/ru12.npy", Body=b"ru12")
    assert "1 files copied, 3 kept" in run()
    env["SKELDIFF_DATA_URI"] = "s3://skeldiff-stage/nothing-here"
    assert "0 files copied" in run()
    env["SKELDIFF_DATA_URI"] = ""       # the NFS component's value
    assert "nothing to copy" in run()


@pytest.mark.slow
def test_mlflow_server_as_deployed_stores_a_clients_artifact_in_the_bucket(s3, tmp_path, monkeypatch):
    """`mlflow server` with the artifact arguments and the bucket env of deploy/mlflow/mlflow.yaml (SQLite here
    instead of PostgreSQL, no basic auth: tests/integration/test_deploy_server.py covers those); a client without
    any bucket credentials logs an artifact, and the object appears under --artifacts-destination in the bucket."""
    from mlflow.tracking import MlflowClient

    s3.create_bucket("skeldiff-mlflow")
    server = mlflow_server(default_objects())
    destination = urlparse(artifacts_destination(server))
    destination = f"s3://skeldiff-mlflow{destination.path}"       # the deployed prefix, in the test bucket
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(container_env({"env": [e for e in server["env"] if "secretKeyRef" in e.get("valueFrom", {})
                                      and e["valueFrom"]["secretKeyRef"]["name"] == BUCKET_SECRET]},
                             bucket_env(s3, tmp_path), {}))
    assert env["MLFLOW_S3_ENDPOINT_URL"] == s3.endpoint
    port, log = free_port(), tmp_path / "mlflow.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli) if mlflow_cli.is_file() else "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--serve-artifacts",
           f"--artifacts-destination={destination}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, log, proc)
        # The client: a Ray pod's view (no AWS_* at all in this process), artifacts over HTTP.
        for key in [k for k in os.environ if k.startswith("AWS_") or k == "MLFLOW_S3_ENDPOINT_URL"]:
            monkeypatch.delenv(key)
        client = MlflowClient(url)
        exp = client.create_experiment("deploy-bucket")
        assert client.get_experiment(exp).artifact_location.startswith("mlflow-artifacts:")
        run = client.create_run(exp)
        note = tmp_path / "best_config.yaml"
        note.write_text("loss: {margin: 0.1}\n")
        client.log_artifact(run.info.run_id, str(note))
        keys = s3.keys("skeldiff-mlflow")
        assert [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/best_config.yaml")], keys
        assert all(k.startswith(destination.split("/", 3)[3].strip("/") + "/") for k in keys), keys
        back = Path(client.download_artifacts(run.info.run_id, "best_config.yaml", str(tmp_path / "back")))
        assert back.read_text() == note.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
