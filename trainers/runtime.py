"""Device, precision, CPU-thread and seeding helpers shared by fit loops, evaluation and benchmarks."""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path
from typing import ContextManager, Mapping

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


# ----------------------------------------------------------------------------------------------
# CPU threads (docs/benchmarks.md: contended vs alone)
# ----------------------------------------------------------------------------------------------

# Below this model width (TDSM's transformer width; a GCN's feature width), one thread: TDSM 'tiny' matmuls take
# microseconds, less than waking a second thread, and beside two busy processes two passive threads ran about 2x
# slower than one (docs/benchmarks.md, `python -m service.bench contended`); CoCoDiff's small convolutions also run
# fastest on one (its train.threads default). From 'small' (the 256-d default encoder) up, every core, with passive
# waits.
SINGLE_THREAD_BELOW_WIDTH = 256

_interop_set = False   # torch accepts set_num_interop_threads once, before any inter-op work


def cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """Whole CPUs a cgroup v2 quota allows ('200000 100000' -> 2), or None when unlimited or not on Linux."""
    try:
        quota, period = open(path).read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a container's CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return min(cpus, limit) if limit else cpus


def resolve_threads(requested: int = 0, hidden_size: int | None = None, cpus: int | None = None,
                    environ: Mapping[str, str] | None = None) -> int:
    """train.threads -> torch intra-op threads. N > 0 is taken as is. 0 (auto) = the CPUs available (`cpus`,
    else affinity and cgroup quota), at most $OMP_NUM_THREADS (the user's, or Ray's per-worker CPUs), and 1 for a
    model narrower than SINGLE_THREAD_BELOW_WIDTH."""
    if requested:
        return requested
    environ = os.environ if environ is None else environ
    budget = cpus if cpus else available_cpus()
    omp = (environ.get("OMP_NUM_THREADS") or "").split(",")[0].strip()   # OpenMP allows a per-level list
    if omp.isdigit() and int(omp) > 0:
        budget = min(budget, int(omp))
    if hidden_size is not None and hidden_size < SINGLE_THREAD_BELOW_WIDTH:
        budget = 1
    return max(1, budget)


def apply_thread_policy(requested: int = 0, hidden_size: int | None = None, cpus: int | None = None) -> int:
    """Set torch's intra-op threads by `resolve_threads` (and, the first time, its inter-op threads); returns them."""
    global _interop_set
    threads = resolve_threads(requested, hidden_size, cpus)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if not _interop_set:
        _interop_set = True
        with contextlib.suppress(RuntimeError):   # raised once inter-op work has started: keep torch's pool
            torch.set_num_interop_threads(threads)
    return threads


# ----------------------------------------------------------------------------------------------
# Threads that follow the machine's load (the skeleton chain's in-process encoder)
# ----------------------------------------------------------------------------------------------

def machine_cpu_ticks(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(busy, total) clock ticks of all the machine's CPUs so far (the first /proc/stat line); None off Linux."""
    try:
        fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)          # idle and iowait are not busy


class ThreadGovernor:
    """Torch intra-op threads of a CPU fit loop, chosen from the cores the other processes leave free: once before
    the first step (a short probe while this process idles) and again every `interval_s` seconds.

    On 2 cores the chain's ST-GCN step took 105 ms on two threads and 181 ms on one while the machine was idle, but
    beside two busy processes two OpenMP threads took 0.7-1.2 s against 0.27-0.48 s for one (each parallel region
    waits for whichever of its threads is descheduled). So each window measures the machine's busy cores
    (/proc/stat) less this process's own (its CPU time), and the next one runs on the cores left free: at least
    1, at most `most` (the thread policy's count). Off Linux the count stays `most`."""

    def __init__(self, most: int, interval_s: float = 2.0, probe_s: float = 0.25, stat: Path = Path("/proc/stat"),
                 machine_cpus: int | None = None):
        self.most, self.interval_s, self.stat = max(1, most), interval_s, stat
        self.machine_cpus = machine_cpus or os.cpu_count() or 1          # the CPUs /proc/stat adds up
        self.threads = self.most
        torch.set_num_threads(self.threads)
        self._mark = self._sample()
        if probe_s > 0:
            time.sleep(probe_s)
            self.decide()

    def _sample(self) -> tuple[float, float, tuple[int, int] | None]:
        return time.monotonic(), time.process_time(), machine_cpu_ticks(self.stat)

    def free_cores(self, wall: float, own_cpu: float, busy_ticks: int, total_ticks: int) -> float:
        """Cores the other processes left free in a window: the machine's minus theirs (busy less our own)."""
        busy = busy_ticks / max(1, total_ticks) * self.machine_cpus
        return self.machine_cpus - max(0.0, busy - own_cpu / max(wall, 1e-9))

    def decide(self) -> int:
        """Close the window: set torch's threads to the cores left free in it (1.75 free cores run 2 threads)."""
        now = self._sample()
        (w0, c0, m0), (w1, c1, m1) = self._mark, now
        self._mark = now
        if m0 is None or m1 is None or m1[1] <= m0[1]:
            return self.threads
        free = self.free_cores(w1 - w0, c1 - c0, m1[0] - m0[0], m1[1] - m0[1])
        threads = int(min(self.most, max(1, math.floor(free + 0.25))))
        if threads != self.threads:
            self.threads = threads
            torch.set_num_threads(threads)
        return threads

    def update(self) -> int:
        """Call after each step: past `interval_s` since the last decision, decide again; returns the count."""
        return self.decide() if time.monotonic() - self._mark[0] >= self.interval_s else self.threads
