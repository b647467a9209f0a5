"""`python -m service.bench serve`: what a user of the registered zero-shot model waits for. Latency of one sequence
and throughput of batches for 5 / 60 / 120 candidate classes, cold (class texts the model has not seen: the text
encoder runs) and warm (the same texts again: cached in the loaded model).

By default the chain has the embedded default's shapes (ST-GCN base 16 on 64 frames x 25 joints x 2 bodies, 64-d
features, the default TDSM denoiser, MiniLM, `service.final`'s 10 noise draws) with random weights: speed does not
depend on what the weights learned. `--model models:/...` measures a registered model instead (through MLflow's
pyfunc, as `service.predict` and `mlflow models serve` call it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from service.benchmarks.common import (
    CONTENDED_SHARE,
    cpu_busy_fraction,
    describe_machine,
    format_seconds,
    format_share,
    format_table,
    log,
    time_calls,
    write_report,
)
from service.tracking.registry import load_served
from service.tracking.store import resolve_tracking_uri
from trainers.config import build_config
from trainers.configs import EncoderConfig, TDSMConfig
from trainers.errors import InputError
from trainers.runtime import resolve_precision
from trainers.skeleton.gcn import build_encoder
from trainers.tdsm_fit import build_model
from trainers.text import build_text_encoder
from trainers.text_encoders import TextFeatures
from trainers.zero_shot import ZeroShotChain, chain_bundle, chain_from_bundle

# The embedded default's chain (search_spaces/tdsm_splits.yaml `synthetic-skeleton`) as final registers it.
DEFAULT_ENCODER = {"name": "stgcn", "base_channels": 16, "units_per_stage": [1, 1, 1]}
DEFAULT_LAYOUT = {"channels": 3, "frames": 64, "joints": 25, "bodies": 2, "dataset": "ntu"}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a registered model (models:/NAME@ALIAS); default: the embedded default's shapes")
    p.add_argument("--tracking-uri", help="with --model (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--classes", type=int, nargs="+", default=[5, 60, 120], help="candidate counts (default: 5 60 120)")
    p.add_argument("--batch", type=int, default=32, help="sequences per throughput call (default: %(default)s)")
    p.add_argument("--noise-draws", type=int, default=10, help="eval.noise_draws of the default chain (final's "
                                                               "default: %(default)s)")
    p.add_argument("--iters", type=int, default=3, help="timed calls per measurement (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench-serve.json"), help="JSON report (default: %(default)s)")


def default_chain(noise_draws: int) -> ZeroShotChain:
    """The embedded default's chain shapes with random weights and 120 MiniLM-encoded class texts."""
    cfg = build_config(TDSMConfig, {}, {"eval.noise_draws": noise_draws, "train.device": "cpu"})
    names = [f"known action {i}" for i in range(120)]
    text = build_text_encoder("minilm", layer=cfg.text.layer, pooled=cfg.text.pooled).encode(names,
                                                                                             cfg.text.max_tokens)
    # the two roles of training (name, description): the names in both
    text = TextFeatures(torch.cat([text.global_feats] * 2, -1), torch.cat([text.local_feats] * 2, -1))
    torch.manual_seed(0)
    encoder = build_encoder("stgcn", 34, 3, base_channels=16, units_per_stage=(1, 1, 1))
    state = {"config": EncoderConfig(**DEFAULT_ENCODER).model_dump(mode="json"), "classes": list(range(34)),
             "in_channels": 3, "model": encoder.state_dict(), "layout": DEFAULT_LAYOUT}
    denoiser = build_model(cfg, encoder.feature_dim, text)
    return chain_from_bundle(chain_bundle(cfg, denoiser, [names, names], text, list(range(12)), state))


def bench_serve(args: argparse.Namespace) -> int:
    if min(args.batch, args.iters, args.noise_draws, *args.classes) < 1:
        raise InputError("--batch, --iters, --noise-draws and --classes must be >= 1")
    device = torch.device("cpu")
    machine = {**describe_machine(device), "cpu_busy_before": cpu_busy_fraction()}
    start = time.perf_counter()
    if args.model:
        predict, chain = load_served(args.model, resolve_tracking_uri(args.tracking_uri))
        what = args.model

        def call(x, names):
            return predict(x, {"classes": names, "top_k": 5})
    else:
        chain = default_chain(args.noise_draws)
        what = "the embedded default's shapes, random weights"

        def call(x, names):
            return chain.rank(x, names)
    log(f"model ready in {format_seconds(time.perf_counter() - start)}")
    frames = chain.layout.frames if chain.layout is not None else 1
    shape = [frames if d == -1 else d for d in chain.input_shape]                       # (C, T, V, M) or (D,)
    x = np.random.default_rng(0).normal(size=(args.batch, *shape)).astype(np.float32)
    rows, results = [], {}
    for count in args.classes:
        fresh = iter(range(10**9))

        def cold(n: int, count=count, fresh=fresh) -> Callable[[], Any]:
            return lambda: call(x[:n], [f"new action {next(fresh)} of {count}" for _ in range(count)])

        known = [f"warm action {i}" for i in range(count)]

        def warm(n: int, known=known) -> Callable[[], Any]:
            return lambda: call(x[:n], known)

        call(x[:1], known)                                   # the warm texts, encoded once
        timed = {"1 cold": time_calls(cold(1), 0, args.iters, device, f"[{count} classes] 1 sequence, new texts"),
                 "1 warm": time_calls(warm(1), 1, args.iters, device,
                                      f"[{count} classes] 1 sequence"),
                 "batch cold": time_calls(cold(args.batch), 0, args.iters, device,
                                          f"[{count} classes] {args.batch} sequences, new texts"),
                 "batch warm": time_calls(warm(args.batch), 1, args.iters, device,
                                          f"[{count} classes] {args.batch} sequences")}
        results[count] = {k: {"median_s": t.median_s, "cpu_share": t.cpu_share} for k, t in timed.items()}
        share = min(t.cpu_share for t in timed.values() if t.cpu_share is not None)
        rows.append([str(count), format_seconds(timed["1 cold"].median_s), format_seconds(timed["1 warm"].median_s),
                     f"{args.batch / timed['batch cold'].median_s:.1f}",
                     f"{args.batch / timed['batch warm'].median_s:.1f}", format_share(share)])
    precision = resolve_precision(chain.encoder_cfg.precision, device) if chain.encoder_cfg else "none"
    report = {"benchmark": "serve", "machine": machine, "model": what, "batch": args.batch,
              "noise_draws": chain.cfg.eval.noise_draws, "encoder_precision": precision, "denoiser_precision": "fp32",
              "classes": results}
    write_report(args.out, report)
    print(f"machine: {machine['cpu_model']}, {machine['cpu_cores_usable']} usable cores, {machine['torch_threads']} "
          f"torch threads; model: {what}; encoder {precision}, denoiser fp32, {chain.cfg.eval.noise_draws} noise draws")
    print(format_table(["classes", "1 seq cold", "1 seq warm", f"{args.batch}-batch seq/s cold",
                        f"{args.batch}-batch seq/s warm", "cpu share"], rows))
    print(f"cold: every class text new (MiniLM encodes them); warm: the same texts again (cached in the model); "
          f"medians of {args.iters} calls")
    if any(r[-1] != "-" and float(r[-1]) < CONTENDED_SHARE for r in rows):
        print(f"warning: cpu share below {CONTENDED_SHARE}: other processes took the cores during the measurement")
    print(f"JSON written to {args.out}")
    return 0
