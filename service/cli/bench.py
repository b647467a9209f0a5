"""Benchmarks: `python -m service.bench tdsm [--device auto|cpu|cuda] [--quick] [--out bench-tdsm.json]`.

One subcommand per benchmark, each a plain function of `service.benchmarks.<name>` registered in `BENCHMARKS`.
Every benchmark prints a readable table on stdout, progress on stderr, and writes the full numbers (with the
machine they came from) as JSON.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

from service.benchmarks.cocodiff import add_cocodiff_arguments, bench_cocodiff
from service.benchmarks.contended import add_contended_arguments, bench_contended
from service.benchmarks.encoder import add_encoder_arguments, bench_encoder
from service.benchmarks.prepare import add_prepare_arguments, bench_prepare_cli
from service.benchmarks.serve import add_serve_arguments, bench_serve
from service.benchmarks.tdsm import add_tdsm_arguments, bench_tdsm
from service.process import exits_cleanly
from trainers.runtime import apply_thread_policy


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
    "serve": Benchmark("the registered zero-shot model: latency of one sequence and throughput of batches for 5 / 60 / "
                       "120 candidate classes, new texts (cold) and cached (warm)", add_serve_arguments, bench_serve),
}


BENCH_EXAMPLES = """examples:
  python -m service.bench tdsm --quick --out bench-tdsm.json      # training step and zero-shot scoring, two sizes
  python -m service.bench cocodiff --device cuda                   # module overhead and exported-classifier speed
  python -m service.bench prepare --format kinetics                # parse + preprocess throughput of a reader
  python -m service.bench encoder --sizes chain                    # GCN encoder training and extraction
  python -m service.bench serve                                    # the served zero-shot model's latency
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
    apply_thread_policy()   # CPU threads sized to this process's cores, before any parallel work
    args = build_parser().parse_args(argv)
    return BENCHMARKS[args.benchmark].run(args)


if __name__ == "__main__":
    sys.exit(main())
