"""deploy/: object storage is the default and the manifests agree with the code on it.

The bucket URI (SKELDIFF_RESULTS), its credentials (Secret skeldiff-bucket, written by deploy/make-secrets.sh) and
MLflow's artifact destination: the env names the manifests set are the ones the service, pyarrow (Ray Tune/Train's
storage layer) and MLflow read; the head, the workers, their init containers and the VMs of ray-up.yaml get the same
storage environment; the default tree has no volume claim and the NFS component (deploy/kuberay/nfs/) adds one.
The static tests read files only (`kubectl kustomize` renders both variants when kubectl is installed). The bucket
tests, on moto's S3 server (stage_data.py, MLflow's proxied artifacts): tests/integration/test_deploy_storage_bucket.py.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from deploy_manifests import (
    BUCKET_SECRET,
    IMAGE_HOME,
    artifacts_destination,
    default_objects,
    env_file_keys,
    find,
    mlflow_server,
    read_yaml,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BUCKET_ENV = DEPLOY / "mlflow" / "bucket.env.example"
NODE_ENV = DEPLOY / "ray-node.env.example"
NFS = DEPLOY / "kuberay" / "nfs"
# Where the storage lives, for every Ray process (ConfigMap skeldiff-config, the VMs' env file).
STORAGE_VARS = ["SKELDIFF_RESULTS", "SKELDIFF_DATA_URI", "SKELDIFF_DATA", "SKELDIFF_CACHE", "HF_HOME"]


def ray_pods(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group, pod spec) of the head and every worker group."""
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


def secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{env var: secretKeyRef} of a container."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def env_names(container: dict[str, Any], config_maps: dict[str, dict[str, str]]) -> set[str]:
    """Every variable a container gets: its `env` and the keys of the ConfigMaps it loads."""
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        names |= set(config_maps[source["configMapRef"]["name"]])
    return names


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/replace/remove, enough for the component's patches (kustomize applies the real thing)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
        node = doc
        for p in parents:
            node = node[p]
        if op["op"] == "remove":
            del node[last]
        elif op["op"] in ("add", "replace"):
            assert op["op"] == "add" or (last in node if isinstance(node, dict) else last < len(node)), op
            node[last] = op["value"]
        else:
            raise AssertionError(f"unexpected patch op {op}")
    return doc


def nfs_objects() -> list[dict[str, Any]]:
    """default_objects() with the component kuberay/nfs/ applied (its resources added, its patches applied)."""
    component = yaml.safe_load((NFS / "kustomization.yaml").read_text())
    objects = default_objects() + [doc for res in component["resources"] for doc in read_yaml(NFS / res)]
    for patch in component["patches"]:
        target = patch["target"]
        hits = [i for i, o in enumerate(objects) if o["kind"] == target["kind"]
                and o["metadata"]["name"] == target["name"]]
        assert len(hits) == 1, f"patch target {target} matches {len(hits)} objects"
        objects[hits[0]] = json_patch(objects[hits[0]], yaml.safe_load(patch["patch"]))
    return objects


def shared_volume(pod: dict[str, Any], data: str) -> tuple[dict[str, Any], str]:
    """(volume, mount path) of the volume that holds DATA (SKELDIFF_DATA), mounted alike by every container."""
    mounts = [{(m["name"], m["mountPath"]) for m in c.get("volumeMounts", []) if data.startswith(m["mountPath"] + "/")}
              for c in pod["containers"] + pod.get("initContainers", [])]
    assert len(mounts[0]) == 1 and all(m == mounts[0] for m in mounts), f"{data} is not on one volume: {mounts}"
    ((name, path),) = mounts[0]
    return next(v for v in pod["volumes"] if v["name"] == name), path


# ----------------------------------------------------------------------------------------------
# The names: what the manifests set is what the code reads
# ----------------------------------------------------------------------------------------------

def test_storage_path_defaults_to_skeldiff_results_in_every_cli():
    """SKELDIFF_RESULTS (a URI in the ConfigMap) is the default --storage-path of sweep, final and encoder."""
    uri = "s3://skeldiff-deploy-check/results"
    probe = """
import argparse, json, sys
from service.sweep import build_parser as sweep
from service.final import build_parser as final
from service.encoder import build_parser as encoder

def default(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return next(d for p in action.choices.values() if (d := default(p)) is not None)
        if action.dest == "storage_path":
            value = action.default
            return str(action.type(value) if isinstance(value, str) and action.type else value)
    return None

print(json.dumps({name: default(build()) for name, build in
                  [("sweep", sweep), ("final", final), ("encoder", encoder)]}))
"""
    env = {**os.environ, "SKELDIFF_RESULTS": uri}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    defaults = json.loads(done.stdout.strip().splitlines()[-1])
    for cli, value in defaults.items():
        assert value is not None and "skeldiff-deploy-check/results" in value, f"service.{cli}: {value}"


@functools.cache
def arrow_library() -> bytes | None:
    """The bytes of pyarrow's Arrow C++ library (its S3 filesystem reads the AWS_* variables); None: not found."""
    import pyarrow

    libs = [p for d in pyarrow.get_library_dirs() for p in Path(d).glob("libarrow.*") if p.is_file()]
    return b"".join(lib.read_bytes() for lib in libs) or None


def pyarrow_reads(name: str) -> bool | None:
    """Whether pyarrow's Arrow library names the env var NAME; None: library not found."""
    lib = arrow_library()
    return None if lib is None else name.encode() in lib


def test_bucket_variables_are_the_ones_the_service_pyarrow_and_mlflow_read():
    import mlflow.environment_variables as mlflow_env

    from service.storage import STORAGE_ENDPOINT_VARS, STORAGE_SECRET_VARS

    objects = default_objects()
    cluster = find(objects, "RayCluster", "skeldiff")
    config = find(objects, "ConfigMap", "skeldiff-config")["data"]
    ray_names = set()
    for _, pod in ray_pods(cluster):
        for container in pod["containers"] + pod.get("initContainers", []):
            ray_names |= env_names(container, {"skeldiff-config": config})
    server_names = {e["name"] for e in mlflow_server(objects)["env"]}
    vm_names = set(env_file_keys(NODE_ENV))
    aws = {n for n in ray_names | server_names | vm_names | set(env_file_keys(BUCKET_ENV)) if n.startswith("AWS_")}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= aws, aws
    # The service treats them as credentials / endpoint (redacted, forwarded to the workers of a running cluster) ...
    assert aws <= set(STORAGE_SECRET_VARS) | set(STORAGE_ENDPOINT_VARS), aws - set(STORAGE_SECRET_VARS)
    # ... and pyarrow, which Ray Tune/Train resolve storage_path with, reads every one of them.
    if pyarrow_reads("AWS_ACCESS_KEY_ID") is not None:
        assert all(pyarrow_reads(n) for n in aws), [n for n in aws if not pyarrow_reads(n)]
    # MLflow: the tracking client's variables on the Ray side, the S3 endpoint on the server.
    for name in ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]:
        assert getattr(mlflow_env, name).name == name and name in ray_names and name in vm_names, name
    assert mlflow_env.MLFLOW_S3_ENDPOINT_URL.name in server_names
    # The service's own names, in the ConfigMap and the VMs' env file alike.
    assert set(STORAGE_VARS) <= set(config) and set(STORAGE_VARS) <= vm_names
    stage = (DEPLOY / "stage_data.py").read_text()
    assert '"SKELDIFF_DATA_URI"' in stage and '"SKELDIFF_DATA"' in stage


def test_results_live_in_a_bucket_without_credentials_in_the_uri():
    config = find(default_objects(), "ConfigMap", "skeldiff-config")["data"]
    for name in ["SKELDIFF_RESULTS", "SKELDIFF_DATA_URI"]:
        uri = urlparse(config[name])
        assert uri.scheme in ("s3", "gs") and uri.hostname, f"{name}={config[name]}: a bucket URI by default"
        assert "@" not in uri.netloc and not uri.query, f"{name}: credentials never go into the URI"
    assert urlparse(config["SKELDIFF_RESULTS"]).hostname == urlparse(config["SKELDIFF_DATA_URI"]).hostname
    text = (DEPLOY / "kuberay" / "config.yaml").read_text()
    assert not re.search(r"(?m)^\s*AWS_", text), "the bucket's credentials come from Secret skeldiff-bucket only"


# ----------------------------------------------------------------------------------------------
# Kubernetes: head, workers and MLflow get the bucket; the NFS component is the alternative
# ----------------------------------------------------------------------------------------------

def check_same_storage_env(objects: list[dict[str, Any]]) -> None:
    """Every Ray container of every group loads the one ConfigMap and the same bucket credentials."""
    cluster = find(objects, "RayCluster", "skeldiff")
    config = find(objects, "ConfigMap", "skeldiff-config")["data"]
    main, init = [], []
    for group, pod in ray_pods(cluster):
        for container in pod["containers"]:
            assert env_names(container, {"skeldiff-config": config}) >= set(STORAGE_VARS), group
            main.append(secret_refs(container))
        for container in pod.get("initContainers", []):
            init.append(secret_refs(container))
    assert len(main) >= 2 and all(refs == main[0] for refs in main), "head and workers differ in their Secrets"
    bucket = {n: r for n, r in main[0].items() if r["name"] == BUCKET_SECRET}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(bucket), main[0]
    assert all(refs == bucket for refs in init), "init containers get the bucket's credentials, nothing else"


def test_head_and_workers_get_the_same_storage_env_and_no_claim():
    objects = default_objects()
    check_same_storage_env(objects)
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"], "the default needs no volume claim"
    config = find(objects, "ConfigMap", "skeldiff-config")["data"]
    for group, pod in ray_pods(find(objects, "RayCluster", "skeldiff")):
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v], group
        volume, mount = shared_volume(pod, config["SKELDIFF_DATA"])
        assert "emptyDir" in volume, f"{group}: /mnt/skeldiff is per-pod scratch"
        for name in ["SKELDIFF_DATA", "SKELDIFF_CACHE", "HF_HOME"]:
            assert config[name].startswith(mount + "/"), f"{name} is on the scratch volume of {group}"
        # The init container copies SKELDIFF_DATA_URI into SKELDIFF_DATA with deploy/stage_data.py of the image.
        (stage,) = [c for c in pod.get("initContainers", []) if "stage_data.py" in " ".join(c.get("command", []))]
        script = stage["command"][-1]
        assert script.startswith(IMAGE_HOME + "/") and (ROOT / script[len(IMAGE_HOME) + 1:]).is_file(), script
        assert stage["image"] == pod["containers"][0]["image"], f"{group}: stage-data runs the pod's own image"
    for docker in ["Dockerfile.cpu", "Dockerfile.gpu"]:
        text = (DEPLOY / "docker" / docker).read_text()
        assert f"WORKDIR {IMAGE_HOME}" in text and re.search(r"(?m)^COPY\b.*\s\.\s+\.$", text), docker


def test_nfs_component_adds_the_claim_and_points_results_at_it():
    top = (DEPLOY / "kustomization.yaml").read_text()
    assert "components" not in yaml.safe_load(top), "object storage is the default: the component stays off"
    assert re.search(r"(?m)^#\s*components:\s*\n#\s*-\s*kuberay/nfs\b", top), "the commented switch names the dir"
    component = yaml.safe_load((NFS / "kustomization.yaml").read_text())
    assert component["kind"] == "Component" and component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    objects = nfs_objects()
    (claim,) = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    config = find(objects, "ConfigMap", "skeldiff-config")["data"]
    assert not config["SKELDIFF_DATA_URI"], "the data lives on the volume: nothing to copy"
    for group, pod in ray_pods(find(objects, "RayCluster", "skeldiff")):
        volume, mount = shared_volume(pod, config["SKELDIFF_DATA"])
        assert volume.get("persistentVolumeClaim") == {"claimName": claim["metadata"]["name"]}, group
        assert not pod.get("initContainers"), f"{group}: no stage-data on NFS"
        for name in ["SKELDIFF_RESULTS", "SKELDIFF_DATA", "SKELDIFF_CACHE", "HF_HOME"]:
            assert config[name].startswith(mount + "/"), f"{name}={config[name]} is not on the claim ({group})"
    check_same_storage_env(objects)
    # MLflow keeps the bucket either way.
    assert mlflow_server(objects) == mlflow_server(default_objects())


def test_mlflow_server_proxies_artifacts_into_the_bucket():
    objects = default_objects()
    server = mlflow_server(objects)
    destination = urlparse(artifacts_destination(server))
    results = urlparse(find(objects, "ConfigMap", "skeldiff-config")["data"]["SKELDIFF_RESULTS"])
    assert destination.scheme == "s3" and destination.hostname == results.hostname, "one bucket for both"
    assert destination.path.strip("/") and destination.path != results.path, "a prefix of its own"
    refs = secret_refs(server)
    assert refs["AWS_ACCESS_KEY_ID"] == {"name": BUCKET_SECRET, "key": "AWS_ACCESS_KEY_ID"}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": BUCKET_SECRET, "key": "AWS_SECRET_ACCESS_KEY"}
    # MLflow's S3 client takes its endpoint from MLFLOW_S3_ENDPOINT_URL: the Secret's AWS_ENDPOINT_URL, when set.
    assert refs["MLFLOW_S3_ENDPOINT_URL"] == {"name": BUCKET_SECRET, "key": "AWS_ENDPOINT_URL", "optional": True}
    pod = find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v], "no artifact volume"
    # The Ray pods need no MLflow artifact store settings: their artifacts go through the server.
    for _, ray_pod in ray_pods(find(objects, "RayCluster", "skeldiff")):
        assert "MLFLOW_S3_ENDPOINT_URL" not in json.dumps(ray_pod)
    # boto3 is the S3 client of `mlflow server`: in the image the Deployment runs, pinned like the rest.
    assert server["image"] == "skeldiff-cpu"
    pins = re.findall(r'"boto3==([\w.]+)"', (DEPLOY / "docker" / "Dockerfile.cpu").read_text())
    assert len(pins) == 1, "Dockerfile.cpu installs one pinned boto3"
    extras = (ROOT / "pyproject.toml").read_text()
    assert set(re.findall(r'"boto3==([\w.]+)"', extras)) <= set(pins), "the image and pyproject pin one boto3"


def test_bucket_secret_keys_come_from_make_secrets(tmp_path):
    """Every key a pod reads from Secret skeldiff-bucket is one make-secrets.sh writes from its environment; the
    optional ones (endpoint, region) are left out when unset, the file is private and never overwritten."""
    bucket_refs = [ref for o in default_objects() + nfs_objects() for spec in _pod_specs(o)
                   for c in spec["containers"] + spec.get("initContainers", [])
                   for ref in secret_refs(c).values() if ref["name"] == BUCKET_SECRET]
    assert bucket_refs, "no pod reads the bucket's Secret"
    required = {r["key"] for r in bucket_refs if not r.get("optional")}
    optional = {r["key"] for r in bucket_refs if r.get("optional")}
    assert required == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} and optional & required == set()
    assert required | optional == set(env_file_keys(BUCKET_ENV, commented=False)), "bucket.env.example's keys"
    script = DEPLOY / "make-secrets.sh"
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    key_id, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)  # '+', '/', '-' survive
    values = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
              "AWS_ENDPOINT_URL": "http://minio.minio:9000", "AWS_DEFAULT_REGION": "us-east-1"}
    assert set(values) == required | optional
    subprocess.run(["sh", str(script), str(tmp_path)], env={**base, **values}, check=True, capture_output=True)
    written = tmp_path / "bucket.env"
    assert env_file_keys(written, commented=False) == values
    assert written.stat().st_mode & 0o077 == 0, "bucket.env readable by others"
    subprocess.run(["sh", str(script), str(tmp_path)], env={**base, "AWS_ACCESS_KEY_ID": "other",
                                                             "AWS_SECRET_ACCESS_KEY": "other"},
                   check=True, capture_output=True)
    assert env_file_keys(written, commented=False) == values, "an existing bucket.env changed"
    # AWS itself: no endpoint, no region -> those keys are absent (an empty endpoint is not "none").
    aws = tmp_path / "aws"
    aws.mkdir()
    subprocess.run(["sh", str(script), str(aws)], env={**base, **{k: values[k] for k in required}},
                   check=True, capture_output=True)
    assert env_file_keys(aws / "bucket.env", commented=False) == {k: values[k] for k in required}


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs of a Deployment, StatefulSet or RayCluster."""
    if obj["kind"] == "RayCluster":
        return [pod for _, pod in ray_pods(obj)]
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return [obj["spec"]["template"]["spec"]]
    return []


def test_kustomize_renders_the_bucket_default_and_the_nfs_variant(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (its `kubectl kustomize` renders deploy/ offline)")
    tree = tmp_path / "deploy"
    shutil.copytree(DEPLOY, tree, ignore=shutil.ignore_patterns("*.env"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
           "AWS_ACCESS_KEY_ID": "AKIATESTKEY", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
           "AWS_ENDPOINT_URL": "http://minio.minio:9000"}
    subprocess.run(["sh", str(tree / "make-secrets.sh")], env=env, check=True, capture_output=True)

    def render() -> list[dict[str, Any]]:
        done = subprocess.run([kubectl, "kustomize", str(tree)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return [d for d in yaml.safe_load_all(done.stdout) if d]

    default = render()
    kustomization = tree / "kustomization.yaml"
    kustomization.write_text(re.sub(r"(?m)^#\s*(components:)\s*\n#\s*(-\s*kuberay/nfs\b)", r"\1\n  \2",
                                    kustomization.read_text()))
    nfs = render()
    assert not [o for o in default if o["kind"] == "PersistentVolumeClaim"]
    assert [o["metadata"]["name"] for o in nfs if o["kind"] == "PersistentVolumeClaim"] == ["skeldiff-shared"]
    bucket = find(default, "Secret", BUCKET_SECRET)
    assert set(bucket["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
    for objects in (default, nfs):
        check_same_storage_env(objects)
        for o in objects:
            for spec in _pod_specs(o):
                for c in spec["containers"] + spec.get("initContainers", []):
                    assert c["securityContext"]["allowPrivilegeEscalation"] is False, (o["kind"], c["name"])
    # The static reading of the component (nfs_objects, what the other tests check) agrees with kustomize's.
    for (_, rendered), (_, static) in zip(ray_pods(find(nfs, "RayCluster", "skeldiff")),
                                          ray_pods(find(nfs_objects(), "RayCluster", "skeldiff"))):
        assert rendered["volumes"] == static["volumes"] and "initContainers" not in rendered
    assert find(nfs, "ConfigMap", "skeldiff-config")["data"] == find(nfs_objects(), "ConfigMap",
                                                                       "skeldiff-config")["data"]


# ----------------------------------------------------------------------------------------------
# VMs: ray-up.yaml gives every node the same environment
# ----------------------------------------------------------------------------------------------

def sources_env_file(command: str, env_file: str) -> bool:
    """Whether COMMAND exports ENV_FILE (`set -a && . FILE && set +a`) before what follows."""
    return re.search(rf"set -a\s*(?:&&|;)\s*\.\s+{re.escape(env_file)}\s*(?:&&|;)\s*set \+a\s*(?:&&|;)", command) \
        is not None


def test_ray_up_exports_one_env_file_on_head_and_workers():
    cfg = yaml.safe_load((DEPLOY / "ray-up.yaml").read_text())
    env_file = next(remote for remote, local in cfg["file_mounts"].items() if remote.endswith(".env"))
    assert not (ROOT / Path(cfg["file_mounts"][env_file]).expanduser()).is_relative_to(ROOT), \
        "the node env file (secrets) stays outside the checkout that file_mounts copies"
    checkout = next(remote for remote, local in cfg["file_mounts"].items() if local == ".")
    for role in ("head", "worker"):
        start = cfg[f"{role}_start_ray_commands"]
        (ray_start,) = [c for c in start if "ray start" in c]
        assert sources_env_file(ray_start, env_file), f"{role}: `ray start` without {env_file}"
        assert ray_start.index(env_file) < ray_start.index("ray start")
        setup = cfg[f"{role}_setup_commands"]
        stage = [c for c in setup if "stage_data.py" in c]
        assert len(stage) == 1 and sources_env_file(stage[0], env_file), f"{role}: stage_data.py with the env file"
        assert f"{checkout}/deploy/stage_data.py" in stage[0]
        assert setup.index(stage[0]) == len(setup) - 1, f"{role}: data is copied after the install"
    # The file holds what a Ray pod gets on Kubernetes: the ConfigMap's names and the Secrets' variables.
    objects = default_objects()
    config = find(objects, "ConfigMap", "skeldiff-config")["data"]
    head = find(objects, "RayCluster", "skeldiff")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    pod_names = env_names(head, {"skeldiff-config": config})
    keys = env_file_keys(NODE_ENV)
    # On AWS VMs a MinIO endpoint is named for S3 only (AWS_ENDPOINT_URL_S3): the head's autoscaler calls EC2.
    file_names = {"AWS_ENDPOINT_URL" if k == "AWS_ENDPOINT_URL_S3" else k for k in keys}
    assert pod_names == file_names, f"only on k8s: {pod_names - file_names}; only on VMs: {file_names - pod_names}"
    for name in STORAGE_VARS:
        assert keys[name] == config[name], f"{name}: the VMs and the pods use the same storage"
    set_now = env_file_keys(NODE_ENV, commented=False)
    for name in ["MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL_S3"]:
        assert name in keys and name not in set_now, f"{name}: `# {name}=` until filled (empty is not unset)"
    run_options = " ".join(cfg["docker"]["run_options"])
    mount = re.search(r"-v\s+(\S+):(\S+)", run_options).group(2)
    assert all(config[n].startswith(mount + "/") for n in ["SKELDIFF_DATA", "SKELDIFF_CACHE", "HF_HOME"])


# ----------------------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------------------

def test_readme_puts_the_bucket_first_and_names_every_variable():
    text = (DEPLOY / "README.md").read_text()
    assert text.index("**The bucket (default).**") < text.index("**NFS/RWX (the alternative).**")
    objects = default_objects()
    config = find(objects, "ConfigMap", "skeldiff-config")["data"]
    head = find(objects, "RayCluster", "skeldiff")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    names = env_names(head, {"skeldiff-config": config}) - set(config) | set(STORAGE_VARS)
    names |= {e["name"] for e in mlflow_server(objects)["env"] if e["name"].startswith(("AWS_", "MLFLOW_S3"))}
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"deploy/README.md does not name {missing}"
    assert "sh deploy/make-secrets.sh" in text and "kuberay/nfs" in text
