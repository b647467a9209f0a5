"""TDSM training objective (docs/METHODS.md §1): L = L_diff + lambda * L_TD, functions of tensors."""

from __future__ import annotations

import torch


def sample_negative_classes(labels: torch.Tensor, class_pool: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """A random class from `class_pool` per sample (may equal the positive: those pairs get masked)."""
    idx = torch.randint(len(class_pool), labels.shape, generator=generator, device="cpu")
    return class_pool[idx].to(labels.device)


def triplet_diffusion_loss(target: torch.Tensor, pred_pos: torch.Tensor, pred_neg: torch.Tensor,
                           valid_neg: torch.Tensor, margin: float, triplet_weight: float
                           ) -> dict[str, torch.Tensor]:
    """L_diff + lambda * L_TD for one batch.

    target (N, D): eps (or x0 / v); pred_pos, pred_neg (N, D): denoiser outputs under the positive and the
    negative text with the same t and eps; valid_neg (N,) bool: negative class differs from the positive.
    L_diff = mean ||target - pred_pos||^2 over all samples (as an MSE over elements, like the paper's code).
    L_TD = mean over valid samples of max(e_pos - e_neg + tau, 0), e = per-sample MSE.
    """
    e_pos = (target - pred_pos).float().pow(2).mean(dim=-1)            # (N,)
    e_neg = (target - pred_neg).float().pow(2).mean(dim=-1)            # (N,)
    l_diff = e_pos.mean()
    hinge = torch.relu(e_pos - e_neg + margin)                          # (N,)
    mask = valid_neg.float()
    l_td = (hinge * mask).sum() / mask.sum().clamp(min=1.0)
    return {
        "loss": l_diff + triplet_weight * l_td,
        "loss_diff": l_diff.detach(),
        "loss_td": l_td.detach(),
        "err_gap": ((e_neg - e_pos) * mask).sum().detach() / mask.sum().clamp(min=1.0),
    }
