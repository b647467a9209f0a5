"""Named splits: `--splits NAME ...` of service.run / sweep / final, from search_spaces/<method>_splits.yaml.

A split is a mapping of dotted config overrides (paths may use environment variables such as $SKELDIFF_DATA;
relative paths are made absolute when the command starts). A split with a `chain:` entry is the embedded
skeleton chain (`service.encoder`): generated NTU-format actions -> prepare -> an encoder trained on the
seen classes -> features, each stage cached under <storage>/chain.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from service.cli import names_data
from trainers.config import build_config
from trainers.errors import InputError

REPO_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
# The split a method runs when the command names no data (its embedded default); None: the config's own data.
DEFAULT_SPLITS: dict[str, str | None] = {"tdsm": "synthetic-skeleton", "cocodiff": None}


def default_splits(method: str, args: argparse.Namespace) -> list[str] | None:
    """[the method's embedded-default split] when the command line names no data, else None."""
    name = DEFAULT_SPLITS.get(method)
    return [name] if name and not names_data(args) else None


def load_splits(path: Path, names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(name, dotted overrides) for each requested split; env vars expanded, relative paths made absolute."""
    table = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    if not isinstance(table, dict):
        raise InputError(f"{path}: splits file missing or not a mapping of split names")
    out = []
    for name in names:
        if name not in table:
            raise InputError(f"--splits {name}: unknown split; known in {path}: {', '.join(table)}")
        out.append((name, {k: (v if k == "chain" else _expand(v)) for k, v in (table[name] or {}).items()}))
    return out


def splits_file(method: str, given: Path | None) -> Path:
    """--splits-file, or the method's table search_spaces/<method>_splits.yaml."""
    return given or REPO_SPACES / f"{method}_splits.yaml"


def resolve_chain(overrides: dict[str, Any], storage: Path, trainer=None) -> dict[str, Any]:
    """A split with `chain:` runs the cached skeleton chain (service.encoder) and points the data at its output.

    trainer trains the encoder (default: in this process; the sweep passes Ray Train workers); every stage
    is cached under <storage>/chain and skipped when its inputs did not change."""
    if "chain" not in overrides:
        return overrides
    from service.encoder import default_synthetic_unseen, synthetic_skeleton_features
    from trainers.encoder_fit import EncoderConfig

    overrides = dict(overrides)
    opts = dict(overrides.pop("chain") or {})
    encoder = build_config(EncoderConfig, opts.pop("encoder", {}))
    unseen = default_synthetic_unseen(int(opts.pop("unseen_count", 6)))
    per_class = int(opts.pop("per_class", 12))
    if opts:
        raise InputError(f"splits chain options {sorted(opts)}: unknown (expected per_class, unseen_count, encoder)")
    made = synthetic_skeleton_features(storage / "chain", per_class, encoder, unseen, trainer=trainer)
    return {**overrides, "data.source": "features", "data.features_dir": made["features_dir"],
            "data.unseen": made["unseen"], "text.class_names": made["class_names"],
            "text.descriptions": [made["descriptions"]]}


def _expand(value: Any) -> Any:
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, str) and ("/" in value or value.startswith("$")):
        expanded = os.path.expandvars(value)
        if "$" in expanded:
            raise InputError(f"split path {value!r}: environment variable not set")
        return str(Path(expanded).resolve())
    return value
