"""Prepared skeleton data to GCN features, in this process: the seen classes' training rows, an encoder trained on
them (`service.encoder train --in-process`, the chain's default), and the SA-DVAE feature layout (train / ztest /
gtest + labels) that `service.run tdsm --features` reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers.checkpoint import ENCODER
from trainers.configs import EncoderConfig
from trainers.data import load_class_ids
from trainers.encoder_fit import extract_features, fit_encoder, load_encoder
from trainers.errors import InputError
from trainers.io import atomic_save_npy, atomic_write_text, load_torch
from trainers.schedule import progress_bar
from trainers.skeleton.prepare import FAMILY
from trainers.skeleton.prepared import read_prepared
from trainers.tracking import NullReporter

FEATURE_FILES = ("train", "ztest", "gtest")


def load_prepared(folder: Path, benchmark: str | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, str]:
    """(data (N,C,T,V,M), labels (N,), train mask from the benchmark column, benchmark) of a prepared folder."""
    prepared = read_prepared(folder, benchmark)
    return (torch.from_numpy(prepared.rows()), torch.from_numpy(prepared.labels),
            prepared.split == "train", prepared.benchmark)


def parse_classes(spec: str | list[int], num_classes: int) -> list[int]:
    """Unseen classes from a .npy file, a comma list, or a list."""
    if isinstance(spec, str) and not spec.endswith(".npy"):
        try:
            spec = [int(c) for c in spec.split(",") if c.strip()]
        except ValueError:
            raise InputError(f"--unseen {spec!r}: expected a .npy file or comma-separated class ids") from None
    return load_class_ids(spec if isinstance(spec, list) else Path(spec), num_classes, "--unseen")


def seen_class_data(prepared: Path, unseen: list[int], benchmark: str | None = None):
    """(x, y, seen classes, held-out (x, y)): the benchmark's training rows of the seen classes, and its test
    rows of the seen classes (never trained on; scored once at the end of encoder training)."""
    data, labels, train_mask, _ = load_prepared(prepared, benchmark)
    is_seen = ~np.isin(labels.numpy(), unseen)
    keep, held = train_mask & is_seen, ~train_mask & is_seen
    if not keep.any():
        raise InputError(f"{prepared}: no training samples of the seen classes")
    seen = sorted(set(labels[keep].tolist()))
    held &= np.isin(labels.numpy(), seen)
    return data[keep], labels[keep], seen, (data[held], labels[held])


def train_encoder(prepared: Path, unseen: list[int], cfg: EncoderConfig, out: Path, benchmark: str | None = None,
                  reporter=None, progress: bool = True) -> Path:
    """Train in this process on the seen classes of the benchmark's training split; returns out/encoder.pt.

    Re-running with the same inputs resumes from out/last.pt (or, when training finished, reports the final evaluation
    again and returns). On the CPU, torch's threads follow the load: every free core (at most $OMP_NUM_THREADS; one
    for an encoder narrower than 256 features), one beside busy processes."""
    x, y, seen, held_out = seen_class_data(prepared, unseen, benchmark)
    fit_encoder(cfg, x, y, seen, reporter or NullReporter(), out, progress, held_out, follow_load=True)
    return Path(out) / ENCODER


def extract_to_folder(prepared: Path, encoder_path: Path, unseen: list[int], out: Path,
                      benchmark: str | None = None, progress: bool = False) -> Path:
    """SA-DVAE layout: train (seen, training split), ztest (unseen, test split), gtest (all, test split)."""
    model, cfg, seen = load_encoder(encoder_path)
    data, labels, train_mask, _ = load_prepared(prepared, benchmark)
    is_unseen = np.isin(labels.numpy(), unseen)
    leaked = sorted(set(unseen) & set(seen))
    if leaked:
        raise InputError(f"{encoder_path}: encoder was trained on classes {leaked} that are unseen here")
    # gtest: test rows of the classes the task knows (the encoder's seen classes and the unseen ones); a class
    # with test rows only (a small generated set) is neither and would have no place among the GZSL candidates.
    known = is_unseen | np.isin(labels.numpy(), seen)
    masks = {"train": train_mask & ~is_unseen, "ztest": ~train_mask & is_unseen, "gtest": ~train_mask & known}
    labels_name = {"train": "train_label", "ztest": "z_label", "gtest": "g_label"}
    out = Path(out)
    bar = progress_bar(sum(int(m.sum()) for m in masks.values()), 0, "features", progress)
    for name, mask in masks.items():
        atomic_save_npy(extract_features(model, data[mask], cfg, on_batch=bar.update).numpy(), out / f"{name}.npy")
        atomic_save_npy(labels[mask].numpy(), out / f"{labels_name[name]}.npy")
    bar.close()
    write_source(out, encoder_path, prepared, benchmark)
    return out


# ----------------------------------------------------------------------------------------------
# Where a features folder came from: what a registered zero-shot model needs to take skeletons
# ----------------------------------------------------------------------------------------------

SOURCE = "source.json"


def write_source(features: Path, encoder_path: Path, prepared: Path, benchmark: str | None) -> None:
    """features/source.json: the encoder and prepared folder the features were extracted with."""
    atomic_write_text(Path(features) / SOURCE, json.dumps(
        {"encoder": str(Path(encoder_path).resolve()), "prepared": str(Path(prepared).resolve()),
         "benchmark": benchmark}, indent=1))


def encoder_source(features: Path) -> dict[str, Any] | None:
    """The skeleton side of a features folder made by skeldiff's encoder, or None (features from elsewhere, or
    its encoder / prepared folder gone): {"state": encoder.pt's dict plus the input layout, "prepared", "benchmark"}."""
    path = Path(features) / SOURCE
    if not path.is_file():
        return None
    try:
        source = json.loads(path.read_text())
        encoder, prepared = Path(source["encoder"]), Path(source["prepared"])
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path}: not a features source record (expected encoder, prepared, benchmark)") from None
    if not encoder.is_file() or not (prepared / "prepare.json").is_file():
        return None
    state = load_torch(encoder, "encoder checkpoint", ("config", "classes", "in_channels", "model"))
    meta = json.loads((prepared / "prepare.json").read_text())
    _, channels, frames, joints, bodies = meta["shape"]
    state["layout"] = {"channels": channels, "frames": frames, "joints": joints, "bodies": bodies,
                       "dataset": FAMILY.get(meta.get("dataset"), "ntu")}
    return {"state": state, "prepared": prepared, "benchmark": source.get("benchmark")}


def unseen_test_sequences(source: dict[str, Any], unseen: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(sequences (N, C, T, V, M), labels): the rows ztest.npy was extracted from, in its order."""
    data, labels, train_mask, _ = load_prepared(source["prepared"], source["benchmark"])
    mask = ~train_mask & np.isin(labels.numpy(), unseen)
    return data[mask].numpy(), labels[mask].numpy()
