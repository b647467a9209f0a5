"""`service.final` after its command line is parsed: read the chosen config (a best_config.yaml or an MLflow run),
re-target it to named splits (their skeleton chains built in this process), then the method's final protocol.
Imported by service.cli.final only once the arguments are known (its start-up stays light)."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

from service.data.chain import resolve_chain
from service.data.splits import load_splits, splits_file
from service.methods.base import FinalOptions, Method
from service.methods.common import train_encoder_logged
from service.methods.implemented import implementation
from service.storage import Storage
from service.tracking.sources import load_source, source_sweep_run_id
from service.tracking.store import resolve_tracking_uri
from trainers.config import build_config
from trainers.runtime import apply_thread_policy


class Source(NamedTuple):
    """What --from named: the config tree, the split it ran on (None for a file), the run's tags (None for a
    file), the sweep parent run it came from, and the resolved tracking URI."""

    tree: dict[str, Any]
    split: str | None
    run_tags: dict[str, str] | None
    sweep_run_id: str | None
    tracking_uri: str


def read_source(source: str, tracking_uri: str | None, writable: Storage) -> Source:
    """The tracking server probed and the output location checked first (one line each, before any work)."""
    apply_thread_policy()      # CPU threads sized to this process's cores, before any parallel work
    uri = resolve_tracking_uri(tracking_uri)
    writable.check_writable()
    tree, split, run_tags = load_source(source, uri)
    return Source(tree, split, run_tags, source_sweep_run_id(source, uri), uri)


def default_out(storage: Storage, method: str, splits: list[str]) -> Storage:
    """<storage-path>/final/<method>-<splits>-<time>: never a folder in the working directory (the repository)."""
    label = "+".join(splits) if len(splits) <= 3 else f"{splits[0]}-and-{len(splits) - 1}-more"
    return storage / "final" / f"{method}-{label}-{time.strftime('%Y%m%d-%H%M%S')}"


def final(opts: FinalOptions, source: Source, splits: list[str] | None, storage: Storage) -> dict[str, Any]:
    """The method's final protocol on the source's config (a run's config with what it chose on validation), or on
    that config re-targeted to each named split; returns the JSON line."""
    method: Method = implementation(opts.method)
    tree = source.tree
    if source.run_tags is not None:     # a run's own config.yaml: what that run chose on validation (TDSM: t_test)
        tree, _ = method.best_config(tree, source.run_tags)
    cfg = build_config(method.config_cls, tree, source=opts.source)  # fail early, naming the offending key
    if splits:   # the same config on other data (a split's skeleton chain built in this process if needed)
        trainer = functools.partial(train_encoder_logged, tracking_uri=source.tracking_uri)  # an MLflow run
        targets = [(split, method.absolute_paths(build_config(method.config_cls, tree,
                                                              resolve_chain(ov, storage, trainer))
                                                 .model_dump(mode="json")))
                   for split, ov in load_splits(splits_file(method.name, opts.splits_file), splits)]
    else:
        targets = [(source.split or method.split_name(cfg), tree)]
    out = opts.out or default_out(storage, method.name, [split for split, _ in targets])
    return method.final(dataclasses.replace(opts, out=out), targets)
