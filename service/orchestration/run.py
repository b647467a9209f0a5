"""`service.run` after its command line is parsed: the split's skeleton chain built in this process (no Ray),
then the method's run. Imported by service.cli.run only once the arguments are known (its start-up stays light)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from service.data.chain import resolve_chain
from service.methods.base import RunOptions
from service.methods.common import train_encoder_logged
from service.methods.implemented import implementation
from service.storage import Storage
from service.tracking.store import resolve_tracking_uri
from trainers.config import build_config, dump_yaml, to_plain
from trainers.runtime import apply_thread_policy

# `--print-config` of a split: the chain's cached outputs, or the paths a first run writes.
PENDING = "  # (built on first run)"


def resolved_config_yaml(config_cls: type, cfg, split: str, overrides: dict, splits_path: Path,
                         storage: Storage, searched: str = "") -> str:
    """The config that will run, as YAML loadable by --config: the named (or default) split applied and a skeleton
    chain resolved to its cached outputs. Trains nothing: a chain not yet built shows the paths it will write.
    searched: comment lines put in the header (`searched_keys_comment`). Without a split the CLIs print the config
    themselves, before importing this module."""
    resolved = resolve_chain(overrides, storage, build=False)   # generate + prepare only (cached)
    cfg = build_config(config_cls, to_plain(cfg), resolved)
    head = f"# split {split} of {splits_path}\n{searched}"
    text = dump_yaml(cfg)
    if "chain" not in overrides:
        return head + text
    features = resolved["data.features_dir"]
    head += f"# data and text: the skeleton chain's outputs under {storage / 'chain'}\n"
    if not (Path(features) / "done.json").is_file():   # done.json: written last by the chain's extract stage
        # The encoder is trained and the features extracted by the first run; the paths are fixed already.
        head += "# the features are not built yet: run without --print-config first, then --config this file\n"
        text = text.replace(f"  features_dir: {features}\n", f"  features_dir: {features}{PENDING}\n", 1)
    return head + text


def run(opts: RunOptions, cfg: Any, overrides: dict[str, Any] | None, storage: Storage) -> dict[str, Any]:
    """Build the split's chain (`overrides`: its split overrides, None without a split), then the method's run;
    returns the JSON line."""
    apply_thread_policy()      # CPU threads sized to this process's cores, before any parallel work
    opts = dataclasses.replace(opts, tracking_uri=resolve_tracking_uri(opts.tracking_uri))  # probed before work
    method = implementation(opts.method)
    if overrides is not None:
        # the chain's encoder: in this process (no Ray), an MLflow run of experiment encoder-<prepared folder>
        trainer = functools.partial(train_encoder_logged, tracking_uri=opts.tracking_uri, progress=opts.progress)
        resolved = resolve_chain(overrides, storage, trainer, progress=opts.progress)
        cfg = build_config(method.config_cls, to_plain(cfg), resolved)
    return method.run(cfg, opts)
