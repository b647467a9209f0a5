"""Shared command-line plumbing: config from YAML + shortcuts + --set, and one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, Callable

from trainers.config import TDSMConfig, build_config, load_yaml, parse_override
from trainers.errors import InputError

METHOD_CONFIGS = {"tdsm": TDSMConfig}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config/--set/--print-config and the data/text shortcuts every TDSM command accepts."""
    g = parser.add_argument_group("configuration")
    g.add_argument("--config", type=Path, help="YAML config (nested, same keys as --print-config)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one dotted key, e.g. --set optim.lr=3e-4 (repeatable; wins over shortcuts)")
    g.add_argument("--print-config", action="store_true", help="print the fully resolved config as YAML and exit")
    d = parser.add_argument_group("data and text shortcuts")
    d.add_argument("--features", type=Path, help="folder of pre-extracted features (SA-DVAE layout)")
    d.add_argument("--unseen", type=Path, help="unseen (test) class ids, ru*.npy")
    d.add_argument("--seen", type=Path, help="seen class ids, rs*.npy (default: all other classes)")
    d.add_argument("--val-unseen", help="validation classes within the seen ones: rv*.npy or a count N")
    d.add_argument("--class-names", type=Path, help="one class name per line")
    d.add_argument("--descriptions", type=Path, action="append", help="class descriptions, one per line (repeatable)")
    d.add_argument("--text-encoder", help="minilm | open_clip:MODEL:PRETRAINED_OR_PATH")


def shortcut_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted overrides implied by the shortcut flags that were given."""
    out: dict[str, Any] = {}
    if args.features is not None:
        out["data.source"] = "features"
        out["data.features_dir"] = str(args.features)
    for flag, key in (("unseen", "data.unseen"), ("seen", "data.seen"), ("class_names", "text.class_names"),
                      ("text_encoder", "text.encoder")):
        if getattr(args, flag) is not None:
            out[key] = str(getattr(args, flag))
    if args.val_unseen is not None:
        out["data.val_unseen"] = int(args.val_unseen) if args.val_unseen.isdigit() else args.val_unseen
    if args.descriptions:
        out["text.descriptions"] = [str(p) for p in args.descriptions]
    return out


def resolve_config(method: str, args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """--config, then shortcuts, then `extra`, then --set; validated into the method's config."""
    base = load_yaml(args.config) if args.config else {}
    overrides = {**shortcut_overrides(args), **(extra or {})}
    overrides.update(parse_override(item) for item in args.overrides)
    return build_config(METHOD_CONFIGS[method], base, overrides, source=args.config)


def exits_cleanly(main: Callable[..., int | None]) -> Callable[..., int]:
    """Bad input -> 'error: <one line>' on stderr and exit code 2; Ctrl-C -> 130."""

    @functools.wraps(main)
    def wrapper(*a, **kw) -> int:
        try:
            return main(*a, **kw) or 0
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
