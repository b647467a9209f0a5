"""Standard NTU RGB+D benchmarks (METHODS.md §3) as pure functions of a sample name.

NTU-60 X-Sub: 20 training performers; X-View: cameras 2 and 3 train. NTU-120 X-Sub: the published list of 53
training performers; X-Set: even setup ids train. Missing-skeleton samples are dropped by the caller
(`split_samples(..., exclude=load_missing_list(...))`), never by the rule itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from trainers.errors import InputError
from trainers.skeleton.ntu import SampleName, parse_sample_name

Split = Literal["train", "test"]

NTU60_XSUB_TRAIN_PERFORMERS = frozenset({1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38})
NTU60_XVIEW_TRAIN_CAMERAS = frozenset({2, 3})
# Liu et al., "NTU RGB+D 120", TPAMI 2020, §4.1: the 53 cross-subject training subjects.
NTU120_XSUB_TRAIN_PERFORMERS = frozenset({
    1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38, 45, 46, 47, 49, 50, 52, 53, 54,
    55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84, 85, 86, 89, 91, 92, 93, 94, 95, 97, 98, 100, 103,
})


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: which samples belong to its dataset and which of them train."""

    name: str
    num_classes: int                                  # 60 or 120 actions
    num_setups: int                                   # NTU-60 has setups 1..17, NTU-120 1..32
    is_train: Callable[[SampleName], bool]


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("ntu60-xsub", 60, 17, lambda s: s.performer in NTU60_XSUB_TRAIN_PERFORMERS),
    Benchmark("ntu60-xview", 60, 17, lambda s: s.camera in NTU60_XVIEW_TRAIN_CAMERAS),
    Benchmark("ntu120-xsub", 120, 32, lambda s: s.performer in NTU120_XSUB_TRAIN_PERFORMERS),
    Benchmark("ntu120-xset", 120, 32, lambda s: s.setup % 2 == 0),
)}


def get_benchmark(benchmark: str) -> Benchmark:
    """The benchmark called `benchmark`, or an InputError listing the known names."""
    try:
        return BENCHMARKS[benchmark]
    except KeyError:
        raise InputError(f"benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}") from None


def split_of(name: str | SampleName, benchmark: str) -> Split:
    """'train' or 'test' for one sample under `benchmark` (e.g. 'ntu60-xsub')."""
    bench = get_benchmark(benchmark)
    sample = name if isinstance(name, SampleName) else parse_sample_name(name)
    if sample.action > bench.num_classes or sample.setup > bench.num_setups:
        raise InputError(f"sample {sample}: not part of {bench.name} (actions 1..{bench.num_classes}, "
                         f"setups 1..{bench.num_setups})")
    return "train" if bench.is_train(sample) else "test"


def split_samples(names: Iterable[str], benchmark: str,
                  exclude: Iterable[str] = ()) -> dict[Split, list[str]]:
    """{'train': [...], 'test': [...]} in input order, dropping the names in `exclude` (missing skeletons)."""
    skip = set(exclude)
    out: dict[Split, list[str]] = {"train": [], "test": []}
    for name in names:
        if name not in skip:
            out[split_of(name, benchmark)].append(name)
    return out
