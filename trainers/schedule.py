"""What every fit loop computes per step the same way: the learning rate, the batch ids, the logging cadence and
the progress bar. All pure functions of the step, so a resumed run continues exactly where it stopped."""

from __future__ import annotations

import math
import sys

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_ratio at `total` (pure function of the step).

    Warm-up is lr * ((step + 1) / warmup), the factor first: then lr * lr_at(..., 1.0, ...) (what a LambdaLR
    computes) is bit-equal to lr_at(..., lr, ...)."""
    if warmup and step < warmup:
        return lr * ((step + 1) / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_lr_scheduler(opt: torch.optim.Optimizer, lr: float, total: int, warmup: int, min_ratio: float,
                       step: int = 0) -> LambdaLR:
    """A LambdaLR of factor lr_at(s, total, 1.0, warmup, min_ratio) on peak lr, positioned at `step`.

    Build it after a resume (a loaded optimizer state carries the lr of its last step, never the peak) and call
    `.step()` at the end of each iteration, after logging: the logged lr is then the one the step used. Its state
    is not checkpointed: it is a function of the step alone."""
    for group in opt.param_groups:
        group["initial_lr"] = lr
    return LambdaLR(opt, lambda s: lr_at(s, total, 1.0, warmup, min_ratio), last_epoch=step - 1)


def epoch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Sample ids of training step `step`: epochs of seeded permutations of range(n), each epoch's remainder
    dropped. A pure function of its arguments, so a resumed run (or every DDP rank) draws the same batches."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size]


def batch_indices(step: int, batch_size: int, n: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Sample ids of a step on one rank (pure function): the global batch of batch_size x world_size ids of
    `epoch_indices`, split into world_size disjoint contiguous shards."""
    return epoch_indices(step, batch_size * world_size, n, seed).tensor_split(world_size)[rank]


def log_every(total: int, cap: int | None = 50) -> int:
    """Steps between training-metric reports: about 20 per run, at most `cap` apart (None: no cap)."""
    every = total // 20
    return max(1, every if cap is None else min(cap, every))


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    """The loops' tqdm bar on stderr (redrawn at most once a second)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, file=sys.stderr, mininterval=1.0,
                dynamic_ncols=True)
