"""TDSM's spec: its config, objective, flags and the zero-shot choices a sweep makes (the t_test grid, best_t_test).
Light: no torch, MLflow or Ray (see service.methods.base); what TDSM runs is `service.methods.tdsm.TDSM`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.methods.base import Method, absolute_fields
from trainers.config import build_config, to_plain
from trainers.configs import TDSMConfig
from trainers.errors import InputError

# The validation metric that chooses the kept (best.pt) weights; runs and sweep trials report its running maximum
# as `<metric>_max`, the name trials are ranked on, so the JSON line, the MLflow run and a sweep trial agree.
OBJECTIVE = "val/zsl_top1"
T_KEY = "diffusion.num_train_timesteps"
NOISE_DRAWS = 10          # evaluation noise draws per seed in service.final (the paper averages 10)
# The zero-shot data shortcuts of service.run / service.sweep (feature folders, class splits): dest -> config key.
DATA_SHORTCUTS = {"features": "data.features_dir", "unseen": "data.unseen", "seen": "data.seen",
                  "val_unseen": "data.val_unseen"}


class TDSMSpec(Method):
    """Zero-shot recognition of unseen actions by text-conditioned denoising (see service.methods.base.Method)."""

    name = "tdsm"
    config_cls = TDSMConfig
    objective = OBJECTIVE
    # Reported at every validation evaluation (trainers.tdsm_fit.zsl_metric_dict with selection=True); never test.
    rankable_metrics = (OBJECTIVE, "val/zsl_top1_ensemble", "val/zsl_top1_best")
    about = "zero-shot (TDSM)"
    default_split = "synthetic-skeleton"     # no data named: the embedded skeleton chain (generate, prepare, encode)
    inference_grid = True                    # t_test is scored per trial on a grid (search space `inference:`)
    chosen_tags = ("best_t_test",)           # the t_test a trial chose on validation (selection_tags)
    flags_hint = "its zero-shot data shortcuts and evaluation draws"
    report_table = True                      # the paper's Table 1 across splits

    def add_arguments(self, parser: argparse.ArgumentParser, command: str) -> None:
        if command in ("run", "sweep"):
            g = parser.add_argument_group("tdsm: zero-shot data shortcuts")
            g.add_argument("--features", type=Path, help="tdsm: folder of pre-extracted features (SA-DVAE layout)")
            g.add_argument("--unseen", type=Path, help="tdsm: unseen (test) class ids, ru*.npy")
            g.add_argument("--seen", type=Path,
                           help="tdsm: seen class ids, rs*.npy (default: the other classes with training samples)")
            g.add_argument("--val-unseen", help="tdsm: validation classes within the seen ones: rv*.npy or a count N")
        elif command == "final":
            parser.add_argument("--noise-draws", type=int,     # None: not given (another method's source refuses it)
                                help=f"tdsm: evaluation noise draws per seed (default: {NOISE_DRAWS}, the paper's)")

    def options(self, given: Mapping[str, Any], command: str) -> dict[str, Any]:
        if command != "final":
            return {}
        draws = NOISE_DRAWS if given["noise_draws"] is None else given["noise_draws"]
        if draws < 1:
            raise InputError(f"--noise-draws must be >= 1 (got {draws})")
        return {"noise_draws": draws}

    def config_overrides(self, given: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for dest, key in DATA_SHORTCUTS.items():
            value = given.get(dest)
            if value is None:
                continue
            out[key] = int(value) if dest == "val_unseen" and value.isdigit() else str(value)
        if "data.features_dir" in out:
            out = {"data.source": "features", **out}
        return out

    def split_name(self, cfg: TDSMConfig) -> str:
        """Its features folder, or `synthetic` (the generated feature task)."""
        return Path(cfg.data.features_dir).name if cfg.data.source == "features" else "synthetic"

    def absolute_paths(self, tree: dict[str, Any]) -> dict[str, Any]:
        cfg = build_config(TDSMConfig, tree)
        tree = to_plain(cfg)
        absolute_fields(tree["data"], cfg.data, ("features_dir", "unseen", "seen", "val_unseen"))
        absolute_fields(tree["text"], cfg.text, ("class_names", "descriptions", "cache_dir"))
        return tree

    def best_config(self, tree: dict[str, Any], tags: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Fix the run's t_test to the one it chose on validation (its best_t_test tag), and tune it no more."""
        section = tree.setdefault("eval", {})
        if not isinstance(section, dict):
            raise InputError(f"eval: expected a mapping of evaluation settings, got {section!r}")
        if "best_t_test" in tags:
            section["t_test"] = int(tags["best_t_test"])
        section["tune_t_test"] = False
        return tree, ({"best_t_test": int(section["t_test"])} if "t_test" in section else {})

    def selection_tags(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """The t_test a fit chose on validation (`service.final --from RUN_ID` reads it back)."""
        return {"best_t_test": int(metrics["val/best_t_test"])} if "val/best_t_test" in metrics else {}

    def trial_overrides(self, space: Any, sampled: Mapping[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        """The sampled params plus the trial's t_test grid: the space's values below its T (sampled or the base's)."""
        if space.inference is None:
            return dict(sampled)
        T = int(sampled[T_KEY]) if T_KEY in sampled else build_config(TDSMConfig, base).diffusion.num_train_timesteps
        grid = sorted({t for t in space.inference.t_test if t < T})
        if not grid:
            raise InputError(f"inference.t_test={space.inference.t_test} has no value < T={T} "
                             "(t_test must be < diffusion.num_train_timesteps)")
        return {**sampled, "eval.t_test_grid": grid, "eval.t_test": grid[len(grid) // 2], "eval.tune_t_test": True}

    def check_space(self, space: Any, base: dict[str, Any], path: Path) -> None:
        """Some t_test below the base T (when T is not searched); no negative t_test."""
        if space.inference is None:
            return
        if T_KEY not in space.params:
            T = build_config(TDSMConfig, base).diffusion.num_train_timesteps
            if not any(t < T for t in space.inference.t_test):
                raise InputError(f"{path}: inference.t_test={space.inference.t_test} has no value < T={T}")
        bad = [t for t in space.inference.t_test if t < 0]
        if bad:
            raise InputError(f"{path}: inference.t_test values {bad} must be >= 0")
