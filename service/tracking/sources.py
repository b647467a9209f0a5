"""Where a final run's config comes from (`service.final --from`): a sweep's best_config.yaml or an MLflow run, and
the sweep parent run it leads back to."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainers.config import load_yaml
from trainers.errors import InputError

STATE_FILE = "skeldiff_sweep.json"


def load_source(source: str, uri: str) -> tuple[dict[str, Any], str | None, dict[str, str] | None]:
    """(config tree, split name if known, the run's tags when the tree is a run's own config.yaml) from a YAML path
    or an MLflow run (a sweep parent or a trial)."""
    path = Path(source)
    if path.is_file():
        tree = load_yaml(path)
        state = path.parent / STATE_FILE   # written beside best_config.yaml by the sweep
        return tree, (json.loads(state.read_text()).get("split") if state.is_file() else None), None
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
        tree = yaml.safe_load(Path(client.download_artifacts(source, name, tmp)).read_text())
    # A run's own config.yaml (a trial, a service.run run) still searches what its run chose: the caller applies the
    # method's best_config rule with these tags. A best_config.yaml has it applied already.
    return tree, run.data.tags.get("split"), (dict(run.data.tags) if name == "config.yaml" else None)


def source_sweep_run_id(source: str, uri: str) -> str | None:
    """The sweep parent run a --from came out of (best_config.yaml beside its state file, a sweep parent run or one
    of its trials), or None; tagged on the final run so that service.report pairs the two."""
    path = Path(source)
    if path.is_file():
        state = path.parent / STATE_FILE
        return json.loads(state.read_text()).get("parent_run_id") if state.is_file() else None
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
        if sweep != source and not Path(source).is_file():
            tags["source_run_id"] = source       # --from named one trial of that sweep
    return tags
