"""Reading deploy/ as `kubectl apply -k deploy/` would (committed files, generated Secrets aside): shared by the
static checks (tests/component/test_deploy_storage.py) and the bucket tests that run what the manifests configure
(tests/integration/test_deploy_storage_bucket.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
BUCKET_SECRET = "skeldiff-bucket"
IMAGE_HOME = "/home/ray/skeldiff"   # WORKDIR of deploy/docker/Dockerfile.*: the checkout inside the images


def read_yaml(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize_files(directory: Path) -> list[Path]:
    """The manifest files a kustomization pulls in through `resources` (directories recursively; no components)."""
    found = []
    for res in yaml.safe_load((directory / "kustomization.yaml").read_text()).get("resources", []):
        path = directory / res
        found += kustomize_files(path) if path.is_dir() else [path]
    return found


def default_objects() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/` creates from committed files (the generated Secrets aside)."""
    return [doc for path in kustomize_files(DEPLOY) for doc in read_yaml(path)]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def env_file_keys(path: Path, commented: bool = True) -> dict[str, str]:
    """{NAME: value} of an env file; with `commented`, also the `# NAME=` lines a user is meant to fill in."""
    pattern = r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$" if commented else r"^()([A-Z][A-Z0-9_]*)=(.*)$"
    return {m.group(2): m.group(3) for m in re.finditer(pattern, path.read_text(), flags=re.M)}


def mlflow_server(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def artifacts_destination(server: dict[str, Any]) -> str:
    args = server["args"]
    found = [a.split("=", 1)[1] for a in args if a.startswith("--artifacts-destination=")]
    found += [args[i + 1] for i, a in enumerate(args) if a == "--artifacts-destination"]
    assert len(found) == 1 and "--serve-artifacts" in args, f"proxied artifacts with one destination: {args}"
    return found[0]
