"""CoCoDiff through `service/`, in process: the embedded default (the generated 46-class set, prepared and cached),
the one-line refusals and --print-config of `service.run cocodiff`, the search space and named splits, and what
`service.sweep cocodiff` refuses before Ray starts. `service.run cocodiff` and `service.final` end to end and a real
smoke sweep: tests/integration/test_cocodiff_cli.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from service.data.generated import prepare_cocodiff_inputs, synthetic_root
from service.methods import METHODS
from service.methods.search_space import check_against_config, load_search_space
from trainers.config import build_config, to_plain
from trainers.configs import CoCoDiffConfig
from trainers.errors import InputError
from trainers.skeleton.synthetic import NUM_CLASSES as SYNTHETIC_CLASSES
from trainers.skeleton.synthetic import action_catalogue

ROOT = Path(__file__).resolve().parents[2]
SPACE = ROOT / "search_spaces" / "cocodiff.yaml"
SPLITS = ROOT / "search_spaces" / "cocodiff_splits.yaml"


# ----------------------------------------------------------------------------------------------
# The embedded default: the generated set, prepared once under $SKELDIFF_CACHE/synthetic
# ----------------------------------------------------------------------------------------------

def test_synthetic_default_is_the_generated_46_class_set_prepared_once():
    cfg = build_config(CoCoDiffConfig, {}, {"data.synthetic.per_class": 4, "module.enabled": False})
    data, names, fine, coarse = prepare_cocodiff_inputs(cfg)
    assert data.num_classes == SYNTHETIC_CLASSES == 46 and names == [c.name for c in action_catalogue()]
    assert fine is None and coarse is None
    assert data.train_x.shape[1:] == (3, 64, 25, 2)                                # NTU layout, 64 frames
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == 4 * 46
    assert len(data.test_y) > 0 and len(data.val_y) > 0
    (folder,) = [p for p in synthetic_root().iterdir() if p.name.startswith("prepared-") and "raw-4x46-s0" in p.name]
    stamp = (folder / "data.npy").stat().st_mtime_ns
    again = prepare_cocodiff_inputs(cfg)[0]
    assert (folder / "data.npy").stat().st_mtime_ns == stamp and torch.equal(again.test_x, data.test_x)
    # X-View splits the same set by camera instead of performer
    xview = prepare_cocodiff_inputs(build_config(CoCoDiffConfig, to_plain(cfg), {"data.benchmark": "ntu60-xview"}))[0]
    assert len(xview.test_y) != len(data.test_y)


def test_shipped_configs_are_the_embedded_default_and_the_paper_plan():
    default = build_config(CoCoDiffConfig, yaml.safe_load((ROOT / "service/configs/cocodiff_default.yaml").read_text()))
    assert default == CoCoDiffConfig()
    paper = build_config(CoCoDiffConfig, yaml.safe_load((ROOT / "service/configs/cocodiff_paper.yaml").read_text()),
                         {"data.prepared_dir": "/data/ntu60"})
    assert (paper.backbone.encoder, paper.backbone.base_channels,
            paper.backbone.units_per_stage) == ("ctrgcn", 64, [4, 3, 3])
    assert (paper.module.hidden, paper.module.depth, paper.optim.batch_size, paper.data.num_classes) == (512, 3, 64, 60)


def test_named_splits_cover_the_synthetic_default_and_every_benchmark(monkeypatch):
    from service.data.splits import load_splits
    from trainers.skeleton.splits import BENCHMARKS

    monkeypatch.setenv("SKELDIFF_DATA", "/data")
    table = yaml.safe_load(SPLITS.read_text())
    assert {"synthetic-skeleton", *BENCHMARKS} <= set(table)
    assert {"synthetic-kinetics", "synthetic-pku-xsub", "synthetic-pku-xview"} <= set(table)
    for name, overrides in load_splits(SPLITS, list(table)):
        cfg = build_config(CoCoDiffConfig, {}, overrides)
        assert cfg.data.benchmark == (name if name in BENCHMARKS else cfg.data.benchmark)
        if cfg.data.source == "prepared":
            family = BENCHMARKS[name].family
            assert str(cfg.data.prepared_dir).startswith(f"/data/prepared/{'ntu' if family == 'ntu' else family}")
    assert build_config(CoCoDiffConfig, {}, dict(load_splits(SPLITS, ["synthetic-skeleton"]))["synthetic-skeleton"]) \
        == CoCoDiffConfig()                                                            # the embedded default


# ----------------------------------------------------------------------------------------------
# service.run cocodiff in process: its refusals and --print-config
# ----------------------------------------------------------------------------------------------

TDSM_FLAGS = "its zero-shot data shortcuts and evaluation draws"


@pytest.mark.parametrize("args,message", [
    (["--features", "feats"], f"--features: tdsm only ({TDSM_FLAGS}), not a cocodiff flag"),
    (["--unseen", "ru.npy", "--val-unseen", "5"],
     f"--unseen, --val-unseen: tdsm only ({TDSM_FLAGS}), not a cocodiff flag"),
    (["--set", "module.w_dif=1"], "unknown config key 'module.w_dif'"),
])
def test_run_cocodiff_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch, args, message):
    from service.run import main

    monkeypatch.chdir(tmp_path)
    assert main(["cocodiff", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (tmp_path / "runs").exists()


def test_print_config_is_a_cocodiff_config(capsys):
    from service.run import main

    assert main(["cocodiff", "--print-config", "--set", "module.w_gen=0.25"]) == 0
    cfg = build_config(CoCoDiffConfig, yaml.safe_load(capsys.readouterr().out))
    assert cfg.module.w_gen == 0.25 and cfg.data.source == "synthetic"


# ----------------------------------------------------------------------------------------------
# Search space
# ----------------------------------------------------------------------------------------------

def test_shipped_cocodiff_space_is_valid():
    space = load_search_space(SPACE)
    assert space.method == "cocodiff" and space.metric == "val/top1" and space.mode == "max"
    assert space.inference is None
    assert {"module.w_diff", "module.w_gen", "module.w_coarse", "module.num_train_timesteps",
            "module.beta_schedule", "optim.lr"} <= set(space.params)
    base = to_plain(CoCoDiffConfig())
    check_against_config(space, CoCoDiffConfig, base, SPACE)
    smoke_base = build_config(CoCoDiffConfig, base, space.smoke.config).model_dump(mode="json")
    check_against_config(space.for_smoke(), CoCoDiffConfig, smoke_base, SPACE)
    assert build_config(CoCoDiffConfig, smoke_base).backbone.units_per_stage == [1, 1, 1]


def test_trial_overrides_without_inference_are_the_sampled_params():
    space = load_search_space(SPACE)
    sampled = {"module.w_diff": 0.7, "module.num_train_timesteps": 50}
    assert METHODS["cocodiff"].trial_overrides(space, sampled, {}) == sampled


def write(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_cocodiff_space_rejects_an_inference_grid(tmp_path):
    path = write(tmp_path, {"method": "cocodiff", "params": {"optim.lr": {"choice": [1e-3]}},
                            "inference": {"t_test": [5]}})
    with pytest.raises(InputError, match="cocodiff has no inference-time parameters"):
        load_search_space(path)


def test_tdsm_space_still_requires_its_grid(tmp_path):
    path = write(tmp_path, {"method": "tdsm", "params": {"optim.lr": {"choice": [1e-3]}}})
    with pytest.raises(InputError, match="inference: required for method tdsm"):
        load_search_space(path)
    assert load_search_space(ROOT / "search_spaces" / "tdsm.yaml").metric == "val/zsl_top1"


@pytest.mark.parametrize("key,value,message", [
    ("module.w_dif", {"choice": [1.0]}, r"params\.module\.w_dif.*unknown config key 'module\.w_dif'"),
    ("module.beta_schedule", {"choice": ["cosine", "sigmoid"]}, r"module\.beta_schedule"),
    ("module.w_gen", {"uniform": [-1.0, 1.0]}, r"module\.w_gen"),
    ("data.synthetic.per_class", {"choice": [8, 16]}, "per sweep"),
])
def test_bad_cocodiff_params_fail_naming_the_key(tmp_path, key, value, message):
    path = write(tmp_path, {"method": "cocodiff", "params": {key: value}})
    with pytest.raises(InputError, match=message):
        check_against_config(load_search_space(path), CoCoDiffConfig, to_plain(CoCoDiffConfig()), path)


@pytest.mark.parametrize("args,message", [
    (["--splits", "synthetic-u5"], "--splits synthetic-u5: unknown split"),
    (["--space", str(ROOT / "search_spaces" / "tdsm.yaml")], "a search space for tdsm, not cocodiff"),
])
def test_sweep_refuses_what_cocodiff_cannot_do_before_ray_starts(capsys, args, message):
    from service.sweep import main

    assert main(["cocodiff", *args]) == 2
    assert message in capsys.readouterr().err
