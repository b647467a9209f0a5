"""The embedded skeleton chain: generated NTU-format actions -> prepare -> a GCN encoder trained on the seen classes
-> features in the SA-DVAE layout, each stage cached under <storage>/chain and skipped when its inputs did not
change. A split with a `chain:` entry (search_spaces/tdsm_splits.yaml) runs it (`resolve_chain`)."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.data.features import SOURCE, extract_to_folder, train_encoder, write_source
from service.data.generated import synthetic_prepared
from service.storage import Storage
from trainers.checkpoint import ENCODER
from trainers.config import build_config
from trainers.configs import EncoderConfig
from trainers.errors import InputError
from trainers.io import atomic_write_text, stable_hash
from trainers.skeleton.synthetic import NUM_CLASSES, action_catalogue


def resolve_chain(overrides: dict[str, Any], storage: Storage, trainer=None, build: bool = True,
                  progress: bool = True) -> dict[str, Any]:
    """A split with `chain:` runs the cached skeleton chain (below) and points the data at its output.

    trainer trains the encoder (default: in this process, logged nowhere; service.run and service.final pass one
    that logs an MLflow run, the sweep Ray Train workers); progress: a bar with an ETA for each stage; every stage
    is cached under <storage>/chain and skipped when its inputs did not change. build=False (--print-config)
    trains nothing: the data points at where the chain's features are once built. With object storage the chain
    is cached in the bucket (storage/chain) and worked on in a local copy that lives as long as this process."""
    if "chain" not in overrides:
        return overrides
    overrides = dict(overrides)
    opts = dict(overrides.pop("chain") or {})
    encoder = build_config(EncoderConfig, opts.pop("encoder", {}))
    unseen = default_synthetic_unseen(int(opts.pop("unseen_count", 6)))
    per_class = int(opts.pop("per_class", 12))
    if opts:
        raise InputError(f"splits chain options {sorted(opts)}: unknown (expected per_class, unseen_count, encoder)")
    remote = None if storage.is_local else storage / "chain"
    root = storage.local / "chain" if remote is None else local_copy(remote)
    if remote is not None and trainer is not None:
        trainer = remote_trainer(trainer, root, remote)
    made = synthetic_skeleton_features(root, per_class, encoder, unseen, trainer=trainer, build=build,
                                       portable=remote is not None, progress=progress)
    if remote is not None and build:
        sync_up(root, remote)
    return {**overrides, "data.source": "features", "data.features_dir": made["features_dir"],
            "data.unseen": made["unseen"], "text.class_names": made["class_names"],
            "text.descriptions": [made["descriptions"]]}


def local_copy(remote: Storage) -> Path:
    """The local working copy of an object-store chain cache: the same path on every machine
    (<tmp>/skeldiff-chain-<hash of the URI>), its files downloaded when missing. The prepare stamp, and so the
    encoder and features keys, hold the raw files' paths and mtimes: with the same path and normalised mtimes
    (synthetic_prepared's portable mode) every machine computes the keys the bucket's files were stored under."""
    local = Path(tempfile.gettempdir()) / f"skeldiff-chain-{stable_hash(remote.root)[:12]}"
    for rel in remote.files():
        if not (local / rel).is_file():
            (remote / rel).download(local / rel)
    return local


def sync_up(local: Path, remote: Storage) -> None:
    """Upload the files of the local copy that the bucket lacks; each stage's done marker last, so an interrupted
    upload never looks complete to the next reader."""
    have = set(remote.files())
    missing = [p for p in sorted(local.rglob("*")) if p.is_file() and str(p.relative_to(local)) not in have]
    for p in sorted(missing, key=lambda p: p.name in ("done.json", "prepare.json", "dataset.json")):
        (remote / str(p.relative_to(local))).upload(p)


def remote_trainer(trainer: EncoderTrainer, local: Path, remote: Storage) -> EncoderTrainer:
    """The encoder trainer on Ray workers of other nodes: they read the prepared folder from the bucket."""
    def train(prepared: Path, unseen: list[int], cfg: EncoderConfig, out: Path) -> Path:
        sync_up(local, remote)
        return trainer(remote / str(Path(prepared).relative_to(local)), unseen, cfg, out)

    return train


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


# (prepared folder (a local path, or its copy in object storage), unseen classes, config, out folder) -> out/encoder.pt
EncoderTrainer = Callable[[Any, list[int], EncoderConfig, Path], Path]


def synthetic_skeleton_features(root: Path, per_class: int, encoder: EncoderConfig, unseen: list[int] | None = None,
                                seed: int = 0, log=None, trainer: EncoderTrainer | None = None,
                                build: bool = True, portable: bool = False, progress: bool = False) -> dict[str, Any]:
    """generate → prepare → train encoder on seen → extract, each stage cached under `root`.

    build=False (`--print-config`): generate and prepare only (cheap, cached; they fix the cache key), train and
    extract nothing, and return the paths the encoder and features have once built; "built": whether they are.
    progress: a bar with an ETA for generate, prepare and extract (the trainer draws its own)."""
    log = log or (lambda msg: print(f"chain: {msg}", file=sys.stderr))
    root = Path(root).expanduser().resolve()
    unseen = unseen if unseen is not None else default_synthetic_unseen(seed=seed)
    raw, prepared, stamp = synthetic_prepared(root, per_class, seed, log, portable, progress and build)
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
        extract_to_folder(prepared, enc_dir / ENCODER, unseen, feat_dir, progress=progress)
        atomic_write_text(done, json.dumps({"encoder": str(enc_dir), "unseen": unseen}))
    else:
        log(f"features up to date: {feat_dir}")
        if not (feat_dir / SOURCE).is_file():          # a cache from before source.json: say where it came from
            write_source(feat_dir, enc_dir / ENCODER, prepared, None)
    return made
