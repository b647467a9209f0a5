"""Search spaces: declarative YAML in search_spaces/, validated here before any trial starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainers.config import build_config, format_validation_error, load_yaml
from trainers.errors import InputError

# Per-sweep inputs: prepared once in the driver and shared by every trial, so they cannot vary per trial.
PER_SWEEP_PREFIXES = ("data.", "text.", "method")
T_KEY = "diffusion.num_train_timesteps"


class Distribution(BaseModel):
    """Exactly one of: choice [v...], uniform [lo, hi], loguniform [lo, hi], randint [lo, hi)."""

    model_config = ConfigDict(extra="forbid")

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Distribution":
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice/uniform/loguniform/randint, got {given or 'none'}")
        kind = given[0]
        if kind == "choice" and not self.choice:
            raise ValueError("choice needs at least one value")
        if kind != "choice":
            lo, hi = getattr(self, kind)
            if not lo < hi or (kind == "loguniform" and lo <= 0):
                raise ValueError(f"{kind} needs 0 < low < high (log) or low < high, got [{lo}, {hi}]")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def extremes(self) -> list[Any]:
        """Values that bound what can be sampled (every choice; both ends of a range)."""
        if self.kind == "choice":
            return list(self.choice)
        lo, hi = getattr(self, self.kind)
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def to_tune(self):
        from ray import tune  # service-only dependency, imported where used

        if self.kind == "choice":
            return tune.choice(self.choice)
        lo, hi = getattr(self, self.kind)
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)


class InferenceSpace(BaseModel):
    """Inference-only parameters, scored from one trained model per trial."""

    model_config = ConfigDict(extra="forbid")

    t_test: list[int] = Field(min_length=1, description="t_test grid; values >= a trial's T are dropped.")


class SmokeSpec(BaseModel):
    """What `--smoke` replaces: sample count, fixed config overrides, and (optionally) params/inference."""

    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(4, ge=1)
    config: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Distribution] | None = None
    inference: InferenceSpace | None = None


# What each method's trials report at every evaluation by default (always a validation metric, never test). Trials
# are ranked on its running maximum, `<metric>_max` (SearchSpace.objective).
DEFAULT_METRICS = {"tdsm": "val/zsl_top1", "cocodiff": "val/top1"}
# Short names of searched keys in run names and tables (other keys: their last dotted part).
PARAM_LABELS = {"diffusion.num_train_timesteps": "T", "module.num_train_timesteps": "T", "loss.margin": "τ",
                "loss.triplet_weight": "λ", "optim.lr": "lr", "model.hidden_size": "width", "model.depth": "depth",
                "diffusion.prediction_type": "pred", "module.beta_schedule": "β"}
# Methods scored over an inference-time grid (TDSM's t_test); the others have no `inference` section.
INFERENCE_METHODS = ("tdsm",)


class SearchSpace(BaseModel):
    """A method's search space."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["tdsm", "cocodiff"]
    metric: str | None = Field(None, description="Validation metric reported at every evaluation (default: the "
                               "method's); trials are ranked on its running maximum, `objective`.")
    mode: Literal["max", "min"] = "max"
    params: dict[str, Distribution]
    inference: InferenceSpace | None = Field(None, description="tdsm only: the t_test grid scored per trial.")
    smoke: SmokeSpec | None = None

    @model_validator(mode="after")
    def _method_defaults(self) -> SearchSpace:
        """Fill the method's metric; an inference grid is required for TDSM and meaningless for the others."""
        if self.metric is None:
            self.metric = DEFAULT_METRICS[self.method]
        grids = self.inference is not None or (self.smoke is not None and self.smoke.inference is not None)
        if self.method in INFERENCE_METHODS and self.inference is None:
            raise ValueError(f"inference: required for method {self.method} (the t_test grid)")
        if self.method not in INFERENCE_METHODS and grids:
            raise ValueError(f"inference: method {self.method} has no inference-time parameters; remove the section")
        return self

    def for_smoke(self) -> "SearchSpace":
        """The space `--smoke` uses."""
        if self.smoke is None:
            return self
        return self.model_copy(update={
            "params": self.smoke.params if self.smoke.params is not None else self.params,
            "inference": self.smoke.inference or self.inference,
        })

    @property
    def objective(self) -> str:
        """What trials are ranked on (Tune, ASHA, the best config): the best `metric` a trial reached, i.e. the value
        of its best checkpoint, which is what `service.final` reuses (a stopped trial's last value is not its best)."""
        return f"{self.metric}_max"

    def tune_param_space(self) -> dict[str, Any]:
        return {key: dist.to_tune() for key, dist in self.params.items()}


def param_label(key: str) -> str:
    """Short name of a searched key: `optim.lr` -> `lr`, `loss.margin` -> `τ`."""
    return PARAM_LABELS.get(key, key.rsplit(".", 1)[-1])


def format_value(value: Any) -> str:
    """Two significant digits, exponent without padding (`2.1e-3`); ints and strings as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e4:
        return str(int(value))
    if 0.01 <= abs(value) < 1e4:
        return f"{value:.2g}" if abs(value) < 10 else f"{value:.3g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def trial_label(sampled: dict[str, Any]) -> str:
    """A trial's run name: what differs between trials, e.g. `T=50 τ=0.52 λ=0.93 lr=2.1e-3`."""
    return " ".join(f"{param_label(k)}={format_value(v)}" for k, v in sampled.items())


def load_search_space(path: Path) -> SearchSpace:
    """Parse and structurally validate a search-space YAML; errors name the file and the key."""
    raw = load_yaml(path)
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as err:
        raise InputError(f"{path}: {format_validation_error(err).replace('config key', 'key')}") from None


def check_against_config(space: SearchSpace, config_cls, base: dict[str, Any], path: Path,
                         fixed: dict[str, Any] | None = None) -> None:
    """Every param key must be a real config leaf accepting its extreme values; t_test < T for every T (TDSM)."""
    fixed = fixed or {}
    for key, dist in space.params.items():
        if key.startswith(PER_SWEEP_PREFIXES):
            raise InputError(f"{path}: params.{key}: data/text settings are per sweep (use --splits or the "
                             "data/text flags), not searchable")
        for value in dist.extremes():
            try:
                T = None
                if space.inference is not None:
                    T = value if key == T_KEY else build_config(config_cls, base, fixed).diffusion.num_train_timesteps
                    if not any(t < int(T) for t in space.inference.t_test):
                        raise InputError(f"inference.t_test={space.inference.t_test} has no value < T={T} "
                                         "(t_test must be < diffusion.num_train_timesteps)")
                build_config(config_cls, base, {**fixed, **trial_overrides(space, {key: value}, T)})
            except InputError as err:
                raise InputError(f"{path}: params.{key}={value!r}: {err}") from None
    if space.inference is None:
        return
    if T_KEY not in space.params:
        T = build_config(config_cls, base, fixed).diffusion.num_train_timesteps
        if not any(t < T for t in space.inference.t_test):
            raise InputError(f"{path}: inference.t_test={space.inference.t_test} has no value < T={T}")
    bad = [t for t in space.inference.t_test if t < 0]
    if bad:
        raise InputError(f"{path}: inference.t_test values {bad} must be >= 0")


def trial_overrides(space: SearchSpace, sampled: dict[str, Any], T: int | None = None) -> dict[str, Any]:
    """Dotted overrides of one trial: the sampled params, plus its t_test grid (values < T) when the space has one."""
    if space.inference is None:
        return dict(sampled)
    grid = sorted({t for t in space.inference.t_test if t < T})
    return {**sampled, "eval.t_test_grid": grid, "eval.t_test": grid[len(grid) // 2], "eval.tune_t_test": True}
