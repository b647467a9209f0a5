"""`python -m service.bench prepare`: parse + preprocess throughput of `service.prepare` on generated NTU,
Kinetics-skeleton or PKU-MMD files, per worker count."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from service.benchmarks.common import cpu_busy_fraction, describe_machine, format_table, log, write_report
from trainers.errors import InputError
from trainers.skeleton.prepare import Job, Result, chunked, run_chunks
from trainers.skeleton.synthetic import NUM_CLASSES as SYNTHETIC_CLASSES
from trainers.skeleton.synthetic import write_synthetic_dataset
from trainers.skeleton.synthetic_release import write_kinetics_release, write_pku_release

BENCH_FORMATS = ("ntu", "kinetics", "pku")


def bench_inputs(folder: Path, dataset: str, n_files: int, seed: int) -> list[Job]:
    """Generated inputs of one format in `folder`: NTU `.skeleton` files, Kinetics-skeleton JSON clips (n_files of
    each), or PKU-MMD sequences + label files (as many long sequences as ~n_files samples make)."""
    classes = min(n_files, SYNTHETIC_CLASSES)
    per_class = math.ceil(n_files / classes)
    if dataset == "ntu":
        paths = write_synthetic_dataset(folder, num_classes=classes, per_class=per_class, seed=seed)[:n_files]
        return [Job("synthetic", str(p)) for p in paths]
    if dataset == "kinetics":
        paths = write_kinetics_release(folder, classes, per_class, seed)[:n_files]
        return [Job("kinetics", str(p)) for p in paths]
    if dataset == "pku":
        paths = write_pku_release(folder, classes, per_class, seed)
        return [Job("pku", str(p), str(folder / "label" / p.name)) for p in paths]
    raise InputError(f"--format {dataset}: expected one of {', '.join(BENCH_FORMATS)}")


def bench_prepare(n_files: int, workers: int, frames: int = 64, chunk_size: int = 8, seed: int = 0,
                  dataset: str = "ntu") -> dict:
    """Generate about `n_files` inputs of `dataset`'s format in a temp dir and time parse + preprocess over them.

    Times only the parsing and preprocessing (process pool start-up included, writing excluded). On a shared
    machine wall-clock rates depend on the load; `files_per_cpu_s` (files per CPU-second, workers included)
    is the per-core throughput that does not. PKU-MMD files are long sequences of several samples each, so
    `samples_per_s` is the rate to compare across formats.
    """
    if n_files < 1 or workers < 1:
        raise InputError(f"bench_prepare(n_files={n_files}, workers={workers}): expected both >= 1")
    with tempfile.TemporaryDirectory(prefix="skeldiff-bench-") as tmp:
        t0 = time.perf_counter()
        jobs = bench_inputs(Path(tmp), dataset, n_files, seed)
        gen_s = time.perf_counter() - t0
        size = sum(Path(j.path).stat().st_size for j in jobs)
        done = [0, 0]                                                             # samples ok, samples in all
        cpu0, t0 = _cpu_seconds(), time.perf_counter()

        def count(_: int, results: list[Result]) -> None:
            done[0] += sum(r[0] == "ok" for r in results)
            done[1] += len(results)

        run_chunks(chunked(jobs, chunk_size), frames, workers, count)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    files, rate = len(jobs), len(jobs) / seconds
    return {"format": dataset, "files": files, "samples": done[1], "ok": done[0], "workers": workers,
            "seconds": round(seconds, 3), "files_per_s": round(rate, 2),
            "files_per_s_per_core": round(rate / workers, 2), "samples_per_s": round(done[1] / seconds, 2),
            "cpu_seconds": round(cpu, 3), "files_per_cpu_s": round(files / cpu, 2) if cpu > 0 else None,
            "mb_per_s": round(size / 1e6 / seconds, 2), "mean_file_kb": round(size / files / 1e3, 1),
            "generate_seconds": round(gen_s, 3), "cpu_count": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (pool workers, once joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--files", type=int, default=368, help="generated input files (pku: ~this many samples, in "
                   "long sequences) (default: %(default)s)")
    p.add_argument("--format", choices=BENCH_FORMATS, default="ntu",
                   help="NTU .skeleton files, Kinetics-skeleton JSON clips or PKU-MMD sequences (default: ntu)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts to time (default: 1 2)")
    p.add_argument("--frames", type=int, default=64, help="frames after resampling (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench-prepare.json"), help="JSON report (default: %(default)s)")


def bench_prepare_cli(args: argparse.Namespace) -> int:
    """`service.prepare`'s parse + preprocess over generated files of one format, per worker count."""
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
