"""`python -m service.bench cocodiff`: the training-step overhead of the CoCoDiff module, and the inference cost
of the exported classifier against the same backbone built without it."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from service.benchmarks.common import (
    CONTENDED_SHARE,
    describe_machine,
    format_seconds,
    format_share,
    format_table,
    log,
    min_cpu_share,
    resolve_bench_device,
    synchronize,
    time_calls,
)
from trainers.cocodiff import build_module, build_schedule
from trainers.cocodiff_classifier import build_classifier, export_classifier
from trainers.cocodiff_fit import (
    TrainingModel,
    build_optimizer,
    fit_cocodiff,
    step_generator,
    training_step,
    with_overrides,
)
from trainers.config import build_config
from trainers.configs import CoCoDiffConfig
from trainers.errors import InputError
from trainers.layers import count_parameters
from trainers.runtime import autocast, resolve_device, resolve_precision, seed_everything
from trainers.tracking import NullReporter

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


def step_times(cfg: CoCoDiffConfig, batch: tuple[torch.Tensor, torch.Tensor], fine_text: torch.Tensor | None = None,
               coarse_text: torch.Tensor | None = None, iters: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median seconds of one training step (the fit loop's own `training_step`) without and with the module.

    batch: (x (N, C, T, V, M), y (N,)); texts default to seeded random 384-d rows (MiniLM's width) for
    1 + max(y) classes. Runs on cfg.train.device with cfg.train.precision; nothing is asserted here. The two
    arms' steps alternate, so a change in load from other processes hits both alike; `<arm>_cpu_share` is this
    process's CPU time over (wall time x torch threads) of the arm's timed steps (CPU only; ~1 when uncontended).
    """
    x, y = batch
    num_classes = fine_text.shape[0] if fine_text is not None else int(y.max()) + 1
    g = torch.Generator().manual_seed(0)
    fine_text = fine_text if fine_text is not None else torch.randn(num_classes, 384, generator=g)
    coarse_text = coarse_text if coarse_text is not None else torch.randn(num_classes, 384, generator=g)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)

    def amp():  # a fresh context per use
        return autocast(device, precision)

    x, y = x.to(device), y.to(device)
    ft, ct = fine_text.float().to(device), coarse_text.float().to(device)
    schedule = build_schedule(cfg.module)
    arms = {}
    for arm, enabled in (("baseline", False), ("cocodiff", True)):
        seed_everything(cfg.train.seed)
        classifier = build_classifier(cfg.backbone, num_classes, x.shape[1]).to(device)
        module = build_module(cfg.module, classifier.encoder.feature_dim, ft.shape[1],
                              ct.shape[1]).to(device) if enabled else None
        model = TrainingModel(classifier, module).train()
        arms[arm] = (model, build_optimizer(cfg, model))
    wall: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, float] = dict.fromkeys(arms, 0.0)
    for i in range(warmup + iters):
        for arm, (model, opt) in arms.items():
            gen = step_generator(cfg.train.seed, i)
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            training_step(model, schedule, opt, cfg, x, y, ft, ct, gen, amp)
            synchronize(device)
            if i >= warmup:
                wall[arm].append(time.perf_counter() - start)
                cpu[arm] += time.process_time() - cpu_start
    out: dict[str, float] = {}
    for arm in arms:
        out[f"{arm}_s"] = statistics.median(wall[arm])
        if device.type == "cpu":
            out[f"{arm}_cpu_share"] = cpu[arm] / (sum(wall[arm]) * torch.get_num_threads())
    out["overhead"] = out["cocodiff_s"] / out["baseline_s"] - 1.0
    return out


def bench_cocodiff(args: argparse.Namespace) -> int:
    """Training step without / with the CoCoDiff module (`step_times`), and inference throughput of the
    exported classifier of a module-enabled fit vs the same backbone built without the module."""
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
