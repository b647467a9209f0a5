"""Generated data sets: the embedded synthetic actions (NTU format, also the skeleton chain's input) and, for
CoCoDiff, the prepared folder a config trains on (one function used by `service.run`, `service.sweep` and
`service.final`).

`data.source=prepared` reads `data.prepared_dir` as it is. `data.source=synthetic` (the embedded default) is the
generated NTU-format action set of `trainers.skeleton.synthetic` (46 classes x `data.synthetic.per_class`),
generated and run through `service.prepare synthetic` once, cached under `$SKELDIFF_CACHE/synthetic` (both
stages are no-ops when their inputs did not change). With `data.benchmark` kinetics / pku-xsub / pku-xview the
same actions are written as a Kinetics-Skeleton / PKU-MMD release (`trainers.skeleton.synthetic_release`) and
prepared by `service.prepare kinetics|pku` with that protocol's split. Trainers never run `service.prepare`
themselves: they get the prepared folder from here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from trainers.assets import default_cache_dir
from trainers.cocodiff_data import CoCoDiffInputs, prepare_cocodiff
from trainers.configs import CoCoDiffConfig
from trainers.schedule import progress_bar
from trainers.skeleton.prepare import prepare
from trainers.skeleton.splits import BENCHMARKS
from trainers.skeleton.synthetic import NUM_CLASSES, SyntheticOptions, synthetic_set_matches, write_synthetic_dataset
from trainers.skeleton.synthetic_release import write_kinetics_release, write_pku_release


def synthetic_root() -> Path:
    """Where the generated set and its prepared arrays are cached: $SKELDIFF_CACHE/synthetic."""
    return default_cache_dir() / "synthetic"


def prepared_folder(cfg: CoCoDiffConfig, log: Callable[[str], None] | None = None) -> Path:
    """The prepared folder a config trains on; generates and prepares the synthetic set when needed."""
    if cfg.data.source == "prepared":
        return Path(cfg.data.prepared_dir)
    s = cfg.data.synthetic
    family = BENCHMARKS[cfg.data.benchmark].family
    if family == "ntu":
        _, prepared, _ = synthetic_prepared(synthetic_root(), s.per_class, s.seed, log)
        return prepared
    return synthetic_release_prepared(synthetic_root(), family, s.per_class, s.seed, log)


def synthetic_release_prepared(root: Path, family: str, per_class: int, seed: int = 0,
                               log: Callable[[str], None] | None = None) -> Path:
    """The generated set as a Kinetics-Skeleton or PKU-MMD release under `root`, prepared with its protocol's
    split columns (kinetics; pku-xsub and pku-xview from the release's Split lists); both stages cached."""
    log = log or (lambda msg: print(f"synthetic: {msg}", file=sys.stderr))
    raw = Path(root).expanduser().resolve() / f"{family}-{per_class}x{NUM_CLASSES}-s{seed}"
    log(f"synthetic {family} release in {raw}")
    out = raw.parent / f"prepared-{raw.name}"
    if family == "kinetics":
        write_kinetics_release(raw, NUM_CLASSES, per_class, seed)
        prepare("kinetics", raw, out, progress=False, log=log)
    else:
        write_pku_release(raw, NUM_CLASSES, per_class, seed)
        lists = {"pku-xsub": raw / "Split" / "cross-subject.txt", "pku-xview": raw / "Split" / "cross-view.txt"}
        prepare("pku", raw / "skeleton", out, labels=raw / "label", split_lists=lists, progress=False, log=log)
    return out


def prepare_cocodiff_inputs(cfg: CoCoDiffConfig, log: Callable[[str], None] | None = None) -> CoCoDiffInputs:
    """(data, class names, fine text, coarse text) of a config; the texts are None for the baseline."""
    return prepare_cocodiff(cfg, prepared_folder(cfg, log))


# The mtime the generated files get in portable mode: prepare's stamp holds mtimes, so copies of one generated set
# on several machines (an object-store chain cache) stamp alike only with the same one.
PORTABLE_MTIME_NS = 946_684_800 * 10**9      # 2000-01-01


def synthetic_prepared(root: Path, per_class: int, seed: int = 0, log=None,
                       portable: bool = False, progress: bool = False) -> tuple[Path, Path, str]:
    """(raw folder, prepared folder, prepare stamp) of the embedded synthetic actions under `root`.

    generate (46 classes x per_class NTU-format `.skeleton` files) -> `service.prepare synthetic`; both stages
    are no-ops when their inputs did not change. The prepared folder has the ntu60-xsub / ntu60-xview columns
    (by performer / camera of the generated sample names); class_names.txt / descriptions.txt stay in the raw folder.
    progress: a bar with an ETA for each stage that does work.
    """
    log = log or (lambda msg: print(f"synthetic: {msg}", file=sys.stderr))
    root = Path(root).expanduser().resolve()
    raw = root / f"raw-{per_class}x{NUM_CLASSES}-s{seed}"
    log(f"synthetic skeletons in {raw}")
    made = synthetic_set_matches(raw, SyntheticOptions(NUM_CLASSES, per_class, seed))
    with progress_bar(NUM_CLASSES * per_class, 0, "generate", progress and not made) as bar:
        write_synthetic_dataset(raw, NUM_CLASSES, per_class, seed, on_sample=bar.update)
    if portable:
        for p in raw.rglob("*"):
            if p.is_file() and p.stat().st_mtime_ns != PORTABLE_MTIME_NS:
                os.utime(p, ns=(PORTABLE_MTIME_NS, PORTABLE_MTIME_NS))
    prepared = root / f"prepared-{raw.name}"
    summary = prepare("synthetic", raw, prepared, progress=progress, log=log)
    return raw, prepared, str(summary.get("stamp"))
