"""Typed configuration: one small pydantic model per concern, nested into one config per method.

`extra="forbid"` everywhere so a typo fails loudly; coupled values are derived by validators. The flat
dotted form (`optim.lr`) is what `--set`, Ray Tune and MLflow use.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

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
# stops (one line at the first non-finite loss, exit 2); the README's diverging-run example uses 1e30.
UNBOUNDED_ABOVE = frozenset({"lr"})


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's denoiser (docs/METHODS.md §1): C=768, B=12, 12 heads, ~261 M parameters with 2048-d text.
    "paper": {"hidden_size": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
    # CPU-friendly sizes for the embedded default, smoke sweeps and tests.
    "small": {"hidden_size": 256, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0},
    "tiny": {"hidden_size": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
}


class ModelConfig(Section):
    """Size of the CrossDiT denoiser; input widths come from the data and text encoder."""

    preset: Literal["paper", "small", "tiny", "custom"] = Field(
        "tiny", description="Named size; explicit hidden_size/depth/num_heads/mlp_ratio override it ('custom').")
    hidden_size: int = Field(64, ge=8, le=16384, description="Transformer width C.")
    depth: int = Field(2, ge=1, le=256, description="Number of CrossDiT blocks B.")
    num_heads: int = Field(2, ge=1, le=1024, description="Attention heads; must divide hidden_size.")
    mlp_ratio: float = Field(2.0, gt=0, le=64, description="MLP hidden width as a multiple of C.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fill size fields from the preset; fields given explicitly win."""
        if isinstance(data, dict):
            preset = data.get("preset", "tiny")
            if preset in MODEL_PRESETS:
                data = {**MODEL_PRESETS[preset], **data}
        return data

    @model_validator(mode="after")
    def _check_sizes(self) -> "ModelConfig":
        """Heads must divide the width; a preset whose sizes were overridden is recorded as 'custom'."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size}")
        sizes = {k: getattr(self, k) for k in MODEL_PRESETS["tiny"]}
        if self.preset != "custom" and sizes != MODEL_PRESETS[self.preset]:
            object.__setattr__(self, "preset", "custom")
        return self


class DiffusionConfig(Section):
    """DDPM forward process and what the denoiser predicts."""

    num_train_timesteps: int = Field(50, ge=1, le=MAX_TIMESTEPS, description="Total diffusion steps T (paper: 50).")
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = Field(
        "scaled_linear", description="Beta schedule; scaled_linear is Stable Diffusion's (paper).")
    beta_start: float = Field(0.00085, gt=0, lt=1, description="First beta (linear schedules).")
    beta_end: float = Field(0.012, gt=0, lt=1, description="Last beta (linear schedules).")
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = Field(
        "epsilon", description="Regression target: noise (paper), x0, or velocity.")


class LossConfig(Section):
    """TDSM objective L = L_diff + lambda * L_TD."""

    margin: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="τ (tau), the margin of L_TD (paper: 1).")
    triplet_weight: float = Field(
        1.0, ge=0, le=MAX_WEIGHT, description="λ (lambda), the weight of L_TD in L_diff + λ L_TD (paper: 1).")


class OptimConfig(Section):
    """AdamW with linear warm-up and cosine decay (paper: lr 1e-4, wd 0.01, 100 warm-up steps)."""

    lr: float = Field(1e-3, gt=0, description="Peak learning rate (paper: 1e-4 for the paper-size model).")
    weight_decay: float = Field(0.01, ge=0, le=MAX_WEIGHT, description="AdamW weight decay.")
    warmup_steps: int = Field(100, ge=0, le=MAX_STEPS, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    batch_size: int = Field(
        128, ge=1, le=MAX_BATCH, description="Samples per step (each gets a positive and a negative prompt).")
    grad_clip: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="Max gradient norm; 0 disables clipping.")


class TrainConfig(Section):
    """Loop length, evaluation cadence, precision and reproducibility."""

    steps: int = Field(1000, ge=1, le=MAX_STEPS, description="Training iterations (paper: 50,000).")
    eval_every: int = Field(250, ge=1, le=MAX_STEPS, description="Evaluate on validation classes every N steps.")
    checkpoint_every: int = Field(250, ge=1, le=MAX_STEPS, description="Write a resumable checkpoint every N steps.")
    seed: Seed = Field(2025, description="Seed of model init, batches, training noise (paper: 2025).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast where the device supports it fast (auto), or force one.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    threads: int = Field(
        0, ge=0, le=MAX_THREADS, description="torch intra-op threads; 0 = auto: the process's CPUs (affinity, "
                         "cgroup quota, at most $OMP_NUM_THREADS), 1 for models narrower than 256 "
                         "(trainers.runtime.resolve_threads).")


class TDSMTrainConfig(TrainConfig):
    """TrainConfig plus what only the TDSM loop offers."""

    compile: bool = Field(False, description="torch.compile the training forward/backward: 1.19x faster paper-size "
                          "steps on one CPU core after a one-off compile of ~95 s (README, Benchmarks); worth it "
                          "for long runs, not for smoke runs.")


class SyntheticConfig(Section):
    """The embedded generated feature task (see README: what it is and is not)."""

    samples_per_class: int = Field(60, ge=4, le=100_000, description="Generated feature vectors per class.")
    feature_dim: int = Field(256, ge=8, le=16384, description="Width of the generated skeleton features.")
    noise: float = Field(0.6, ge=0, le=1000, description="Within-class spread relative to the class prototype scale.")
    text_components: int = Field(
        16, ge=1, le=4096, description="Leading principal directions of the class texts that shape the prototypes.")
    seed: Seed = Field(0, description="Seed of the generator (prototypes and samples).")


class DataConfig(Section):
    """Where skeleton features and the zero-shot split come from."""

    source: Literal["synthetic", "features"] = Field(
        "synthetic", description="'features': SA-DVAE layout in features_dir; 'synthetic': embedded task.")
    features_dir: Path | None = Field(
        None, description="Folder with train.npy, train_label.npy, ztest.npy, z_label.npy (and, for GZSL metrics, "
                          "optionally gtest.npy, g_label.npy).")
    unseen: Path | list[ClassId] | None = Field(
        None, description="Unseen (test) class ids: a ru*.npy file or a list; default for features: z_label's classes.")
    seen: Path | list[ClassId] | None = Field(
        None, description="Seen class ids (rs*.npy); default: the non-unseen classes with samples in train_label.npy.")
    val_unseen: Path | list[ClassId] | ClassCount = Field(
        5, description="Validation classes carved from the seen ones: a rv*.npy file, a list, or a count N (seeded).")
    val_seed: Seed = Field(0, description="Seed of the validation-class draw when val_unseen is a count.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


class TextConfig(Section):
    """Which text encoder and which prompts (one per class per file)."""

    encoder: str = Field("minilm", description="'minilm' (offline) or 'open_clip:MODEL:PRETRAINED_OR_PATH'.")
    layer: Literal["last", "penultimate"] = Field(
        "last", description="Text-tower layer: 'last' = every block; 'penultimate' = all but the last block, then "
                            "the final LayerNorm (minilm: hidden_states[-2]). Paper: penultimate (SD 2.1's encoder).")
    pooled: Literal["projected", "eot"] = Field(
        "projected", description="Global feature: 'projected' = the encoder's sentence embedding over its full "
                                 "context (open_clip encode_text on 77 tokens; minilm mean-pooled); 'eot' = the "
                                 "end-of-text (minilm: [SEP]) state of the prompt tokenised to max_tokens, "
                                 "unprojected. Paper: eot.")
    max_tokens: int = Field(35, ge=1, le=1024, description="Local text tokens M_l; with pooled=eot also the tokenised "
                                                  "length (padded/truncated). Paper: 35.")
    class_names: Path | None = Field(None, description="One class name per line; default: embedded NTU-60 names.")
    descriptions: list[Path] | None = Field(
        None, description="Description files (one sentence per class); default: embedded NTU-60 descriptions.")
    num_classes: ClassCount | None = Field(
        None, description="Read only the first N rows of class_names and of each descriptions file (the "
                                "official code reads NTU-120's files for NTU-60: N=60); default: every row.")
    cache_dir: Path | None = Field(
        None, description="Encoded-text cache; default $SKELDIFF_CACHE or ~/.cache/skeldiff.")


class EvalConfig(Section):
    """Zero-shot scoring: noise at t_test, pick the class whose text denoises best."""

    t_test: int = Field(25, ge=0, le=MAX_TIMESTEPS, description="Inference step (paper: 25 of T=50); must be < T.")
    t_test_grid: list[Annotated[int, Field(ge=0, le=MAX_TIMESTEPS)]] | None = Field(
        None, description="t_test values evaluated from one model (Fig. 5 curve); default: 9 values over [1, T).")
    noise_draws: int = Field(3, ge=1, le=1000, description="Independent evaluation noise draws; accuracy is averaged.")
    tune_t_test: bool = Field(
        False, description="Score the whole grid at every evaluation and report its best point as zsl_top1 "
                           "(sweeps: t_test becomes an inference parameter chosen on validation).")
    seed: Seed = Field(1234, description="Seed of the evaluation noise, independent of training randomness.")
    batch_size: int = Field(
        64, ge=1, le=MAX_BATCH, description="Test samples per batched forward (x draws x candidates).")


# ----------------------------------------------------------------------------------------------
# Method config
# ----------------------------------------------------------------------------------------------

class TDSMConfig(Section):
    """Everything one TDSM run reads."""

    method: Literal["tdsm"] = "tdsm"
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TDSMTrainConfig = Field(default_factory=TDSMTrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _derive_eval_grid(self) -> "TDSMConfig":
        """t_test and its grid must lie in [0, T); the default grid spans the schedule; every grid includes t_test."""
        T = self.diffusion.num_train_timesteps
        if self.eval.t_test >= T:
            raise ValueError(f"eval.t_test={self.eval.t_test} must be < diffusion.num_train_timesteps={T}")
        grid = self.eval.t_test_grid
        if grid is None:
            step = max(1, T // 10)
            grid = range(min(step, T - 1), T, step)
        # The reported accuracy is read at t_test, so the grid always holds it.
        grid = [*grid, self.eval.t_test]
        bad = [t for t in grid if not 0 <= t < T]
        if bad:
            raise ValueError(f"eval.t_test_grid values {bad} must be in [0, {T}) (diffusion.num_train_timesteps)")
        if self.eval.t_test_grid != sorted(set(grid)):
            # Bypass validate_assignment: assigning here would re-run this validator.
            object.__setattr__(self.eval, "t_test_grid", sorted(set(grid)))
        return self


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


def build_config(cls: type[BaseModel], base: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None, source: Path | str | None = None) -> Any:
    """Validate `base` (nested) with dotted `overrides` applied; errors become one-line InputError.

    source: the file `base` was read from, named in errors about keys that no override touched.
    """
    tree = copy.deepcopy(base or {})
    overrides = overrides or {}
    if "model.preset" in overrides and isinstance(tree.get("model"), dict):
        # A new preset replaces the base's sizes (e.g. a resolved YAML); sizes set in overrides still win.
        for key in MODEL_PRESETS["tiny"]:
            tree["model"].pop(key, None)
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
