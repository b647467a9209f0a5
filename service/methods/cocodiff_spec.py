"""CoCoDiff's spec: its config, objective and `service.final` flags (`--ablation`, `--streams`). Light: no torch,
MLflow or Ray (see service.methods.base); what CoCoDiff runs is `service.methods.cocodiff.CoCoDiff`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any, get_args

from service.methods.base import Method, absolute_fields
from trainers.config import build_config, to_plain
from trainers.configs import BackboneConfig, CoCoDiffConfig, dataset_label
from trainers.errors import InputError

OBJECTIVE = "val/top1"   # chooses the kept classifier; reported and ranked as `<metric>_max` (see tdsm_spec)
STREAMS = get_args(BackboneConfig.model_fields["stream"].annotation)   # ('joint', 'bone', 'motion')


def check_streams(streams: list[str] | None) -> None:
    """--streams names each known stream at most once."""
    for i, stream in enumerate(streams or []):
        if stream not in STREAMS:
            raise InputError(f"--streams: unknown stream {stream!r} (expected {', '.join(STREAMS)})")
        if stream in streams[:i]:
            raise InputError(f"--streams: {stream} given twice")


class CoCoDiffSpec(Method):
    """Supervised recognition with a training-only diffusion module (see service.methods.base.Method)."""

    name = "cocodiff"
    config_cls = CoCoDiffConfig
    objective = OBJECTIVE
    rankable_metrics = (OBJECTIVE, "val/top5")   # trainers.cocodiff_eval.accuracy_metrics on validation; never test
    about = "supervised classification (CoCoDiff)"
    flags_hint = "its classifier arms and input streams"

    def add_arguments(self, parser: argparse.ArgumentParser, command: str) -> None:
        if command != "final":
            return
        parser.add_argument("--ablation", action="store_true",
                            help="cocodiff: baseline (module.enabled=false) vs +CoCoDiff, same seeds and protocol")
        parser.add_argument("--streams", nargs="+", metavar="STREAM",
                            help=f"cocodiff: one classifier per input stream ({', '.join(STREAMS)}) per arm and seed, "
                                 "and their equal-weight score fusion per seed (an 'ensemble' row; the seed-0 stream "
                                 "classifiers are registered as one fused model)")

    def options(self, given: Mapping[str, Any], command: str) -> dict[str, Any]:
        if command != "final":
            return {}
        check_streams(given["streams"])
        return {"ablation": given["ablation"], "streams": tuple(given["streams"] or ())}

    def split_name(self, cfg: CoCoDiffConfig) -> str:
        """Its benchmark, or the prepared folder."""
        return dataset_label(cfg)

    def absolute_paths(self, tree: dict[str, Any]) -> dict[str, Any]:
        cfg = build_config(CoCoDiffConfig, tree)
        tree = to_plain(cfg)
        absolute_fields(tree["data"], cfg.data, ("prepared_dir",))
        absolute_fields(tree["text"], cfg.text, ("class_names", "synonyms", "descriptions", "cache_dir"))
        return tree
