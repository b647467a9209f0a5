"""GCN feature encoders for TDSM: cross-entropy on the *seen* classes only, then feature extraction.

The encoder never sees an unseen class (docs/METHODS.md §1: a frozen GCN trained on the seen classes); its pooled
feature is what TDSM denoises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers import checkpoint
from trainers.checkpoint import ENCODER, LAST
from trainers.configs import EncoderConfig
from trainers.errors import InputError
from trainers.fit_loop import FitParts, LossGuard, StepPlan, build_adamw, optimizer_step, run_fit
from trainers.io import load_checkpoint, load_torch
from trainers.runtime import (
    ThreadGovernor,
    apply_thread_policy,
    autocast,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from trainers.schedule import epoch_indices, log_every
from trainers.skeleton.gcn import Encoder, build_encoder, joint_to_bone, joint_to_motion
from trainers.skeleton.graph import Graph
from trainers.tracking import Reporter

# EncoderConfig fields that do not change what training computes (exact names).
NON_TRAINING_KEYS = ("device", "checkpoint_every")


def to_stream(x: torch.Tensor, stream: str, layout: str) -> torch.Tensor:
    """(N, C, T, V, M) joint coordinates -> the requested stream."""
    if stream == "bone":
        return joint_to_bone(x, Graph(layout).bone_pairs)
    if stream == "motion":
        return joint_to_motion(x)
    return x


@dataclass
class EncoderResult:
    """The trained encoder and the seen classes its head predicts (column order)."""

    model: Encoder
    classes: list[int]
    train_top1: float                             # running top-1 over the last logging window
    step: int = 0
    held_out_top1: float | None = None            # top-1 on held-out sequences of the seen classes


def training_fingerprint(cfg: EncoderConfig, x: torch.Tensor, classes: list[int]) -> str:
    """Hash of what training computes: a checkpoint written under anything else is refused on resume."""
    return checkpoint.training_fingerprint(cfg.model_dump(mode="json"), names=NON_TRAINING_KEYS,
                                           data_shape=list(x.shape), classes=list(classes))


@torch.no_grad()
def classification_top1(model: Encoder, x: torch.Tensor, target: torch.Tensor, cfg: EncoderConfig,
                        batch_size: int = 64) -> float:
    """Top-1 (%) of the head on (x (N, C, T, V, M), head columns (N,)); the model is left in its mode."""
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    was_training = model.training
    model.eval()
    correct = 0
    for s in range(0, len(x), batch_size):
        xb = to_stream(x[s:s + batch_size].float(), cfg.stream, cfg.layout).to(device)
        with autocast(device, precision):
            correct += int((model(xb).argmax(-1).cpu() == target[s:s + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(1, len(x))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, tb: torch.Tensor,
               device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One cross-entropy step on (xb (B, C, T, V, M), head columns tb (B,)); returns (loss, logits), detached."""
    with autocast(device, precision):
        logits = model(xb)
    loss = F.cross_entropy(logits.float(), tb)
    optimizer_step(opt, loss, model)
    return loss.detach(), logits.detach()


def fit_encoder(cfg: EncoderConfig, x: torch.Tensor, y: torch.Tensor, classes: list[int], reporter: Reporter,
                run_dir: Path | None = None, progress: bool = True,
                held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                wrap_model: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0,
                world: int = 1, follow_load: bool = False) -> EncoderResult:
    """Train on (x (N, C, T, V, M), y class ids ⊂ classes) with cross-entropy.

    Batches are a pure function of (seed, step): `cfg.batch_size` sequences per step in all, rank r of
    `world` DDP workers taking every world-th of them (wrap_model, e.g. Ray Train's prepare_model, wraps the
    model for the training forward). Rank 0 keeps run_dir/last.pt (resumable, every cfg.checkpoint_every
    steps) and, at the end, run_dir/encoder.pt; every checkpoint is announced through
    `reporter.log_evaluation(evaluation, step, {}, run_dir)` on every rank. `held_out` (sequences of the seen
    classes never trained on) is scored once at the end as `encoder/held_out_top1`, the one evaluation metric.
    follow_load (in-process CPU training): torch's thread count follows the machine's load (runtime.ThreadGovernor).
    """
    stray = sorted(set(y.tolist()) - set(classes))
    if stray:
        raise InputError(f"encoder training labels {stray[:5]} are not among the seen classes")
    if cfg.batch_size < world:
        raise InputError(f"encoder batch_size={cfg.batch_size}: smaller than the {world} workers sharing it")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    # RNG: dropout draws from torch's global RNG, which last.pt does not hold (its key set is pinned): a run resumed
    # with dropout > 0 draws other masks than an uninterrupted one.
    seed_everything(cfg.seed)                                               # same init on every rank
    col = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    col[torch.tensor(classes)] = torch.arange(len(classes))
    target = col[y]                                                         # (N,) head columns
    model = build_encoder(cfg.name, len(classes), in_channels=x.shape[1], layout=cfg.layout,
                          base_channels=cfg.base_channels, units_per_stage=tuple(cfg.units_per_stage),
                          dropout=cfg.dropout).to(device)
    threads = apply_thread_policy(0, model.feature_dim)                     # no threads field: always auto
    # In-process beside other work (the skeleton chain), the count also follows the load: two OpenMP threads beside
    # two busy processes ran 2-4x slower than one (runtime.ThreadGovernor).
    governor = ThreadGovernor(threads) if follow_load and device.type == "cpu" else None
    # Every parameter decayed, by the per-tensor AdamW: matrices-only decay or the fused kernel would change the
    # pinned metric traces.
    opt = build_adamw(model, cfg.lr, cfg.weight_decay, decay_all=True, fused=False)
    fingerprint = training_fingerprint(cfg, x, classes)
    last = Path(run_dir) / LAST if run_dir is not None else None
    step = _resume(last, fingerprint, model, opt, cfg.steps) if last is not None and last.is_file() else 0
    train_model = wrap_model(model) if wrap_model is not None else model
    correct = seen = 0
    metrics: dict[str, float] = {}

    def train(at: int) -> dict[str, torch.Tensor]:
        nonlocal correct, seen
        idx = epoch_indices(at, cfg.batch_size, len(x), cfg.seed)[rank::world]
        xb = to_stream(x[idx].float(), cfg.stream, cfg.layout).to(device)
        tb = target[idx].to(device)
        loss, logits = train_step(train_model, opt, xb, tb, device, precision)
        if governor is not None:
            governor.update()
        correct += int((logits.argmax(-1) == tb).sum())
        seen += len(tb)
        return {"loss": loss}

    def scalars(losses: dict[str, torch.Tensor]) -> dict[str, float]:
        nonlocal metrics, correct, seen
        metrics = {"encoder/loss": float(losses["loss"]), "encoder/train_top1": 100.0 * correct / seen,
                   "encoder/lr": opt.param_groups[0]["lr"]}
        correct = seen = 0
        return metrics

    def postfix(logged: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{logged['encoder/loss']:.3f}", "acc": f"{logged['encoder/train_top1']:.1f}",
                **({"threads": str(governor.threads)} if governor is not None else {})}

    def evaluate(at: int) -> tuple[dict[str, float], dict[str, Any]]:
        evaluation = {}                # the training metrics were logged at their own step
        if at == cfg.steps and held_out is not None and len(held_out[0]):
            evaluation["encoder/held_out_top1"] = classification_top1(model, held_out[0], col[held_out[1]], cfg)
        return evaluation, {}

    def record(at: int, evaluation: dict[str, float] | None) -> None:
        metrics.update(evaluation or {})
        if rank == 0 and last is not None:
            _save_last(last, fingerprint, model, opt, at, metrics)
            if at == cfg.steps:
                save_encoder(model, list(classes), cfg, Path(run_dir) / ENCODER)

    # Its evaluation points are its checkpoints: each is announced, the last one scores the held-out sequences.
    plan = StepPlan(cfg.steps, cfg.lr, max(1, cfg.steps // 20), 0.0, log_every(cfg.steps, cap=None),
                    cfg.checkpoint_every, cfg.checkpoint_every)
    parts = FitParts(train, scalars, evaluate, record, postfix=postfix)
    step = run_fit(plan, parts, model, opt, step, reporter, run_dir, LossGuard(device, "lower the encoder's lr"),
                   cfg.name, progress)
    if not metrics and last is not None and last.is_file():         # resumed after the last step
        metrics = load_checkpoint(last).get("metrics", {})
    return EncoderResult(model, list(classes), metrics.get("encoder/train_top1", float("nan")), step,
                         metrics.get("encoder/held_out_top1"))


def _save_last(path: Path, fingerprint: str, model: nn.Module, opt, step: int, metrics: dict[str, float]) -> None:
    checkpoint.save(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                           "fingerprint": fingerprint, "metrics": metrics})


def _resume(path: Path, fingerprint: str, model: nn.Module, opt, total: int) -> int:
    """Load last.pt into model/optimizer; refuse a checkpoint written under another config or data, or whose
    contents do not fit this model and config (checkpoint.check_last)."""
    state = checkpoint.restore(path, fingerprint, ("model", "optimizer", "step"), {"model": model}, opt, total,
                               optional=("metrics",))
    checkpoint.check_metrics(path, "metrics", state.get("metrics", {}))
    return state["step"]


def save_encoder(model: Encoder, classes: list[int], cfg: EncoderConfig, path: Path) -> Path:
    """encoder.pt: config, seen classes (head column order), input channels and CPU weights."""
    return checkpoint.save(path, {"config": cfg.model_dump(mode="json"), "classes": list(classes),
                                  "in_channels": model.in_channels,
                                  "model": {k: v.cpu() for k, v in model.state_dict().items()}})


def load_encoder(path: Path) -> tuple[Encoder, EncoderConfig, list[int]]:
    """(model in eval mode, its config, its seen classes) from encoder.pt."""
    blob = load_torch(path, "encoder checkpoint", ("config", "classes", "in_channels", "model"))
    return encoder_from_state(blob, Path(path))


def encoder_from_state(blob: dict, path: Path, key: str = "model") -> tuple[Encoder, EncoderConfig, list[int]]:
    """(model in eval mode, config, seen classes) from encoder.pt's dict (also held inside other bundles: `key`
    names its weights in errors about `path`)."""
    try:
        cfg = EncoderConfig.model_validate(blob["config"])
        model = build_encoder(cfg.name, len(blob["classes"]), in_channels=blob["in_channels"], layout=cfg.layout,
                              base_channels=cfg.base_channels, units_per_stage=tuple(cfg.units_per_stage),
                              dropout=cfg.dropout)
    except Exception as err:  # noqa: BLE001 - a config that does not build: one line
        raise InputError(f"{path}: not an encoder checkpoint ({type(err).__name__})") from None
    checkpoint.load_weights(path, key, blob["model"], model)            # keys, shapes, finite: one line naming them
    return model.eval(), cfg, list(blob["classes"])


@torch.no_grad()
def extract_features(model: Encoder, x: torch.Tensor, cfg: EncoderConfig, batch_size: int = 64,
                     on_batch: Callable[[int], object] | None = None) -> torch.Tensor:
    """Pooled features (N, feature_dim) of (N, C, T, V, M) sequences, in batches; on_batch(n) after each (a
    progress bar's update)."""
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    out = []
    for s in range(0, len(x), batch_size):
        xb = to_stream(x[s:s + batch_size].float(), cfg.stream, cfg.layout).to(device)
        with autocast(device, precision):
            out.append(model.forward_features(xb).float().cpu())
        if on_batch is not None:
            on_batch(len(xb))
    return torch.cat(out) if out else torch.empty(0, model.feature_dim)
