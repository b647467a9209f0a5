"""Zero-shot feature tasks: pre-extracted skeleton features (SA-DVAE layout), split files, and the embedded
generated task. Features are small (N x 256), so they stay as tensors: no DataLoader, no workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers.configs import DataConfig
from trainers.errors import InputError, short_repr
from trainers.guards import check_finite_rows, check_numeric_array
from trainers.io import load_npy

# SynSE's NTU-60 55/5 unseen classes (0-based; label_splits/ru5.npy), used by the embedded default.
EMBEDDED_UNSEEN = [10, 11, 19, 26, 56]
# The generated task's GZSL test set: samples_per_class // 5 fresh samples per seen class, from a generator seeded
# seed + this offset (apart from the one that draws prototypes, training and test samples).
GZSL_HELD_OUT_DIVISOR = 5
GZSL_SEED_OFFSET = 7919


@dataclass
class FeatureSplit:
    """Features (N, D) float32 and class ids (N,) int64."""

    features: torch.Tensor
    labels: torch.Tensor

    def select(self, classes: list[int]) -> "FeatureSplit":
        """The samples whose label is in `classes`."""
        keep = torch.isin(self.labels, torch.tensor(classes, dtype=self.labels.dtype))
        return FeatureSplit(self.features[keep], self.labels[keep])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ZSLTask:
    """A zero-shot split: seen training features, unseen test features, validation classes within seen."""

    name: str
    num_classes: int
    train: FeatureSplit          # samples of all seen classes
    test: FeatureSplit           # samples of the unseen classes
    seen: list[int]
    unseen: list[int]
    val: list[int]               # validation classes, a subset of seen
    gtest: FeatureSplit | None = None   # held-out samples of seen AND unseen classes (GZSL); None: not available

    @property
    def feature_dim(self) -> int:
        return int(self.train.features.shape[1])

    def tuning_split(self) -> tuple[FeatureSplit, FeatureSplit, list[int]]:
        """(train on seen minus val, evaluate on val samples, val classes): what hyper-parameters are tuned on."""
        fit_classes = [c for c in self.seen if c not in set(self.val)]
        return self.train.select(fit_classes), self.train.select(self.val), fit_classes

    def final_split(self) -> tuple[FeatureSplit, FeatureSplit, list[int]]:
        """(train on all seen, evaluate on the unseen test samples, seen classes): used once, at the end."""
        return self.train, self.test, list(self.seen)

    def gzsl_split(self) -> tuple[FeatureSplit, list[int], list[int]] | None:
        """(GZSL test samples, candidate classes = seen + unseen, seen classes), or None without a GZSL test set.
        Used once, at the end, like final_split: nothing is chosen on it."""
        if self.gtest is None:
            return None
        return self.gtest, sorted(self.seen + self.unseen), list(self.seen)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def load_array(path: Path, ndim: int, what: str) -> np.ndarray:
    """np.load with a one-line error naming the file and the expected shape."""
    if not path.is_file():
        raise InputError(f"{path}: missing ({what})")
    arr = load_npy(path)
    if arr.ndim != ndim:
        raise InputError(f"{path}: expected a {ndim}-D array ({what}), got shape {arr.shape}")
    check_numeric_array(arr, str(path), what)
    return arr


def load_class_ids(spec: Path | list[int], num_classes: int, key: str,
                   class_list: str = "the class list") -> list[int]:
    """A split given as a .npy file of 0-based class ids or as a list; checked against the class count."""
    ids = load_array(Path(spec), 1, "0-based class ids").tolist() if isinstance(spec, (str, Path)) else list(spec)
    where = f"{spec}" if isinstance(spec, (str, Path)) else key
    not_int = [c for c in ids if not isinstance(c, (int, np.integer)) or isinstance(c, bool)]
    if not_int:
        raise InputError(f"{where}: class ids must be integers, got {not_int[:5]}")
    bad = [c for c in ids if not 0 <= int(c) < num_classes]
    if bad:
        raise InputError(f"{where}: class ids {bad[:5]} outside {class_list} (0..{num_classes - 1})")
    if len(set(ids)) != len(ids):
        raise InputError(f"{where}: repeated class ids")
    if not ids:
        raise InputError(f"{where}: no class ids (an empty split would silently train or test on nothing)")
    return sorted(int(c) for c in ids)


def load_feature_split(folder: Path, feat_name: str, label_name: str, num_classes: int,
                       class_list: str = "the class list") -> FeatureSplit:
    """One (features, labels) pair of the SA-DVAE layout, validated."""
    x = load_array(folder / feat_name, 2, "N x D features")
    y = load_array(folder / label_name, 1, "N integer labels")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{folder / label_name}: {y.shape[0]} labels for {x.shape[0]} rows of {feat_name}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise InputError(f"{folder / label_name}: labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise InputError(f"{folder / label_name}: labels outside {class_list} (0..{num_classes - 1}): "
                         f"min {y.min()}, max {y.max()}")
    if x.shape[1] == 0:
        raise InputError(f"{folder / feat_name}: zero-width features (shape {x.shape}), expected N x D with D >= 1")
    check_finite_rows(x, str(folder / feat_name))
    return FeatureSplit(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)))


def carve_validation(seen: list[int], count: int, seed: int) -> list[int]:
    """A seeded draw of `count` validation classes out of the seen classes."""
    if not 0 < count < len(seen):
        raise InputError(f"data.val_unseen={count}: need 0 < N < {len(seen)} (number of seen classes)")
    rng = np.random.default_rng(seed)
    return sorted(int(c) for c in rng.choice(seen, size=count, replace=False))


def resolve_split(cfg: DataConfig, num_classes: int, default_unseen: list[int], class_list: str = "the class list",
                  present: set[int] | None = None) -> tuple[list[int], list[int], list[int]]:
    """(seen, unseen, val) from the config, checked for overlaps and unknown classes.

    present: the classes with training samples, when known. The default seen set is these minus the unseen
    ones (every class of the list only when `present` is None), and a validation *count* is carved from them.
    """
    unseen = (load_class_ids(cfg.unseen, num_classes, "data.unseen", class_list) if cfg.unseen is not None
              else default_unseen)
    if cfg.seen is not None:
        seen = load_class_ids(cfg.seen, num_classes, "data.seen", class_list)
        overlap = sorted(set(seen) & set(unseen))
        if overlap:
            raise InputError(f"data.seen ({cfg.seen}) and data.unseen overlap on classes {overlap}")
    else:
        # Never "every class of the names file": NTU-120's 120 names over NTU-60 features would put 60 classes
        # without a sample among the training classes and the negative pool.
        candidates = range(num_classes) if present is None else sorted(present)
        seen = [c for c in candidates if c not in set(unseen)]
    if isinstance(cfg.val_unseen, int):
        val = carve_validation([c for c in seen if present is None or c in present], cfg.val_unseen, cfg.val_seed)
    else:
        val = load_class_ids(cfg.val_unseen, num_classes, "data.val_unseen", class_list)
        outside = sorted(set(val) - set(seen))
        if outside:
            raise InputError(f"data.val_unseen ({cfg.val_unseen}): classes {outside} are not seen classes "
                             "(validation classes are carved out of the seen set)")
        if len(val) >= len(seen):
            raise InputError(f"data.val_unseen ({cfg.val_unseen}): leaves no seen class to train on")
    check_split_sizes(seen, val, f"data.val_unseen ({short_repr(cfg.val_unseen)})")
    return seen, unseen, val


# The least a TDSM split can hold: the triplet loss draws a negative class besides each sample's own, and zero-shot
# validation over one class always scores 100% (the first checkpoint would be kept).
MIN_TRAIN_CLASSES = MIN_VAL_CLASSES = 2


def check_split_sizes(seen: list[int], val: list[int], what: str) -> None:
    """Enough training classes (seen minus validation) for the triplet loss, and validation classes to choose on."""
    train = len(set(seen) - set(val))
    if train < MIN_TRAIN_CLASSES:
        raise InputError(f"{what}: leaves {train} of {len(seen)} seen classes to train on; the triplet loss needs at "
                         f"least {MIN_TRAIN_CLASSES} (a negative class besides each sample's own)")
    if len(val) < MIN_VAL_CLASSES:
        raise InputError(f"{what}: {len(val)} validation class; zero-shot validation needs at least "
                         f"{MIN_VAL_CLASSES} (over one class every checkpoint scores 100%)")


def load_feature_task(cfg: DataConfig, num_classes: int, class_list: str = "the class list") -> ZSLTask:
    """Pre-extracted features in the SA-DVAE layout (docs/METHODS.md §3) plus the zero-shot split.

    class_list: where the class count comes from (e.g. the class-names file), named in label errors.
    """
    if cfg.features_dir is None:
        raise InputError("data.features_dir is required with data.source=features (--features DIR)")
    folder = Path(cfg.features_dir)
    if not folder.is_dir():
        raise InputError(f"{folder}: features folder not found")
    train = load_feature_split(folder, "train.npy", "train_label.npy", num_classes, class_list)
    test = load_feature_split(folder, "ztest.npy", "z_label.npy", num_classes, class_list)
    for split, name in ((train, "train.npy"), (test, "ztest.npy")):
        if len(split) == 0:
            raise InputError(f"{folder / name}: no samples (0 rows); its accuracy would be NaN")
    if train.features.shape[1] != test.features.shape[1]:
        raise InputError(f"{folder / 'ztest.npy'}: feature width {test.features.shape[1]} differs from "
                         f"train.npy's {train.features.shape[1]}")
    default_unseen = sorted(set(test.labels.tolist()))
    seen, unseen, val = resolve_split(cfg, num_classes, default_unseen, class_list, set(train.labels.tolist()))
    remapped = len(test) > 0 and max(test.labels.tolist()) < len(unseen)
    hint = " (z_label.npy's labels look remapped to 0..k-1; expected original class ids)" if remapped else ""
    stray_test = sorted(set(test.labels.tolist()) - set(unseen))
    if stray_test:
        raise InputError(f"{folder / 'z_label.npy'}: labels {stray_test[:5]} are not unseen classes{hint}")
    stray_train = sorted(set(train.labels.tolist()) - set(seen))
    if stray_train:
        # Without data.unseen the unseen classes are z_label's, so remapped test labels surface here.
        hint = hint if cfg.unseen is None else ""
        raise InputError(f"{folder / 'train_label.npy'}: labels {stray_train[:5]} are not seen classes{hint}")
    missing = sorted(set(val) - set(train.labels.tolist()))
    if missing:
        raise InputError(f"data.val_unseen: validation classes {missing} have no samples in train.npy")
    empty = sorted(set(seen) - set(train.labels.tolist()))
    if empty:
        # Only an explicit data.seen can get here: a class without samples would still be drawn as a negative.
        raise InputError(f"data.seen ({cfg.seen}): seen classes {empty[:5]} have no samples in "
                         f"{folder / 'train_label.npy'} (leave data.seen unset to use the classes with samples)")
    gtest = load_gzsl_split(folder, num_classes, class_list, train, seen, unseen)
    return ZSLTask(folder.name, num_classes, train, test, seen, unseen, val, gtest)


def load_gzsl_split(folder: Path, num_classes: int, class_list: str, train: FeatureSplit, seen: list[int],
                    unseen: list[int]) -> FeatureSplit | None:
    """gtest.npy + g_label.npy (generalised zero-shot: held-out samples of seen and unseen classes), validated like
    the other pairs; None when the folder has neither file (GZSL metrics are then not reported)."""
    present = [name for name in ("gtest.npy", "g_label.npy") if (folder / name).exists()]
    if not present:
        return None
    if len(present) == 1:
        other = "g_label.npy" if present[0] == "gtest.npy" else "gtest.npy"
        raise InputError(f"{folder / other}: missing (the GZSL pair gtest.npy + g_label.npy needs both; "
                         f"remove {present[0]} to skip GZSL)")
    gtest = load_feature_split(folder, "gtest.npy", "g_label.npy", num_classes, class_list)
    if gtest.features.shape[1] != train.features.shape[1]:
        raise InputError(f"{folder / 'gtest.npy'}: feature width {gtest.features.shape[1]} differs from "
                         f"train.npy's {train.features.shape[1]}")
    labels = set(gtest.labels.tolist())
    stray = sorted(labels - set(seen) - set(unseen))
    if stray:
        raise InputError(f"{folder / 'g_label.npy'}: labels {stray[:5]} are neither seen nor unseen classes")
    for side, classes in (("seen", seen), ("unseen", unseen)):
        if not labels & set(classes):
            raise InputError(f"{folder / 'g_label.npy'}: no samples of the {side} classes (GZSL scores both sides)")
    return gtest


# ----------------------------------------------------------------------------------------------
# The embedded generated task
# ----------------------------------------------------------------------------------------------

def generate_synthetic_task(cfg: DataConfig, text_global: torch.Tensor) -> ZSLTask:
    """A generated zero-shot feature task whose class structure comes from real class texts.

    Each class prototype is a fixed random two-layer map of its encoded text (global feature), so classes
    with similar descriptions get similar prototypes and an unseen class is reachable from its text alone;
    samples add isotropic noise plus a shared low-rank nuisance. It exercises the whole pipeline; it is not
    skeleton data and its accuracies say nothing about NTU.
    """
    s = cfg.synthetic
    g = torch.Generator().manual_seed(s.seed)
    C, D = text_global.shape[0], s.feature_dim
    txt = text_global.float()
    txt = (txt - txt.mean(0)) / (txt.std(0) + 1e-6)                                 # (C, D_g) standardised
    # Prototypes depend on the text's leading principal directions only: a low-dimensional, smooth relation
    # that a model can learn from the seen classes and carry over to the unseen ones.
    _, _, v = torch.linalg.svd(txt, full_matrices=False)
    txt = txt @ v[:s.text_components].T                                            # (C, k)
    txt = txt / txt.std(0)
    w1 = torch.randn(txt.shape[1], 512, generator=g) / txt.shape[1] ** 0.5
    w2 = torch.randn(512, D, generator=g) / 512 ** 0.5
    proto = torch.tanh(txt @ w1) @ w2                                               # (C, D)
    proto = (proto - proto.mean(0)) / (proto.std(0) + 1e-6)
    n = s.samples_per_class
    labels = torch.arange(C).repeat_interleave(n)                                   # (C n,)
    nuisance = torch.randn(8, D, generator=g) / 8 ** 0.5                            # shared low-rank directions
    x = (proto[labels] + s.noise * torch.randn(C * n, D, generator=g)
         + s.noise * torch.randn(C * n, 8, generator=g) @ nuisance)                 # (C n, D)
    everything = FeatureSplit(x, labels)
    seen, unseen, val = resolve_split(cfg, C, [c for c in EMBEDDED_UNSEEN if c < C])
    test = everything.select(unseen)
    # GZSL test set: fresh samples of the seen classes (never trained on) beside the unseen test samples, as in
    # SA-DVAE's gtest. Drawn from their own generator, after everything above: the tensors above stay bit-identical.
    g_held = torch.Generator().manual_seed(s.seed + GZSL_SEED_OFFSET)
    held_labels = torch.tensor(seen).repeat_interleave(max(1, n // GZSL_HELD_OUT_DIVISOR))     # (S m,)
    m = len(held_labels)
    held = (proto[held_labels] + s.noise * torch.randn(m, D, generator=g_held)
            + s.noise * torch.randn(m, 8, generator=g_held) @ nuisance)                      # (S m, D)
    gtest = FeatureSplit(torch.cat([held, test.features]), torch.cat([held_labels, test.labels]))
    return ZSLTask("synthetic", C, everything.select(seen), test, seen, unseen, val, gtest)
