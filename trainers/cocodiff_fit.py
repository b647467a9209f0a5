"""CoCoDiff fit loop (docs/METHODS.md §2): backbone + head, and with `module.enabled` the CoCoDiff module beside them.

Evaluation and export touch backbone + head only (`trainers.cocodiff_classifier`), so the module adds no
inference cost. The loop (the skeleton of `trainers.fit_loop`) reports through `trainers.tracking.Reporter` (no
artifacts), checkpoints atomically (last.pt resumable, best.pt = best `val/top1`, holding the classifier only and
its validation logits for stream ensembles).

Batches and the diffusion draws are pure functions of (seed, step, rank), so a resumed run trains exactly as an
uninterrupted one, and data-parallel ranks (DDP, `wrap_model`) train on disjoint shards of each global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainers import checkpoint
from trainers.checkpoint import BEST, LAST
from trainers.cocodiff import (
    CoCoDiffModule,
    build_module,
    build_schedule,
    classification_loss,
    cocodiff_loss,
    draw_diffusion_inputs,
)
from trainers.cocodiff_classifier import SkeletonClassifier, build_classifier
from trainers.cocodiff_eval import evaluate_classifier
from trainers.config import flatten, to_plain
from trainers.configs import CoCoDiffConfig
from trainers.diffusion import NoiseSchedule
from trainers.errors import InputError
from trainers.fit_loop import DIVERGED_HINT, FitParts, LossGuard, build_adamw, optimizer_step, run_fit, step_plan
from trainers.io import load_checkpoint
from trainers.runtime import apply_thread_policy, autocast, resolve_device, resolve_precision, seed_everything
from trainers.schedule import batch_indices
from trainers.tracking import Reporter

# Config keys that do not change what training computes: a checkpoint stays valid when only these differ.
NON_TRAINING_KEYS = ("eval.", "train.eval_every", "train.checkpoint_every", "train.device", "train.threads",
                     "text.cache_dir")


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------

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


def build_optimizer(cfg: CoCoDiffConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW (fit_loop.build_adamw): decay on matrices and conv kernels only, fused on CPU and CUDA (the per-tensor
    loop cost ~3 ms per step for the ~70 small tensors of the default model + module on one CPU thread, measured
    with `service.bench cocodiff`)."""
    return build_adamw(model, cfg.optim.lr, cfg.optim.weight_decay)


def training_step(model: TrainingModel, schedule: NoiseSchedule, opt: torch.optim.Optimizer, cfg: CoCoDiffConfig,
                  x: torch.Tensor, y: torch.Tensor, fine_text: torch.Tensor | None, coarse_text: torch.Tensor | None,
                  gen: torch.Generator, amp, forward: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Forward (through `forward`, e.g. a DDP wrapper of model), backward, clip, step; the detached loss terms."""
    losses = compute_losses(model, schedule, cfg, x, y, fine_text, coarse_text, gen, amp, forward)
    optimizer_step(opt, losses["loss"], model, cfg.optim.grad_clip)
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
    return checkpoint.training_fingerprint(flatten(to_plain(cfg)), NON_TRAINING_KEYS, data_shape=list(train_x.shape),
                                           num_classes=num_classes, text=text_dims)


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
        raise InputError(f"rank {rank} of {world_size}: needs 0 <= rank < world_size <= {len(train_x)} "
                         "training sequences")
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    seed_everything(cfg.train.seed)
    classifier = build_classifier(cfg.backbone, num_classes, train_x.shape[1]).to(device)
    apply_thread_policy(cfg.train.threads, classifier.encoder.feature_dim)
    module, schedule, text_dims = None, build_schedule(cfg.module), None
    if enabled:
        text_dims = (fine_text.shape[1], coarse_text.shape[1])
        module = build_module(cfg.module, classifier.encoder.feature_dim, *text_dims).to(device)
        fine_text, coarse_text = fine_text.float().to(device), coarse_text.float().to(device)
    model = TrainingModel(classifier, module)
    opt = build_optimizer(cfg, model)

    def amp():  # a fresh context per use
        return autocast(device, precision)

    fingerprint = training_fingerprint(cfg, train_x, num_classes, text_dims)
    state = _FitState()
    if run_dir is not None and (Path(run_dir) / LAST).is_file():
        state = _resume(Path(run_dir), fingerprint, classifier, module, opt, cfg.train.steps, num_classes)
    # Wrapped after a resume: DDP broadcasts rank 0's weights at construction, and every rank loaded the same.
    forward = wrap_model(model) if wrap_model is not None else model
    evaluating = val_x is not None and len(val_x) > 0
    logits = None

    def train(step: int) -> dict[str, torch.Tensor]:
        idx = batch_indices(step, cfg.optim.batch_size, len(train_x), cfg.train.seed, rank, world_size)
        x, y = train_x[idx].to(device, non_blocking=True), train_y[idx].to(device)
        gen = step_generator(cfg.train.seed, step, rank)
        return training_step(model, schedule, opt, cfg, x, y, fine_text, coarse_text, gen, amp, forward)

    def scalars(losses: dict[str, torch.Tensor]) -> dict[str, float]:
        out = {f"train/{k}": float(v) for k, v in losses.items()}
        out["train/lr"] = opt.param_groups[0]["lr"]
        if module is not None:
            out["train/logit_scale"] = float(module.logit_scale().detach())
        return out

    def evaluate(_: int) -> tuple[dict[str, float], dict[str, Any]]:
        nonlocal logits
        state.last_metrics, logits = evaluate_classifier(classifier, val_x, val_y, cfg.eval.batch_size, "val",
                                                         precision)
        return state.last_metrics, {}

    def record(step: int, metrics: dict[str, float] | None) -> None:
        state.step = step
        if metrics is not None and metrics["val/top1"] > state.best:
            state.best, state.best_step, state.best_metrics = metrics["val/top1"], step, metrics
            state.best_state = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
            state.val_logits = logits
            if run_dir is not None:
                _save_best(Path(run_dir) / BEST, state, val_y, cfg, num_classes, train_x.shape[1])
        if run_dir is not None:
            _save_last(Path(run_dir) / LAST, fingerprint, classifier, module, opt, state, cfg)

    def sync() -> None:
        average_buffers(model, world_size)       # every rank evaluates and saves the same model

    parts = FitParts(train, scalars, evaluate if evaluating else None, record, "val/top1",
                     sync if world_size > 1 else None)
    state.step = run_fit(step_plan(cfg.train, cfg.optim), parts, model, opt, state.step, reporter, run_dir,
                         LossGuard(device, DIVERGED_HINT), "cocodiff" if enabled else "baseline", progress)
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
    checkpoint.save(path, {
        "classifier": state.best_state, "step": state.best_step, "metrics": state.best_metrics,
        "val_logits": state.val_logits, "val_labels": val_y.cpu(), "num_classes": num_classes,
        "in_channels": in_channels, "config": to_plain(cfg),
    })


def _save_last(path: Path, fingerprint: str, classifier, module, opt, state: _FitState, cfg: CoCoDiffConfig) -> None:
    # Batches and diffusion draws are pure functions of (seed, step, rank); the torch RNG drives dropout.
    checkpoint.save(path, {
        "classifier": classifier.state_dict(), "module": module.state_dict() if module is not None else None,
        "optimizer": opt.state_dict(), **checkpoint.rng_state(cuda=True),
        "step": state.step, "best": state.best, "best_step": state.best_step, "best_metrics": state.best_metrics,
        "last_metrics": state.last_metrics, "fingerprint": fingerprint, "config": to_plain(cfg),
    })


def _resume(run_dir: Path, fingerprint: str, classifier, module, opt, total: int, num_classes: int) -> _FitState:
    """Load last.pt (and best.pt's weights and logits) into the run; refuse a checkpoint of another config, or
    whose contents do not fit this model and config (checkpoint.check_last)."""
    last = run_dir / LAST
    state = checkpoint.restore(last, fingerprint, ("classifier", "optimizer", "torch_rng", "step", "best",
                                                   "best_step", "best_metrics", "last_metrics"),
                               {"classifier": classifier, "module": module}, opt, total, optional=("cuda_rng",))
    out = _FitState(state["step"], checkpoint.check_score(last, "best", state["best"]),
                    checkpoint.check_step(last, "best_step", state["best_step"], state["step"]),
                    checkpoint.check_metrics(last, "best_metrics", state["best_metrics"]),
                    last_metrics=checkpoint.check_metrics(last, "last_metrics", state["last_metrics"]))
    if (run_dir / BEST).is_file():
        path = run_dir / BEST
        best = load_checkpoint(path, keys=("classifier", "val_logits"))
        checkpoint.check_weights(path, "classifier", best["classifier"], classifier)
        logits = best["val_logits"]
        if logits is not None and (not isinstance(logits, torch.Tensor) or logits.dim() != 2
                                   or logits.shape[1] != num_classes):
            raise checkpoint.bad_entry(path, "val_logits", f"expected (N, {num_classes}) validation logits")
        checkpoint.check_finite(path, "val_logits", logits)
        out.best_state, out.val_logits = best["classifier"], logits
    return out


# ----------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------

def with_overrides(cfg: CoCoDiffConfig, **sections: dict[str, Any]) -> CoCoDiffConfig:
    """A validated copy of cfg with fields of named sections replaced, e.g. module={'enabled': False}."""
    tree = to_plain(cfg)
    for section, values in sections.items():
        tree[section] = {**tree[section], **values}
    return CoCoDiffConfig.model_validate(tree)
