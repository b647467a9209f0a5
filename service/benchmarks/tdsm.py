"""`python -m service.bench tdsm`: the TDSM denoiser's training step and zero-shot scoring.

For the paper-size denoiser and a small one (256-d skeleton features, 2048-d global and local text, M_l = 35 text
tokens) it measures:
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
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from service.benchmarks.common import (
    CONTENDED_SHARE,
    MIB,
    PeakMemory,
    cpu_busy_fraction,
    describe_machine,
    format_seconds,
    format_share,
    format_table,
    log,
    memory_method,
    min_cpu_share,
    resolve_bench_device,
    synchronize,
    time_calls,
)
from trainers.config import build_config
from trainers.configs import TDSMConfig
from trainers.diffusion import NoiseSchedule
from trainers.errors import InputError
from trainers.layers import count_parameters
from trainers.losses import sample_negative_classes
from trainers.runtime import autocast, cpu_has_fast_bf16, seed_everything
from trainers.tdsm_fit import TrainBatch, build_optimizer, build_schedule, train_step
from trainers.tdsm_model import TDSMDenoiser
from trainers.zsl import evaluation_noise, score_candidates, score_candidates_loop

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
    for _ in range(100):
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
        # Drop the model and its optimizer before the next phase (assigning, not `del`: `step` closes over them).
        model = train_model = opt = step = None
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
# TDSM: the subcommand
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
