"""What the CLIs share: config from YAML + shortcuts + --set, the named or default split, and --print-config."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from service.methods import METHODS
from service.methods.base import Method
from service.methods.search_space import SearchSpace
from service.storage import Storage
from trainers.config import build_config, field_description, load_yaml, parse_override
from trainers.errors import InputError

# Ray results and checkpoints, and the cached skeleton chain (service.data.chain): shared storage on a cluster.
DEFAULT_STORAGE = os.environ.get("SKELDIFF_RESULTS", "~/skeldiff_results")   # a folder or an s3:// / gs:// URI


# Config keys that name the data a run trains on (none of them given means: the embedded default split).
DATA_KEYS = ("data.", "text.class_names", "text.descriptions", "text.synonyms")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config/--set/--print-config and the text shortcuts every method has (a method adds its own:
    `MethodFlags`)."""
    g = parser.add_argument_group("configuration")
    g.add_argument("--config", type=Path, help="YAML config (nested, same keys as --print-config)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one dotted key, e.g. --set optim.lr=3e-4 (repeatable; wins over shortcuts)")
    g.add_argument("--print-config", action="store_true",
                   help="print the config that will run as YAML (loadable by --config) and exit: the named or "
                        "default split applied, a skeleton chain resolved to its cached paths (generated and "
                        "prepared if missing, never trained: '# (built on first run)' marks features not built yet)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="shortcut for --set train.threads=N: CPU threads of the fit loop (0 = auto, see docs/usage.md)")
    d = parser.add_argument_group("text shortcuts")
    d.add_argument("--class-names", type=Path, help="one class name per line")
    d.add_argument("--descriptions", type=Path, action="append", help="class descriptions, one per line (repeatable)")
    d.add_argument("--text-encoder", help="minilm | open_clip:MODEL:PRETRAINED_OR_PATH")


class MethodFlags:
    """Every registered method's own flags on one parser (`Method.add_arguments`, for `command`: run, sweep, final),
    and who owns each: the command line is parsed once, before the method is known (service.final reads it from
    --from), then a flag of another method that was given is refused. A method's flags default to None (or False),
    so "given" means given. The CLIs keep it on their parser (`parser.method_flags`)."""

    def __init__(self, parser: argparse.ArgumentParser, command: str):
        self.command = command
        self.owner: dict[str, Method] = {}          # dest -> the method that added it
        self.flag: dict[str, str] = {}              # dest -> its option string, for messages
        self.default: dict[str, Any] = {}
        for method in METHODS.values():
            before = {id(a) for a in parser._actions}
            method.add_arguments(parser, command)
            for action in parser._actions:
                if id(action) not in before:
                    self.owner[action.dest], self.flag[action.dest] = method, action.option_strings[0]
                    self.default[action.dest] = action.default

    def check_values(self, args: argparse.Namespace) -> None:
        """Each method checks the values of its own flags that were given (before anything is read or run)."""
        for method in {id(m): m for m in self.owner.values()}.values():
            if any(getattr(args, d) != self.default[d] for d, m in self.owner.items() if m is method):
                method.options(self.given(args, method), self.command)

    def options(self, args: argparse.Namespace, method: Method) -> dict[str, Any]:
        """`method`'s options (`Method.options`); a flag of another method that was given is refused."""
        foreign = [d for d, owner in self.owner.items() if owner is not method and getattr(args, d) != self.default[d]]
        if foreign:
            owner = self.owner[foreign[0]]
            hint = f" ({owner.flags_hint})" if owner.flags_hint else ""
            raise InputError(f"{', '.join(self.flag[d] for d in foreign)}: {owner.name} only{hint}, not a "
                             f"{method.name} flag")
        return method.options(self.given(args, method), self.command)

    def given(self, args: argparse.Namespace, method: Method) -> dict[str, Any]:
        """`method`'s own flags as parsed (dest -> value): what its hooks read, nothing of the other methods'."""
        return {dest: getattr(args, dest) for dest, owner in self.owner.items() if owner is method}


def shortcut_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted overrides implied by the shortcut flags every method has (add_config_args)."""
    out: dict[str, Any] = {}
    for flag, key in (("class_names", "text.class_names"), ("text_encoder", "text.encoder")):
        if getattr(args, flag, None) is not None:
            out[key] = str(getattr(args, flag))
    if getattr(args, "threads", None) is not None:
        out["train.threads"] = args.threads
    if getattr(args, "descriptions", None):
        out["text.descriptions"] = [str(p) for p in args.descriptions]
    return out


def method_overrides(method: Method, args: argparse.Namespace, flags: MethodFlags | None = None) -> dict[str, Any]:
    """The shortcut overrides: every method's, then `method`'s own (its data flags; without `flags`, read from every
    parsed value)."""
    given = flags.given(args, method) if flags is not None else vars(args)
    return {**shortcut_overrides(args), **method.config_overrides(given)}


def names_data(args: argparse.Namespace, overrides: dict[str, Any]) -> bool:
    """Whether the command line names its data: a shortcut (`overrides`) or --set on a data/text-file key, or a
    --config with a data section."""
    if any(key.startswith(DATA_KEYS) for key in overrides):
        return True
    if any(item.split("=", 1)[0].strip().startswith(DATA_KEYS) for item in args.overrides):
        return True
    tree = load_yaml(args.config) if getattr(args, "config", None) else {}
    return "data" in tree or any(k in (tree.get("text") or {}) for k in ("class_names", "descriptions", "synonyms"))


def resolve_config(method: Method, args: argparse.Namespace, extra: dict[str, Any] | None = None,
                   flags: MethodFlags | None = None):
    """--config, then shortcuts, then `extra`, then --set; validated into the method's config."""
    base = load_yaml(args.config) if args.config else {}
    overrides = {**method_overrides(method, args, flags), **(extra or {})}
    overrides.update(parse_override(item) for item in args.overrides)
    return build_config(method.config_cls, base, overrides, source=args.config)


def default_splits(method: Method, args: argparse.Namespace, flags: MethodFlags | None = None) -> list[str] | None:
    """[the method's embedded-default split] when the command line names no data, else None."""
    name = method.default_split
    return [name] if name and not names_data(args, method_overrides(method, args, flags)) else None


def storage_arg(value: str) -> Storage:
    """argparse type of --storage-path / --out: a folder or an object-store URI; argparse prints our one line."""
    try:
        return Storage.parse(value)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--storage-path {value}: ")) from None


def searched_keys_comment(method: Method, space: SearchSpace, space_path: Path) -> str:
    """One YAML comment line per key the sweep searches: its distribution and what the field is (its description
    names the paper's symbol, e.g. loss.margin = τ), so --print-config says which values a sweep replaces."""
    lines = [f"# searched by service.sweep ({space_path}): each trial replaces these values"]
    for key, dist in space.params.items():
        values = getattr(dist, dist.kind)
        shown = ", ".join(map(str, values))
        about = field_description(method.config_cls, key)
        lines.append(f"#   {key}: {dist.kind} [{shown}]" + (f"; {about}" if about else ""))
    return "\n".join(lines) + "\n"
