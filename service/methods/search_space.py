"""Search spaces: declarative YAML in search_spaces/, validated here before any trial starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.methods import METHODS
from trainers.config import build_config, format_validation_error, load_yaml
from trainers.errors import InputError, short_repr

# Per-sweep inputs: prepared once in the driver and shared by every trial, so they cannot vary per trial.
PER_SWEEP_PREFIXES = ("data.", "text.", "method")


class Distribution(BaseModel):
    """Exactly one of: choice [v...], uniform [lo, hi], loguniform [lo, hi], randint [lo, hi). Range ends are
    finite (Ray would fail on `.inf` only once the sweep has started)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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


class SearchSpace(BaseModel):
    """A method's search space."""

    model_config = ConfigDict(extra="forbid")

    method: str
    metric: str | None = Field(None, description="Validation metric reported at every evaluation (default: the "
                               "method's); trials are ranked on its running maximum, `objective`.")
    mode: Literal["max", "min"] = "max"
    params: dict[str, Distribution]
    inference: InferenceSpace | None = Field(None, description="tdsm only: the t_test grid scored per trial.")
    smoke: SmokeSpec | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        if name not in METHODS:
            raise ValueError(f"expected one of {', '.join(METHODS)}")
        return name

    @model_validator(mode="after")
    def _method_defaults(self) -> SearchSpace:
        """Fill the method's metric; an inference grid is required for TDSM and meaningless for the others."""
        method = METHODS[self.method]
        if self.metric is None:          # always a validation metric, never test
            self.metric = method.objective
        if self.metric not in method.rankable_metrics:
            raise ValueError(f"metric {short_repr(self.metric)}: trials of {self.method} can only be ranked on a "
                             f"validation metric they report: {', '.join(method.rankable_metrics)}")
        grids = self.inference is not None or (self.smoke is not None and self.smoke.inference is not None)
        if method.inference_grid and self.inference is None:
            raise ValueError(f"inference: required for method {self.method} (the t_test grid)")
        if not method.inference_grid and grids:
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



def load_search_space(path: Path) -> SearchSpace:
    """Parse and structurally validate a search-space YAML; errors name the file and the key."""
    raw = load_yaml(path)
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as err:
        raise InputError(f"{path}: {format_validation_error(err).replace('config key', 'key')}") from None


def check_against_config(space: SearchSpace, config_cls, base: dict[str, Any], path: Path) -> None:
    """Every param key must be a real config leaf accepting its extreme values (with what the method derives from
    them: `Method.trial_overrides`), then the method's own checks (`Method.check_space`)."""
    method = METHODS[space.method]
    for key, dist in space.params.items():
        if key.startswith(PER_SWEEP_PREFIXES):
            raise InputError(f"{path}: params.{key}: data/text settings are per sweep (use --splits or the "
                             "data/text flags), not searchable")
        for value in dist.extremes():
            try:
                build_config(config_cls, base, method.trial_overrides(space, {key: value}, base))
            except InputError as err:
                raise InputError(f"{path}: params.{key}={short_repr(value)}: {err}") from None
    method.check_space(space, base, path)
