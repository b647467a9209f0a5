"""GCN feature encoders for TDSM: cross-entropy on the *seen* classes only, then feature extraction.

The encoder never sees an unseen class (METHODS.md §1: a frozen GCN trained on the seen classes); its pooled
feature is what TDSM denoises.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from trainers.config import Section
from trainers.errors import InputError
from trainers.io import atomic_torch_save
from trainers.runtime import autocast, resolve_device, resolve_precision, seed_everything
from trainers.skeleton.gcn import Encoder, build_encoder, joint_to_bone, joint_to_motion
from trainers.skeleton.graph import Graph
from trainers.tdsm_fit import lr_at
from trainers.tracking import Reporter


class EncoderConfig(Section):
    """A GCN encoder and how to train it on the seen classes."""

    name: Literal["stgcn", "shiftgcn", "ctrgcn"] = Field("stgcn", description="GCN architecture.")
    layout: Literal["ntu-rgb+d", "openpose"] = Field("ntu-rgb+d", description="Skeleton graph layout.")
    base_channels: int = Field(64, ge=4, description="Width of the first stage; the feature is 4x this.")
    units_per_stage: list[int] = Field([1, 1, 1], description="GCN units per stage (paper models: 4, 3, 3).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout (per unit for ST-GCN, before the head otherwise).")
    stream: Literal["joint", "bone", "motion"] = Field("joint", description="Input stream.")
    steps: int = Field(400, ge=1, description="Training iterations.")
    batch_size: int = Field(32, ge=1, description="Sequences per step.")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (cosine decay, 5% warm-up).")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    seed: int = Field(0, description="Seed of init and batches.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="bf16 autocast where fast.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda'.")


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
    train_top1: float


def fit_encoder(cfg: EncoderConfig, x: torch.Tensor, y: torch.Tensor, classes: list[int], reporter: Reporter,
                run_dir: Path | None = None, progress: bool = True) -> EncoderResult:
    """Train on (x (N, C, T, V, M), y class ids ⊂ classes) with cross-entropy; saves run_dir/encoder.pt."""
    stray = sorted(set(y.tolist()) - set(classes))
    if stray:
        raise InputError(f"encoder training labels {stray[:5]} are not among the seen classes")
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    gen = seed_everything(cfg.seed)
    col = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    col[torch.tensor(classes)] = torch.arange(len(classes))
    target = col[y]                                                         # (N,) head columns
    model = build_encoder(cfg.name, len(classes), in_channels=x.shape[1], layout=cfg.layout,
                          base_channels=cfg.base_channels, units_per_stage=tuple(cfg.units_per_stage),
                          dropout=cfg.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 20)
    correct = seen = 0
    model.train()
    bar = tqdm(range(cfg.steps), desc=f"{cfg.name}", disable=not progress, file=sys.stderr, mininterval=1.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, warmup, 0.0)
        idx = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        xb = to_stream(x[idx].float(), cfg.stream, cfg.layout).to(device)
        tb = target[idx].to(device)
        with autocast(device, precision):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), tb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct += int((logits.argmax(-1) == tb).sum())
        seen += len(tb)
        if (step + 1) % max(1, cfg.steps // 20) == 0 or step + 1 == cfg.steps:
            metrics = {"encoder/loss": float(loss.detach()), "encoder/train_top1": 100.0 * correct / seen,
                       "encoder/lr": opt.param_groups[0]["lr"]}
            reporter.log_metrics(metrics, step + 1)
            bar.set_postfix(loss=f"{metrics['encoder/loss']:.3f}", acc=f"{metrics['encoder/train_top1']:.1f}")
            correct = seen = 0
    model.eval()
    result = EncoderResult(model, list(classes), 100.0 * correct / max(1, seen))
    if run_dir is not None:
        save_encoder(result, cfg, Path(run_dir) / "encoder.pt")
    return result


def save_encoder(result: EncoderResult, cfg: EncoderConfig, path: Path) -> Path:
    return atomic_torch_save({"config": cfg.model_dump(mode="json"), "classes": result.classes,
                              "in_channels": result.model.in_channels,
                              "model": {k: v.cpu() for k, v in result.model.state_dict().items()}}, path)


def load_encoder(path: Path) -> tuple[Encoder, EncoderConfig, list[int]]:
    """(model in eval mode, its config, its seen classes) from encoder.pt."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        cfg = EncoderConfig.model_validate(blob["config"])
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint gets one line
        raise InputError(f"{path}: not an encoder checkpoint ({type(err).__name__})") from None
    model = build_encoder(cfg.name, len(blob["classes"]), in_channels=blob["in_channels"], layout=cfg.layout,
                          base_channels=cfg.base_channels, units_per_stage=tuple(cfg.units_per_stage),
                          dropout=cfg.dropout)
    model.load_state_dict(blob["model"])
    return model.eval(), cfg, list(blob["classes"])


@torch.no_grad()
def extract_features(model: Encoder, x: torch.Tensor, cfg: EncoderConfig, batch_size: int = 64) -> torch.Tensor:
    """Pooled features (N, feature_dim) of (N, C, T, V, M) sequences, in batches."""
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    out = []
    for s in range(0, len(x), batch_size):
        xb = to_stream(x[s:s + batch_size].float(), cfg.stream, cfg.layout).to(device)
        with autocast(device, precision):
            out.append(model.forward_features(xb).float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.feature_dim)
