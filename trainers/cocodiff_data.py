"""CoCoDiff inputs: a prepared folder (a real release or the generated synthetic set) split into train /
validation / test, and the class texts (coarse names and synonyms, fine descriptions) encoded once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from trainers.assets import ASSETS, EMBEDDED_DESCRIPTIONS, EMBEDDED_NAMES, default_cache_dir
from trainers.configs import CoCoDiffConfig
from trainers.errors import InputError
from trainers.prompts import read_prompt_file
from trainers.skeleton.prepared import read_prepared
from trainers.skeleton.splits import BENCHMARKS
from trainers.skeleton.synthetic import action_catalogue
from trainers.text import encode_prompt_sets

# Only the pooled (global) text features are used; MiniLM's local features need at least [CLS] and [SEP].
UNUSED_LOCAL_TOKENS = 2
# One hand-written synonym per generated class (coarse text beside the generated name), in catalogue order.
SYNTHETIC_SYNONYMS = ASSETS / "synthetic_synonyms.txt"


@dataclass
class SkeletonData:
    """Joint arrays (N, C, T, V, M) float32 and labels (N,) int64 of the three splits."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


def load_prepared(folder: Path, benchmark: str, val_fraction: float, val_seed: int,
                  num_classes: int | None = None) -> SkeletonData:
    """data.npy / label.npy / index.tsv of `service.prepare`: the benchmark's train rows minus a seeded
    validation draw, its test rows as test. num_classes defaults to the benchmark's (60 / 120)."""
    prepared = read_prepared(folder, benchmark)
    split, labels = prepared.split, prepared.labels
    train_idx, test_idx = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    if len(train_idx) < 2:
        raise InputError(f"{prepared.folder}: fewer than two {benchmark} training samples")
    if len(test_idx) == 0:
        raise InputError(f"{prepared.folder / 'index.tsv'}: no {benchmark} test samples; "
                         "the test accuracy would be NaN")
    perm = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(val_seed)).numpy()
    n_val = max(1, round(val_fraction * len(train_idx)))
    val_idx, fit_idx = np.sort(train_idx[perm[:n_val]]), np.sort(train_idx[perm[n_val:]])
    num_classes = num_classes or BENCHMARKS[benchmark].num_classes

    def take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        y = labels[idx].astype(np.int64)
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise InputError(f"{prepared.folder / 'label.npy'}: labels outside 0..{num_classes - 1} for {benchmark}")
        return torch.from_numpy(prepared.rows(idx)), torch.from_numpy(y)

    return SkeletonData(*take(fit_idx), *take(val_idx), *take(test_idx), num_classes)


def load_cocodiff_data(cfg: CoCoDiffConfig, folder: Path | None = None) -> SkeletonData:
    """The splits of cfg.data from a prepared folder: data.prepared_dir, or (source=synthetic) `folder`, the
    generated set prepared by the service layer (`service.data.generated`; trainers never run `service.prepare`)."""
    d = cfg.data
    folder = folder if folder is not None else d.prepared_dir
    if folder is None:
        raise InputError("data.source=synthetic: the generated set is made by the service layer "
                         "(python -m service.run cocodiff); pass its prepared folder")
    return load_prepared(folder, d.benchmark, d.val_fraction, d.val_seed, d.num_classes)


@dataclass(frozen=True)
class PromptSets:
    """One prompt per class in each set: coarse = [names, *synonyms], fine = [*descriptions]."""

    names: list[str]
    synonyms: list[list[str]]
    descriptions: list[list[str]]


def synthetic_prompts() -> PromptSets:
    """The generated set's own texts: catalogue names, the embedded hand-written synonyms, generated descriptions."""
    catalogue = action_catalogue()
    return PromptSets([c.name for c in catalogue],
                      [read_prompt_file(SYNTHETIC_SYNONYMS, expected_count=len(catalogue))],
                      [[c.description for c in catalogue]])


def class_prompts(cfg: CoCoDiffConfig, num_classes: int) -> PromptSets:
    """The coarse and fine prompts of cfg.text, each file exactly one line per class.

    Defaults: the synthetic set's own texts (source=synthetic), else the embedded NTU-60 names and descriptions
    and no synonyms. A given file replaces only its own default; a names file needs its own descriptions.
    """
    t = cfg.text
    if cfg.data.source == "synthetic":
        default = synthetic_prompts()
    else:
        if t.class_names is not None and t.descriptions is None:
            raise InputError("text.descriptions (fine text) is required when text.class_names is given")
        default = PromptSets(read_prompt_file(EMBEDDED_NAMES), [], [read_prompt_file(EMBEDDED_DESCRIPTIONS)])

    def read(path: Path) -> list[str]:
        return read_prompt_file(Path(path), expected_count=num_classes)

    sets = PromptSets(read(t.class_names) if t.class_names is not None else default.names,
                      [read(p) for p in t.synonyms] if t.synonyms is not None else default.synonyms,
                      [read(p) for p in t.descriptions] if t.descriptions is not None else default.descriptions)
    for label, rows in (("class names", sets.names), *(("synonyms", r) for r in sets.synonyms),
                        *(("descriptions", r) for r in sets.descriptions)):
        if len(rows) != num_classes:
            raise InputError(f"text: the default {label} have {len(rows)} lines but the data has {num_classes} "
                             "classes; give text.class_names and text.descriptions files")
    return sets


def read_class_names(cfg: CoCoDiffConfig, num_classes: int) -> list[str]:
    """The class names (coarse text) without encoding anything: labels for plots, also for the baseline."""
    return class_prompts(cfg, num_classes).names


def encode_cocodiff_texts(cfg: CoCoDiffConfig, num_classes: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(class names, fine text (C, D_f), coarse text (C, D_c)): pooled features, prompt sets concatenated."""
    sets = class_prompts(cfg, num_classes)
    coarse_sets = [sets.names, *sets.synonyms]
    cache = Path(cfg.text.cache_dir) if cfg.text.cache_dir else default_cache_dir() / "text"
    # One call: the encoder loads once and the sets come back concatenated, each the encoder's width.
    feats = encode_prompt_sets(cfg.text.encoder, coarse_sets + sets.descriptions, UNUSED_LOCAL_TOKENS,
                               cache).global_feats
    width = feats.shape[1] // (len(coarse_sets) + len(sets.descriptions))
    split = len(coarse_sets) * width
    return sets.names, feats[:, split:].contiguous(), feats[:, :split].contiguous()   # fine (C, D_f), coarse (C, D_c)


class CoCoDiffInputs(NamedTuple):
    """What a CoCoDiff run needs besides its config; a sweep builds it once per split and shares it with every
    trial."""

    data: SkeletonData
    names: list[str]                 # class names, by class id
    fine: torch.Tensor | None        # (C, D_fine) encoded fine text; None for the baseline (never encoded)
    coarse: torch.Tensor | None      # (C, D_coarse) encoded coarse text


def prepare_cocodiff(cfg: CoCoDiffConfig, folder: Path | None = None) -> CoCoDiffInputs:
    """(data, class names, fine text, coarse text); the texts are None (never encoded) for the baseline.

    folder: the prepared folder of a source=synthetic config (see `load_cocodiff_data`)."""
    data = load_cocodiff_data(cfg, folder)
    if not cfg.module.enabled:
        return CoCoDiffInputs(data, read_class_names(cfg, data.num_classes), None, None)
    return CoCoDiffInputs(data, *encode_cocodiff_texts(cfg, data.num_classes))
