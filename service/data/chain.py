"""The embedded skeleton chain: generated NTU-format actions -> prepare -> a GCN encoder trained on the seen classes
-> features in the SA-DVAE layout, each stage cached under <storage>/chain and skipped when its inputs did not
change. A split with a `chain:` entry (search_spaces/tdsm_splits.yaml) runs it (`resolve_chain`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.data.features import extract_to_folder, train_encoder
from service.data.generated import synthetic_prepared
from trainers.checkpoint import ENCODER
from trainers.config import build_config
from trainers.encoder_fit import EncoderConfig
from trainers.errors import InputError
from trainers.io import atomic_write_text, stable_hash
from trainers.skeleton.synthetic import NUM_CLASSES, action_catalogue


def resolve_chain(overrides: dict[str, Any], storage: Path, trainer=None, build: bool = True) -> dict[str, Any]:
    """A split with `chain:` runs the cached skeleton chain (below) and points the data at its output.

    trainer trains the encoder (default: in this process; the sweep passes Ray Train workers); every stage
    is cached under <storage>/chain and skipped when its inputs did not change. build=False (--print-config)
    trains nothing: the data points at where the chain's features are once built."""
    if "chain" not in overrides:
        return overrides
    overrides = dict(overrides)
    opts = dict(overrides.pop("chain") or {})
    encoder = build_config(EncoderConfig, opts.pop("encoder", {}))
    unseen = default_synthetic_unseen(int(opts.pop("unseen_count", 6)))
    per_class = int(opts.pop("per_class", 12))
    if opts:
        raise InputError(f"splits chain options {sorted(opts)}: unknown (expected per_class, unseen_count, encoder)")
    made = synthetic_skeleton_features(storage / "chain", per_class, encoder, unseen, trainer=trainer, build=build)
    return {**overrides, "data.source": "features", "data.features_dir": made["features_dir"],
            "data.unseen": made["unseen"], "text.class_names": made["class_names"],
            "text.descriptions": [made["descriptions"]]}


def default_synthetic_unseen(count: int = 6, seed: int = 0) -> list[int]:
    """Unseen synthetic classes whose primitive and body part both also occur among the seen classes."""
    cat = action_catalogue()
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for i in rng.permutation(len(cat)):
        c = cat[int(i)]
        rest = [d for d in cat if d.index != c.index and d.index not in chosen]
        if any(d.primitive == c.primitive for d in rest) and any(d.part == c.part for d in rest):
            chosen.append(c.index)
        if len(chosen) == count:
            break
    return sorted(chosen)


# (prepared folder, unseen classes, config, out folder) -> out/encoder.pt
EncoderTrainer = Callable[[Path, list[int], EncoderConfig, Path], Path]


def synthetic_skeleton_features(root: Path, per_class: int, encoder: EncoderConfig, unseen: list[int] | None = None,
                                seed: int = 0, log=None, trainer: EncoderTrainer | None = None,
                                build: bool = True) -> dict[str, Any]:
    """generate → prepare → train encoder on seen → extract, each stage cached under `root`.

    build=False (`--print-config`): generate and prepare only (cheap, cached; they fix the cache key), train and
    extract nothing, and return the paths the encoder and features have once built; "built": whether they are."""
    log = log or (lambda msg: print(f"chain: {msg}", file=sys.stderr))
    root = Path(root).expanduser().resolve()
    unseen = unseen if unseen is not None else default_synthetic_unseen(seed=seed)
    raw, prepared, stamp = synthetic_prepared(root, per_class, seed, log)
    key = stable_hash({"prepare": stamp, "encoder": encoder.model_dump(mode="json"), "unseen": unseen})[:12]
    enc_dir, feat_dir = root / f"encoder-{key}", root / f"features-{key}"
    done = feat_dir / "done.json"
    made = {"features_dir": str(feat_dir), "unseen": unseen, "class_names": str(raw / "class_names.txt"),
            "descriptions": str(raw / "descriptions.txt"), "encoder": str(enc_dir / ENCODER)}
    if not build:
        return {**made, "built": done.is_file()}
    if not (enc_dir / ENCODER).is_file():
        log(f"training {encoder.name} on {NUM_CLASSES - len(unseen)} seen classes -> {enc_dir}")
        (trainer or train_encoder)(prepared, unseen, encoder, enc_dir)
    else:
        log(f"encoder up to date: {enc_dir}")
    if not done.is_file():
        log(f"extracting features -> {feat_dir}")
        extract_to_folder(prepared, enc_dir / ENCODER, unseen, feat_dir)
        atomic_write_text(done, json.dumps({"encoder": str(enc_dir), "unseen": unseen}))
    else:
        log(f"features up to date: {feat_dir}")
    return made
