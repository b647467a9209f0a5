"""GCN feature encoders: `python -m service.encoder {train,extract}` and the cached skeleton chain.

train    cross-entropy on the *seen* classes of a prepared dataset (`service.prepare` output) on Ray Train
         workers (DDP with --workers N; --in-process without Ray), checkpointed and logged to MLflow;
extract  features in the SA-DVAE layout (train / ztest / gtest + labels) that `service.run tdsm --features`
         and `service.sweep tdsm --features` read directly.

`synthetic_skeleton_features()` runs the whole chain on the embedded synthetic actions — generate (cached) →
prepare → train the encoder on the seen classes → extract — each stage skipped when its inputs did not change.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.cli import exits_cleanly
from trainers.config import build_config, parse_override
from trainers.encoder_fit import (
    LAST,
    EncoderConfig,
    extract_features,
    fit_encoder,
    load_encoder,
)
from trainers.errors import InputError
from trainers.io import atomic_save_npy, atomic_write, atomic_write_text, stable_hash
from trainers.runtime import apply_thread_policy
from trainers.skeleton.prepared import read_prepared
from trainers.tracking import NullReporter

FEATURE_FILES = ("train", "ztest", "gtest")


# ----------------------------------------------------------------------------------------------
# Prepared data
# ----------------------------------------------------------------------------------------------

def load_prepared(folder: Path, benchmark: str | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, str]:
    """(data (N,C,T,V,M), labels (N,), train mask from the benchmark column, benchmark) of a prepared folder."""
    prepared = read_prepared(folder, benchmark)
    return (torch.from_numpy(prepared.rows()), torch.from_numpy(prepared.labels),
            prepared.split == "train", prepared.benchmark)


def parse_classes(spec: str | list[int], num_classes: int) -> list[int]:
    """Unseen classes from a .npy file, a comma list, or a list."""
    from trainers.data import load_class_ids

    if isinstance(spec, str) and not spec.endswith(".npy"):
        try:
            spec = [int(c) for c in spec.split(",") if c.strip()]
        except ValueError:
            raise InputError(f"--unseen {spec!r}: expected a .npy file or comma-separated class ids") from None
    return load_class_ids(spec if isinstance(spec, list) else Path(spec), num_classes, "--unseen")


def seen_class_data(prepared: Path, unseen: list[int], benchmark: str | None = None):
    """(x, y, seen classes, held-out (x, y)): the benchmark's training rows of the seen classes, and its test
    rows of the seen classes (never trained on; scored once at the end of encoder training)."""
    data, labels, train_mask, _ = load_prepared(prepared, benchmark)
    is_seen = ~np.isin(labels.numpy(), unseen)
    keep, held = train_mask & is_seen, ~train_mask & is_seen
    if not keep.any():
        raise InputError(f"{prepared}: no training samples of the seen classes")
    seen = sorted(set(labels[keep].tolist()))
    held &= np.isin(labels.numpy(), seen)
    return data[keep], labels[keep], seen, (data[held], labels[held])


def train_encoder(prepared: Path, unseen: list[int], cfg: EncoderConfig, out: Path, benchmark: str | None = None,
                  reporter=None, progress: bool = True) -> Path:
    """Train in this process on the seen classes of the benchmark's training split; returns out/encoder.pt.

    Re-running with the same inputs resumes from out/last.pt (or returns at once when training finished)."""
    x, y, seen, held_out = seen_class_data(prepared, unseen, benchmark)
    fit_encoder(cfg, x, y, seen, reporter or NullReporter(), out, progress, held_out)
    return Path(out) / "encoder.pt"


# ----------------------------------------------------------------------------------------------
# On Ray Train workers
# ----------------------------------------------------------------------------------------------

class EncoderWorkerReporter:
    """Reporter of an encoder Train worker: rank 0 logs to MLflow and prints a progress line; every rank
    reports each checkpoint to Ray Train (rank 0 with the files, so a restarted run resumes from them)."""

    def __init__(self, rank: int, mlflow, total_steps: int):
        self.rank, self.mlflow, self.total_steps = rank, mlflow, total_steps

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step)
        if self.rank == 0:   # through logging: Ray forwards a Train worker's print()s twice, log records once
            logging.getLogger("skeldiff.encoder").info(
                "encoder step %d/%d: loss %.3f, train top-1 %.1f %%", step, self.total_steps,
                metrics["encoder/loss"], metrics["encoder/train_top1"])

    def log_evaluation(self, metrics: dict[str, float], step: int, curve, checkpoint_dir: Path | None) -> None:
        import ray.train

        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step)
        if self.rank == 0 and checkpoint_dir is not None:
            with tempfile.TemporaryDirectory() as tmp:
                for name in (LAST, "encoder.pt"):
                    if (checkpoint_dir / name).is_file():
                        shutil.copy2(checkpoint_dir / name, Path(tmp) / name)
                ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report({**metrics, "step": step})


def encoder_worker(loop: dict[str, Any]) -> None:
    """Ray Train worker loop: DDP over the workers (gloo on CPU, NCCL on GPU) when there are several."""
    import ray.train
    import ray.train.torch

    from service.tracking import MLflowReporter

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    apply_thread_policy(cpus=loop["threads"])   # the worker's Ray CPUs, less if its cores are fewer
    cfg = EncoderConfig.model_validate(loop["config"])
    x, y, seen, held_out = seen_class_data(Path(loop["prepared"]), loop["unseen"], loop["benchmark"])
    run_dir = Path(tempfile.mkdtemp(prefix="encoder-"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:                      # a restarted run continues from its latest checkpoint
        with checkpoint.as_directory() as d:
            if (Path(d) / LAST).is_file():
                shutil.copy2(Path(d) / LAST, run_dir / LAST)
    mlflow = (MLflowReporter.start(loop["tracking_uri"], loop["experiment"], "", run_id=loop["run_id"])
              if rank == 0 and loop["run_id"] else None)
    wrap = ray.train.torch.prepare_model if world > 1 else None
    # Ray Train retries every worker error; bad input or a diverged loss fails the same way again, so a retry
    # re-raises the first attempt's message instead of training again.
    marker = Path(loop["input_error_file"]) if loop.get("input_error_file") else None
    try:
        if marker is not None and marker.is_file():
            raise InputError(marker.read_text())
        fit_encoder(cfg, x, y, seen, EncoderWorkerReporter(rank, mlflow, cfg.steps), run_dir, progress=False,
                    held_out=held_out, wrap_model=wrap, rank=rank, world=world)
    except InputError as err:
        if marker is not None and not marker.is_file():
            atomic_write_text(marker, str(err))
        raise
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def input_error_cause(err: BaseException) -> InputError | None:
    """The InputError (e.g. TrainingDivergedError) a Ray Train/Tune failure wraps, or None.

    Ray wraps a worker's exception in a RayTaskError, then in a WorkerGroupError (Train) and again in a
    RayTaskError (a Tune trial): walk those wrappers (and __cause__ chains) so the driver can report the
    one-line message instead of Ray's traceback.
    """
    from ray.exceptions import RayTaskError

    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RayTaskError):      # its dual-class instance prints a traceback: use the cause itself
            todo.append(e.cause)
            continue
        if isinstance(e, InputError):
            return e
        todo.extend([*(getattr(e, "worker_failures", None) or {}).values(), getattr(e, "controller_failure", None),
                     e.__cause__, e.__context__])
    return None


def train_encoder_on_ray(prepared: Path, unseen: list[int], cfg: EncoderConfig, out: Path, *, storage: Path,
                         benchmark: str | None = None, workers: int = 1, cpus_per_worker: float = 1.0,
                         gpus_per_worker: float = 0.0, tracking_uri: str | None = None,
                         experiment: str | None = None, retries: int = 1) -> Path:
    """Train on Ray Train workers (a TorchTrainer; DDP when workers > 1) and write out/encoder.pt.

    The prepared folder must be readable by every worker (shared storage on a cluster). The Train run is
    named after `out`, so re-running after a crash resumes from its latest checkpoint; with a tracking URI
    the run is an MLflow run (params = the encoder config, metrics by step, encoder.pt as an artifact).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from service.tracking import MLflowReporter, standard_tags

    out = Path(out).resolve()
    prepared = Path(prepared).resolve()
    experiment = experiment or f"encoder-{prepared.name}"
    mlflow = None
    if tracking_uri:
        mlflow = MLflowReporter.start(tracking_uri, experiment, f"{cfg.name}-{out.name}",
                                      tags=standard_tags(phase="encoder", method="encoder"))
        mlflow.log_params({**{f"encoder.{k}": v for k, v in cfg.model_dump(mode="json").items()},
                           "encoder.unseen": unseen, "encoder.prepared": str(prepared),
                           "encoder.benchmark": benchmark or "", "encoder.workers": workers})
    loop = {"config": cfg.model_dump(mode="json"), "prepared": str(prepared), "unseen": list(unseen),
            "benchmark": benchmark, "threads": max(1, int(cpus_per_worker)), "tracking_uri": tracking_uri,
            "experiment": experiment, "run_id": mlflow.run_id if mlflow else None}
    run_name = f"encoder-{stable_hash(str(out))[:12]}"
    loop["input_error_file"] = str(Path(storage) / run_name / "input_error.txt")
    Path(loop["input_error_file"]).unlink(missing_ok=True)     # from an earlier call, maybe with another config
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    trainer = TorchTrainer(
        encoder_worker, train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=bool(gpus_per_worker),
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=run_name, storage_path=str(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=retries)))
    try:
        try:
            result = trainer.fit()
        except Exception as err:   # a worker's bad input or divergence: its one-line message, not Ray's traceback
            cause = input_error_cause(err)
            if cause is None:
                raise
            raise type(cause)(str(cause)) from None
        if result.checkpoint is None:
            raise RuntimeError("encoder training reported no checkpoint")
        with result.checkpoint.as_directory() as d:
            atomic_write(out / "encoder.pt", lambda tmp: shutil.copyfile(Path(d) / "encoder.pt", tmp))
    except BaseException:
        if mlflow is not None:
            mlflow.finish("FAILED")
        raise
    if mlflow is not None:
        mlflow.log_artifact(out / "encoder.pt", "checkpoints")
        mlflow.finish()
    return out / "encoder.pt"


def extract_to_folder(prepared: Path, encoder_path: Path, unseen: list[int], out: Path,
                      benchmark: str | None = None) -> Path:
    """SA-DVAE layout: train (seen, training split), ztest (unseen, test split), gtest (all, test split)."""
    model, cfg, seen = load_encoder(encoder_path)
    data, labels, train_mask, _ = load_prepared(prepared, benchmark)
    is_unseen = np.isin(labels.numpy(), unseen)
    leaked = sorted(set(unseen) & set(seen))
    if leaked:
        raise InputError(f"{encoder_path}: encoder was trained on classes {leaked} that are unseen here")
    masks = {"train": train_mask & ~is_unseen, "ztest": ~train_mask & is_unseen, "gtest": ~train_mask}
    labels_name = {"train": "train_label", "ztest": "z_label", "gtest": "g_label"}
    out = Path(out)
    for name, mask in masks.items():
        atomic_save_npy(extract_features(model, data[mask], cfg).numpy(), out / f"{name}.npy")
        atomic_save_npy(labels[mask].numpy(), out / f"{labels_name[name]}.npy")
    return out


# ----------------------------------------------------------------------------------------------
# The embedded chain
# ----------------------------------------------------------------------------------------------

def default_synthetic_unseen(count: int = 6, seed: int = 0) -> list[int]:
    """Unseen synthetic classes whose primitive and body part both also occur among the seen classes."""
    from trainers.skeleton.synthetic import action_catalogue

    cat = action_catalogue()
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for i in rng.permutation(len(cat)):
        c = cat[int(i)]
        rest = [d for d in cat if d.index != c.index and d.index not in chosen]
        if any(d.primitive == c.primitive for d in rest) and any(d.part == c.part for d in rest):
            chosen.append(c.index)
        if len(chosen) == count:
            break
    return sorted(chosen)


def synthetic_prepared(root: Path, per_class: int, seed: int = 0, log=None) -> tuple[Path, Path, str]:
    """(raw folder, prepared folder, prepare stamp) of the embedded synthetic actions under `root`.

    generate (46 classes x per_class NTU-format `.skeleton` files) -> `service.prepare synthetic`; both stages
    are no-ops when their inputs did not change. The prepared folder has the ntu60-xsub / ntu60-xview columns
    (by performer / camera of the generated sample names); class_names.txt / descriptions.txt stay in the raw folder.
    """
    from service.prepare import prepare
    from trainers.skeleton.synthetic import NUM_CLASSES, write_synthetic_dataset

    log = log or (lambda msg: print(f"synthetic: {msg}", file=sys.stderr))
    root = Path(root).expanduser().resolve()
    raw = root / f"raw-{per_class}x{NUM_CLASSES}-s{seed}"
    log(f"synthetic skeletons in {raw}")
    write_synthetic_dataset(raw, NUM_CLASSES, per_class, seed)
    prepared = root / f"prepared-{raw.name}"
    summary = prepare("synthetic", raw, prepared, progress=False, log=log)
    return raw, prepared, str(summary.get("stamp"))


# (prepared folder, unseen classes, config, out folder) -> out/encoder.pt
EncoderTrainer = Callable[[Path, list[int], EncoderConfig, Path], Path]


def synthetic_skeleton_features(root: Path, per_class: int, encoder: EncoderConfig, unseen: list[int] | None = None,
                                seed: int = 0, log=None, trainer: EncoderTrainer | None = None,
                                build: bool = True) -> dict[str, Any]:
    """generate → prepare → train encoder on seen → extract, each stage cached under `root`.

    build=False (`--print-config`): generate and prepare only (cheap, cached; they fix the cache key), train and
    extract nothing, and return the paths the encoder and features have once built; "built": whether they are."""
    from trainers.skeleton.synthetic import NUM_CLASSES

    log = log or (lambda msg: print(f"chain: {msg}", file=sys.stderr))
    root = Path(root).expanduser().resolve()
    unseen = unseen if unseen is not None else default_synthetic_unseen(seed=seed)
    raw, prepared, stamp = synthetic_prepared(root, per_class, seed, log)
    key = stable_hash({"prepare": stamp, "encoder": encoder.model_dump(mode="json"), "unseen": unseen})[:12]
    enc_dir, feat_dir = root / f"encoder-{key}", root / f"features-{key}"
    done = feat_dir / "done.json"
    made = {"features_dir": str(feat_dir), "unseen": unseen, "class_names": str(raw / "class_names.txt"),
            "descriptions": str(raw / "descriptions.txt"), "encoder": str(enc_dir / "encoder.pt")}
    if not build:
        return {**made, "built": done.is_file()}
    if not (enc_dir / "encoder.pt").is_file():
        log(f"training {encoder.name} on {NUM_CLASSES - len(unseen)} seen classes -> {enc_dir}")
        (trainer or train_encoder)(prepared, unseen, encoder, enc_dir)
    else:
        log(f"encoder up to date: {enc_dir}")
    if not done.is_file():
        log(f"extracting features -> {feat_dir}")
        extract_to_folder(prepared, enc_dir / "encoder.pt", unseen, feat_dir)
        atomic_write_text(done, json.dumps({"encoder": str(enc_dir), "unseen": unseen}))
    else:
        log(f"features up to date: {feat_dir}")
    return made


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

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
    train.add_argument("--storage-path", type=Path,
                       default=Path(os.environ.get("SKELDIFF_RESULTS", "~/skeldiff_results")),
                       help="Ray Train checkpoints (shared storage on a cluster)")
    train.add_argument("--in-process", action="store_true", help="train in this process, without Ray")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (--in-process)")
    sub.choices["extract"].add_argument("--encoder", type=Path, required=True, help="encoder.pt from `train`")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    labels = np.load(args.data / "label.npy") if (args.data / "label.npy").is_file() else None
    if labels is None:
        raise InputError(f"{args.data / 'label.npy'}: missing (expected the output of `python -m service.prepare`)")
    unseen = parse_classes(args.unseen, int(labels.max()) + 1)
    if args.command == "train":
        from service.tracking import resolve_tracking_uri

        cfg = build_config(EncoderConfig, {}, dict(parse_override(o) for o in args.overrides))
        uri = resolve_tracking_uri(args.tracking_uri)
        if args.in_process:
            from service.tracking import MLflowReporter, standard_tags

            reporter = MLflowReporter.start(uri, f"encoder-{args.data.resolve().name}", f"{cfg.name}-{args.out.name}",
                                            tags=standard_tags(phase="encoder", method="encoder"))
            reporter.log_params({**{f"encoder.{k}": v for k, v in cfg.model_dump(mode="json").items()},
                                 "encoder.unseen": unseen})
            try:
                path = train_encoder(args.data, unseen, cfg, args.out, args.benchmark, reporter, not args.no_progress)
                reporter.log_artifact(path, "checkpoints")
            except BaseException:
                reporter.finish("FAILED")
                raise
            reporter.finish()
        else:
            import ray

            from service.sweep import connect_ray

            connect_ray(args.address)
            path = train_encoder_on_ray(args.data, unseen, cfg, args.out, benchmark=args.benchmark,
                                        storage=args.storage_path.expanduser().resolve(), workers=args.workers,
                                        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                                        tracking_uri=uri)
            ray.shutdown()
        print(json.dumps({"encoder": str(path), "tracking_uri": uri}))
    else:
        out = extract_to_folder(args.data, args.encoder, unseen, args.out, args.benchmark)
        shapes = {f: list(np.load(out / f"{f}.npy", mmap_mode="r").shape) for f in FEATURE_FILES}
        print(json.dumps({"features": str(out), "shapes": shapes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
