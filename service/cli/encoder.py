"""GCN feature encoders: `python -m service.encoder {train,extract}` and the cached skeleton chain.

train    cross-entropy on the *seen* classes of a prepared dataset (`service.prepare` output) on Ray Train
         workers (DDP with --workers N; --in-process without Ray), checkpointed and logged to MLflow;
extract  features in the SA-DVAE layout (train / ztest / gtest + labels) that `service.run tdsm --features`
         and `service.sweep tdsm --features` read directly.

`service.data.chain.synthetic_skeleton_features()` runs the whole chain on the embedded synthetic actions —
generate (cached) → prepare → train the encoder on the seen classes → extract — each stage skipped when its inputs
did not change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.cli.options import DEFAULT_STORAGE, storage_arg
from service.process import exits_cleanly
from trainers.config import build_config, parse_override
from trainers.configs import EncoderConfig
from trainers.errors import InputError

ENCODER_EXAMPLES = """examples:
  python -m service.encoder train --data $SKELDIFF_DATA/prepared/ntu60 --unseen label_splits/ru5.npy \\
      --out encoders/stgcn-ru5 --set name=stgcn --set steps=20000 --set batch_size=64 --workers 2 --gpus-per-worker 1
  python -m service.encoder train --data prepared/synthetic --unseen 1,2,4 --out encoders/tiny --in-process
  python -m service.encoder extract --data $SKELDIFF_DATA/prepared/ntu60 --unseen label_splits/ru5.npy \\
      --encoder encoders/stgcn-ru5/encoder.pt --out features/stgcn-ru5   # then: service.run tdsm --features ...
"""


SUBCOMMANDS = {"train": "train a GCN encoder on the seen classes (Ray Train workers, or --in-process)",
               "extract": "write SA-DVAE-layout features (train / ztest / gtest + labels) with a trained encoder"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.encoder", description=__doc__.splitlines()[0],
                                epilog=ENCODER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("train", "extract"):
        s = sub.add_parser(name, help=SUBCOMMANDS[name], description=SUBCOMMANDS[name])
        s.add_argument("--data", type=Path, required=True, help="prepared folder (service.prepare output)")
        s.add_argument("--unseen", required=True, help="unseen class ids: ru*.npy or a comma list")
        s.add_argument("--benchmark", help="split column of index.tsv (default: the first)")
        s.add_argument("--out", type=Path, required=True,
                       help="output folder (train: encoder.pt and checkpoints; extract: the feature files)")
    train = sub.choices["train"]
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="encoder config, e.g. --set name=ctrgcn --set steps=2000")
    train.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    train.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP when > 1)")
    train.add_argument("--cpus-per-worker", type=float, default=1.0, help="also the torch thread count per worker")
    train.add_argument("--gpus-per-worker", type=float, default=0.0,
                       help="GPUs per Ray Train worker (default 0: CPU; fractions share a GPU)")
    train.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local one)")
    train.add_argument("--storage-path", type=storage_arg,
                       default=DEFAULT_STORAGE,
                       help="Ray Train checkpoints: a folder shared by every node, or an s3:// / gs:// URI (the "
                            "prepared --data is then copied there for the workers)")
    train.add_argument("--in-process", action="store_true", help="train in this process, without Ray")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (--in-process)")
    sub.choices["extract"].add_argument("--encoder", type=Path, required=True, help="encoder.pt from `train`")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.data / "label.npy").is_file():
        raise InputError(f"{args.data / 'label.npy'}: missing (expected the output of `python -m service.prepare`)")
    from service.orchestration import encoder as job  # torch, Ray, MLflow: only once the command line is known
    unseen = job.unseen_classes(args.data, args.unseen)
    if args.command == "train":
        cfg = build_config(EncoderConfig, {}, dict(parse_override(o) for o in args.overrides))
        print(json.dumps(job.train(args.data, unseen, cfg, args.out, benchmark=args.benchmark,
                                   tracking_uri=args.tracking_uri, in_process=args.in_process,
                                   progress=not args.no_progress, address=args.address, storage=args.storage_path,
                                   workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                                   gpus_per_worker=args.gpus_per_worker)))
    else:
        print(json.dumps(job.extract(args.data, args.encoder, unseen, args.out, args.benchmark)))
    return 0
