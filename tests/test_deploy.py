"""deploy/: manifests parse and agree with the project; a real PostgreSQL-backed `mlflow server` records a sweep.

The static tests read the files only (no cluster, no Docker). The slow test starts PostgreSQL and `mlflow server`
on loopback, runs a two-trial sweep against them (local Ray) and reads the runs back as a user would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
TEXT_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
GPU = "nvidia.com/gpu"


def pinned_ray_version() -> str:
    """The `ray[...]==X` pin of pyproject.toml."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d.replace(" ", "")))]
    assert len(pins) == 1, f"expected one exact ray pin in pyproject.toml, found {pins}"
    return pins[0]


def load_docs() -> list[tuple[Path, dict[str, Any]]]:
    """Every YAML document under deploy/, with its file."""
    return [(path, doc) for path in YAML_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in load_docs() if isinstance(doc, dict) and doc.get("kind") == kind]


def one(kind: str, name_prefix: str = "") -> dict[str, Any]:
    found = [o for o in k8s_objects(kind)
             if (o["metadata"].get("name") or o["metadata"].get("generateName", "")).startswith(name_prefix)]
    assert len(found) == 1, f"expected one {kind} named {name_prefix}*, found {len(found)}"
    return found[0]


def gpu_count(container: dict[str, Any]) -> float:
    return float(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def cpu_count(container: dict[str, Any]) -> float:
    value = str(container.get("resources", {}).get("limits", {}).get("cpu", 0))
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def entrypoint_args(job: dict[str, Any], module: str) -> list[str]:
    """The argv after `python -m MODULE` of a RayJob's entrypoint."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", module], f"entrypoint should start with `python -m {module}`: {argv[:3]}"
    return argv[3:]


def walk(obj: Any) -> Iterator[dict[str, Any]]:
    """Every mapping inside a parsed YAML document, depth first."""
    if isinstance(obj, dict):
        yield obj
        obj = list(obj.values())
    if isinstance(obj, list):
        for item in obj:
            yield from walk(item)


def ray_containers(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group, container) of the head and every worker group."""
    spec = cluster["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


# ----------------------------------------------------------------------------------------------
# Static checks
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_manifest_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"


def test_the_expected_files_exist():
    for rel in ["README.md", "docker/Dockerfile.cpu", "docker/Dockerfile.gpu", "kustomization.yaml",
                "kuberay/raycluster.yaml", "kuberay/rayjob-sweep.yaml", "kuberay/rayjob-final.yaml",
                "kuberay/config.yaml", "mlflow/mlflow.yaml", "mlflow/postgres.yaml", "mlflow/secret.yaml",
                "mlflow/docker-compose.yml", "ray-up.yaml"]:
        assert (DEPLOY / rel).is_file(), f"deploy/{rel} is missing"
    assert (ROOT / ".dockerignore").is_file()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


@pytest.mark.parametrize("name, suffix", [("Dockerfile.cpu", "-py311"), ("Dockerfile.gpu", "-py311-gpu")])
def test_dockerfiles_build_on_the_pinned_ray_image(name, suffix):
    text = (DEPLOY / "docker" / name).read_text().replace("\\\n", " ")  # join continued lines
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms == [f"rayproject/ray:{pinned_ray_version()}{suffix}"]
    assert re.search(r"pip install[^\n]*\"?\.\[deploy\]", text), f"{name} must install the project (.[deploy])"


def test_every_ray_image_and_version_in_deploy_is_the_pinned_one():
    version = pinned_ray_version()
    tags = [(p, t) for p in TEXT_FILES for t in re.findall(r"rayproject/ray:([\w.\-]+)", p.read_text())]
    assert tags, "no rayproject/ray image referenced under deploy/"
    wrong = [(str(p.relative_to(ROOT)), t) for p, t in tags if not (t == version or t.startswith(version + "-"))]
    assert not wrong, f"rayproject/ray tags not at the pyproject pin {version}: {wrong}"
    for cluster in k8s_objects("RayCluster"):
        assert str(cluster["spec"]["rayVersion"]) == version
    pins = [(p, v) for p in TEXT_FILES for v in re.findall(r"\bray\[[^\]]*\]==([\w.]+)", p.read_text())]
    assert all(v == version for _, v in pins), pins


def test_entrypoints_name_modules_that_exist():
    modules = {m for p in TEXT_FILES for m in re.findall(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)", p.read_text())}
    assert {"service.sweep", "service.final"} <= modules, modules
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"deploy/ runs modules that do not exist: {missing}"


def test_rayjobs_run_the_workflow_on_the_cluster():
    cluster = one("RayCluster")
    jobs = k8s_objects("RayJob")
    assert {shlex.split(j["spec"]["entrypoint"])[2] for j in jobs} == {"service.sweep", "service.final"}
    for job in jobs:
        assert job["apiVersion"] == "ray.io/v1"
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        assert "MLFLOW_TRACKING_URI" not in json.dumps(job), "jobs inherit the tracking URI from the ConfigMap"


def test_raycluster_autoscales_a_gpu_worker_group():
    cluster = one("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    groups = cluster["spec"]["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any(gpu_count(c) > 0 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group with GPUs"
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert g["maxReplicas"] >= 1


def test_sweep_trials_fit_one_gpu_worker_pod(monkeypatch):
    from service.splits import load_splits, splits_file
    from service.sweep import build_parser

    cluster = one("RayCluster")
    group = max(cluster["spec"]["workerGroupSpecs"], key=lambda g: gpu_count(g["template"]["spec"]["containers"][0]))
    pod = group["template"]["spec"]["containers"][0]
    pod_gpus, pod_cpus = gpu_count(pod), cpu_count(pod)
    args = build_parser().parse_args(entrypoint_args(one("RayJob", "skeldiff-sweep"), "service.sweep"))
    trial_gpus = args.gpus_per_worker * args.workers_per_trial
    assert 0 < trial_gpus <= pod_gpus, f"a trial needs {trial_gpus} GPUs; a worker pod has {pod_gpus}"
    assert args.cpus_per_worker * args.workers_per_trial <= pod_cpus
    assert args.max_concurrent, "without --max-concurrent a sweep on a cluster scaled to zero runs 1 trial at a time"
    assert args.max_concurrent * trial_gpus <= group["maxReplicas"] * pod_gpus, "more trials than GPUs at maxReplicas"
    if args.splits:
        monkeypatch.setenv("SKELDIFF_DATA", one("ConfigMap", "skeldiff-config")["data"]["SKELDIFF_DATA"])
        load_splits(splits_file(args.method, args.splits_file), args.splits)  # every named split exists


def test_final_job_fits_one_gpu_worker_pod():
    from service.final import build_parser

    cluster = one("RayCluster")
    pod_gpus = max(gpu_count(c) for g in cluster["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    job = one("RayJob", "skeldiff-final")
    args = build_parser().parse_args(entrypoint_args(job, "service.final"))
    assert args.source
    assert 0 < float(job["spec"].get("entrypointNumGpus", 0)) <= pod_gpus


def test_tracking_uri_is_defined_once_and_reaches_every_ray_pod():
    definitions = []
    for path, doc in load_docs():
        if doc.get("kind") == "ConfigMap" and "MLFLOW_TRACKING_URI" in (doc.get("data") or {}):
            definitions.append((path, doc["metadata"]["name"], doc["data"]["MLFLOW_TRACKING_URI"]))
        for node in walk(doc):
            if node.get("name") == "MLFLOW_TRACKING_URI":
                definitions.append((path, "env", node.get("value")))
        if "services" in doc:  # docker compose
            for svc in doc["services"].values():
                if "MLFLOW_TRACKING_URI" in (svc.get("environment") or {}):
                    definitions.append((path, "compose", svc["environment"]["MLFLOW_TRACKING_URI"]))
    assert len(definitions) == 1, f"MLFLOW_TRACKING_URI should be defined once in deploy/: {definitions}"
    _, config_map, uri = definitions[0]
    for group, container in ray_containers(one("RayCluster")):
        refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
        assert config_map in refs, f"Ray group {group} does not load ConfigMap {config_map}"
    # ... and it points at the MLflow Service, whose server accepts that Host header.
    url = urlparse(uri)
    service = one("Service", url.hostname)
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    server = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    allowed = {e["name"]: e.get("value") for e in server["env"]}["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert url.netloc in allowed


def test_db_password_comes_from_the_secret():
    secret = one("Secret", "mlflow-db")
    key = next(iter(secret["stringData"]))
    for kind, name in [("StatefulSet", "mlflow-postgres"), ("Deployment", "mlflow")]:
        env = one(kind, name)["spec"]["template"]["spec"]["containers"][0]["env"]
        refs = [e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e]
        assert {"name": secret["metadata"]["name"], "key": key} in refs, f"{kind} {name} does not read the secret"
    server = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(server["args"])
    assert "--serve-artifacts" in args and "--artifacts-destination" in args
    uri = {e["name"]: e.get("value") for e in server["env"]}["MLFLOW_BACKEND_STORE_URI"]
    assert uri.startswith("postgresql+psycopg://") and "$(" in uri, "the DB password must come from the env, not the file"


def test_kustomizations_list_existing_files_and_set_image_tags_once():
    top = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    images = {i["name"]: i for i in top["images"]}
    for kfile in DEPLOY.rglob("kustomization.yaml"):
        for res in yaml.safe_load(kfile.read_text()).get("resources", []):
            assert (kfile.parent / res).exists(), f"{kfile}: resource {res} does not exist"
    used = {node["image"] for _, doc in load_docs() if "apiVersion" in doc  # Kubernetes objects only
            for node in walk(doc) if isinstance(node.get("image"), str)}
    ours = {u for u in used if u.startswith("skeldiff")}
    assert ours and ours <= set(images), f"images {ours - set(images)} get no tag from deploy/kustomization.yaml"
    assert all(":" not in u for u in ours), "tags of the project images are set in deploy/kustomization.yaml only"
    assert len({i["newTag"].rsplit("-", 1)[0] for i in images.values()}) == 1, "cpu and gpu images of one version"


# ----------------------------------------------------------------------------------------------
# PostgreSQL + mlflow server + a real sweep
# ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path:
    """Newest /usr/lib/postgresql/<version>/bin holding `postgres` and `initdb` (Debian's layout)."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").is_file() and (p / "initdb").is_file()]
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


@pytest.fixture
def postgres_uri() -> Iterator[str]:
    """A throwaway PostgreSQL on 127.0.0.1 with database `mlflow` and a password: its SQLAlchemy URI."""
    psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install -e '.[deploy]'")
    bin_dir, ids = postgres_bin(), run_as()
    # Not tmp_path: pytest's base folder is private to the invoking user, and PostgreSQL runs as another one.
    base = Path(tempfile.mkdtemp(prefix="skeldiff-pg-"))
    password = "deploy-test-pw"
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
        yield f"postgresql+psycopg://mlflow:{password}@127.0.0.1:{port}/mlflow"
    finally:
        stop(proc, signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres_uri, tmp_path) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on 127.0.0.1 backed by PostgreSQL, artifacts proxied into tmp_path/art: (URL, art dir)."""
    port, art, log = free_port(), tmp_path / "art", tmp_path / "mlflow-server.log"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli) if mlflow_cli.is_file() else "mlflow", "server", "--backend-store-uri", postgres_uri,
           "--artifacts-destination", str(art), "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, 180, "mlflow server",
                   proc, log)
        yield url, art
    finally:
        stop(proc)


@pytest.mark.slow
def test_sweep_logs_to_a_postgres_backed_mlflow_server(mlflow_server, postgres_uri, tmp_path):
    import psycopg
    from mlflow.tracking import MlflowClient

    url, art = mlflow_server
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, "-m", "service.sweep", "tdsm", "--smoke", "--num-samples", "2",
           "--set", "train.steps=40", "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20",
           "--storage-path", str(tmp_path / "results"), "--tracking-uri", url, "--experiment-name", "deploy-test"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["tracking_uri"] == url
    sweep = summary["sweeps"][0]

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
    with psycopg.connect(postgres_uri.replace("+psycopg", "")) as conn:
        count = conn.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
        assert count.fetchone()[0] == len(children) + 1
