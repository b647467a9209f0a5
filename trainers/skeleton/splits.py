"""Standard benchmarks of the supervised protocols (docs/METHODS.md §3): which samples train and which test.

NTU RGB+D, a pure function of the sample name: NTU-60 X-Sub: 20 training performers; X-View: cameras 2 and 3
train. NTU-120 X-Sub: the published list of 53 training performers; X-Set: even setup ids train.
Missing-skeleton samples are dropped by the caller (`split_samples(..., exclude=load_missing_list(...))`),
never by the rule itself.

Kinetics-Skeleton (ST-GCN release): the folder a clip sits in, `kinetics_train/` trains and `kinetics_val/`
tests (the validation set is the test set of every skeleton paper: Kinetics' own test labels are not public);
400 classes, top-1 and top-5 reported.

PKU-MMD: the official split lists (`cross-subject.txt`, `cross-view.txt` of the release's Split folder), one per
benchmark: "Training videos:" then comma-separated sequence names, "Validataion videos:" (sic) then the test
sequences. Action ids 1..51 (Part I's action list).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
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
    """One benchmark: its dataset family, class count and where its train/test split comes from."""

    name: str
    family: Literal["ntu", "kinetics", "pku"]        # which `service.prepare` datasets it applies to
    num_classes: int
    split_from: Literal["name", "folder", "list"]    # NTU sample name / release folder / official list file
    num_setups: int = 0                               # NTU only: NTU-60 has setups 1..17, NTU-120 1..32
    is_train: Callable[[SampleName], bool] | None = None    # NTU only: the rule on the parsed name


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("ntu60-xsub", "ntu", 60, "name", 17, lambda s: s.performer in NTU60_XSUB_TRAIN_PERFORMERS),
    Benchmark("ntu60-xview", "ntu", 60, "name", 17, lambda s: s.camera in NTU60_XVIEW_TRAIN_CAMERAS),
    Benchmark("ntu120-xsub", "ntu", 120, "name", 32, lambda s: s.performer in NTU120_XSUB_TRAIN_PERFORMERS),
    Benchmark("ntu120-xset", "ntu", 120, "name", 32, lambda s: s.setup % 2 == 0),
    Benchmark("kinetics", "kinetics", 400, "folder"),
    Benchmark("pku-xsub", "pku", 51, "list"),
    Benchmark("pku-xview", "pku", 51, "list"),
)}
KINETICS_FOLDERS: dict[str, Split] = {"kinetics_train": "train", "kinetics_val": "test"}


def get_benchmark(benchmark: str) -> Benchmark:
    """The benchmark called `benchmark`, or an InputError listing the known names."""
    try:
        return BENCHMARKS[benchmark]
    except KeyError:
        raise InputError(f"benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}") from None


def split_of(name: str | SampleName, benchmark: str) -> Split:
    """'train' or 'test' for one sample under `benchmark` (e.g. 'ntu60-xsub')."""
    bench = get_benchmark(benchmark)
    if bench.is_train is None:
        raise InputError(f"benchmark {benchmark}: its split comes from the release's "
                         f"{'folders' if bench.split_from == 'folder' else 'official list file'}, not a sample name")
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


def kinetics_split(path: Path, root: Path) -> Split:
    """'train' / 'test' from the release folder (kinetics_train / kinetics_val) `path` sits in below `root`."""
    parts = Path(path).relative_to(root).parts[:-1]
    found = {KINETICS_FOLDERS[p] for p in parts if p in KINETICS_FOLDERS}
    if len(found) != 1:
        raise InputError(f"{path}: expected it under exactly one of the release folders "
                         f"{' / '.join(KINETICS_FOLDERS)} (below {root})")
    return found.pop()


def read_split_list(path: str | Path) -> dict[str, Split]:
    """{sequence name: 'train' / 'test'} of a PKU-MMD official split file (cross-subject.txt, cross-view.txt).

    Sections start at a line "Training videos:" or "Validataion videos:" (the release's spelling; "Validation",
    "Test" and "Testing" are accepted too); the names below are comma-separated across any number of lines.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()          # tolerate a byte-order mark
    except FileNotFoundError:
        raise InputError(f"{path}: split list not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the split list ({err})") from None
    headers = {"training videos": "train", "validataion videos": "test", "validation videos": "test",
               "test videos": "test", "testing videos": "test"}
    out: dict[str, Split] = {}
    section: Split | None = None
    for lineno, line in enumerate(lines, start=1):
        head, colon, rest = line.partition(":")
        if colon and head.strip().lower() in headers:
            section, line = headers[head.strip().lower()], rest
        names = [n.strip() for n in line.split(",") if n.strip()]
        if names and section is None:
            raise InputError(f"{path}:{lineno}: names before a 'Training videos:' or 'Validataion videos:' line")
        for name in names:
            if out.get(name, section) != section:
                raise InputError(f"{path}:{lineno}: {name} is listed for both training and testing")
            out[name] = section
    if set(out.values()) != {"train", "test"}:
        raise InputError(f"{path}: expected 'Training videos:' and 'Validataion videos:' sections with names, "
                         f"found {len(out)} names in {sorted(set(out.values())) or 'no'} sections")
    return out
