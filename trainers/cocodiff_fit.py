"""CoCoDiff fit loop, classification evaluation and the inference-only export (METHODS.md §2).

Training runs backbone + head, and with `module.enabled` the CoCoDiff module beside them; evaluation and
export touch backbone + head only (`SkeletonClassifier`), so the module adds no inference cost. The loop
reports through `trainers.tracking.Reporter` (curve=None), checkpoints atomically (last.pt resumable,
best.pt = best `val/top1`, holding the classifier only and its validation logits for stream ensembles).

Batches and the diffusion draws are pure functions of (seed, step, rank), so a resumed run trains exactly as an
uninterrupted one, and data-parallel ranks (DDP, `wrap_model`) train on disjoint shards of each global batch.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from trainers.cocodiff import (
    BackboneConfig,
    CoCoDiffConfig,
    CoCoDiffModule,
    build_module,
    build_schedule,
    classification_loss,
    cocodiff_loss,
    draw_diffusion_inputs,
)
from trainers.config import flatten, to_plain
from trainers.diffusion import NoiseSchedule
from trainers.errors import InputError
from trainers.guards import LossGuard
from trainers.io import atomic_torch_save, load_checkpoint, stable_hash
from trainers.runtime import (
    autocast,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from trainers.skeleton.gcn import Encoder, build_encoder, joint_to_bone, joint_to_motion
from trainers.skeleton.prepared import read_prepared
from trainers.skeleton.splits import BENCHMARKS
from trainers.skeleton.synthetic import action_catalogue
from trainers.tdsm_fit import lr_at
from trainers.tdsm_task import (
    ASSETS,
    EMBEDDED_DESCRIPTIONS,
    EMBEDDED_NAMES,
    default_cache_dir,
)
from trainers.text import encode_prompt_sets, read_prompt_file
from trainers.tracking import Reporter

LAST = "last.pt"
BEST = "best.pt"
# Config keys that do not change what training computes: a checkpoint stays valid when only these differ.
NON_TRAINING_KEYS = ("eval.", "train.eval_every", "train.checkpoint_every", "train.device", "train.threads",
                     "text.cache_dir")
# Only the pooled (global) text features are used; MiniLM's local features need at least [CLS] and [SEP].
UNUSED_LOCAL_TOKENS = 2
TOP_K = 5
# One hand-written synonym per generated class (coarse text beside the generated name), in catalogue order.
SYNTHETIC_SYNONYMS = ASSETS / "synthetic_synonyms.txt"
SYNTHETIC_LABEL = "synthetic-skeleton"


# ----------------------------------------------------------------------------------------------
# The inference model: backbone + head
# ----------------------------------------------------------------------------------------------

class SkeletonClassifier(nn.Module):
    """GCN backbone + linear head on one input stream: everything that runs at inference.

    Reads the joint array (N, C, T, V, M) and derives its stream (bone / motion) itself, so every stream's
    classifier takes the same input and their logits can be ensembled. No parameters beyond the encoder's.
    """

    def __init__(self, encoder: Encoder, stream: str = "joint"):
        super().__init__()
        if stream not in ("joint", "bone", "motion"):
            raise InputError(f"backbone.stream {stream!r}: expected joint, bone or motion")
        self.encoder = encoder
        self.stream = stream

    def to_stream(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, V, M) joints -> the same shape in this classifier's stream."""
        if self.stream == "bone":
            return joint_to_bone(x, self.encoder.graph.bone_pairs)
        if self.stream == "motion":
            return joint_to_motion(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, V, M) joints -> pooled feature x_0 (N, D)."""
        return self.encoder.forward_features(self.to_stream(x))

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, D) features (real x_0 or generated x̂_0) -> logits (N, num_classes), dropout as in Encoder.forward."""
        return self.encoder.fc(self.encoder.drop(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))                                 # (N, num_classes)


def build_classifier(cfg: BackboneConfig, num_classes: int, in_channels: int = 3) -> SkeletonClassifier:
    """Backbone + head sized by the config; never builds any diffusion part."""
    encoder = build_encoder(cfg.encoder, num_classes, in_channels, cfg.layout, cfg.base_channels,
                            tuple(cfg.units_per_stage), cfg.dropout)
    return SkeletonClassifier(encoder, cfg.stream)


# ----------------------------------------------------------------------------------------------
# Data: a prepared folder (real release or the generated synthetic set) and the class texts
# ----------------------------------------------------------------------------------------------

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
        raise InputError(f"{prepared.folder / 'index.tsv'}: no {benchmark} test samples; the test accuracy would be NaN")
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
    generated set prepared by the service layer (`service.cocodiff_data`; trainers never run `service.prepare`)."""
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
    return PromptSets([c.name for c in catalogue], [read_prompt_file(SYNTHETIC_SYNONYMS, expected_count=len(catalogue))],
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


def dataset_label(cfg: CoCoDiffConfig) -> str:
    """Short name of the data a config trains on, for run and experiment names: 'synthetic-skeleton' or the
    benchmark (with '-synthetic-skeleton' for the generated set's X-View)."""
    if cfg.data.source == "synthetic":
        return SYNTHETIC_LABEL if cfg.data.benchmark == "ntu60-xsub" else f"{SYNTHETIC_LABEL}-{cfg.data.benchmark}"
    return cfg.data.benchmark


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


def prepare_cocodiff(cfg: CoCoDiffConfig, folder: Path | None = None) -> tuple[SkeletonData, list[str],
                                                                             torch.Tensor | None, torch.Tensor | None]:
    """(data, class names, fine text, coarse text); the texts are None (never encoded) for the baseline.

    folder: the prepared folder of a source=synthetic config (see `load_cocodiff_data`)."""
    data = load_cocodiff_data(cfg, folder)
    if not cfg.module.enabled:
        return data, read_class_names(cfg, data.num_classes), None, None
    return (data, *encode_cocodiff_texts(cfg, data.num_classes))


# ----------------------------------------------------------------------------------------------
# Evaluation and ensembles
# ----------------------------------------------------------------------------------------------

def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor, prefix: str = "val") -> dict[str, float]:
    """{prefix/top1, prefix/top5} in %; top-5 is top-min(5, C)."""
    labels = labels.to(logits.device)
    k = min(TOP_K, logits.shape[1])
    top = logits.topk(k, dim=1).indices                                         # (N, k)
    return {f"{prefix}/top1": float((top[:, 0] == labels).float().mean() * 100),
            f"{prefix}/top5": float((top == labels[:, None]).any(1).float().mean() * 100)}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                        prefix: str = "val", precision: str = "fp32") -> tuple[dict[str, float], torch.Tensor]:
    """(top-1/top-5 metrics, per-sample logits (N, C) float32 CPU) of any backbone+head module.

    Runs the model alone, in eval mode (restored afterwards), on the device of its parameters.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(x), batch_size):
        with autocast(device, precision):
            chunks.append(model(x[start:start + batch_size].to(device)).float().cpu())   # (B, C)
    model.train(was_training)
    logits = torch.cat(chunks)                                                           # (N, C)
    return accuracy_metrics(logits, y, prefix), logits


def evaluate_split(cfg: CoCoDiffConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   prefix: str) -> tuple[dict[str, float], torch.Tensor]:
    """`evaluate_classifier` at the config's evaluation batch and training precision (as validation in the fit)."""
    precision = resolve_precision(cfg.train.precision, next(model.parameters()).device)
    return evaluate_classifier(model, x, y, cfg.eval.batch_size, prefix, precision)


def ensemble_logits(logits: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted sum of per-stream logits (N, C) (the usual joint/bone/motion score fusion); equal weights by default."""
    if not logits:
        raise InputError("ensemble_logits: no logits given")
    weights = [1.0] * len(logits) if weights is None else list(weights)
    if len(weights) != len(logits):
        raise InputError(f"ensemble_logits: {len(logits)} logits but {len(weights)} weights")
    shapes = {tuple(lg.shape) for lg in logits}
    if len(shapes) != 1:
        raise InputError(f"ensemble_logits: logits differ in shape {sorted(shapes)}")
    return sum(w * lg.float() for w, lg in zip(weights, logits))


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------

def batch_indices(step: int, batch_size: int, n: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Sample ids of a step on one rank (pure function): epochs of seeded permutations, the remainder of each
    epoch dropped; the global batch of batch_size x world_size ids is split into world_size disjoint shards."""
    global_batch = batch_size * world_size
    per_epoch = max(1, n // global_batch)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * global_batch:(k + 1) * global_batch].tensor_split(world_size)[rank]


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The generator of one step's diffusion draws (t, noise, fine-text mask): a pure function of (seed, step,
    rank), so a resumed run draws what an uninterrupted one would and every DDP rank draws differently."""
    state = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(state)


class TrainingModel(nn.Module):
    """Backbone + head and, when enabled, the CoCoDiff module as one nn.Module for the training forward.

    This is what DDP wraps: its gradient all-reduce is armed by a forward *through the wrapper*, so the training
    pass must be one forward call (the inference model stays `classifier` alone).
    """

    def __init__(self, classifier: SkeletonClassifier, cocodiff: CoCoDiffModule | None):
        super().__init__()
        self.classifier = classifier
        self.cocodiff = cocodiff

    @property
    def feature_dim(self) -> int:
        return self.classifier.encoder.feature_dim

    def forward(self, x: torch.Tensor, y: torch.Tensor, fine_text: torch.Tensor | None,
                coarse_text: torch.Tensor | None, t: torch.Tensor | None, noise: torch.Tensor | None,
                keep: torch.Tensor | None, schedule: NoiseSchedule,
                detach_diffusion_input: bool = False) -> dict[str, torch.Tensor]:
        """x (N, C, T, V, M), y (N,) -> logits (N, K) and, with the module, x0 / x0_hat (N, D), logits_gen (N, K),
        skel_emb / text_emb (N, A), the logit scale (scalar) and, with detach_diffusion_input, x0_hat_diff (N, D):
        the same prediction denoised from an x_t of sg(x_0), for the diffusion term alone."""
        x0 = self.classifier.features(x)                                           # (N, D)
        out = {"logits": self.classifier.head(x0), "x0": x0}                       # (N, K)
        if self.cocodiff is None:
            return out
        # The module is a handful of small GEMMs on pooled (N, D) features: under bf16 autocast the per-call
        # weight casts cost more than they save (CPU, measured with `service.bench cocodiff`), so it runs in fp32.
        with torch.autocast(x.device.type, enabled=False):
            fine, x0_hat_diff = fine_text[y], None                                 # (N, D_f)
            if detach_diffusion_input:
                # Only ||x̂_0 - sg(x_0)||² is cut from the backbone: its target is detached and it holds no label,
                # so through x_t it can only make x_0 easier to denoise (mostly a change of its scale against the
                # fixed noise, along ±x_0), not more separable; CE(head(x̂_0)) and the coarse KL are label-driven
                # and keep reaching the backbone through x_t (the paper's point: label-consistent generation).
                # One denoiser call on the stacked (sg(x_0), x_0) rows: the same draws, twice the rows, and the
                # denoiser's own gradient is what a single, undetached call gives it.
                both = self.cocodiff(torch.cat([x0.detach(), x0]).float(), fine.repeat(2, 1), t.repeat(2),
                                     noise.repeat(2, 1), schedule, keep.repeat(2) if keep is not None else None)
                x0_hat_diff, x0_hat = both.chunk(2)                                # 2 x (N, D)
            else:
                x0_hat = self.cocodiff(x0.float(), fine, t, noise, schedule, keep)  # (N, D)
            skel_emb, text_emb = self.cocodiff.align(x0_hat, coarse_text[y])       # (N, A), (N, A)
        return {**out, "x0_hat": x0_hat, "x0_hat_diff": x0_hat_diff, "logits_gen": self.classifier.head(x0_hat),
                "skel_emb": skel_emb, "text_emb": text_emb, "logit_scale": self.cocodiff.logit_scale()}


def compute_losses(model: TrainingModel, schedule: NoiseSchedule, cfg: CoCoDiffConfig, x: torch.Tensor,
                   y: torch.Tensor, fine_text: torch.Tensor | None, coarse_text: torch.Tensor | None,
                   gen: torch.Generator, amp, forward: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Loss terms of one batch x (N, C, T, V, M), y (N,); the module's t, noise and mask come from `gen`.

    Besides the terms, `x0_norm`: the batch's mean ||x_0|| (detached), logged as train/x0_norm to follow the
    feature scale. forward: what runs model's forward, i.e. model itself or its DDP wrapper (default: model).
    """
    m = cfg.module
    t = noise = keep = None
    if model.cocodiff is not None:
        t, noise, keep = draw_diffusion_inputs(len(y), model.feature_dim, m.num_train_timesteps, m.fine_dropout,
                                               gen, x.device)
    with amp():
        out = (forward or model)(x, y, fine_text, coarse_text, t, noise, keep, schedule,
                                 detach_diffusion_input=m.detach_diffusion_input)
    if model.cocodiff is None:
        terms = classification_loss(out["logits"], y)
    else:
        terms = cocodiff_loss(out["logits"], out["logits_gen"], out["x0"], out["x0_hat"], out["skel_emb"],
                              out["text_emb"], y, out["logit_scale"], m.w_diff, m.w_gen, m.w_coarse,
                              x0_hat_diff=out["x0_hat_diff"])
    return {**terms, "x0_norm": out["x0"].detach().float().norm(dim=-1).mean()}


def make_optimizer(cfg: CoCoDiffConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and conv kernels only (not on biases, norms, scales, shifts).

    The fused kernel (CPU and CUDA) updates all tensors in one pass: the per-tensor loop of the default
    implementation cost ~3 ms per step for the ~70 small tensors of the default model + module on one CPU
    thread, a large share of the module's training overhead (measured with `service.bench cocodiff`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, fused=fused)


def training_step(model: TrainingModel, schedule: NoiseSchedule, opt: torch.optim.Optimizer, cfg: CoCoDiffConfig,
                  x: torch.Tensor, y: torch.Tensor, fine_text: torch.Tensor | None, coarse_text: torch.Tensor | None,
                  gen: torch.Generator, amp, forward: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Forward (through `forward`, e.g. a DDP wrapper of model), backward, clip, step; the detached loss terms."""
    losses = compute_losses(model, schedule, cfg, x, y, fine_text, coarse_text, gen, amp, forward)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    return {k: v.detach() for k, v in losses.items()}


# ----------------------------------------------------------------------------------------------
# Fit
# ----------------------------------------------------------------------------------------------

def average_buffers(model: nn.Module, world_size: int) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the DDP ranks, in place.

    DDP broadcasts rank 0's buffers only at the start of each forward, so after a step every rank holds
    statistics updated on its own shard; the average is the estimate over all shards. A collective: every rank
    calls it at the same steps."""
    import torch.distributed as dist

    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)     # gloo has no AVG
            buf.div_(world_size)


@dataclass
class CoCoDiffResult:
    """A finished fit: the final classifier, the training-only module, and the best evaluation point."""

    classifier: SkeletonClassifier               # final weights
    module: CoCoDiffModule | None                # None for the baseline; never needed at inference
    step: int
    last_metrics: dict[str, float]
    best_metric: float                           # best val/top1 (-1 when nothing was evaluated)
    best_step: int
    best_metrics: dict[str, float]
    best_state: dict[str, torch.Tensor] | None   # classifier weights at best_step (CPU)
    val_logits: torch.Tensor | None              # (N_val, C) logits at best_step


def training_fingerprint(cfg: CoCoDiffConfig, train_x: torch.Tensor, num_classes: int,
                         text_dims: tuple[int, int] | None) -> str:
    """Hash of everything that changes what training computes (resuming under another config is refused)."""
    flat = flatten(to_plain(cfg))
    keys = {k: v for k, v in flat.items() if not k.startswith(NON_TRAINING_KEYS)}
    return stable_hash({**keys, "data_shape": list(train_x.shape), "num_classes": num_classes, "text": text_dims})


def _check_inputs(train_x, train_y, val_x, val_y, fine_text, coarse_text, enabled: bool) -> int:
    """The class count (rows of the text, else 1 + the largest label); InputError naming what is wrong."""
    if len(train_x) == 0 or len(train_x) != len(train_y):
        raise InputError(f"training data: {len(train_x)} sequences, {len(train_y)} labels (need equal, > 0)")
    if train_x.ndim != 5:
        raise InputError(f"training data: expected (N, C, T, V, M), got shape {tuple(train_x.shape)}")
    if val_x is not None and len(val_x) != len(val_y):
        raise InputError(f"validation data: {len(val_x)} sequences, {len(val_y)} labels")
    if enabled:
        if fine_text is None or coarse_text is None:
            raise InputError("module.enabled needs fine_text and coarse_text (one row per class)")
        if fine_text.shape[0] != coarse_text.shape[0]:
            raise InputError(f"fine text has {fine_text.shape[0]} classes, coarse text {coarse_text.shape[0]}")
        num_classes = fine_text.shape[0]
    else:
        num_classes = int(max(train_y.max(), val_y.max() if val_y is not None and len(val_y) else 0)) + 1
        if fine_text is not None:
            num_classes = max(num_classes, fine_text.shape[0])
    if int(train_y.max()) >= num_classes or int(train_y.min()) < 0:
        raise InputError(f"training labels must be in 0..{num_classes - 1}")
    return num_classes


def fit_cocodiff(cfg: CoCoDiffConfig, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor | None,
                 val_y: torch.Tensor | None, fine_text: torch.Tensor | None, coarse_text: torch.Tensor | None,
                 reporter: Reporter, run_dir: Path | None = None, progress: bool = True,
                 num_classes: int | None = None, wrap_model: Callable[[nn.Module], nn.Module] | None = None,
                 rank: int = 0, world_size: int = 1) -> CoCoDiffResult:
    """Train backbone + head (+ the CoCoDiff module when cfg.module.enabled) on (train_x (N, C, T, V, M), train_y).

    fine_text (K, D_f), coarse_text (K, D_c): one row per class (may be None for the baseline). Evaluates
    top-1/top-5 on (val_x, val_y) every train.eval_every steps as `val/top1`, `val/top5`. run_dir holds
    last.pt (resumable) and best.pt (best val/top1: classifier weights + validation logits); None keeps
    nothing on disk. num_classes defaults to the text rows (or 1 + the largest label for the baseline).

    Data-parallel training (DDP): every rank calls this with the same config and data, its `rank` and the
    `world_size`, and wrap_model (e.g. Ray Train's prepare_model) wrapping the one `TrainingModel`. Each rank
    trains on its own shard of every global batch (optim.batch_size per rank) with its own diffusion draws;
    gradients are averaged, so the weights stay identical; BatchNorm statistics are averaged over the ranks before
    each evaluation and checkpoint, so every rank evaluates and checkpoints the same model.
    """
    enabled = cfg.module.enabled
    inferred = _check_inputs(train_x, train_y, val_x, val_y, fine_text, coarse_text, enabled)
    num_classes = num_classes or inferred
    if enabled and num_classes != fine_text.shape[0]:
        raise InputError(f"num_classes={num_classes} but the texts have {fine_text.shape[0]} rows (one per class)")
    if not 0 <= rank < world_size or len(train_x) < world_size:
        raise InputError(f"rank {rank} of {world_size}: needs 0 <= rank < world_size <= {len(train_x)} training sequences")
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    classifier = build_classifier(cfg.backbone, num_classes, train_x.shape[1]).to(device)
    module, schedule, text_dims = None, build_schedule(cfg.module), None
    if enabled:
        text_dims = (fine_text.shape[1], coarse_text.shape[1])
        module = build_module(cfg.module, classifier.encoder.feature_dim, *text_dims).to(device)
        fine_text, coarse_text = fine_text.float().to(device), coarse_text.float().to(device)
    model = TrainingModel(classifier, module)
    opt = make_optimizer(cfg, model)
    amp = lambda: autocast(device, precision)  # a fresh context per use
    fingerprint = training_fingerprint(cfg, train_x, num_classes, text_dims)

    state = _FitState()
    if run_dir is not None and (Path(run_dir) / LAST).is_file():
        state = _resume(Path(run_dir), fingerprint, classifier, module, opt)
    # Wrapped after a resume: DDP broadcasts rank 0's weights at construction, and every rank loaded the same.
    forward = wrap_model(model) if wrap_model is not None else model
    evaluating = val_x is not None and len(val_x) > 0
    total, B = cfg.train.steps, cfg.optim.batch_size
    log_every = max(1, min(50, total // 20))
    bar = tqdm(total=total, initial=state.step, desc="cocodiff" if enabled else "baseline", disable=not progress,
               file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    guard = LossGuard(device, "lower optim.lr or set optim.grad_clip > 0")
    model.train()
    start_step = state.step
    while state.step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(state.step, total, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
        idx = batch_indices(state.step, B, len(train_x), cfg.train.seed, rank, world_size)
        x, y = train_x[idx].to(device, non_blocking=True), train_y[idx].to(device)
        gen = step_generator(cfg.train.seed, state.step, rank)
        losses = training_step(model, schedule, opt, cfg, x, y, fine_text, coarse_text, gen, amp, forward)
        state.step += 1
        bar.update(1)
        step = state.step
        guard.update(losses["loss"], step)
        if (step % log_every == 0 or step == total or step % cfg.train.eval_every == 0
                or step % cfg.train.checkpoint_every == 0):
            guard.flush()                  # nothing diverged is logged as a metric or saved
        if step % log_every == 0 or step == total:
            scalars = {f"train/{k}": float(v) for k, v in losses.items()}
            scalars["train/lr"] = opt.param_groups[0]["lr"]
            if module is not None:
                scalars["train/logit_scale"] = float(module.logit_scale().detach())
            reporter.log_metrics(scalars, step)
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", refresh=False)
        is_eval = evaluating and (step % cfg.train.eval_every == 0 or step == total)
        is_ckpt = step % cfg.train.checkpoint_every == 0 or step == total
        if (is_eval or is_ckpt) and world_size > 1:
            average_buffers(model, world_size)       # every rank evaluates and saves the same model
        if is_eval:
            state.last_metrics, logits = evaluate_classifier(classifier, val_x, val_y, cfg.eval.batch_size, "val",
                                                             precision)
            bar.set_postfix(loss=f"{float(losses['loss']):.4f}", val=f"{state.last_metrics['val/top1']:.1f}")
            if state.last_metrics["val/top1"] > state.best:
                state.best, state.best_step, state.best_metrics = state.last_metrics["val/top1"], step, state.last_metrics
                state.best_state = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
                state.val_logits = logits
                if run_dir is not None:
                    _save_best(Path(run_dir) / BEST, state, val_y, cfg, num_classes, train_x.shape[1])
        if run_dir is not None and (is_ckpt or is_eval):
            _save_last(Path(run_dir) / LAST, fingerprint, classifier, module, opt, state, cfg)
        if is_eval:
            reporter.log_evaluation(state.last_metrics, step, None, Path(run_dir) if run_dir is not None else None)
    if start_step >= total and evaluating:
        # Resumed after the last step: report the final metrics again for whoever restarted the run.
        state.last_metrics, _ = evaluate_classifier(classifier, val_x, val_y, cfg.eval.batch_size, "val", precision)
        reporter.log_evaluation(state.last_metrics, state.step, None, Path(run_dir) if run_dir is not None else None)
    bar.close()
    model.eval()
    return CoCoDiffResult(classifier, module, state.step, state.last_metrics, state.best, state.best_step,
                          state.best_metrics, state.best_state, state.val_logits)


@dataclass
class _FitState:
    """What a resumed run must know beyond the weights."""

    step: int = 0
    best: float = -1.0
    best_step: int = 0
    best_metrics: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    val_logits: torch.Tensor | None = None
    last_metrics: dict[str, float] | None = None

    def __post_init__(self):
        self.best_metrics = self.best_metrics or {}
        self.last_metrics = self.last_metrics or {}


def _save_best(path: Path, state: _FitState, val_y: torch.Tensor, cfg: CoCoDiffConfig, num_classes: int,
               in_channels: int) -> None:
    """best.pt: the classifier only (what inference needs) with the config to rebuild it and its val logits."""
    atomic_torch_save({
        "classifier": state.best_state, "step": state.best_step, "metrics": state.best_metrics,
        "val_logits": state.val_logits, "val_labels": val_y.cpu(), "num_classes": num_classes,
        "in_channels": in_channels, "config": to_plain(cfg),
    }, path)


def _save_last(path: Path, fingerprint: str, classifier, module, opt, state: _FitState, cfg: CoCoDiffConfig) -> None:
    # Batches and diffusion draws are pure functions of (seed, step, rank); the torch RNG drives dropout.
    atomic_torch_save({
        "classifier": classifier.state_dict(), "module": module.state_dict() if module is not None else None,
        "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "step": state.step, "best": state.best, "best_step": state.best_step, "best_metrics": state.best_metrics,
        "last_metrics": state.last_metrics, "fingerprint": fingerprint, "config": to_plain(cfg),
    }, path)


def _load(path: Path) -> dict[str, Any]:
    """best.pt or an exported bundle: the classifier weights and what rebuilds it."""
    return load_checkpoint(path, keys=("classifier", "config", "num_classes", "in_channels"))


def _resume(run_dir: Path, fingerprint: str, classifier, module, opt) -> _FitState:
    """Load last.pt (and best.pt's weights and logits) into the run; refuse a checkpoint of another config."""
    state = load_checkpoint(run_dir / LAST, fingerprint, ("classifier", "optimizer", "torch_rng", "step", "best",
                                                          "best_step", "best_metrics", "last_metrics"))
    classifier.load_state_dict(state["classifier"])
    if module is not None:
        module.load_state_dict(state["module"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    out = _FitState(int(state["step"]), float(state["best"]), int(state["best_step"]), state["best_metrics"],
                    last_metrics=state["last_metrics"])
    if (run_dir / BEST).is_file():
        best = load_checkpoint(run_dir / BEST, keys=("classifier", "val_logits"))
        out.best_state, out.val_logits = best["classifier"], best["val_logits"]
    return out


# ----------------------------------------------------------------------------------------------
# Export: what inference runs
# ----------------------------------------------------------------------------------------------

def export_classifier(result: CoCoDiffResult, weights: str = "best") -> SkeletonClassifier:
    """An independent copy of backbone + head (eval mode) with the best-on-validation weights, or the final
    ones (weights='last', or when nothing was evaluated). No diffusion part is copied or referenced."""
    if weights not in ("best", "last"):
        raise InputError(f"export_classifier: weights={weights!r}, expected 'best' or 'last'")
    model = copy.deepcopy(result.classifier)
    if weights == "best" and result.best_state is not None:
        model.load_state_dict(result.best_state)
    return model.eval()


def load_classifier(path: Path, map_location: str | torch.device = "cpu") -> tuple[SkeletonClassifier, dict[str, Any]]:
    """(classifier, checkpoint) from a best.pt: rebuilt from its stored backbone config, no diffusion code."""
    ckpt = _load(Path(path))
    try:
        model = build_classifier(BackboneConfig.model_validate(ckpt["config"]["backbone"]), ckpt["num_classes"],
                                 ckpt["in_channels"])
        model.load_state_dict(ckpt["classifier"])
    except Exception as err:  # noqa: BLE001 - a config or weights that do not fit: one line
        raise InputError(f"{path}: not a classifier checkpoint ({type(err).__name__})") from None
    return model.to(map_location).eval(), ckpt


# ----------------------------------------------------------------------------------------------
# Ablation and step cost
# ----------------------------------------------------------------------------------------------

def with_overrides(cfg: CoCoDiffConfig, **sections: dict[str, Any]) -> CoCoDiffConfig:
    """A validated copy of cfg with fields of named sections replaced, e.g. module={'enabled': False}."""
    tree = to_plain(cfg)
    for section, values in sections.items():
        tree[section] = {**tree[section], **values}
    return CoCoDiffConfig.model_validate(tree)


def run_ablation(cfg: CoCoDiffConfig, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                 val_y: torch.Tensor, fine_text: torch.Tensor, coarse_text: torch.Tensor, seeds: Sequence[int],
                 reporter_factory=None, run_root: Path | None = None,
                 progress: bool = False) -> dict[str, list[dict[str, float]]]:
    """The same backbone trained with the module disabled ('baseline') and enabled ('cocodiff'), per seed.

    Each entry: {seed, step, best_step, val/top1, val/top5} at the best evaluation. reporter_factory(arm, seed)
    gives each run its reporter (default: a NullReporter); run_root/<arm>-s<seed> holds checkpoints.
    """
    from trainers.tracking import NullReporter

    out: dict[str, list[dict[str, float]]] = {"baseline": [], "cocodiff": []}
    num_classes = fine_text.shape[0]
    for seed in seeds:
        for arm, enabled in (("baseline", False), ("cocodiff", True)):
            arm_cfg = with_overrides(cfg, module={"enabled": enabled}, train={"seed": int(seed)})
            reporter = reporter_factory(arm, seed) if reporter_factory is not None else NullReporter()
            run_dir = Path(run_root) / f"{arm}-s{seed}" if run_root is not None else None
            result = fit_cocodiff(arm_cfg, train_x, train_y, val_x, val_y, fine_text, coarse_text, reporter, run_dir,
                                  progress, num_classes=num_classes)
            out[arm].append({"seed": float(seed), "step": float(result.step), "best_step": float(result.best_step),
                             **result.best_metrics})
    return out


def step_times(cfg: CoCoDiffConfig, batch: tuple[torch.Tensor, torch.Tensor], fine_text: torch.Tensor | None = None,
               coarse_text: torch.Tensor | None = None, iters: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median seconds of one training step (the fit loop's own `training_step`) without and with the module.

    batch: (x (N, C, T, V, M), y (N,)); texts default to seeded random 384-d rows (MiniLM's width) for
    1 + max(y) classes. Runs on cfg.train.device with cfg.train.precision; nothing is asserted here. The two
    arms' steps alternate, so a change in load from other processes hits both alike; `<arm>_cpu_share` is this
    process's CPU time over (wall time x torch threads) of the arm's timed steps (CPU only; ~1 when uncontended).
    """
    x, y = batch
    num_classes = fine_text.shape[0] if fine_text is not None else int(y.max()) + 1
    g = torch.Generator().manual_seed(0)
    fine_text = fine_text if fine_text is not None else torch.randn(num_classes, 384, generator=g)
    coarse_text = coarse_text if coarse_text is not None else torch.randn(num_classes, 384, generator=g)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    amp = lambda: autocast(device, precision)
    x, y = x.to(device), y.to(device)
    ft, ct = fine_text.float().to(device), coarse_text.float().to(device)
    schedule = build_schedule(cfg.module)
    arms = {}
    for arm, enabled in (("baseline", False), ("cocodiff", True)):
        seed_everything(cfg.train.seed)
        classifier = build_classifier(cfg.backbone, num_classes, x.shape[1]).to(device)
        module = build_module(cfg.module, classifier.encoder.feature_dim, ft.shape[1],
                              ct.shape[1]).to(device) if enabled else None
        model = TrainingModel(classifier, module).train()
        arms[arm] = (model, make_optimizer(cfg, model))
    wall: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, float] = dict.fromkeys(arms, 0.0)
    for i in range(warmup + iters):
        for arm, (model, opt) in arms.items():
            gen = step_generator(cfg.train.seed, i)
            _synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            training_step(model, schedule, opt, cfg, x, y, ft, ct, gen, amp)
            _synchronize(device)
            if i >= warmup:
                wall[arm].append(time.perf_counter() - start)
                cpu[arm] += time.process_time() - cpu_start
    out: dict[str, float] = {}
    for arm in arms:
        out[f"{arm}_s"] = statistics.median(wall[arm])
        if device.type == "cpu":
            out[f"{arm}_cpu_share"] = cpu[arm] / (sum(wall[arm]) * torch.get_num_threads())
    out["overhead"] = out["cocodiff_s"] / out["baseline_s"] - 1.0
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "BEST", "LAST", "CoCoDiffResult", "PromptSets", "SkeletonClassifier", "SkeletonData", "TrainingModel",
    "accuracy_metrics", "average_buffers", "batch_indices", "build_classifier", "class_prompts", "compute_losses", "dataset_label",
    "encode_cocodiff_texts", "ensemble_logits", "evaluate_classifier", "evaluate_split", "export_classifier",
    "fit_cocodiff", "load_classifier", "load_cocodiff_data", "load_prepared", "prepare_cocodiff", "read_class_names",
    "run_ablation", "step_generator", "step_times", "synthetic_prompts", "training_step", "with_overrides",
]
