"""Config: unknown keys, --set parsing, derived/validated values, model presets, YAML files, every field read."""

from __future__ import annotations

import ast
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from trainers.config import build_config, dump_yaml, flatten, load_yaml, parse_override, to_plain
from trainers.configs import MODEL_PRESETS, TDSMConfig
from trainers.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def build(base=None, **overrides) -> TDSMConfig:
    return build_config(TDSMConfig, base or {}, overrides)


def error_of(base=None, **overrides) -> str:
    with pytest.raises(InputError) as err:
        build(base, **overrides)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------------
# Unknown keys, --set
# ----------------------------------------------------------------------------------------------

def test_unknown_nested_key_names_dotted_key():
    assert "'optim.lrr'" in error_of({"optim": {"lrr": 1e-3}})
    assert "'optim.lrr'" in error_of(**{"optim.lrr": 1e-3})
    assert "'data.synthetic.noize'" in error_of(**{"data.synthetic.noize": 0.1})


def test_unknown_top_level_key_names_it():
    assert "'optimizer'" in error_of({"optimizer": {"lr": 1e-3}})
    assert "'foo'" in error_of(foo=1)


def test_value_where_section_expected_is_one_line_error():
    assert "'optim'" in error_of({"optim": 3}, **{"optim.lr": 1e-3})


@pytest.mark.parametrize("item, expected", [
    ("optim.lr=3e-4", ("optim.lr", 3e-4)),
    ("optim.lr=1E-3", ("optim.lr", 1e-3)),
    ("train.steps=1e3", ("train.steps", 1000.0)),
    ("optim.lr=0.001", ("optim.lr", 0.001)),
    ("train.steps=200", ("train.steps", 200)),
    ("train.seed=-3", ("train.seed", -3)),
    ("eval.t_test_grid=[5, 10, 25]", ("eval.t_test_grid", [5, 10, 25])),
    ("data.unseen=[1e0, 2]", ("data.unseen", [1.0, 2])),
    ("eval.t_test_grid=null", ("eval.t_test_grid", None)),
    ("text.encoder=open_clip:ViT-B-32:none", ("text.encoder", "open_clip:ViT-B-32:none")),
    ("data.features_dir=/data/shift_ntu60_5_r", ("data.features_dir", "/data/shift_ntu60_5_r")),
    ("text.encoder=e5", ("text.encoder", "e5")),
    (" train.device = cpu", ("train.device", "cpu")),
    ("text.class_names=a=b.txt", ("text.class_names", "a=b.txt")),
])
def test_parse_override(item, expected):
    assert parse_override(item) == expected


def test_parse_override_needs_equals():
    with pytest.raises(InputError, match="optim.lr"):
        parse_override("optim.lr")


def test_overrides_reach_the_config():
    cfg = build(**dict(parse_override(s) for s in ["optim.lr=3e-4", "train.steps=1e3", "data.unseen=[1, 2]",
                                                    "eval.t_test_grid=[5, 10]"]))
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 1000 and cfg.data.unseen == [1, 2]
    assert cfg.eval.t_test_grid == [5, 10, 25]


def test_wrong_type_names_key_and_value():
    msg = error_of(**{"optim.lr": "fast"})
    assert "'optim.lr'" in msg and "'fast'" in msg


# ----------------------------------------------------------------------------------------------
# Derived and coupled values
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t_test, T", [(50, 50), (60, 50), (10, 10)])
def test_t_test_must_be_below_T(t_test, T):
    msg = error_of(**{"eval.t_test": t_test, "diffusion.num_train_timesteps": T})
    assert "eval.t_test" in msg and "diffusion.num_train_timesteps" in msg


@pytest.mark.parametrize("grid", [[5, 50], [-1, 5], [100]])
def test_grid_values_out_of_range(grid):
    msg = error_of(**{"eval.t_test_grid": grid})
    assert "eval.t_test_grid" in msg


def test_default_grid_spans_schedule_and_holds_t_test():
    cfg = build(**{"eval.t_test": 7})
    grid = cfg.eval.t_test_grid
    assert 7 in grid and grid == sorted(set(grid)) and min(grid) >= 1 and max(grid) < 50 and len(grid) >= 9


def test_explicit_grid_always_holds_t_test():
    # The headline metric is read at t_test: a grid without it would fail at the end of training.
    assert build(**{"eval.t_test_grid": [10, 5, 10]}).eval.t_test_grid == [5, 10, 25]
    assert build(**{"eval.t_test_grid": []}).eval.t_test_grid == [25]


def test_single_step_schedule():
    cfg = build(**{"diffusion.num_train_timesteps": 1, "eval.t_test": 0})
    assert cfg.eval.t_test_grid == [0]


# ----------------------------------------------------------------------------------------------
# Model presets
# ----------------------------------------------------------------------------------------------

def sizes(cfg: TDSMConfig) -> dict:
    return {k: getattr(cfg.model, k) for k in MODEL_PRESETS["tiny"]}


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_preset_fills_sizes(preset):
    cfg = build(**{"model.preset": preset})
    assert cfg.model.preset == preset and sizes(cfg) == MODEL_PRESETS[preset]


def test_default_sizes_are_the_default_preset():
    default = build().model.preset
    assert default in MODEL_PRESETS and sizes(build()) == MODEL_PRESETS[default]
    assert build({"model": {"depth": MODEL_PRESETS[default]["depth"]}}).model.preset == default


def test_explicit_sizes_win_and_preset_becomes_custom():
    cfg = build(**{"model.preset": "tiny", "model.depth": 3})
    assert cfg.model.preset == "custom"
    assert sizes(cfg) == {**MODEL_PRESETS["tiny"], "depth": 3}


def test_explicit_sizes_equal_to_preset_keep_its_name():
    assert build(**{"model.preset": "tiny", "model.hidden_size": 64}).model.preset == "tiny"


def test_preset_over_dumped_yaml_gives_preset_sizes():
    dumped = yaml.safe_load(dump_yaml(build(**{"model.preset": "tiny", "model.depth": 3})))
    assert dumped["model"]["preset"] == "custom"
    assert sizes(build(dumped)) == {**MODEL_PRESETS["tiny"], "depth": 3}
    cfg = build(dumped, **{"model.preset": "paper"})
    assert cfg.model.preset == "paper" and sizes(cfg) == MODEL_PRESETS["paper"]
    # Sizes given next to the new preset still win.
    cfg = build(dumped, **{"model.preset": "paper", "model.depth": 2})
    assert cfg.model.preset == "custom" and cfg.model.hidden_size == 768 and cfg.model.depth == 2


@pytest.mark.parametrize("hidden, heads", [(100, 3), (64, 5)])
def test_num_heads_must_divide_hidden_size(hidden, heads):
    msg = error_of(**{"model.hidden_size": hidden, "model.num_heads": heads})
    assert "model.num_heads" in msg and "model.hidden_size" in msg


# ----------------------------------------------------------------------------------------------
# YAML files
# ----------------------------------------------------------------------------------------------

def test_dump_round_trips():
    cfg = build(**{"model.preset": "tiny", "optim.lr": 3e-4, "data.unseen": [1, 2], "eval.t_test_grid": [5]})
    assert build(yaml.safe_load(dump_yaml(cfg))) == cfg
    assert flatten(to_plain(cfg))["optim.lr"] == 3e-4


def test_yaml_missing_file_names_it(tmp_path):
    with pytest.raises(InputError, match="nope.yaml: config file not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: {lr: 1e-3\ntrain: [\n")
    with pytest.raises(InputError) as err:
        load_yaml(path)
    assert str(err.value).startswith(f"{path}: not valid YAML") and "\n" not in str(err.value)


def test_yaml_unreadable_file_names_it(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01")
    for path in (tmp_path, tmp_path / "binary.yaml"):
        with pytest.raises(InputError) as err:
            load_yaml(path)
        assert str(err.value).startswith(f"{path}: unreadable config file")


def test_yaml_not_a_mapping_names_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="list.yaml: expected a YAML mapping"):
        load_yaml(path)


def test_yaml_empty_file_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert build(load_yaml(path)) == build()


def test_yaml_reads_exponent_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\n")
    assert load_yaml(path) == {"optim": {"lr": 3e-4}}


def test_bad_key_in_yaml_file_names_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(InputError) as err:
        build_config(TDSMConfig, load_yaml(path), {"train.steps": 5}, source=path)
    assert str(err.value) == f"{path}: unknown config key 'optim.lrr'"
    # A bad key that came from an override is not blamed on the file.
    with pytest.raises(InputError) as err:
        build_config(TDSMConfig, {}, {"optim.lrr": 0.1}, source=path)
    assert str(err.value) == "unknown config key 'optim.lrr'"


# ----------------------------------------------------------------------------------------------
# Every field is read
# ----------------------------------------------------------------------------------------------

# Fields that no code outside config.py and configs.py reads, and why that is right.
NOT_READ_OUTSIDE_CONFIG = {
    "method": "a constant naming the method in dumped configs and MLflow params",
    "model.preset": "consumed by ModelConfig's own validator, which fills the size fields from it",
}


def section_type(annotation) -> type[BaseModel] | None:
    """The config section class of a field annotation, if it is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next((a for a in typing.get_args(annotation) if section_type(a)), None)
    return None


def leaf_fields(cls: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in cls.model_fields.items():
        sub = section_type(field.annotation)
        out += leaf_fields(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return out


def attribute_names() -> set[str]:
    """Every `x.name` attribute access in the non-config code under trainers/ and service/ (comments excluded)."""
    names = set()
    for folder in ("trainers", "service"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in ("config.py", "configs.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute):
                    names.add(node.attr)
    return names


def test_leaf_walk_sees_nested_sections():
    leaves = leaf_fields(TDSMConfig)
    assert "optim.lr" in leaves and "data.synthetic.samples_per_class" in leaves and "data.synthetic" not in leaves
    assert set(leaves) == set(flatten(to_plain(build())))


def test_every_config_field_is_read():
    read = attribute_names()
    unread = [key for key in leaf_fields(TDSMConfig)
              if key.rsplit(".", 1)[-1] not in read and key not in NOT_READ_OUTSIDE_CONFIG]
    assert not unread, f"config fields that no code reads: {unread}"


def test_allow_list_is_current():
    assert set(NOT_READ_OUTSIDE_CONFIG) <= set(leaf_fields(TDSMConfig))
