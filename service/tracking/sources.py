"""Where a final run's config comes from (`service.final --from`): a sweep's best_config.yaml or an MLflow run, and
the sweep parent run it leads back to."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from service.storage import Storage, is_uri
from trainers.config import load_yaml
from trainers.errors import InputError

STATE_FILE = "skeldiff_sweep.json"


def config_file(source: str) -> Storage | None:
    """--from as a config file: a local path or an object-store URI (s3://.../best_config.yaml); None: a run id."""
    if is_uri(source):
        stored = Storage.parse(source)
        if not stored.is_file():
            raise InputError(f"--from {source}: no such object (expected a sweep's best_config.yaml)")
        return stored
    return Storage.parse(source) if Path(source).is_file() else None


def load_stored_yaml(stored: Storage) -> dict[str, Any]:
    """load_yaml of a local file or of an object (through a local copy; errors name the URI)."""
    if stored.is_local:
        return load_yaml(stored.local)
    with tempfile.TemporaryDirectory() as tmp:
        copy = stored.download(Path(tmp) / stored.name)
        try:
            return load_yaml(copy)
        except InputError as err:
            raise InputError(str(err).replace(str(copy), stored.root)) from None


def read_state(sweep: Storage) -> dict[str, Any]:
    """The sweep's state file (parent run, split, ...) in its folder; {} when there is none or it is not an object."""
    state = sweep / STATE_FILE
    if not state.is_file():
        return {}
    try:
        data = json.loads(state.read_text())
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{state}: not a skeldiff sweep state file (invalid JSON)") from None
    return data if isinstance(data, dict) else {}


def load_source(source: str, uri: str) -> tuple[dict[str, Any], str | None, dict[str, str] | None]:
    """(config tree, split name if known, the run's tags when the tree is a run's own config.yaml) from a YAML path
    or an MLflow run (a sweep parent or a trial)."""
    stored = config_file(source)
    if stored is not None:
        tree = load_stored_yaml(stored)
        state = read_state(stored.parent)   # written beside best_config.yaml by the sweep
        return tree, state.get("split"), None
    client = MlflowClient(uri)
    try:
        run = client.get_run(source)
    except MlflowException:
        raise InputError(f"--from {source}: neither a config file nor a run id in {uri}") from None
    with tempfile.TemporaryDirectory() as tmp:
        names = {a.path for a in client.list_artifacts(source)}
        name = "best_config.yaml" if "best_config.yaml" in names else "config.yaml"
        if name not in names:
            raise InputError(f"--from {source}: run has no best_config.yaml or config.yaml artifact")
        tree = load_yaml(Path(client.download_artifacts(source, name, tmp)))     # aliases bounded
    # A run's own config.yaml (a trial, a service.run run) still searches what its run chose: the caller applies the
    # method's best_config rule with these tags. A best_config.yaml has it applied already.
    return tree, run.data.tags.get("split"), (dict(run.data.tags) if name == "config.yaml" else None)


def source_sweep_run_id(source: str, uri: str) -> str | None:
    """The sweep parent run a --from came out of (best_config.yaml beside its state file, a sweep parent run or one
    of its trials), or None; tagged on the final run so that service.report pairs the two."""
    stored = config_file(source)
    if stored is not None:
        return read_state(stored.parent).get("parent_run_id")
    tags = MlflowClient(uri).get_run(source).data.tags    # load_source has checked that the run exists
    if tags.get("phase") != "sweep":
        return None
    return tags.get("mlflow.parentRunId") or source


def source_tags(source: str, uri: str) -> dict[str, str]:
    """--from, the sweep parent run it leads back to (source_sweep_run_id) and, for a trial run, that run's id."""
    tags = {"source": source}
    sweep = source_sweep_run_id(source, uri)
    if sweep:
        tags["source_sweep_run_id"] = sweep
        if sweep != source and config_file(source) is None:
            tags["source_run_id"] = source       # --from named one trial of that sweep
    return tags
