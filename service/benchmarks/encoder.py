"""`python -m service.bench encoder`: GCN encoder training and feature-extraction throughput, fp32 vs bf16."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from service.benchmarks.common import (
    CONTENDED_SHARE,
    cpu_busy_fraction,
    describe_machine,
    format_share,
    format_table,
    min_cpu_share,
    resolve_bench_device,
    time_calls,
    write_report,
)
from trainers.configs import EncoderConfig
from trainers.encoder_fit import extract_features
from trainers.encoder_fit import train_step as encoder_train_step
from trainers.errors import InputError
from trainers.layers import count_parameters
from trainers.runtime import seed_everything
from trainers.skeleton.gcn import build_encoder

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

            def extract_call(model=model, cfg=cfg, xe=x[:args.extract_batch]):
                return extract_features(model, xe, cfg, args.extract_batch)

            extract = time_calls(extract_call, args.warmup, args.iters, device, f"[{size}] extract {precision}")
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
        share = min_cpu_share(*({"cpu_share": v[k]} for v in (f32, b16)
                                for k in ("train_cpu_share", "extract_cpu_share")))
        rows.append([size, f"{r['parameters'] / 1e6:.2f}M", f"{f32['train_samples_per_s']:.1f}",
                     f"{b16['train_samples_per_s']:.1f}",
                     f"{b16['train_samples_per_s'] / f32['train_samples_per_s']:.2f}x",
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
