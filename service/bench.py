"""Benchmarks: `python -m service.bench tdsm [--device auto|cpu|cuda] [--quick] [--out bench-tdsm.json]`.

One subcommand per benchmark, each a plain function registered in `BENCHMARKS`. Every benchmark prints a
readable table on stdout, progress on stderr, and writes the full numbers (with the machine they came from)
as JSON.

`tdsm` measures, for the paper-size denoiser and a small one (256-d skeleton features, 2048-d global and
local text, M_l = 35 text tokens):
  1. one training step (forward + backward + AdamW over 2B rows: each sample with its positive and its
     negative prompt, as in `trainers.tdsm_fit`), fp32 vs bf16 autocast;
  2. zero-shot scoring throughput, `score_candidates` (all candidates and draws in one forward) vs
     `score_candidates_loop` (one forward per draw and class), bf16 autocast, and fp32 for the batched path;
  3. the peak memory of each phase.
Each size runs in its own fresh subprocess, so its memory peaks and allocator state owe nothing to the other.
Every timing records the CPU share it got: on a shared CPU, other processes can slow two OpenMP threads by an
order of magnitude, and the table says so instead of reporting such numbers as the machine's speed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from service.cli import exits_cleanly
from trainers.config import TDSMConfig, build_config
from trainers.diffusion import NoiseSchedule
from trainers.errors import InputError
from trainers.losses import sample_negative_classes
from trainers.runtime import (
    apply_thread_policy, autocast, available_cpus, cpu_has_fast_bf16, resolve_precision, seed_everything,
)
from trainers.tdsm_fit import TrainBatch, build_optimizer, build_schedule, train_step
from trainers.tdsm_model import TDSMDenoiser, count_parameters
from trainers.zsl import evaluation_noise, score_candidates, score_candidates_loop

MIB = 2**20


def log(msg: str) -> None:
    """Progress goes to stderr so stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Machine, timing and memory
# ----------------------------------------------------------------------------------------------

def resolve_bench_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; asking for cuda without one is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available on this machine")
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on; the load average exposes other work sharing the cores."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpu_amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "cpu_avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        # Threading knobs that change CPU timings a lot on a shared machine.
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                               "MKL_NUM_THREADS")},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
        info["gpu_memory_mib"] = round(torch.cuda.get_device_properties(device).total_memory / MIB)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_busy_fraction(interval: float = 0.5) -> float | None:
    """Share of all CPUs busy over `interval` seconds (/proc/stat); sampled while this process idles, it is
    the load from everything else."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]                                  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])
    try:
        busy0, total0 = sample()
        time.sleep(interval)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


@dataclass
class Timed:
    """Wall seconds of the timed calls, the CPU share they got, and the last call's result."""

    times_s: list[float]
    # Process CPU seconds / (wall seconds x torch threads) over the timed calls, on CPU devices. Near 1 for
    # compute-bound work on an idle machine; well below 1 means other processes took the cores.
    cpu_share: float | None
    result: Any

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device, label: str) -> Timed:
    """Time `iters` calls after `warmup` untimed ones (kernel selection, first-touch allocations)."""
    result = None
    for i in range(warmup):
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        log(f"  {label}: warm-up {i + 1}/{warmup} {format_seconds(time.perf_counter() - start)}")
    times = []
    cpu_start = time.process_time()
    for i in range(iters):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        log(f"  {label}: {i + 1}/{iters} {format_seconds(times[-1])}")
    cpu_share = None
    if device.type == "cpu" and times:
        cpu_share = (time.process_time() - cpu_start) / (sum(times) * torch.get_num_threads())
    return Timed(times, cpu_share, result)


def _libc_malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0): hand freed heap pages back to the OS so the next phase starts from a true RSS."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


_malloc_trim = _libc_malloc_trim()


def _proc_status_kib(key: str) -> int | None:
    """A 'VmRSS:' / 'VmHWM:' line of /proc/self/status in KiB, or None off Linux."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0, clear_refs mode 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _ru_maxrss_kib() -> int:
    scale = 1024 if sys.platform == "darwin" else 1   # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale


def memory_method(device: torch.device) -> str:
    """How `PeakMemory` measures on this device, in words (written into the report)."""
    if device.type == "cuda":
        return ("CUDA: torch.cuda.max_memory_allocated() during the phase minus memory_allocated() at its start "
                "(tensors only, not the caching allocator's reserve)")
    if _proc_status_kib("VmHWM") is not None and _reset_rss_peak():
        return ("CPU: process RSS high-water mark (VmHWM, reset per phase via /proc/self/clear_refs) minus RSS at "
                "the phase start, after gc and malloc_trim; one fresh process per model size")
    return ("CPU: increase of getrusage ru_maxrss over the phase (a lower bound: a phase below an earlier peak "
            "reads 0); one fresh process per model size")


class PeakMemory:
    """Peak memory of one phase above its starting point, in MiB (`peak_mib` after the block exits)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = 0.0

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        self._hwm = _proc_status_kib("VmHWM") is not None and _reset_rss_peak()
        self._start = _proc_status_kib("VmRSS") if self._hwm else _ru_maxrss_kib()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._start) / MIB
        else:
            end = _proc_status_kib("VmHWM") if self._hwm else _ru_maxrss_kib()
            self.peak_mib = max(0, end - self._start) / 1024


def format_seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


# ----------------------------------------------------------------------------------------------
# TDSM: sizes and settings
# ----------------------------------------------------------------------------------------------

SKELETON_DIM = 256       # pre-extracted skeleton feature (Shift-GCN, SA-DVAE layout)
TEXT_DIM = 2048          # global and local text feature width of the paper's text encoder
TEXT_TOKENS = 35         # M_l (paper)
NUM_CLASSES = 60         # text table rows (NTU-60); training draws positives/negatives among 55 seen ones
NUM_SEEN = 55


@dataclass(frozen=True)
class SizePlan:
    """How hard to benchmark one model size. A paper-size row costs ~6.5 GFLOP forward (36 tokens through
    12 blocks of C=768), so one training step of 128 rows is ~2.5 TFLOP and a scoring call of 8 samples x
    3 draws x 20 candidates ~3 TFLOP: tens of seconds each in fp32 on 2 CPU cores. The paper size gets few calls."""

    preset: str
    train_warmup: int      # untimed training steps before timing
    train_iters: int       # timed training steps; the median is reported
    score_warmup: int      # untimed scoring calls (each scores every sample, draw and candidate once)
    score_iters: int       # timed scoring calls
    score_samples: int     # test samples N per scoring call


SIZE_PLANS: dict[str, SizePlan] = {
    "paper": SizePlan("paper", train_warmup=1, train_iters=2, score_warmup=1, score_iters=1, score_samples=8),
    "small": SizePlan("small", train_warmup=2, train_iters=5, score_warmup=1, score_iters=2, score_samples=32),
    "tiny": SizePlan("tiny", train_warmup=1, train_iters=2, score_warmup=1, score_iters=1, score_samples=8),
}
DEFAULT_SIZES = ["paper", "small"]
DEFAULT_CANDIDATES = (5, 20)


@dataclass(frozen=True)
class TDSMBenchSettings:
    """What one size is benchmarked with (its plan after --quick and explicit flags)."""

    size: str
    batch: int                     # training samples per step -> 2 * batch rows
    train_warmup: int
    train_iters: int
    score_warmup: int
    score_iters: int
    score_samples: int             # test samples N per scoring call
    draws: int                     # evaluation noise draws K
    candidates: tuple[int, ...]    # candidate class counts C, one scoring run each
    t_test: int = 25
    seed: int = 0
    compile: bool = False          # also time torch.compile'd training steps (and their compile time)


def settings_for(size: str, args: argparse.Namespace) -> TDSMBenchSettings:
    """The size's plan, made lighter by --quick; --iters/--warmup/--score-samples/--candidates win."""
    plan = SIZE_PLANS[size]
    train_warmup, train_iters, score_warmup, score_iters = (plan.train_warmup, plan.train_iters, plan.score_warmup,
                                                            plan.score_iters)
    candidates = DEFAULT_CANDIDATES
    if args.quick:
        train_warmup, train_iters = 1, max(1, train_iters // 2 if size != "paper" else 1)
        score_iters, candidates = 1, DEFAULT_CANDIDATES[:1]
    if args.warmup is not None:
        train_warmup = score_warmup = args.warmup
    if args.iters is not None:
        train_iters = score_iters = args.iters
    return TDSMBenchSettings(
        size=size, batch=args.batch, train_warmup=train_warmup, train_iters=train_iters,
        score_warmup=score_warmup, score_iters=score_iters,
        score_samples=args.score_samples if args.score_samples is not None else plan.score_samples,
        draws=args.draws, candidates=tuple(args.candidates) if args.candidates else candidates, seed=args.seed,
        compile=args.compile,
    )


def bench_config(size: str) -> TDSMConfig:
    """Default TDSM config (loss, AdamW, grad clip, schedule) with the size's model preset."""
    return build_config(TDSMConfig, {}, {"model.preset": SIZE_PLANS[size].preset})


def build_denoiser(cfg: TDSMConfig, seed: int, device: torch.device) -> TDSMDenoiser:
    """The denoiser at the bench's input widths; the seed makes every phase start from the same weights."""
    torch.manual_seed(seed)
    return TDSMDenoiser(cfg.model, SKELETON_DIM, TEXT_DIM, TEXT_DIM, TEXT_TOKENS).to(device)


def open_gates(model: TDSMDenoiser, gen: torch.Generator, std: float = 0.02) -> TDSMDenoiser:
    """Give the adaLN-Zero layers non-zero weights: at init every prediction is 0 and all candidates tie,
    which would make the batched-vs-loop agreement check vacuous (compute cost is unchanged)."""
    zero_init = [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    zero_init += [s.adaLN_modulation[-1] for b in model.blocks for s in (b.x_stream, b.l_stream)]
    with torch.no_grad():
        for layer in zero_init:
            for p in (layer.weight, layer.bias):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


# ----------------------------------------------------------------------------------------------
# TDSM: one training step
# ----------------------------------------------------------------------------------------------

def make_train_batch(batch: int, num_steps: int, gen: torch.Generator, device: torch.device) -> TrainBatch:
    y = torch.randint(NUM_SEEN, (batch,), generator=gen)
    neg = sample_negative_classes(y, torch.arange(NUM_SEEN), gen)
    return TrainBatch(
        x0=torch.randn(batch, SKELETON_DIM, generator=gen).to(device), y=y.to(device), neg=neg.to(device),
        t=torch.randint(num_steps, (batch,), generator=gen).to(device),
        eps=torch.randn(batch, SKELETON_DIM, generator=gen).to(device),
    )


def matmul_peak_gflops(device: torch.device, precision: str, seconds: float = 2.0) -> float | None:
    """The best GFLOP/s of a square GEMM in this process, the yardstick of a step's efficiency (its fraction
    of peak). n = 2048 on CPU (~17 GFLOP, fits the caches' blocking), 8192 on CUDA. None for bf16 on a CPU
    without bf16 matrix units (AMX / AVX512-BF16): its emulated GEMM is no peak to measure against (a 2048^3
    bf16 GEMM took ~30 s on an AMD EPYC without them)."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        return None
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best, deadline = float("inf"), time.perf_counter() + seconds
    for i in range(100):
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return 2 * n**3 / best / 1e9


def train_step_flops(cfg: TDSMConfig, batch: int) -> float:
    """Matmul + attention FLOPs of one training step's forward and backward (torch's FlopCounterMode on meta
    tensors: exact for this shape, no memory, no time). Elementwise ops and the optimizer are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = 2 * batch
    with torch.device("meta"):
        model = TDSMDenoiser(cfg.model, SKELETON_DIM, TEXT_DIM, TEXT_DIM, TEXT_TOKENS)
        text_g, text_l = torch.randn(NUM_CLASSES, TEXT_DIM), torch.randn(NUM_CLASSES, TEXT_TOKENS, TEXT_DIM)
        cls = torch.randint(NUM_CLASSES, (rows,))
        texts = (text_g, text_l, cls) if NUM_CLASSES < rows else (text_g[cls], text_l[cls], None)  # as train_step
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(rows, SKELETON_DIM), torch.randint(10, (rows,)), *texts).pow(2).mean().backward()
    return float(counter.get_total_flops())


def bench_train_step(cfg: TDSMConfig, s: TDSMBenchSettings, precision: str, device: torch.device,
                     text_g: torch.Tensor, text_l: torch.Tensor, compile_model: bool = False) -> dict[str, Any]:
    """Median step time of a freshly built model + AdamW (as fit_tdsm builds them: fused AdamW, torch.compile
    when asked); the memory peak covers weights, gradients, optimizer state and activations (everything training
    this model needs). With compile, `compile_s` is the first call's extra time (tracing + code generation)."""
    schedule = build_schedule(cfg)
    batch = make_train_batch(s.batch, cfg.diffusion.num_train_timesteps, torch.Generator().manual_seed(s.seed),
                             device)
    label = f"[{s.size}] train {precision}{' compiled' if compile_model else ''}"
    compile_s = None
    with PeakMemory(device) as mem:
        model = build_denoiser(cfg, s.seed, device).train()
        opt = build_optimizer(cfg, model)
        train_model = torch.compile(model) if compile_model else model
        step = lambda: train_step(train_model, opt, schedule, cfg, batch, text_g, text_l,  # noqa: E731
                                  lambda: autocast(device, precision))["loss"].detach()
        if compile_model:
            log(f"{label}: compiling (first call) ...")
            t0 = time.perf_counter()
            step()
            synchronize(device)
            compile_s = time.perf_counter() - t0
        timed = time_calls(step, s.train_warmup, s.train_iters, device, label)
        del model, train_model, opt, step
    median = timed.median_s
    # A non-finite loss would mean the timing measured garbage (e.g. a broken bf16 path).
    out = {"median_s": median, "times_s": timed.times_s, "samples_per_s": s.batch / median,
           "rows_per_s": 2 * s.batch / median, "cpu_share": timed.cpu_share, "peak_mib": mem.peak_mib,
           "loss_finite": bool(torch.isfinite(timed.result))}
    if compile_s is not None:
        out["compile_s"] = max(0.0, compile_s - median)
    return out


# ----------------------------------------------------------------------------------------------
# TDSM: zero-shot scoring
# ----------------------------------------------------------------------------------------------

@dataclass
class ScoringInputs:
    """Test features, evaluation noise and candidate texts for one scoring run."""

    features: torch.Tensor      # (N, D_x)
    noise: torch.Tensor         # (K, N, D_x)
    cand_global: torch.Tensor   # (C, D_g)
    cand_local: torch.Tensor    # (C, M_l, D_l)


def make_scoring_inputs(samples: int, draws: int, candidates: int, seed: int, device: torch.device) -> ScoringInputs:
    gen = torch.Generator().manual_seed(seed)
    return ScoringInputs(
        features=torch.randn(samples, SKELETON_DIM, generator=gen).to(device),
        noise=evaluation_noise(draws, samples, SKELETON_DIM, seed),
        cand_global=torch.randn(candidates, TEXT_DIM, generator=gen).to(device),
        cand_local=torch.randn(candidates, TEXT_TOKENS, TEXT_DIM, generator=gen).to(device),
    )


def time_scoring(model: TDSMDenoiser, schedule: NoiseSchedule, inputs: ScoringInputs, t_test: int, mode: str,
                 precision: str, device: torch.device, warmup: int, iters: int, label: str
                 ) -> tuple[dict[str, Any], torch.Tensor]:
    """Time `score_candidates` ('batched': every sample, draw and candidate in one forward, as evaluation
    sizes it) or `score_candidates_loop` ('loop'); returns the timing and the (K, N, C) errors."""
    K, N, _ = inputs.noise.shape
    C = inputs.cand_global.shape[0]
    amp = lambda: autocast(device, precision)  # noqa: E731  (a fresh context per use)
    args = (model, schedule, inputs.features, inputs.noise, t_test, inputs.cand_global, inputs.cand_local)
    if mode == "batched":
        call = lambda: score_candidates(*args, max_rows=N * K * C, amp=amp)  # noqa: E731
    elif mode == "loop":
        call = lambda: score_candidates_loop(*args, amp=amp)  # noqa: E731
    else:
        raise ValueError(f"unknown scoring mode {mode!r}")
    with PeakMemory(device) as mem:
        timed = time_calls(call, warmup, iters, device, label)
    median = timed.median_s
    return ({"median_s": median, "times_s": timed.times_s, "pairs_per_s": N * C / median,
             "rows_per_s": N * K * C / median, "cpu_share": timed.cpu_share, "peak_mib": mem.peak_mib}, timed.result)


def compare_scores(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How far two (K, N, C) error tensors are apart, and how often they pick the same class."""
    diff = (a - b).abs().max()
    return {"max_abs_diff": float(diff), "max_rel_diff": float(diff / a.abs().mean().clamp(min=1e-12)),
            "argmin_agreement": float((a.argmin(-1) == b.argmin(-1)).float().mean())}


def bench_scoring(cfg: TDSMConfig, s: TDSMBenchSettings, device: torch.device) -> list[dict[str, Any]]:
    """Batched vs per-class scoring in bf16 and in fp32, for each candidate count. Memory peaks are above
    the resident model: activations and the repeated inputs the batched path materialises."""
    schedule = build_schedule(cfg)
    model = open_gates(build_denoiser(cfg, s.seed, device), torch.Generator().manual_seed(s.seed)).eval()
    results = []
    for C in s.candidates:
        inputs = make_scoring_inputs(s.score_samples, s.draws, C, s.seed, device)
        row: dict[str, Any] = {"candidates": C, "samples": s.score_samples, "draws": s.draws}
        scores = {}
        for mode, precision in (("batched", "bf16"), ("loop", "bf16"), ("batched", "fp32"), ("loop", "fp32")):
            key, label = f"{mode}_{precision}", f"[{s.size}] score C={C} {mode} {precision}"
            row[key], scores[key] = time_scoring(model, schedule, inputs, s.t_test, mode, precision, device,
                                                 s.score_warmup, s.score_iters, label)
        row["batched_over_loop"] = row["loop_bf16"]["median_s"] / row["batched_bf16"]["median_s"]
        row["batched_over_loop_fp32"] = row["loop_fp32"]["median_s"] / row["batched_fp32"]["median_s"]
        row["bf16_over_fp32"] = row["batched_fp32"]["median_s"] / row["batched_bf16"]["median_s"]
        row["agreement_bf16_batched_vs_loop"] = compare_scores(scores["batched_bf16"], scores["loop_bf16"])
        row["agreement_bf16_vs_fp32"] = compare_scores(scores["batched_fp32"], scores["batched_bf16"])
        results.append(row)
    return results


# ----------------------------------------------------------------------------------------------
# TDSM: one size, all sizes
# ----------------------------------------------------------------------------------------------

def run_tdsm_size(s: TDSMBenchSettings, device: torch.device) -> dict[str, Any]:
    """Every TDSM measurement for one model size (run it in a fresh process for meaningful memory peaks)."""
    cfg = bench_config(s.size)
    seed_everything(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    text_g = torch.randn(NUM_CLASSES, TEXT_DIM, generator=gen).to(device)                 # (classes, D_g)
    text_l = torch.randn(NUM_CLASSES, TEXT_TOKENS, TEXT_DIM, generator=gen).to(device)    # (classes, M_l, D_l)
    with torch.device("meta"):   # shapes only: no memory, no init cost
        params = count_parameters(TDSMDenoiser(cfg.model, SKELETON_DIM, TEXT_DIM, TEXT_DIM, TEXT_TOKENS))
    start, load_start = time.perf_counter(), os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    log(f"[{s.size}] {params / 1e6:.1f}M parameters on {device}")
    peak = {p: matmul_peak_gflops(device, p) for p in ("fp32", "bf16")}
    flops = train_step_flops(cfg, s.batch)
    log(f"[{s.size}] matmul peak in this process (GFLOP/s): "
        f"{', '.join(f'{p} {v:.0f}' if v else f'{p} -' for p, v in peak.items())}; "
        f"a training step is {flops / 1e12:.2f} TFLOP")
    arms = [(p, False) for p in ("fp32", "bf16")] + ([(p, True) for p in ("fp32", "bf16")] if s.compile else [])
    train: dict[str, Any] = {}
    for precision, compiled in arms:
        r = bench_train_step(cfg, s, precision, device, text_g, text_l, compile_model=compiled)
        r["gflop_per_s"] = flops / r["median_s"] / 1e9
        r["peak_fraction"] = r["gflop_per_s"] / peak[precision] if peak[precision] else None
        train[precision + ("_compiled" if compiled else "")] = r
    train["bf16_speedup"] = train["fp32"]["median_s"] / train["bf16"]["median_s"]
    train["step_tflop"] = flops / 1e12
    train["matmul_peak_gflops"] = peak
    score = bench_scoring(cfg, s, device)
    return {
        "settings": asdict(s),
        "model": {"preset": s.size, **{k: getattr(cfg.model, k) for k in ("hidden_size", "depth", "num_heads",
                                                                          "mlp_ratio")},
                  "parameters": params, "weights_mib": params * 4 / MIB, "skeleton_dim": SKELETON_DIM,
                  "text_global_dim": TEXT_DIM, "text_local_dim": TEXT_DIM, "text_tokens": TEXT_TOKENS},
        "train": {"batch": s.batch, "rows": 2 * s.batch, **train},
        "score": score,
        "memory_method": memory_method(device),
        "wall_s": time.perf_counter() - start,
        "load_average_1m": [load_start, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    }


def run_size_in_subprocess(s: TDSMBenchSettings, device: torch.device) -> dict[str, Any]:
    """Run one size in a fresh interpreter (its own RSS baseline and allocator); progress streams to stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "size.json"
        cmd = [sys.executable, "-m", "service.bench", "tdsm", "--worker", json.dumps(asdict(s)),
               "--device", device.type, "--threads", str(torch.get_num_threads()), "--out", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if proc.returncode != 0 or not out.is_file():
            return {"settings": asdict(s), "error": f"worker exited with code {proc.returncode}"}
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------
# TDSM: table
# ----------------------------------------------------------------------------------------------

def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def min_cpu_share(*timings: dict[str, Any]) -> float | None:
    shares = [t["cpu_share"] for t in timings if t.get("cpu_share") is not None]
    return min(shares) if shares else None


def format_share(share: float | None) -> str:
    return "-" if share is None else f"{share:.2f}"


CONTENDED_SHARE = 0.7    # below this CPU share a measurement is flagged as starved by other processes
CONTENDED_BUSY = 0.25    # above this share of busy CPUs before the start, the machine was not idle


def contention_warning(report: dict[str, Any]) -> str | None:
    """A warning when other processes took the CPU before or during the measurements."""
    m = report["machine"]
    if m["device"].startswith("cuda"):
        return None
    starved = sorted({name for name, r in report["sizes"].items() if "error" not in r and any(
        (share := t.get("cpu_share")) is not None and share < CONTENDED_SHARE
        for t in [r["train"]["fp32"], r["train"]["bf16"]]
        + [row[k] for row in r["score"] for k in ("batched_bf16", "loop_bf16", "batched_fp32")])})
    busy = [b for b in (m.get("cpu_busy_before"), m.get("cpu_busy_after")) if b is not None]
    if not starved and not (busy and max(busy) > CONTENDED_BUSY):
        return None
    return (f"WARNING: the CPU was shared: {max(busy, default=0) * 100:.0f}% busy with other work around the run"
            + (f", measurements of {', '.join(starved)} got < {CONTENDED_SHARE} of their threads' CPU time"
               if starved else "")
            + ". Timings are inflated and noisy; oversubscribed OpenMP threads suffer most "
              "(compare --threads 1 or OMP_WAIT_POLICY=PASSIVE).")


def format_tdsm_report(report: dict[str, Any]) -> str:
    """The human-readable tables; every number is also in the JSON."""
    m = report["machine"]
    bf16 = "fast (AMX/AVX512-BF16)" if m["cpu_fast_bf16"] else "no AMX/AVX512-BF16"
    omp = {k: v for k, v in m["env"].items() if v is not None}
    busy = " / ".join("?" if b is None else f"{b * 100:.0f}%" for b in (m.get("cpu_busy_before"),
                                                                       m.get("cpu_busy_after")))
    lines = [
        f"machine: {m['cpu_model']}, {m['cpu_cores_usable']} usable cores, torch {m['torch']}, "
        f"{m['torch_threads']} torch threads, CPU bf16: {bf16}, device {m['device']}"
        + (f" ({m['gpu']}, bf16 {m['gpu_bf16']})" if "gpu" in m else "")
        + (f", {' '.join(f'{k}={v}' for k, v in omp.items())}" if omp else ""),
        f"other work: CPUs {busy} busy before / after the run; load average (1/5/15 min) "
        f"{' '.join(f'{v:.1f}' for v in m['load_average'] or [])} at start, "
        f"{' '.join(f'{v:.1f}' for v in m['load_average_end'] or [])} at end",
        f"memory: {report['memory_method']}",
    ]
    warning = contention_warning(report)
    lines += [warning, ""] if warning else [""]
    train_rows, score_rows, flop_rows = [], [], []
    for name, r in report["sizes"].items():
        if "error" in r:
            lines.append(f"{name}: {r['error']}")
            continue
        t, st = r["train"], r["settings"]
        train_rows.append([
            name, f"{r['model']['parameters'] / 1e6:.1f}M", f"{t['batch']}/{t['rows']}",
            f"{st['train_warmup']}+{st['train_iters']}",
            format_seconds(t["fp32"]["median_s"]), format_seconds(t["bf16"]["median_s"]), f"{t['bf16_speedup']:.2f}x",
            f"{t['fp32']['samples_per_s']:.1f}", f"{t['bf16']['samples_per_s']:.1f}",
            f"{t['fp32']['peak_mib']:.0f}", f"{t['bf16']['peak_mib']:.0f}",
            format_share(min_cpu_share(t["fp32"], t["bf16"])),
        ])
        for key in ("fp32", "bf16", "fp32_compiled", "bf16_compiled"):
            if key in t:
                arm = t[key]
                flop_rows.append([
                    name, key.replace("_", " "), format_seconds(arm["median_s"]), f"{t['step_tflop']:.3f}",
                    f"{arm['gflop_per_s']:.0f}",
                    f"{t['matmul_peak_gflops'][key[:4]]:.0f}" if arm["peak_fraction"] is not None else "-",
                    f"{100 * arm['peak_fraction']:.0f} %" if arm["peak_fraction"] is not None else "-",
                    format_seconds(arm["compile_s"]) if "compile_s" in arm else "-",
                    format_share(arm.get("cpu_share")),
                ])
        for row in r["score"]:
            agree = row["agreement_bf16_batched_vs_loop"]
            score_rows.append([
                name, str(row["candidates"]), f"{row['samples']}x{row['draws']}",
                f"{st['score_warmup']}+{st['score_iters']}",
                f"{row['batched_bf16']['pairs_per_s']:.1f}", f"{row['loop_bf16']['pairs_per_s']:.1f}",
                f"{row['batched_fp32']['pairs_per_s']:.1f}", f"{row['loop_fp32']['pairs_per_s']:.1f}",
                f"{row['batched_over_loop']:.2f}x / {row['batched_over_loop_fp32']:.2f}x",
                f"{row['bf16_over_fp32']:.2f}x",
                "/".join(f"{row[k]['peak_mib']:.0f}" for k in ("batched_bf16", "loop_bf16", "batched_fp32")),
                f"{agree['max_rel_diff']:.1e} / {agree['argmin_agreement']:.2f}",
                format_share(min_cpu_share(row["batched_bf16"], row["loop_bf16"], row["batched_fp32"])),
            ])
    lines += [
        "training step: forward + backward + AdamW over 2B rows (each sample with its positive and a negative "
        "prompt); median of the timed steps",
        format_table(["size", "params", "B/rows", "warm+timed", "fp32", "bf16", "bf16 speed-up", "fp32 samp/s",
                      "bf16 samp/s", "peak MiB fp32", "peak MiB bf16", "cpu share"], train_rows),
        "",
        "efficiency: the step's matmul + attention FLOPs (forward + backward) per second, against the best square "
        "GEMM of the same precision in the same process; compile = the first call's extra time (--compile)",
        format_table(["size", "arm", "step", "TFLOP", "GFLOP/s", "GEMM peak", "of peak", "compile", "cpu share"],
                     flop_rows),
        "",
        "zero-shot scoring: (sample x candidate) pairs/s, each pair over all K noise draws; batched = "
        "score_candidates, loop = score_candidates_loop",
        format_table(["size", "C", "N x K", "warm+timed", "batched bf16", "loop bf16", "batched fp32", "loop fp32",
                      "batched/loop bf16 / fp32", "bf16/fp32", "peak MiB b-bf16/loop/b-fp32",
                      "batched vs loop: rel diff / argmin",
                      "cpu share"],
                     score_rows),
        "",
        "peak MiB: training = weights + grads + AdamW state + activations of a freshly built model; "
        "scoring = above the resident model (activations, repeated inputs)",
        "cpu share: lowest process CPU time / (wall time x torch threads) of the row's timed calls; "
        f"< {CONTENDED_SHARE} means other processes took the cores",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------

def add_tdsm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--out", type=Path, default=Path("bench-tdsm.json"), help="JSON report (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64,
                   help="training samples per step; each is scored with its positive and a negative prompt, "
                        "so a step is 2x this many rows (default: %(default)s -> 128 rows, sized for a CPU; "
                        "TDSM's optim.batch_size defaults to 256)")
    p.add_argument("--iters", type=int,
                   help="timed calls per measurement (default: training 2 paper / 5 small, scoring 1 / 2)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default: training 1 paper / 2 small, scoring 1)")
    p.add_argument("--candidates", type=int, nargs="+", help="candidate class counts C to score (default: 5 20)")
    p.add_argument("--score-samples", type=int, help="test samples N per scoring call (default: 8 paper, 32 small)")
    p.add_argument("--draws", type=int, default=3, help="evaluation noise draws K (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="fewer timed calls, C=5 only")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd training steps (train.compile) and report the compile time")
    p.add_argument("--sizes", nargs="+", choices=list(SIZE_PLANS), default=DEFAULT_SIZES, help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)   # JSON settings of one size: run it, write --out


def check_tdsm_arguments(args: argparse.Namespace) -> None:
    """Counts must be positive (warm-up may be 0); the message names the flag."""
    for flag, value, least in (("--batch", args.batch, 1), ("--iters", args.iters, 1), ("--warmup", args.warmup, 0),
                               ("--score-samples", args.score_samples, 1), ("--draws", args.draws, 1),
                               ("--threads", args.threads, 0)):
        if value is not None and value < least:
            raise InputError(f"{flag} must be >= {least} (got {value})")
    if args.candidates and min(args.candidates) < 1:
        raise InputError(f"--candidates must all be >= 1 (got {args.candidates})")


def bench_tdsm(args: argparse.Namespace) -> int:
    """TDSM training step and zero-shot scoring, paper size and small size; table on stdout, JSON to --out."""
    check_tdsm_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_bench_device(args.device)
    if args.worker:
        fields = json.loads(args.worker)
        s = TDSMBenchSettings(**{**fields, "candidates": tuple(fields["candidates"])})
        args.out.write_text(json.dumps(run_tdsm_size(s, device)))
        return 0
    start = time.perf_counter()
    machine = {**describe_machine(device), "cpu_busy_before": cpu_busy_fraction()}
    log(f"bench tdsm on {device}: {machine['cpu_model']}, torch {machine['torch']}, "
        f"{machine['torch_threads']} threads, load average {machine['load_average']}")
    sizes = {}
    for size in args.sizes:
        s = settings_for(size, args)
        sizes[size] = run_size_in_subprocess(s, device)
    report = {
        "benchmark": "tdsm",
        "machine": {**machine, "cpu_busy_after": cpu_busy_fraction(),
                    "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "memory_method": memory_method(device),
        "isolation": "one subprocess per size",
        "sizes": sizes,
        "wall_s": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(format_tdsm_report(report))
    print(f"\nwall time {report['wall_s']:.0f} s; JSON written to {args.out}")
    return 1 if any("error" in r for r in sizes.values()) else 0


# ----------------------------------------------------------------------------------------------
# Contended: one TDSM training step alone and beside busy processes, per CPU thread setting
# ----------------------------------------------------------------------------------------------

# libgomp reads OMP_WAIT_POLICY once, when torch loads it, so every arm runs in a fresh interpreter. The
# 'torch default' arm imports torch before `service` can set the wait policy (what every process did before the
# thread policy); the others start like any CLI (`python -m service...`).
TORCH_FIRST = "import sys, torch; from service.bench import main; sys.exit(main())"
THREAD_ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
BUSY_LOOP = "while True: pass"    # one competitor: a pure-Python process that keeps one core busy
CONTENDED_GOAL = 1.5              # the default setting's step time at most this many times the best setting's


@dataclass(frozen=True)
class ThreadArm:
    """One thread setting: torch intra-op threads (0 = the thread policy's auto, as train.threads = 0) and whether
    torch loads before `service` sets OMP_WAIT_POLICY=PASSIVE (libgomp's own default: spin, then sleep)."""

    name: str
    threads: int
    torch_first: bool = False


def contended_arms(cpus: int) -> list[ThreadArm]:
    """Torch's default (all cores, spinning waits), one thread, all cores with passive waits, and auto."""
    return [ThreadArm("torch default", cpus, torch_first=True), ThreadArm("1 thread", 1),
            ThreadArm(f"{cpus} passive", cpus), ThreadArm("auto", 0)]


@contextlib.contextmanager
def busy_processes(n: int):
    """n CPU-bound competitor processes for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
    try:
        time.sleep(0.2 if n else 0)   # let them start spinning before the timed steps
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


def run_contended_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One arm in this (fresh) process: the size's training step at the arm's threads, median of spec['iters']."""
    cfg = bench_config(spec["size"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    else:
        apply_thread_policy(0, cfg.model.hidden_size)    # what tdsm_fit does with train.threads = 0
    device = torch.device("cpu")
    s = TDSMBenchSettings(size=spec["size"], batch=spec["batch"], train_warmup=spec["warmup"],
                          train_iters=spec["iters"], score_warmup=0, score_iters=1, score_samples=1, draws=1,
                          candidates=(1,))
    gen = torch.Generator().manual_seed(s.seed)
    text_g = torch.randn(NUM_CLASSES, TEXT_DIM, generator=gen)                 # (classes, D_g)
    text_l = torch.randn(NUM_CLASSES, TEXT_TOKENS, TEXT_DIM, generator=gen)    # (classes, M_l, D_l)
    precision = resolve_precision(cfg.train.precision, device)
    step = bench_train_step(cfg, s, precision, device, text_g, text_l)
    return {"threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "precision": precision, "median_s": step["median_s"], "times_s": step["times_s"],
            "cpu_share": step["cpu_share"], "loss_finite": step["loss_finite"]}


def run_contended_arm(arm: ThreadArm, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run one arm in a fresh interpreter; its JSON result, or {'error': ...} with the tail of its stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "arm.json"
        entry = ["-c", TORCH_FIRST] if arm.torch_first else ["-m", "service.bench"]
        cmd = [sys.executable, *entry, "contended", "--worker", json.dumps({**spec, "threads": arm.threads}),
               "--out", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0 or not out.is_file():
            return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
        result = json.loads(out.read_text())
    if arm.torch_first:   # `service` set the variable after libgomp had read it: libgomp's default applied
        result["wait_policy"] = None
    return result


def summarise_contended(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (size, competitors, arm): the median over rounds, its ratio to the same arm alone and to the best arm."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in runs:
        if "error" not in r:
            groups.setdefault((r["size"], r["competitors"], r["arm"]), []).append(r)
    rows = []
    for (size, n, arm), rs in groups.items():
        shares = [r["cpu_share"] for r in rs if r["cpu_share"] is not None]
        rows.append({"size": size, "competitors": n, "arm": arm, "threads": rs[0]["threads"],
                     "wait_policy": rs[0]["wait_policy"], "rounds": len(rs),
                     "median_s": statistics.median(r["median_s"] for r in rs),
                     "cpu_share": statistics.median(shares) if shares else None})
    for row in rows:
        same = [r["median_s"] for r in rows if r["size"] == row["size"] and r["competitors"] == row["competitors"]]
        alone = [r["median_s"] for r in rows if (r["size"], r["competitors"], r["arm"]) == (row["size"], 0, row["arm"])]
        row["vs_best"] = row["median_s"] / min(same)
        row["vs_alone"] = row["median_s"] / alone[0] if alone else None
    return rows


def format_contended_report(report: dict[str, Any]) -> str:
    """The table (one row per size, competitors and arm) and whether auto met the goal under contention."""
    m = report["machine"]
    rows = [[r["size"], str(r["competitors"]), r["arm"], str(r["threads"]), r["wait_policy"] or "(libgomp)",
             f"{r['median_s'] * 1e3:.0f}", format_share(r["cpu_share"]),
             "-" if r["vs_alone"] is None else f"{r['vs_alone']:.2f}", f"{r['vs_best']:.2f}"]
            for r in report["rows"]]
    lines = [
        f"machine: {m['cpu_model']}, {m['cpu_cores_usable']} usable cores, torch {m['torch']}; "
        f"{m['cpu_busy_before'] * 100 if m['cpu_busy_before'] is not None else float('nan'):.0f}% of the CPUs busy "
        f"with other work before the start",
        f"TDSM training step, batch {report['settings']['batch']} ({2 * report['settings']['batch']} rows), "
        f"median of {report['settings']['iters']} steps per run, median over {report['settings']['rounds']} "
        "alternating rounds; competitors: busy pure-Python processes",
        "",
        format_table(["size", "competitors", "threads setting", "threads", "wait policy", "step ms", "cpu share",
                      "x alone", "x best"], rows),
        "",
        "cpu share: process CPU time / (wall time x threads); x alone: this setting with no competitor; "
        "x best: the fastest setting at this size and competitor count.",
    ]
    for size in report["settings"]["sizes"]:
        for n in report["settings"]["competitors"]:
            auto = [r for r in report["rows"] if (r["size"], r["competitors"], r["arm"]) == (size, n, "auto")]
            if n and auto:
                verdict = "met" if auto[0]["vs_best"] <= CONTENDED_GOAL else "MISSED"
                lines.append(f"goal ({size}, {n} competitor{'s' * (n > 1)}): auto at {auto[0]['vs_best']:.2f}x "
                             f"the best setting (<= {CONTENDED_GOAL}x): {verdict}")
    return "\n".join(lines)


def add_contended_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("bench-contended.json"), help="JSON report (default: %(default)s)")
    p.add_argument("--sizes", nargs="+", choices=list(SIZE_PLANS), default=["tiny", "small"],
                   help="TDSM model sizes (default: %(default)s)")
    p.add_argument("--competitors", type=int, nargs="+", default=[0, 1, 2],
                   help="numbers of busy competitor processes, 0 = alone (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds; medians are reported (default: %(default)s)")
    p.add_argument("--iters", type=int, default=5, help="timed steps per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="training samples per step, 2x as many rows "
                                                        "(default: %(default)s)")
    p.add_argument("--worker", help=argparse.SUPPRESS)   # JSON spec of one arm: run it, write --out


def bench_contended(args: argparse.Namespace) -> int:
    """TDSM step time alone vs beside N busy processes, for torch's default threads, 1, all-passive and auto."""
    for flag, value, least in (("--rounds", args.rounds, 1), ("--iters", args.iters, 1), ("--warmup", args.warmup, 0),
                               ("--batch", args.batch, 1), ("--competitors", min(args.competitors), 0)):
        if value < least:
            raise InputError(f"{flag} must be >= {least} (got {value})")
    if args.worker:
        write_report(args.out, run_contended_worker(json.loads(args.worker)))
        return 0
    start = time.perf_counter()
    cpus = available_cpus()
    arms = contended_arms(cpus)
    # Each arm sets its own threads: none inherits this shell's OpenMP settings.
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV_KEYS}
    machine = {**describe_machine(torch.device("cpu")), "cpu_busy_before": cpu_busy_fraction()}
    log(f"bench contended: {machine['cpu_model']}, {cpus} usable cores, load average {machine['load_average']}")
    runs = []
    for rnd in range(args.rounds):
        for n in args.competitors:
            with busy_processes(n):
                for size in args.sizes:
                    # Rotate the arms each round so no setting always runs first (or last) after a change.
                    for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:
                        spec = {"size": size, "batch": args.batch, "warmup": args.warmup, "iters": args.iters}
                        result = run_contended_arm(arm, spec, env)
                        runs.append({"size": size, "competitors": n, "arm": arm.name, "round": rnd, **result})
                        log(f"  round {rnd + 1}/{args.rounds} {size} competitors={n} {arm.name}: "
                            + (result["error"] if "error" in result else
                               f"{result['median_s'] * 1e3:.0f} ms, share {format_share(result['cpu_share'])}"))
    report = {
        "benchmark": "contended",
        "machine": {**machine, "cpu_busy_after": cpu_busy_fraction()},
        "settings": {"sizes": args.sizes, "competitors": args.competitors, "rounds": args.rounds,
                     "iters": args.iters, "warmup": args.warmup, "batch": args.batch,
                     "arms": [asdict(a) for a in arms], "goal_vs_best": CONTENDED_GOAL},
        "runs": runs,
        "rows": summarise_contended(runs),
        "wall_s": time.perf_counter() - start,
    }
    write_report(args.out, report)
    print(format_contended_report(report))
    print(f"\nwall time {report['wall_s']:.0f} s; JSON written to {args.out}")
    return 1 if any("error" in r for r in runs) else 0


# ----------------------------------------------------------------------------------------------
# CoCoDiff: training-step overhead of the module, inference cost of the exported classifier
# ----------------------------------------------------------------------------------------------

# Dotted overrides of CoCoDiffConfig per size. 'default' is the config's own (the embedded default's: ST-GCN,
# 8 base channels, units 1,1,1 -> 32-d x_0, a 128-wide 2-block denoiser, batch 16); 'paper' is the
# model of service/configs/cocodiff_paper.yaml (CTR-GCN, 64 base channels, units 4,3,3 -> 256-d x_0, a 512-wide
# 3-block denoiser; the paper's batch is 64, --batch sets it); 'tiny' is the smoke-sweep size.
COCODIFF_BENCH_SIZES: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"backbone.encoder": "ctrgcn", "backbone.base_channels": 64, "backbone.units_per_stage": [4, 3, 3],
              "module.hidden": 512, "module.depth": 3, "module.align_dim": 256},
    "tiny": {"backbone.encoder": "stgcn", "backbone.base_channels": 8, "backbone.units_per_stage": [1, 1, 1],
             "module.hidden": 32, "module.depth": 1, "module.align_dim": 16},
}
COCODIFF_TEXT_DIM = 384   # MiniLM's width (the default text encoder)


def add_cocodiff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--out", type=Path, default=Path("bench-cocodiff.json"), help="JSON report (default: %(default)s)")
    p.add_argument("--sizes", nargs="+", choices=list(COCODIFF_BENCH_SIZES), default=["default"],
                   help="model sizes (default: default = CoCoDiffConfig's own)")
    p.add_argument("--batch", type=int, default=16,
                   help="training sequences per step (default: %(default)s, the default config's; the paper uses 64)")
    p.add_argument("--infer-batch", type=int, default=32, help="sequences per inference call (default: %(default)s)")
    p.add_argument("--frames", type=int, default=64, help="frames per sequence (default: %(default)s, the paper's)")
    p.add_argument("--classes", type=int, default=46,
                   help="classes of the head and text tables (default: %(default)s, the embedded synthetic set)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="as train.precision")
    # The first steps after the warm-up still run slower (allocator, oneDNN primitive caches); with 2 + 10 steps
    # the default size read +13..+17 %, with 5 + 30 a stable +6..+7 % on an idle core (cpu share 1.00).
    p.add_argument("--iters", type=int, default=30,
                   help="timed calls per measurement; training steps of the two arms alternate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default: the config's train.threads, else torch's choice)")


def _cocodiff_share(size_report: dict[str, Any]) -> float | None:
    """The lowest CPU share of a size's measurements (training arms and inference), None off the CPU."""
    t = size_report["train"]
    return min_cpu_share({"cpu_share": t.get("baseline_cpu_share")}, {"cpu_share": t.get("cocodiff_cpu_share")},
                         {"cpu_share": size_report["inference"]["cpu_share"]})


def _param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def bench_cocodiff(args: argparse.Namespace) -> int:
    """Training step without / with the CoCoDiff module (`step_times`), and inference throughput of the
    exported classifier of a module-enabled fit vs the same backbone built without the module."""
    from trainers.cocodiff import CoCoDiffConfig
    from trainers.cocodiff_fit import (
        build_classifier,
        export_classifier,
        fit_cocodiff,
        step_times,
        with_overrides,
    )
    from trainers.runtime import resolve_precision
    from trainers.tracking import NullReporter

    for flag, value, least in (("--batch", args.batch, 1), ("--infer-batch", args.infer_batch, 1),
                               ("--frames", args.frames, 4), ("--classes", args.classes, 2),
                               ("--iters", args.iters, 1), ("--warmup", args.warmup, 0),
                               ("--threads", args.threads, 0)):
        if value < least:
            raise InputError(f"{flag} must be >= {least} (got {value})")
    threads = args.threads or CoCoDiffConfig().train.threads
    if threads:
        torch.set_num_threads(threads)
    device = resolve_bench_device(args.device)
    start = time.perf_counter()
    machine = describe_machine(device)
    precision = resolve_precision(args.precision, device)
    log(f"bench cocodiff on {device} ({precision}): {machine['cpu_model']}, {machine['torch_threads']} threads")
    sizes: dict[str, Any] = {}
    for size in args.sizes:
        cfg = build_config(CoCoDiffConfig, {}, {**COCODIFF_BENCH_SIZES[size], "train.device": str(device),
                                                "train.precision": args.precision, "optim.batch_size": args.batch})
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, args.frames, 25, 2, generator=g)                  # (B, C, T, V, M)
        y = torch.arange(args.batch) % args.classes
        fine = torch.randn(args.classes, COCODIFF_TEXT_DIM, generator=g)
        coarse = torch.randn(args.classes, COCODIFF_TEXT_DIM, generator=g)
        log(f"[{size}] training step, backbone alone vs + module ({args.warmup}+{args.iters} steps each) ...")
        train = step_times(cfg, (x, y), fine, coarse, iters=args.iters, warmup=args.warmup)
        log(f"[{size}] step {format_seconds(train['baseline_s'])} alone, {format_seconds(train['cocodiff_s'])} "
            f"+ module: {train['overhead'] * 100:+.1f}%")
        # The classifier a module-enabled fit exports (one step is enough: only its structure matters here),
        # against the same backbone built without any module.
        one_step = with_overrides(cfg, train={"steps": 1})
        result = fit_cocodiff(one_step, x, y, None, None, fine, coarse, NullReporter(), None, progress=False,
                              num_classes=args.classes)
        exported = export_classifier(result, "last")
        plain = build_classifier(cfg.backbone, args.classes, 3).to(device).eval()
        xi = torch.randn(args.infer_batch, 3, args.frames, 25, 2, generator=g).to(device)

        def infer(model, xi=xi):
            with torch.no_grad(), autocast(device, precision):
                return model(xi)

        timed = {name: time_calls(lambda m=m: infer(m), args.warmup, args.iters, device, f"[{size}] infer {name}")
                 for name, m in (("exported", exported), ("plain", plain))}
        per_s = {name: args.infer_batch / statistics.median(t.times_s) for name, t in timed.items()}
        sizes[size] = {
            "overrides": COCODIFF_BENCH_SIZES[size],
            "parameters": {"classifier_exported": count_parameters(exported),
                           "classifier_plain": count_parameters(plain),
                           "module_training_only": count_parameters(result.module)},
            "train": {**train, "batch": args.batch,
                      "baseline_samples_per_s": args.batch / train["baseline_s"],
                      "cocodiff_samples_per_s": args.batch / train["cocodiff_s"]},
            "inference": {"batch": args.infer_batch, "exported_samples_per_s": per_s["exported"],
                          "cpu_share": min_cpu_share(*({"cpu_share": t.cpu_share} for t in timed.values())),
                          "plain_samples_per_s": per_s["plain"],
                          "exported_over_plain": per_s["exported"] / per_s["plain"],
                          "same_architecture": _param_shapes(exported) == _param_shapes(plain)},
        }
    report = {"benchmark": "cocodiff", "machine": machine, "precision": precision, "frames": args.frames,
              "classes": args.classes, "sizes": sizes, "wall_s": time.perf_counter() - start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    rows = [[name, f"{r['parameters']['classifier_exported'] / 1e6:.2f}M",
             f"{r['parameters']['module_training_only'] / 1e6:.2f}M",
             format_seconds(r["train"]["baseline_s"]), format_seconds(r["train"]["cocodiff_s"]),
             f"{r['train']['overhead'] * 100:+.1f}%", format_share(_cocodiff_share(r)),
             f"{r['inference']['plain_samples_per_s']:.1f}",
             f"{r['inference']['exported_samples_per_s']:.1f}", f"{r['inference']['exported_over_plain']:.2f}x",
             str(r["inference"]["same_architecture"])] for name, r in sizes.items()]
    print(f"machine: {machine['cpu_model']}, {machine['cpu_cores_usable']} usable cores, {machine['torch_threads']} "
          f"torch threads, device {device}, {precision}; {args.frames} frames, {args.classes} classes")
    print(f"training step: batch {args.batch}, median of {args.iters} after {args.warmup} warm-up; inference: batch "
          f"{args.infer_batch}, median of {args.iters}")
    print(format_table(["size", "classifier", "module", "step backbone", "step +module", "overhead", "cpu share",
                        "infer plain seq/s", "infer exported seq/s", "exported/plain", "same arch"], rows))
    if any((share := _cocodiff_share(r)) is not None and share < CONTENDED_SHARE for r in sizes.values()):
        print(f"warning: cpu share below {CONTENDED_SHARE}: other processes took the cores during the measurement; "
              "the two arms' steps alternate, so the overhead ratio is less affected than the times")
    print(f"\nwall time {report['wall_s']:.0f} s; JSON written to {args.out}")
    return 0 if all(r["inference"]["same_architecture"] for r in sizes.values()) else 1


# ----------------------------------------------------------------------------------------------
# prepare: parse + preprocess throughput
# ----------------------------------------------------------------------------------------------

def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--files", type=int, default=368, help="generated input files (pku: ~this many samples, in "
                   "long sequences) (default: %(default)s)")
    from service.prepare import BENCH_FORMATS

    p.add_argument("--format", choices=BENCH_FORMATS, default="ntu",
                   help="NTU .skeleton files, Kinetics-skeleton JSON clips or PKU-MMD sequences (default: ntu)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts to time (default: 1 2)")
    p.add_argument("--frames", type=int, default=64, help="frames after resampling (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench-prepare.json"), help="JSON report (default: %(default)s)")


def bench_prepare_cli(args: argparse.Namespace) -> int:
    """`service.prepare`'s parse + preprocess over generated files of one format, per worker count."""
    from service.prepare import bench_prepare

    if args.files < 1 or any(w < 1 for w in args.workers):
        raise InputError(f"--files {args.files} / --workers {args.workers}: expected positive counts")
    machine = {**describe_machine(torch.device("cpu")), "cpu_busy_before": cpu_busy_fraction()}
    runs = []
    for workers in args.workers:
        log(f"prepare: {args.format}, {args.files} files with {workers} worker(s) ...")
        runs.append(bench_prepare(args.files, workers, args.frames, dataset=args.format))
    report = {"benchmark": "prepare", "format": args.format, "machine": machine, "frames": args.frames, "runs": runs}
    write_report(args.out, report)
    kind = {"ntu": "NTU .skeleton files", "kinetics": "Kinetics-skeleton JSON clips",
            "pku": f"PKU-MMD sequences ({runs[0]['samples']} labelled samples)"}[args.format]
    print(f"machine: {machine['cpu_model']}, {machine['cpu_cores_usable']} usable cores; {runs[0]['files']} generated "
          f"{kind} (mean {runs[0]['mean_file_kb']} kB), parse + preprocess to {args.frames} frames")
    print(format_table(["workers", "seconds", "files/s", "files/s per worker", "samples/s", "files per CPU-s", "MB/s"],
                       [[str(r["workers"]), f"{r['seconds']:.2f}", f"{r['files_per_s']:.1f}",
                         f"{r['files_per_s_per_core']:.1f}", f"{r['samples_per_s']:.1f}",
                         f"{r['files_per_cpu_s'] or 0:.1f}", f"{r['mb_per_s']:.1f}"] for r in runs]))
    print("files per CPU-s counts the CPU time of every worker: the per-core rate that other load does not change")
    print(f"JSON written to {args.out}")
    return 0 if all(r["ok"] == r["samples"] for r in runs) else 1


# ----------------------------------------------------------------------------------------------
# encoder: GCN training and feature-extraction throughput
# ----------------------------------------------------------------------------------------------

ENCODER_BENCH_SIZES = {      # name -> EncoderConfig fields
    "chain": {"name": "stgcn", "base_channels": 16, "units_per_stage": [1, 1, 1]},    # the embedded chain's
    "stgcn": {"name": "stgcn", "base_channels": 64, "units_per_stage": [4, 3, 3]},    # paper-size encoders
    "shiftgcn": {"name": "shiftgcn", "base_channels": 64, "units_per_stage": [4, 3, 3]},
    "ctrgcn": {"name": "ctrgcn", "base_channels": 64, "units_per_stage": [4, 3, 3]},
}


def add_encoder_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--sizes", nargs="+", choices=list(ENCODER_BENCH_SIZES), default=["chain", "stgcn"],
                   help="encoders (default: chain stgcn)")
    p.add_argument("--batch", type=int, default=32, help="training sequences per step (default: %(default)s)")
    p.add_argument("--extract-batch", type=int, default=64, help="sequences per extraction call (default: %(default)s)")
    p.add_argument("--frames", type=int, default=64, help="frames per sequence (default: %(default)s)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per measurement (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("bench-encoder.json"), help="JSON report (default: %(default)s)")


def bench_encoder(args: argparse.Namespace) -> int:
    """Training step (`trainers.encoder_fit.train_step`, AdamW) and `extract_features`, fp32 vs bf16."""
    from trainers.encoder_fit import EncoderConfig, extract_features
    from trainers.encoder_fit import train_step as encoder_train_step
    from trainers.skeleton.gcn import build_encoder

    if min(args.batch, args.extract_batch, args.frames, args.iters) < 1 or args.warmup < 0:
        raise InputError("--batch, --extract-batch, --frames and --iters must be >= 1, --warmup >= 0")
    device = resolve_bench_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {**describe_machine(device), "cpu_busy_before": cpu_busy_fraction()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(max(args.batch, args.extract_batch), 3, args.frames, 25, 2, generator=gen)
    y = torch.randint(40, (args.batch,), generator=gen)
    sizes: dict[str, Any] = {}
    for size in args.sizes:
        sizes[size] = {"config": ENCODER_BENCH_SIZES[size]}
        for precision in ("fp32", "bf16"):
            cfg = EncoderConfig(**ENCODER_BENCH_SIZES[size], precision=precision, device=str(device))
            seed_everything(0)
            model = build_encoder(cfg.name, 40, 3, cfg.layout, cfg.base_channels, tuple(cfg.units_per_stage)).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            xb, yb = x[:args.batch].to(device), y.to(device)

            def step(model=model, opt=opt, xb=xb, yb=yb, precision=precision):
                return encoder_train_step(model, opt, xb, yb, device, precision)[0]

            train = time_calls(step, args.warmup, args.iters, device, f"[{size}] train {precision}")
            model.eval()
            xe = x[:args.extract_batch]
            extract = time_calls(lambda model=model, cfg=cfg: extract_features(model, xe, cfg, args.extract_batch),
                                 args.warmup, args.iters, device, f"[{size}] extract {precision}")
            sizes[size]["parameters"] = count_parameters(model)
            sizes[size][precision] = {
                "train_step_s": train.median_s, "train_samples_per_s": args.batch / train.median_s,
                "train_cpu_share": train.cpu_share, "extract_call_s": extract.median_s,
                "extract_samples_per_s": args.extract_batch / extract.median_s, "extract_cpu_share": extract.cpu_share}
    report = {"benchmark": "encoder", "machine": machine, "batch": args.batch, "extract_batch": args.extract_batch,
              "frames": args.frames, "sizes": sizes}
    write_report(args.out, report)
    print(f"machine: {machine['cpu_model']}, {machine['cpu_cores_usable']} usable cores, {machine['torch_threads']} "
          f"torch threads, device {device}; {args.frames} frames x 25 joints x 2 bodies, 40 classes")
    rows = []
    for size, r in sizes.items():
        f32, b16 = r["fp32"], r["bf16"]
        share = min_cpu_share(*({"cpu_share": v[k]} for v in (f32, b16) for k in ("train_cpu_share", "extract_cpu_share")))
        rows.append([size, f"{r['parameters'] / 1e6:.2f}M", f"{f32['train_samples_per_s']:.1f}",
                     f"{b16['train_samples_per_s']:.1f}", f"{b16['train_samples_per_s'] / f32['train_samples_per_s']:.2f}x",
                     f"{f32['extract_samples_per_s']:.1f}", f"{b16['extract_samples_per_s']:.1f}",
                     f"{b16['extract_samples_per_s'] / f32['extract_samples_per_s']:.2f}x", format_share(share)])
    print(format_table(["encoder", "params", "train seq/s fp32", "train seq/s bf16", "bf16 speed-up",
                        "extract seq/s fp32", "extract seq/s bf16", "bf16 speed-up", "cpu share"], rows))
    print(f"training: batch {args.batch}, forward + backward + AdamW; extraction: batch {args.extract_batch}, pooled "
          f"features; medians of {args.iters} calls after {args.warmup} warm-up")
    if any(float(r[-1]) < CONTENDED_SHARE for r in rows if r[-1] != "-"):
        print(f"warning: cpu share below {CONTENDED_SHARE}: other processes took the cores during the measurement")
    print(f"JSON written to {args.out}")
    return 0


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The JSON report, written through a temporary name."""
    from trainers.io import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=2))


@dataclass(frozen=True)
class Benchmark:
    """One `python -m service.bench NAME` subcommand: its flags and the function that runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


BENCHMARKS: dict[str, Benchmark] = {
    "tdsm": Benchmark("TDSM training step (fp32 vs bf16) and zero-shot scoring (batched vs per-class loop)",
                      add_tdsm_arguments, bench_tdsm),
    "prepare": Benchmark("parse + preprocess throughput of service.prepare on generated NTU, Kinetics or PKU files",
                         add_prepare_arguments, bench_prepare_cli),
    "encoder": Benchmark("GCN encoder training and feature-extraction throughput, fp32 vs bf16",
                         add_encoder_arguments, bench_encoder),
    "contended": Benchmark("TDSM training step alone vs beside N busy processes, per CPU thread setting "
                           "(torch default, 1, all cores passive, auto)", add_contended_arguments, bench_contended),
    "cocodiff": Benchmark("CoCoDiff training-step overhead of the module, and inference of the exported classifier "
                          "vs the same backbone without it", add_cocodiff_arguments, bench_cocodiff),
}


BENCH_EXAMPLES = """examples:
  python -m service.bench tdsm --quick --out bench-tdsm.json      # training step and zero-shot scoring, two sizes
  python -m service.bench cocodiff --device cuda                   # module overhead and exported-classifier speed
  python -m service.bench prepare --format kinetics                # parse + preprocess throughput of a reader
  python -m service.bench encoder --sizes chain                    # GCN encoder training and extraction
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__.splitlines()[0],
                                epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, bench in BENCHMARKS.items():
        bench.add_arguments(sub.add_parser(name, help=bench.help, description=bench.help))
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return BENCHMARKS[args.benchmark].run(args)


if __name__ == "__main__":
    sys.exit(main())
