"""service.storage on a local folder and on a real S3-API server (moto's standalone server on loopback): the one
filesystem layer every results file goes through, its URI checks, and `service.final --from s3://...`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from servers import BUCKET, S3Server, apply_env  # noqa: E402  (tests/ is on sys.path)

from service.data.chain import local_copy, sync_up
from service.storage import Storage
from service.tracking.sources import STATE_FILE, config_file, load_source, source_sweep_run_id
from trainers.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    server.create_bucket()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    apply_env(s3, monkeypatch)
    return s3


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return Storage.parse(tmp_path / "results")
    request.getfixturevalue("s3_env")
    return Storage.parse(f"s3://{BUCKET}/{tmp_path.name}/results")


def test_parse_local_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage.parse("rel/dir").root == str(tmp_path / "rel" / "dir")          # absolute, as Ray needs
    assert Storage.parse(f"file://{tmp_path}/x").is_local
    s = Storage.parse("s3://bucket/a/b/")
    assert (s.root, s.is_local, s.name, str(s / "c"), str(s.parent)) == \
        ("s3://bucket/a/b", False, "b", "s3://bucket/a/b/c", "s3://bucket/a")
    assert str(Storage.parse("gs://bucket/p") / "q") == "gs://bucket/p/q"


@pytest.mark.parametrize("uri", ["s3://AKIAEXAMPLE:hunter2secret@bucket/p", "s3://bucket/p?secret_key=hunter2secret",
                                 "s3://bucket/p?access_key=a&SECRET_KEY=hunter2secret"])
def test_credentials_in_a_uri_are_refused_without_echoing_them(uri):
    with pytest.raises(InputError) as err:
        Storage.parse(uri)
    assert "hunter2secret" not in str(err.value) and "AWS_SECRET_ACCESS_KEY" in str(err.value)


def test_a_uri_without_a_bucket_is_refused():
    with pytest.raises(InputError, match="no bucket"):
        Storage.parse("s3:///prefix")


def test_files_round_trip(location, tmp_path):
    (location / "sweep" / "state.json").write_text('{"a": 1}')
    assert (location / "sweep" / "state.json").is_file() and not (location / "sweep").is_file()
    assert json.loads((location / "sweep" / "state.json").read_text()) == {"a": 1}
    (location / "sweep" / "state.json").write_text('{"a": 2}')                      # replaced whole
    assert (location / "sweep" / "state.json").read_text() == '{"a": 2}'
    folder = tmp_path / "up"
    (folder / "x").mkdir(parents=True)
    (folder / "x" / "y.bin").write_bytes(bytes(range(256)) * 4096)                 # 1 MiB, binary
    (folder / "z.txt").write_text("z")
    (location / "up").upload(folder)
    assert location.children() == ["sweep", "up"]
    assert (location / "up").files() == ["x/y.bin", "z.txt"]
    back = (location / "up").download(tmp_path / "down")
    assert (back / "x" / "y.bin").read_bytes() == (folder / "x" / "y.bin").read_bytes()
    (location / "up").remove()
    assert location.children() == ["sweep"]
    assert (location / "missing").children() == [] and (location / "missing").files() == []
    location.check_writable()


def test_an_unreachable_bucket_fails_in_one_line(s3_env):
    with pytest.raises(InputError) as err:
        Storage.parse("s3://no-such-bucket/results").check_writable()
    assert str(err.value).startswith("--storage-path s3://no-such-bucket/results: not writable:")
    assert "\n" not in str(err.value)


def test_cli_refuses_bad_storage_before_starting_anything(s3_env, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    for storage, expected in [("s3://no-such-bucket/r", "not writable"),
                              ("s3://KEY:hunter2secret@b/r", "credentials in the URI")]:
        out = subprocess.run([sys.executable, "-m", "service.sweep", "tdsm", "--smoke", "--storage-path", storage],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        assert expected in out.stderr and "Traceback" not in out.stderr and "hunter2secret" not in out.stderr
        assert "Ray" not in out.stderr           # refused before Ray started


def test_final_source_from_an_object(s3_env, tmp_path):
    sweep = Storage.parse(f"s3://{BUCKET}/{tmp_path.name}/sweep")
    (sweep / "best_config.yaml").write_text("method: tdsm\ntrain:\n  steps: 7\n")
    (sweep / STATE_FILE).write_text(json.dumps({"parent_run_id": "p1", "split": "s1"}))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tree, split, tags = load_source(str(sweep / "best_config.yaml"), uri)
    assert (tree["train"]["steps"], split, tags) == (7, "s1", None)
    assert source_sweep_run_id(str(sweep / "best_config.yaml"), uri) == "p1"
    assert config_file("0123abcd") is None                     # a run id: read from MLflow
    with pytest.raises(InputError, match="no such object"):
        load_source(str(sweep / "missing.yaml"), uri)
    (sweep / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(InputError) as err:
        load_source(str(sweep / "bad.yaml"), uri)
    assert str(err.value).startswith(str(sweep / "bad.yaml"))   # names the object, not a temporary copy


def test_chain_cache_syncs_missing_files_markers_last(s3_env, tmp_path, monkeypatch):
    remote = Storage.parse(f"s3://{BUCKET}/{tmp_path.name}/chain")
    local = tmp_path / "local"
    for rel in ["features-k/done.json", "features-k/train.npy", "prepared/prepare.json", "prepared/data.npy"]:
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_text(rel)
    (remote / "prepared" / "data.npy").write_text("already there")
    order: list[str] = []
    upload = Storage.upload
    monkeypatch.setattr(Storage, "upload", lambda self, p: (order.append(self.root), upload(self, p))[1])
    sync_up(local, remote)
    names = [o.rsplit("/chain/", 1)[1] for o in order]
    assert sorted(names) == ["features-k/done.json", "features-k/train.npy", "prepared/prepare.json"]   # only missing
    assert set(names[-2:]) == {"features-k/done.json", "prepared/prepare.json"}     # a stage's marker after its data
    assert (remote / "prepared" / "data.npy").read_text() == "already there"
    copy = local_copy(remote)                                 # another machine: the same path, the bucket's files
    assert copy == local_copy(remote) and (copy / "features-k" / "train.npy").read_text() == "features-k/train.npy"
    shutil.rmtree(copy)



def test_an_object_store_outage_is_waited_out_then_reported_in_one_line(monkeypatch, capsys):
    import threading

    import service.storage as storage

    server = S3Server().start()
    try:
        server.create_bucket()
        apply_env(server, monkeypatch)
        obj = Storage.parse(f"s3://{BUCKET}/outage/state.json")
        obj.write_text("before")
        server.stop()
        threading.Timer(8.0, server.start).start()               # back 8 s later, same port, same objects
        assert obj.read_text() == "before"                        # waited out
        assert "warning: object store unreachable" in capsys.readouterr().err
        server.stop()
        monkeypatch.setattr(storage, "_patience", [2.0])
        with pytest.raises(storage.ServiceUnavailable) as err:
            obj.write_text("after")
        assert str(err.value).startswith("object store unreachable for") and "\n" not in str(err.value)
        server.start()
        assert obj.read_text() == "before"                        # nothing half-written
    finally:
        server.stop()
