"""CoCoDiff evaluation: top-1/top-5 of a classifier on a split, and score fusion of per-stream logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trainers.configs import CoCoDiffConfig
from trainers.errors import InputError
from trainers.runtime import autocast, resolve_precision

TOP_K = 5


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
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        # All zero fuses to zero logits: every sample "predicted" as class 0, a number that means nothing.
        raise InputError(f"weights {' '.join(map(str, weights))}: expected weights >= 0, at least one > 0")
    shapes = {tuple(lg.shape) for lg in logits}
    if len(shapes) != 1:
        raise InputError(f"ensemble_logits: logits differ in shape {sorted(shapes)}")
    return sum(w * lg.float() for w, lg in zip(weights, logits))
