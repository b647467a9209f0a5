"""Device, precision and seeding helpers shared by fit loops, evaluation and benchmarks."""

from __future__ import annotations

import contextlib
import random
from typing import ContextManager

import numpy as np
import torch

from trainers.errors import InputError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; explicit names are checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"train.device={name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"train.device={name!r}: CUDA is not available on this machine")
    return device


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX or AVX512-BF16 (bf16 matmuls run faster than fp32 there)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA with bf16 support or a CPU with AMX/AVX512-BF16, else 'fp32'."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> ContextManager:
    """bf16 autocast for matmul-heavy ops (weights and optimizer state stay fp32), or a no-op."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> torch.Generator:
    """Seed python/numpy/torch global RNGs and return a dedicated CPU generator for batch draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def epoch_batch(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Sample ids of training step `step`: epochs of seeded permutations of range(n), each epoch's remainder
    dropped. A pure function of its arguments, so a resumed run (or every DDP rank) draws the same batches."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size]
