"""deploy/: manifests parse, agree with the project and are locked down.

The static tests read the files only (no cluster, no Docker; `kubectl kustomize` renders the tree when kubectl is
installed; deploy/make-secrets.sh runs into tmp_path). The same settings on a real PostgreSQL-backed `mlflow server`
with basic auth that records a sweep: tests/integration/test_deploy_server.py.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
TEXT_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
GPU = "nvidia.com/gpu"
# The secret files deploy/make-secrets.sh writes: git-ignored, each with a committed `.example`. SECRET_FILES hold
# random values; BUCKET_FILE the object store's credentials, copied from the script's environment.
SECRET_FILES = ["mlflow/.env", "mlflow/db.env", "mlflow/auth.env"]
BUCKET_FILE = "mlflow/bucket.env"
ENV_FILES = [*SECRET_FILES, BUCKET_FILE]
RAY_UID, RAY_GID, POSTGRES_UID = 1000, 100, 999  # `ray` of rayproject/ray, `postgres` of the postgres image


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
                "kuberay/config.yaml", "mlflow/mlflow.yaml", "mlflow/postgres.yaml", "mlflow/networkpolicy.yaml",
                "mlflow/basic_auth.ini", "mlflow/docker-compose.yml", "make-secrets.sh", "ray-up.yaml",
                *[f"{rel}.example" for rel in ENV_FILES]]:
        assert (DEPLOY / rel).is_file(), f"deploy/{rel} is missing"
    assert (ROOT / ".dockerignore").is_file()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert ".venv" in ignored and ".git" in ignored
    # The build context is the repository root: the secret files must never reach an image.
    for rel in ENV_FILES:
        assert any(fnmatch.fnmatch(f"deploy/{rel}", pat) for pat in ignored), f"deploy/{rel} not in .dockerignore"


@pytest.mark.parametrize("name, suffix", [("Dockerfile.cpu", "-py311"), ("Dockerfile.gpu", "-py311-gpu")])
def test_dockerfiles_build_on_the_pinned_ray_image(name, suffix):
    text = (DEPLOY / "docker" / name).read_text().replace("\\\n", " ")  # join continued lines
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms == [f"rayproject/ray:{pinned_ray_version()}{suffix}"]
    assert re.search(r"pip install[^\n]*\"?\.\[deploy\]", text), f"{name} must install the project (.[deploy])"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] in ("ray", str(RAY_UID)), f"{name} must end as the unprivileged `ray`: USER {users}"


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
        assert "MLFLOW_TRACKING_PASSWORD" not in json.dumps(job), "jobs inherit the credentials from the pods"
        # HTTPMode: the operator submits through the dashboard, so no submitter pod escapes the pod-security checks.
        assert job["spec"]["submissionMode"] == "HTTPMode"


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
    from service.data.splits import load_splits, splits_file
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
    pod_gpus = max(gpu_count(c) for g in cluster["spec"]["workerGroupSpecs"]
                   for c in g["template"]["spec"]["containers"])
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


def secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """{env var: (secret, key)} of a container's `valueFrom.secretKeyRef` entries."""
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_db_password_comes_from_the_secret():
    postgres = one("StatefulSet", "mlflow-postgres")["spec"]["template"]["spec"]["containers"][0]
    server = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert secret_refs(postgres)["POSTGRES_PASSWORD"] == ("mlflow-db", "password")
    assert secret_refs(server)["PGPASSWORD"] == ("mlflow-db", "password"), "libpq reads PGPASSWORD"
    args = " ".join(server["args"])
    assert "--serve-artifacts" in args and "--artifacts-destination" in args
    uri = env_values(server)["MLFLOW_BACKEND_STORE_URI"]
    assert uri.startswith("postgresql+psycopg://") and not urlparse(uri).password, "no password in the URI"


def test_mlflow_server_asks_for_basic_auth_with_credentials_from_a_secret():
    pod = one("Deployment", "mlflow")["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert "--app-name=basic-auth" in server["args"]
    refs, values = secret_refs(server), env_values(server)
    assert refs["MLFLOW_AUTH_ADMIN_USERNAME"] == ("mlflow-auth", "username")
    assert refs["MLFLOW_AUTH_ADMIN_PASSWORD"] == ("mlflow-auth", "password")
    assert refs["MLFLOW_FLASK_SERVER_SECRET_KEY"] == ("mlflow-auth", "flask-secret-key"), "CSRF key of all workers"
    # basic_auth.ini reaches the container as the generated ConfigMap, where MLFLOW_AUTH_CONFIG_PATH points.
    config_path = Path(values["MLFLOW_AUTH_CONFIG_PATH"])
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    kustomization = yaml.safe_load((DEPLOY / "mlflow" / "kustomization.yaml").read_text())
    generated = {g["name"]: g for g in kustomization["configMapGenerator"]}
    assert generated[volume["configMap"]["name"]]["files"] == [config_path.name]
    ini = (DEPLOY / "mlflow" / config_path.name).read_text()
    auth_db = re.search(r"^database_uri\s*=\s*(\S+)", ini, flags=re.M).group(1)
    assert auth_db == values["MLFLOW_BACKEND_STORE_URI"], "users live in the tracking database"
    assert not re.search(r"^\s*admin_password", ini, flags=re.M), "the admin password comes from the Secret"


def test_ray_pods_get_mlflow_credentials_from_the_secret_not_the_uri():
    uri = one("ConfigMap", "skeldiff-config")["data"]["MLFLOW_TRACKING_URI"]
    assert "@" not in urlparse(uri).netloc, "credentials never go into the tracking URI"
    for group, container in ray_containers(one("RayCluster")):
        refs = secret_refs(container)
        assert refs.get("MLFLOW_TRACKING_USERNAME") == ("mlflow-auth", "username"), group
        assert refs.get("MLFLOW_TRACKING_PASSWORD") == ("mlflow-auth", "password"), group


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(owner, pod spec) of every pod template under deploy/: Deployments, StatefulSets, Ray groups, Jobs."""
    found = []
    for path, doc in load_docs():
        if "apiVersion" not in doc:
            continue  # docker compose
        for node in walk(doc):
            if isinstance(node.get("containers"), list):
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata'].get('name')}", node))
    return found


def test_every_pod_meets_the_restricted_pod_security_standard():
    pods = pod_specs()
    assert len(pods) >= 4, pods  # PostgreSQL, MLflow, Ray head, GPU workers
    allowed_volumes = {"name", "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
    for owner, pod in pods:
        ctx = pod.get("securityContext", {})
        assert ctx.get("runAsNonRoot") is True, f"{owner}: runAsNonRoot"
        assert ctx.get("runAsUser", 0) > 0 and ctx.get("runAsGroup", 0) > 0, f"{owner}: numeric non-root ids"
        assert ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, f"{owner}: seccomp RuntimeDefault"
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), owner
        for volume in pod.get("volumes", []):
            assert set(volume) <= allowed_volumes, f"{owner}: volume {volume['name']} of a restricted type"
        for container in pod["containers"] + pod.get("initContainers", []):
            c = container.get("securityContext", {})
            assert c.get("allowPrivilegeEscalation") is False, f"{owner}/{container['name']}: allowPrivilegeEscalation"
            assert c.get("capabilities", {}).get("drop") == ["ALL"], f"{owner}/{container['name']}: drop ALL"
            assert not c.get("capabilities", {}).get("add") and not c.get("privileged"), owner
            assert c.get("runAsUser", 1) != 0 and c.get("runAsNonRoot", True) is True, owner
    ids = {owner.split(":")[1]: (pod["securityContext"]["runAsUser"], pod["securityContext"].get("fsGroup"))
           for owner, pod in pods}
    assert ids["StatefulSet/mlflow-postgres"] == (POSTGRES_UID, POSTGRES_UID)
    assert ids["Deployment/mlflow"] == (RAY_UID, RAY_GID)
    assert ids["RayCluster/skeldiff"] == (RAY_UID, RAY_GID)
    for _, pod in [(o, p) for o, p in pods if "RayCluster" in o]:
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (RAY_UID, RAY_GID)
    # The autoscaler sidecar is KubeRay's, not ours: its container settings go through autoscalerOptions.
    autoscaler = one("RayCluster")["spec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["allowPrivilegeEscalation"] is False and autoscaler["capabilities"]["drop"] == ["ALL"]
    assert autoscaler["runAsNonRoot"] is True and autoscaler["seccompProfile"] == {"type": "RuntimeDefault"}


def pod_labels(kind: str, name: str) -> dict[str, str]:
    return one(kind, name)["spec"]["template"]["metadata"]["labels"]


def ingress_sources(policy_for: dict[str, str]) -> list[tuple[dict[str, str], list[int]]]:
    """(pod labels, ports) allowed in by the NetworkPolicies selecting pods with these labels."""
    policies = [p for p in k8s_objects("NetworkPolicy")
                if p["spec"]["podSelector"]["matchLabels"].items() <= policy_for.items()]
    assert policies, f"no NetworkPolicy selects pods {policy_for}"
    sources = []
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits every pod"
            ports = [p["port"] for p in rule.get("ports", [])]
            assert ports, f"{policy['metadata']['name']}: a rule without ports admits every port"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{policy['metadata']['name']}: only pods of this namespace"
                sources.append((peer["podSelector"]["matchLabels"], ports))
    return sources


def test_network_policies_admit_only_the_clients():
    postgres = ingress_sources(pod_labels("StatefulSet", "mlflow-postgres"))
    assert postgres == [(pod_labels("Deployment", "mlflow"), [5432])], "PostgreSQL: the MLflow server only"
    mlflow = ingress_sources(pod_labels("Deployment", "mlflow"))
    cluster = one("RayCluster")["metadata"]["name"]
    assert mlflow == [({"ray.io/cluster": cluster}, [5000])], "MLflow: the pods of the RayCluster only"


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "mlflow" / "docker-compose.yml").read_text())


def test_compose_publishes_on_loopback_only_and_drops_privileges():
    services = compose()["services"]
    assert "ports" not in services["postgres"], "PostgreSQL is reached on the compose network only"
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"], name
        assert not str(svc["user"]).startswith("0"), name
    server = services["mlflow"]
    assert "--app-name=basic-auth" in server["command"]
    assert not urlparse(server["environment"]["MLFLOW_BACKEND_STORE_URI"]).password
    assert "./basic_auth.ini:" + server["environment"]["MLFLOW_AUTH_CONFIG_PATH"] + ":ro" in server["volumes"]


def git_ignored(rel: str) -> bool:
    """Whether git ignores deploy/REL (deploy/.gitignore)."""
    done = subprocess.run(["git", "check-ignore", "-q", f"deploy/{rel}"], cwd=ROOT)
    if done.returncode == 128:  # not a git checkout: read deploy/.gitignore
        return rel in (DEPLOY / ".gitignore").read_text().split()
    return done.returncode == 0


def env_keys(text: str) -> list[str]:
    return [line.split("=", 1)[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_secrets_are_generated_from_git_ignored_files():
    assert not k8s_objects("Secret"), "no Secret is committed: kustomize generates them"
    kustomization = yaml.safe_load((DEPLOY / "mlflow" / "kustomization.yaml").read_text())
    generated = {g["name"]: g for g in kustomization["secretGenerator"]}
    assert set(generated) == {"mlflow-db", "mlflow-auth", "skeldiff-bucket"}
    for name, gen in generated.items():
        assert set(gen) <= {"name", "envs", "options"}, f"{name}: values come from the env files only"
        # RayCluster is a custom resource: kustomize would not rename its references to a hashed name.
        assert gen["options"]["disableNameSuffixHash"] is True
        (env,) = gen["envs"]
        assert git_ignored(f"mlflow/{env}"), f"deploy/mlflow/{env} must be git-ignored"
        assert f"mlflow/{env}" in ENV_FILES
    for rel in ENV_FILES:
        assert git_ignored(rel) and not git_ignored(f"{rel}.example"), rel
    # Every key a manifest reads from a Secret is one the generator's file provides.
    keys = {name: env_keys((DEPLOY / "mlflow" / f"{gen['envs'][0]}.example").read_text())
            for name, gen in generated.items()}
    for owner, pod in pod_specs():
        for container in pod["containers"]:
            for var, (secret, key) in secret_refs(container).items():
                assert key in keys.get(secret, []), f"{owner}: {var} reads {secret}/{key}, which nothing generates"


def test_make_secrets_writes_random_private_files_and_never_overwrites(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no bucket: bucket.env is skipped
    run = lambda: subprocess.run(["sh", str(DEPLOY / "make-secrets.sh"), str(tmp_path)],  # noqa: E731
                                 capture_output=True, text=True, check=True, env=env)
    assert "AWS_ACCESS_KEY_ID" in run().stderr and not (tmp_path / Path(BUCKET_FILE).name).exists()
    first = {rel: (tmp_path / Path(rel).name).read_text() for rel in SECRET_FILES}
    for rel, text in first.items():
        path = tmp_path / Path(rel).name
        assert path.stat().st_mode & 0o077 == 0, f"{rel} readable by others"
        example = (DEPLOY / f"{rel}.example").read_text()
        assert env_keys(text) == env_keys(example), f"{rel}: keys differ from {rel}.example"
        for line in text.splitlines():
            key, value = line.split("=", 1)
            if re.search(r"(?i)password|secret", key):
                assert re.fullmatch(r"[0-9a-f]{48,}", value), f"{rel}: {key} is not >= 24 random bytes (hex)"
    db = dict(line.split("=", 1) for line in first["mlflow/db.env"].splitlines())["password"]
    assert f"SKELDIFF_DB_PASSWORD={db}" in first["mlflow/.env"]
    assert "password=" + db not in first["mlflow/auth.env"], "the MLflow admin has a password of its own"
    run()
    assert {rel: (tmp_path / Path(rel).name).read_text() for rel in SECRET_FILES} == first, "an existing file changed"
    again = tmp_path / "again"
    again.mkdir()
    subprocess.run(["sh", str(DEPLOY / "make-secrets.sh"), str(again)], capture_output=True, check=True, env=env)
    assert (again / "db.env").read_text() != first["mlflow/db.env"], "not random"


# A secret-looking key given a value in place (not empty, not `$VAR`/`${VAR}`/`$(VAR)`, not a YAML mapping).
PASSWORD_ASSIGNMENT = re.compile(
    r"(?i)\b([\w.-]*(?:password|passwd|secret[\w-]*key|token)[\w.-]*)[\"']?[ \t]*[:=][ \t]*[\"']?([^\s\"'`,]*)")
URI_USERINFO = re.compile(r"://[^/\s:@]+:([^@\s/]+)@")
SQL_PASSWORD = re.compile(r"(?i)\bPASSWORD\s+'([^']*)'")


def password_literals(text: str) -> list[str]:
    """Passwords written out in TEXT (assignments, URI userinfo, SQL)."""
    found = [f"{m.group(1)}={m.group(2)}" for m in PASSWORD_ASSIGNMENT.finditer(text)
             if m.group(2) and not m.group(2).startswith(("$", "{", "["))]
    found += [m.group(0) for m in URI_USERINFO.finditer(text) if not m.group(1).startswith("$")]
    found += [m.group(0) for m in SQL_PASSWORD.finditer(text) if not m.group(1).startswith("$")]
    return found


def committed_deploy_files() -> list[Path]:
    """Files under deploy/ that git would commit (tracked or not ignored)."""
    done = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "deploy"],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:  # not a git checkout
        return [p for p in TEXT_FILES if not git_ignored(str(p.relative_to(DEPLOY)))]
    return [ROOT / line for line in done.stdout.splitlines() if (ROOT / line).is_file()]


def test_no_password_is_committed_under_deploy():
    # The detector itself: it finds what it must and passes references and empty placeholders.
    for bad in ["password: hunter2", "POSTGRES_PASSWORD=abc", "stringData:\n  password: change-me",
                "postgresql://mlflow:pw@db/mlflow", "CREATE ROLE m LOGIN PASSWORD 'x'", "admin_password = x1",
                "MLFLOW_FLASK_SERVER_SECRET_KEY: k", '"password": "p"']:
        assert password_literals(bad), bad
    for ok in ["password=", "PGPASSWORD: ${SKELDIFF_DB_PASSWORD:?set it}", "password=$db", "key: password",
               "secretKeyRef: {name: mlflow-db, key: password}", "value: $(DB_PASSWORD)", "- name: PGPASSWORD",
               "postgresql+psycopg://mlflow@postgres:5432/mlflow", "PASSWORD '$PGPASSWORD'"]:
        assert not password_literals(ok), ok
    files = committed_deploy_files()
    assert DEPLOY / "mlflow" / "mlflow.yaml" in files and DEPLOY / "README.md" in files
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := password_literals(p.read_text()))}
    assert not found, f"password-like literals under deploy/: {found}"


def test_kustomize_renders_the_tree_with_generated_secrets(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (its `kubectl kustomize` renders deploy/ offline)")
    tree = tmp_path / "deploy"
    shutil.copytree(DEPLOY, tree, ignore=shutil.ignore_patterns(*[Path(r).name for r in ENV_FILES]))
    missing = subprocess.run([kubectl, "kustomize", str(tree)], capture_output=True, text=True)
    assert missing.returncode != 0 and "db.env" in missing.stderr, "the build must need the secret files"
    # A bucket key without endpoint or region (AWS itself): the optional keys stay out of Secret skeldiff-bucket.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
           "AWS_ACCESS_KEY_ID": "AKIATESTKEY", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}
    subprocess.run(["sh", str(tree / "make-secrets.sh")], capture_output=True, check=True, env=env)
    done = subprocess.run([kubectl, "kustomize", str(tree)], capture_output=True, text=True, check=True)
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert {o["metadata"]["namespace"] for o in objects if o["kind"] != "Namespace"} == {"skeldiff"}
    rendered_secrets = {o["metadata"]["name"]: set(o["data"]) for o in objects if o["kind"] == "Secret"}
    config_maps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    refs = 0
    for o in objects:
        for node in walk(o):
            if isinstance(node.get("secretKeyRef"), dict):
                ref = node["secretKeyRef"]
                assert ref["name"] in rendered_secrets, f"{o['kind']}: Secret {ref['name']} not rendered"
                assert ref.get("optional") or ref["key"] in rendered_secrets[ref["name"]], f"{o['kind']}: {ref}"
                refs += 1
            if isinstance(node.get("configMap"), dict):
                assert node["configMap"]["name"] in config_maps, node
    # PostgreSQL 1, MLflow 4 + 4 (bucket), 2 Ray groups x (2 MLflow + 4 bucket + 4 bucket in stage-data)
    assert refs >= 29, refs


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
