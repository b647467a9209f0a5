"""Named splits: `--splits NAME ...` of service.run / sweep / final, from search_spaces/<method>_splits.yaml.

A split is a mapping of dotted config overrides (paths may use environment variables such as $SKELDIFF_DATA;
relative paths are made absolute when the command starts), plus an optional `reference:` block (the paper's
figure for that protocol, read by service.report, never applied to the config). A split with a `chain:` entry
is the embedded skeleton chain (service.data.chain): generated NTU-format actions -> prepare -> an encoder trained
on the seen classes -> features, each stage cached under <storage>/chain.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainers.config import load_yaml
from trainers.errors import InputError

REPO_SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
# Keys of a split entry that describe it rather than override the config.
META_KEYS = ("reference",)
# A `reference:` block: the paper's top-1 (%) on the unseen classes (null: not verified, `note` says why), where it
# comes from, and `group`: splits whose mean the paper reports (SMIE's three random splits).
REFERENCE_KEYS = ("protocol", "top1", "source", "checked", "note", "group")


def load_splits(path: Path, names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(name, dotted overrides) for each requested split; env vars expanded, relative paths made absolute."""
    table = load_yaml(path) if Path(path).is_file() else None       # bounded aliases, duplicate keys refused
    if not isinstance(table, dict):
        raise InputError(f"{path}: splits file missing or not a mapping of split names")
    out = []
    for name in names:
        if name not in table:
            raise InputError(f"--splits {name}: unknown split; known in {path}: {', '.join(table)}")
        out.append((name, {k: (v if k == "chain" else _expand(v)) for k, v in (table[name] or {}).items()
                           if k not in META_KEYS}))
    return out


def load_references(path: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The paper's reference of each named split that has one (its `reference:` block), checked; see REFERENCE_KEYS."""
    table = load_yaml(path) if Path(path).is_file() else None
    if not isinstance(table, dict):
        raise InputError(f"{path}: splits file missing or not a mapping of split names")
    out = {}
    for name in names:
        ref = (table.get(name) or {}).get("reference")
        if ref is None:
            continue
        if not isinstance(ref, dict) or set(ref) - set(REFERENCE_KEYS) or "protocol" not in ref or "top1" not in ref:
            raise InputError(f"{path}: {name}.reference must be a mapping with protocol and top1 (keys: "
                             f"{', '.join(REFERENCE_KEYS)}), got {ref!r}")
        top1 = ref["top1"]
        if top1 is not None and (isinstance(top1, bool) or not isinstance(top1, (int, float)) or not 0 <= top1 <= 100):
            raise InputError(f"{path}: {name}.reference.top1={top1!r}: expected a percentage in [0, 100] or null")
        if top1 is None and not ref.get("note"):
            raise InputError(f"{path}: {name}.reference.top1 is null: a note must say why")
        if top1 is not None and not ref.get("source"):
            raise InputError(f"{path}: {name}.reference.top1={top1}: a source (table and row) is required")
        out[name] = dict(ref)
    return out


def splits_file(method: str, given: Path | None) -> Path:
    """--splits-file, or the method's table search_spaces/<method>_splits.yaml."""
    return given or REPO_SPACES / f"{method}_splits.yaml"


def _expand(value: Any) -> Any:
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, str) and ("/" in value or value.startswith("$")):
        expanded = os.path.expandvars(value)
        if "$" in expanded:
            raise InputError(f"split path {value!r}: environment variable not set")
        return str(Path(expanded).resolve())
    return value
