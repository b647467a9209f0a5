"""Config machinery: the `Section` base and value bounds of every config class (`trainers.configs`), YAML files,
the flat dotted form, `--set` overrides and validation into one-line errors.

`extra="forbid"` everywhere so a typo fails loudly; coupled values are derived by validators. The flat
dotted form (`optim.lr`) is what `--set`, Ray Tune and MLflow use.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from trainers.errors import InputError, short_repr


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    # allow_inf_nan=False: no float field takes NaN or inf (`model.mlp_ratio=.inf` would build an infinite MLP).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic turns true/false into 1/0 for int and float fields: `train.steps=true` would train one step."""
        if isinstance(value, bool) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, got a boolean")
        return value


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type admits a bool (bool itself, Any, or a union/container holding one)."""
    if annotation is bool or annotation is Any:
        return True
    return any(_accepts_bool(arg) for arg in get_args(annotation) if arg is not type(None))


# ----------------------------------------------------------------------------------------------
# Bounds: what a sane value is (tests/unit/test_hostile_config.py checks every numeric field has both ends)
# ----------------------------------------------------------------------------------------------

MAX_STEPS = 100_000_000          # iterations, warm-up and cadences (the paper trains 50,000 steps)
MAX_BATCH = 65_536               # samples per forward; far beyond any GPU's memory at paper size
MAX_THREADS = 1024               # torch intra-op threads; 100000 makes OpenMP segfault
MAX_TIMESTEPS = 100_000          # diffusion steps T (the papers: 50 and 100-1000)
MAX_WEIGHT = 1e6                 # loss weights, margins, weight decay, gradient-clip norms
# Seeds: numpy's legacy seeding takes 0..2**32-1 and torch.manual_seed nothing beyond 2**64 (`seed=1e20`).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
ClassId = Annotated[int, Field(ge=0, le=99_999)]            # a class id of a data set
ClassCount = Annotated[int, Field(ge=1, le=99_999)]         # a number of classes
# Not bounded above on purpose: the learning rate. A finite lr too large to train is what the divergence check
# stops (one line at the first non-finite loss, exit 2); docs/failures.md's diverging-run example uses 1e30.
UNBOUNDED_ABOVE = frozenset({"lr"})


# ----------------------------------------------------------------------------------------------
# Flat dotted form, overrides, files
# ----------------------------------------------------------------------------------------------

class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives the same key twice."""


class YamlTooLargeError(yaml.YAMLError):
    """Aliases that expand to more nodes than any config has (a "billion laughs" bomb), or refer to themselves."""


# Nodes a YAML document may expand to, aliases counted each time they are used. The largest shipped file (a splits
# table) expands to ~2,000; `optim.lr: *i` of a billion-laughs bomb to 9**9 (and hangs anything that walks it).
MAX_YAML_NODES = 100_000


def expanded_size(node: yaml.Node, limit: int = MAX_YAML_NODES) -> int:
    """Nodes of a composed YAML graph with every alias expanded, computed once per distinct node (linear in the
    file); YamlTooLargeError beyond `limit` or on an alias that contains itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_nodes:
            raise YamlTooLargeError(f"an alias on line {n.start_mark.line + 1} contains itself (recursive alias)")
        open_nodes.add(id(n))
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        else:
            total = 1
        open_nodes.discard(id(n))
        if total > limit:
            raise YamlTooLargeError(f"aliases expand to more than {limit:,} values (line {n.start_mark.line + 1}); "
                                    "refused (a YAML alias bomb?)")
        sizes[id(n)] = total
        return total

    return size(node)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot ('3e-4'): YAML 1.1 would make them strings;
    refuses a key given twice in one mapping (plain YAML keeps the last one silently), and a document whose
    aliases expand beyond MAX_YAML_NODES (checked on the composed graph, before anything is built)."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return self.construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue                   # '<<' merges may be overridden on purpose
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(f"duplicate key {key!r} on line {line} (first given on line {first[key]})")
                first[key] = line
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))

def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1e-4}} -> {'optim.lr': 1e-4}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def field_description(cls: type[BaseModel], key: str) -> str:
    """The `description` of the field a dotted key names ('' when it has none or the key is unknown)."""
    *parents, leaf = key.split(".")
    for part in parents:
        info = cls.model_fields.get(part)
        sub = info.annotation if info is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return ""
        cls = sub
    info = cls.model_fields.get(leaf)
    return (info.description or "") if info is not None else ""


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set tree['a']['b'] = value for key 'a.b', creating sub-dicts as needed."""
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise InputError(f"config key {key!r}: {p!r} is a value, not a section")
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 3e-4); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise InputError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_YamlLoader) if raw.strip() else ""
    except YamlTooLargeError as err:
        raise InputError(f"--set {key.strip()!r}: {err}") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


# Error types of a value out of its bounds: for a union field (`Path | list[int] | int`) they name what was wrong,
# where the other members' errors only say "not a path" / "not a list".
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number", "too_short",
                 "too_long")


def _dotted_loc(loc: tuple) -> str:
    """The dotted key of an error location, without pydantic's union-member tags ('list[constrained-int]')."""
    return ".".join(str(p) for p in loc if not _UNION_TAG.fullmatch(str(p)))


_UNION_TAG = re.compile(r".*\[.*|int|float|str|bool|none|[a-z]+(-[a-z]+)+")


def first_error(err: ValidationError) -> dict[str, Any]:
    """The error to report: the first out-of-bounds one if any (a union's real complaint), else the first."""
    errors = err.errors()
    return next((e for e in errors if e["type"] in _BOUND_ERRORS), errors[0])


def format_validation_error(err: ValidationError) -> str:
    """One line naming the first offending dotted key and what was expected."""
    first = first_error(err)
    loc = _dotted_loc(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config key {loc!r}"
    return f"config key {loc!r}: {msg} (got {short_repr(first.get('input'))})" if loc else msg


def preset_fields(cls: type[BaseModel]) -> dict[str, set[str]]:
    """{section: the fields its named presets fill} for each section of `cls` whose class lists `presets` (TDSM's
    `model`): an override naming another preset clears them from the base config."""
    return {name: {key for preset in info.annotation.presets.values() for key in preset}
            for name, info in cls.model_fields.items() if isinstance(getattr(info.annotation, "presets", None), dict)}


def build_config(cls: type[BaseModel], base: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None, source: Path | str | None = None) -> Any:
    """Validate `base` (nested) with dotted `overrides` applied; errors become one-line InputError.

    source: the file `base` was read from, named in errors about keys that no override touched.
    """
    tree = copy.deepcopy(base or {})
    overrides = overrides or {}
    for section, fields in preset_fields(cls).items():
        if f"{section}.preset" in overrides and isinstance(tree.get(section), dict):
            # A new preset replaces the base's sizes (e.g. a resolved YAML); sizes set in overrides still win.
            for key in fields:
                tree[section].pop(key, None)
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        msg = format_validation_error(err)
        loc = _dotted_loc(first_error(err)["loc"])
        from_base = loc and not any(k == loc or k.startswith(f"{loc}.") or loc.startswith(f"{k}.") for k in overrides)
        raise InputError(f"{source}: {msg}" if source and from_base else msg) from None


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    try:
        data = yaml.load(Path(path).read_text(), Loader=_YamlLoader)
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: unreadable config file ({type(err).__name__})") from None
    except (DuplicateKeyError, YamlTooLargeError) as err:
        raise InputError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a YAML mapping at the top level")
    return data


def to_plain(cfg: BaseModel) -> dict[str, Any]:
    """JSON/YAML-safe nested dict (paths as strings)."""
    return cfg.model_dump(mode="json")


def dump_yaml(cfg: BaseModel) -> str:
    """The full resolved config as YAML, in field order."""
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)
