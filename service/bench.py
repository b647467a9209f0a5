"""`python -m service.bench`: the command lives in service.cli.bench (the benchmarks in service.benchmarks); this
module keeps its name (also for the benchmarks' own worker subprocesses)."""

from service.cli.bench import build_parser, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
