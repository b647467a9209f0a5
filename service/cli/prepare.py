"""Raw skeletons -> compact arrays: `python -m service.prepare DATASET --raw DIR --out DIR`.

DATASET is one of ntu60, ntu120, pku, kinetics, synthetic. What is written, and how a re-run resumes or does
nothing: trainers.skeleton.prepare.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from service.process import exits_cleanly, lock_dir
from trainers.errors import InputError
from trainers.io import atomic_write_text
from trainers.skeleton.prepare import DATASETS, parse_split_lists, prepare
from trainers.skeleton.splits import BENCHMARKS
from trainers.skeleton.synthetic import NUM_CLASSES as SYNTHETIC_CLASSES
from trainers.skeleton.synthetic import SyntheticOptions, synthetic_set_matches, write_synthetic_dataset

PREPARE_EXAMPLES = """examples:
  python -m service.prepare ntu60 --raw nturgb+d_skeletons/ --out $SKELDIFF_DATA/prepared/ntu60 \\
      --missing NTU_RGBD_samples_with_missing_skeletons.txt --workers 16
  python -m service.prepare kinetics --raw kinetics-skeleton/ --out $SKELDIFF_DATA/prepared/kinetics
  python -m service.prepare pku --raw PKUMMD/Data --labels PKUMMD/Label --out $SKELDIFF_DATA/prepared/pku \\
      --split-list pku-xsub=PKUMMD/Split/cross-subject.txt pku-xview=PKUMMD/Split/cross-view.txt
  python -m service.prepare synthetic --out prepared/synthetic --per-class 12   # the generated NTU-format actions
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.prepare", description=__doc__.splitlines()[0],
                                epilog=PREPARE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=DATASETS,
                   help="raw format: ntu60 / ntu120 (.skeleton files), pku (PKU-MMD sequences + --labels), "
                        "kinetics (Kinetics-Skeleton JSON), synthetic (generated NTU-format actions)")
    p.add_argument("--raw", type=Path, help="folder of raw files, searched recursively (synthetic: generated "
                   "here, default <out>/raw)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parser processes")
    p.add_argument("--frames", type=int, default=64, help="frames per sample after resampling (default 64)")
    p.add_argument("--benchmark", nargs="+", help=f"split columns in index.tsv ({', '.join(BENCHMARKS)}); "
                   "default: the dataset's standard benchmarks (pku: those given a --split-list)")
    p.add_argument("--split-list", nargs="+", metavar="BENCHMARK=FILE",
                   help="pku: the official split files, e.g. pku-xsub=Split/cross-subject.txt "
                        "pku-xview=Split/cross-view.txt")
    p.add_argument("--missing", type=Path, help="list of samples with missing skeletons to drop")
    p.add_argument("--labels", type=Path, help="pku: folder of label files (same file names as the skeletons)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="data.npy dtype")
    p.add_argument("--chunk-size", type=int, default=32, help="files per worker task and per cached shard")
    p.add_argument("--keep-parts", action="store_true", help="keep <out>/.parts/ after a successful run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("synthetic")
    g.add_argument("--classes", type=int, default=SYNTHETIC_CLASSES, help=f"classes (1..{SYNTHETIC_CLASSES})")
    g.add_argument("--per-class", type=int, default=10, help="samples per class")
    g.add_argument("--seed", type=int, default=0, help="generator seed")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: expected at least 1")
    # One prepare per --out: a second one into the same folder at once would race on its shards and files.
    lock_dir(args.out, "another prepare into the same --out", "pass another --out")
    raw = args.raw
    if args.dataset == "synthetic":
        raw = raw or args.out / "raw"
        options = SyntheticOptions(args.classes, args.per_class, args.seed)
        if synthetic_set_matches(raw, options):
            print(f"prepare: {raw} already holds this synthetic set", file=sys.stderr)
        else:
            print(f"prepare: generating {args.classes} classes x {args.per_class} synthetic samples in {raw}",
                  file=sys.stderr)
            write_synthetic_dataset(raw, args.classes, args.per_class, args.seed)
        for text in ("class_names.txt", "descriptions.txt"):              # rewritten only when they differ
            content = (raw / text).read_text()
            if not (args.out / text).is_file() or (args.out / text).read_text() != content:
                atomic_write_text(args.out / text, content)
    elif raw is None:
        raise InputError(f"--raw: required for {args.dataset}")
    summary = prepare(args.dataset, raw, args.out, frames=args.frames, workers=args.workers,
                      benchmarks=args.benchmark, missing=args.missing, labels=args.labels,
                      split_lists=parse_split_lists(args.split_list, args.dataset), dtype=args.dtype,
                      chunk_size=args.chunk_size, keep_parts=args.keep_parts, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("samples", "skipped", "shape", "dtype", "up_to_date", "seconds")
                      if k in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
