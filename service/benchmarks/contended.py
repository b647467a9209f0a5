"""`python -m service.bench contended`: one TDSM training step alone and beside busy processes, per CPU thread
setting (torch's default, one thread, all cores with passive waits, the thread policy's auto)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from service.benchmarks.common import (
    cpu_busy_fraction,
    describe_machine,
    format_share,
    format_table,
    log,
    write_report,
)
from service.benchmarks.tdsm import (
    NUM_CLASSES,
    SIZE_PLANS,
    TEXT_DIM,
    TEXT_TOKENS,
    TDSMBenchSettings,
    bench_config,
    bench_train_step,
)
from trainers.errors import InputError
from trainers.runtime import apply_thread_policy, available_cpus, resolve_precision

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
