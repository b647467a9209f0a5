"""GCN feature encoders: `python -m service.encoder {train,extract}` and the cached skeleton chain.

train    cross-entropy on the *seen* classes of a prepared dataset (`service.prepare` output), logged to MLflow;
extract  features in the SA-DVAE layout (train / ztest / gtest + labels) that `service.run tdsm --features`
         and `service.sweep tdsm --features` read directly.

`synthetic_skeleton_features()` runs the whole chain on the embedded synthetic actions — generate (cached) →
prepare → train the encoder on the seen classes → extract — each stage skipped when its inputs did not change.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.cli import exits_cleanly
from trainers.config import build_config, parse_override
from trainers.encoder_fit import EncoderConfig, extract_features, fit_encoder, load_encoder
from trainers.errors import InputError
from trainers.io import atomic_save_npy, atomic_write_text, stable_hash
from trainers.tracking import NullReporter

FEATURE_FILES = ("train", "ztest", "gtest")


# ----------------------------------------------------------------------------------------------
# Prepared data
# ----------------------------------------------------------------------------------------------

def load_prepared(folder: Path, benchmark: str | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, str]:
    """(data (N,C,T,V,M), labels (N,), train mask from the benchmark column, benchmark) of a prepared folder."""
    folder = Path(folder)
    for name in ("data.npy", "label.npy", "index.tsv"):
        if not (folder / name).is_file():
            raise InputError(f"{folder / name}: missing (expected the output of `python -m service.prepare`)")
    header, *rows = [line.split("\t") for line in (folder / "index.tsv").read_text().splitlines()]
    split_cols = header[6:]
    if not split_cols:
        raise InputError(f"{folder / 'index.tsv'}: no benchmark split columns")
    benchmark = benchmark or split_cols[0]
    if benchmark not in split_cols:
        raise InputError(f"--benchmark {benchmark}: not in {folder / 'index.tsv'} (has {', '.join(split_cols)})")
    col = header.index(benchmark)
    train_mask = np.array([r[col] == "train" for r in rows])
    data = torch.from_numpy(np.load(folder / "data.npy", mmap_mode="r")[:].astype(np.float32))
    labels = torch.from_numpy(np.load(folder / "label.npy").astype(np.int64))
    return data, labels, train_mask, benchmark


def parse_classes(spec: str | list[int], num_classes: int) -> list[int]:
    """Unseen classes from a .npy file, a comma list, or a list."""
    from trainers.data import load_class_ids

    if isinstance(spec, str) and not spec.endswith(".npy"):
        try:
            spec = [int(c) for c in spec.split(",") if c.strip()]
        except ValueError:
            raise InputError(f"--unseen {spec!r}: expected a .npy file or comma-separated class ids") from None
    return load_class_ids(spec if isinstance(spec, list) else Path(spec), num_classes, "--unseen")


def train_encoder(prepared: Path, unseen: list[int], cfg: EncoderConfig, out: Path, benchmark: str | None = None,
                  reporter=None, progress: bool = True) -> Path:
    """Train on the seen classes of the benchmark's training split; returns out/encoder.pt."""
    data, labels, train_mask, _ = load_prepared(prepared, benchmark)
    keep = train_mask & ~np.isin(labels.numpy(), unseen)
    seen = sorted(set(labels[keep].tolist()))
    fit_encoder(cfg, data[keep], labels[keep], seen, reporter or NullReporter(), out, progress)
    return Path(out) / "encoder.pt"


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


def synthetic_skeleton_features(root: Path, per_class: int, encoder: EncoderConfig, unseen: list[int] | None = None,
                                seed: int = 0, log=None) -> dict[str, Any]:
    """generate → prepare → train encoder on seen → extract, each stage cached under `root`."""
    from service.prepare import prepare
    from trainers.skeleton.synthetic import NUM_CLASSES, write_synthetic_dataset

    log = log or (lambda msg: print(f"chain: {msg}", file=sys.stderr))
    root = Path(root).expanduser().resolve()
    unseen = unseen if unseen is not None else default_synthetic_unseen(seed=seed)
    raw = root / f"raw-{per_class}x{NUM_CLASSES}-s{seed}"
    log(f"synthetic skeletons in {raw}")
    write_synthetic_dataset(raw, NUM_CLASSES, per_class, seed)
    prepared = root / f"prepared-{raw.name}"
    summary = prepare("synthetic", raw, prepared, progress=False, log=log)
    key = stable_hash({"prepare": summary.get("stamp"), "encoder": encoder.model_dump(mode="json"), "unseen": unseen})[:12]
    enc_dir, feat_dir = root / f"encoder-{key}", root / f"features-{key}"
    if not (enc_dir / "encoder.pt").is_file():
        log(f"training {encoder.name} on {NUM_CLASSES - len(unseen)} seen classes -> {enc_dir}")
        train_encoder(prepared, unseen, encoder, enc_dir)
    else:
        log(f"encoder up to date: {enc_dir}")
    done = feat_dir / "done.json"
    if not done.is_file():
        log(f"extracting features -> {feat_dir}")
        extract_to_folder(prepared, enc_dir / "encoder.pt", unseen, feat_dir)
        atomic_write_text(done, json.dumps({"encoder": str(enc_dir), "unseen": unseen}))
    else:
        log(f"features up to date: {feat_dir}")
    return {"features_dir": str(feat_dir), "unseen": unseen, "class_names": str(raw / "class_names.txt"),
            "descriptions": str(raw / "descriptions.txt"), "encoder": str(enc_dir / "encoder.pt")}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service.encoder", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("train", "extract"):
        s = sub.add_parser(name)
        s.add_argument("--data", type=Path, required=True, help="prepared folder (service.prepare output)")
        s.add_argument("--unseen", required=True, help="unseen class ids: ru*.npy or a comma list")
        s.add_argument("--benchmark", help="split column of index.tsv (default: the first)")
        s.add_argument("--out", type=Path, required=True)
    train = sub.choices["train"]
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="encoder config, e.g. --set name=ctrgcn --set steps=2000")
    train.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    train.add_argument("--no-progress", action="store_true")
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
        from service.tracking import MLflowReporter, resolve_tracking_uri, standard_tags

        cfg = build_config(EncoderConfig, {}, dict(parse_override(o) for o in args.overrides))
        reporter = MLflowReporter.start(resolve_tracking_uri(args.tracking_uri), f"encoder-{args.data.name}",
                                        f"{cfg.name}-{args.out.name}", tags=standard_tags(phase="encoder"))
        reporter.log_params({**{f"encoder.{k}": v for k, v in cfg.model_dump(mode="json").items()},
                             "encoder.unseen": unseen})
        try:
            path = train_encoder(args.data, unseen, cfg, args.out, args.benchmark, reporter, not args.no_progress)
            reporter.log_artifact(path, "checkpoints")
        except BaseException:
            reporter.finish("FAILED")
            raise
        reporter.finish()
        print(json.dumps({"encoder": str(path), "mlflow_run_id": reporter.run_id}))
    else:
        out = extract_to_folder(args.data, args.encoder, unseen, args.out, args.benchmark)
        shapes = {f: list(np.load(out / f"{f}.npy", mmap_mode="r").shape) for f in FEATURE_FILES}
        print(json.dumps({"features": str(out), "shapes": shapes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
