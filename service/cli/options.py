"""What the CLIs share: config from YAML + shortcuts + --set, the named or default split, and --print-config."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from service.data.chain import resolve_chain
from service.data.features import train_encoder
from service.methods import METHODS
from service.methods.search_space import SearchSpace
from service.storage import Storage
from service.tracking.store import start_encoder_run
from trainers.config import build_config, dump_yaml, field_description, load_yaml, parse_override, to_plain
from trainers.configs import EncoderConfig
from trainers.errors import InputError

# Ray results and checkpoints, and the cached skeleton chain (service.data.chain): shared storage on a cluster.
DEFAULT_STORAGE = os.environ.get("SKELDIFF_RESULTS", "~/skeldiff_results")   # a folder or an s3:// / gs:// URI


# Shortcut flags and config keys that name the data a run trains on (their absence means: the embedded default).
DATA_FLAGS = ("features", "unseen", "seen", "val_unseen", "class_names", "descriptions")


DATA_KEYS = ("data.", "text.class_names", "text.descriptions", "text.synonyms")


# Shortcuts that name zero-shot inputs (feature folders, class splits): TDSM's data model only.
TDSM_ONLY_SHORTCUTS = ("features", "unseen", "seen", "val_unseen")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config/--set/--print-config and the data/text shortcuts (the data ones are TDSM-only)."""
    g = parser.add_argument_group("configuration")
    g.add_argument("--config", type=Path, help="YAML config (nested, same keys as --print-config)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one dotted key, e.g. --set optim.lr=3e-4 (repeatable; wins over shortcuts)")
    g.add_argument("--print-config", action="store_true",
                   help="print the config that will run as YAML (loadable by --config) and exit: the named or "
                        "default split applied, a skeleton chain resolved to its cached paths (generated and "
                        "prepared if missing, never trained: '# (built on first run)' marks features not built yet)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="shortcut for --set train.threads=N: CPU threads of the fit loop (0 = auto, see README)")
    d = parser.add_argument_group("data and text shortcuts")
    d.add_argument("--features", type=Path, help="tdsm: folder of pre-extracted features (SA-DVAE layout)")
    d.add_argument("--unseen", type=Path, help="tdsm: unseen (test) class ids, ru*.npy")
    d.add_argument("--seen", type=Path,
                   help="tdsm: seen class ids, rs*.npy (default: the other classes with training samples)")
    d.add_argument("--val-unseen", help="tdsm: validation classes within the seen ones: rv*.npy or a count N")
    d.add_argument("--class-names", type=Path, help="one class name per line")
    d.add_argument("--descriptions", type=Path, action="append", help="class descriptions, one per line (repeatable)")
    d.add_argument("--text-encoder", help="minilm | open_clip:MODEL:PRETRAINED_OR_PATH")


def shortcut_overrides(args: argparse.Namespace, method: str = "tdsm") -> dict[str, Any]:
    """Dotted overrides implied by the shortcut flags that were given; TDSM-only flags are refused otherwise."""
    if not METHODS[method].data_shortcuts:
        given = [f"--{flag.replace('_', '-')}" for flag in TDSM_ONLY_SHORTCUTS if getattr(args, flag) is not None]
        if given:
            raise InputError(f"{', '.join(given)}: zero-shot data flags are TDSM-only; for {method} set the data with "
                             "--set data.source=prepared --set data.prepared_dir=DIR (or --config)")
    out: dict[str, Any] = {}
    if args.features is not None:
        out["data.source"] = "features"
        out["data.features_dir"] = str(args.features)
    for flag, key in (("unseen", "data.unseen"), ("seen", "data.seen"), ("class_names", "text.class_names"),
                      ("text_encoder", "text.encoder")):
        if getattr(args, flag) is not None:
            out[key] = str(getattr(args, flag))
    if getattr(args, "threads", None) is not None:
        out["train.threads"] = args.threads
    if args.val_unseen is not None:
        out["data.val_unseen"] = int(args.val_unseen) if args.val_unseen.isdigit() else args.val_unseen
    if args.descriptions:
        out["text.descriptions"] = [str(p) for p in args.descriptions]
    return out


def names_data(args: argparse.Namespace) -> bool:
    """Whether the command line names its data (a shortcut flag, a data/text-file --set, a --config data section)."""
    if any(getattr(args, flag, None) for flag in DATA_FLAGS):
        return True
    if any(item.split("=", 1)[0].strip().startswith(DATA_KEYS) for item in args.overrides):
        return True
    tree = load_yaml(args.config) if getattr(args, "config", None) else {}
    return "data" in tree or any(k in (tree.get("text") or {}) for k in ("class_names", "descriptions", "synonyms"))


def resolve_config(method: str, args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """--config, then shortcuts, then `extra`, then --set; validated into the method's config."""
    base = load_yaml(args.config) if args.config else {}
    overrides = {**shortcut_overrides(args, method), **(extra or {})}
    overrides.update(parse_override(item) for item in args.overrides)
    return build_config(METHODS[method].config_cls, base, overrides, source=args.config)




def train_encoder_logged(prepared: Path | Storage, unseen: list[int], cfg: EncoderConfig, out: Path, *,
                         tracking_uri: str, benchmark: str | None = None, progress: bool = True) -> Path:
    """Train an encoder in this process as an MLflow run (`service.encoder train --in-process`, the skeleton chain
    of service.run and service.final): run `<name>-<out folder>` of experiment `encoder-<prepared folder>`
    (`start_encoder_run`); metrics: encoder/loss, encoder/train_top1, encoder/lr by step and, at the end,
    encoder/held_out_top1 on the seen classes' test sequences; encoder.pt as an artifact. Returns out/encoder.pt."""
    prepared = prepared if isinstance(prepared, Storage) else Storage.parse(str(Path(prepared).resolve()))
    with start_encoder_run(tracking_uri, prepared.name, cfg.model_dump(mode="json"), out, list(unseen),
                           prepared=str(prepared), benchmark=benchmark or "") as reporter, \
            tempfile.TemporaryDirectory() as tmp:     # a bucket's copy (a chain cached in object storage) read here
        folder = prepared.local if prepared.is_local else prepared.download(Path(tmp) / "prepared")
        path = train_encoder(folder, unseen, cfg, out, benchmark, reporter, progress)
        reporter.log_artifact(path, "checkpoints")
    return path


def default_splits(method: str, args: argparse.Namespace) -> list[str] | None:
    """[the method's embedded-default split] when the command line names no data, else None."""
    name = METHODS[method].default_split
    return [name] if name and not names_data(args) else None


def storage_arg(value: str) -> Storage:
    """argparse type of --storage-path / --out: a folder or an object-store URI; argparse prints our one line."""
    try:
        return Storage.parse(value)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--storage-path {value}: ")) from None


PENDING = "  # (built on first run)"


def searched_keys_comment(method: str, space: SearchSpace, space_path: Path) -> str:
    """One YAML comment line per key the sweep searches: its distribution and what the field is (its description
    names the paper's symbol, e.g. loss.margin = τ), so --print-config says which values a sweep replaces."""
    lines = [f"# searched by service.sweep ({space_path}): each trial replaces these values"]
    for key, dist in space.params.items():
        values = getattr(dist, dist.kind)
        shown = ", ".join(map(str, values))
        about = field_description(METHODS[method].config_cls, key)
        lines.append(f"#   {key}: {dist.kind} [{shown}]" + (f"; {about}" if about else ""))
    return "\n".join(lines) + "\n"


def resolved_config_yaml(method: str, cfg, split: str | None, overrides: dict | None, splits_path: Path,
                         storage: Storage, searched: str = "") -> str:
    """The config that will run, as YAML loadable by --config: the named (or default) split applied and a skeleton
    chain resolved to its cached outputs. Trains nothing: a chain not yet built shows the paths it will write.
    searched: comment lines put in the header (`searched_keys_comment`)."""
    if overrides is None:
        return searched + dump_yaml(cfg)
    resolved = resolve_chain(overrides, storage, build=False)   # generate + prepare only (cached)
    cfg = build_config(METHODS[method].config_cls, to_plain(cfg), resolved)
    head = f"# split {split} of {splits_path}\n{searched}"
    text = dump_yaml(cfg)
    if "chain" not in overrides:
        return head + text
    features = resolved["data.features_dir"]
    head += f"# data and text: the skeleton chain's outputs under {storage / 'chain'}\n"
    if not (Path(features) / "done.json").is_file():   # done.json: written last by the chain's extract stage
        # The encoder is trained and the features extracted by the first run; the paths are fixed already.
        head += "# the features are not built yet: run without --print-config first, then --config this file\n"
        text = text.replace(f"  features_dir: {features}\n", f"  features_dir: {features}{PENDING}\n", 1)
    return head + text
