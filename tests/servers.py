"""Real servers on loopback for the tests: an S3-API server (moto's standalone `ThreadedMotoServer`, the one
MLflow's and Ray's own test suites use; its objects live in this process, so stopping and starting it again on the
same port keeps them: an outage, not a wipe) and the wait for an `mlflow server` to answer."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
import urllib.request
from contextlib import closing
from pathlib import Path

BUCKET = "skeldiff-test"
# moto accepts any credentials; these are fake and only ever go to the loopback server.
TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value-42",
            "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """start() / stop() a moto server; env() is what a client process needs to reach it."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)      # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)
                return self
            except OSError as err:
                if getattr(err, "code", None):      # an HTTP error answer: the server is up
                    return self
                time.sleep(0.2)
        raise RuntimeError(f"moto server on {self.endpoint} did not start")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self) -> dict[str, str]:
        return {**TEST_ENV, "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=TEST_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=TEST_ENV["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def create_bucket(self, name: str = BUCKET) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str = BUCKET, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def apply_env(server: S3Server, monkeypatch) -> None:
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    os.environ.pop("AWS_PROFILE", None)


def wait_for_health(url: str, log: Path, proc: subprocess.Popen | None = None, timeout: float = 180) -> None:
    """Until `url/health` answers 200 (an `mlflow server` starting: ~5-20 s here); its log's tail if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=3).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up:\n" + Path(log).read_text(errors="replace")[-3000:])
