"""Catalogue of hostile numbers and YAML (issue 22 §3, §4 alias bombs): every numeric config field is bounded
(finite, in range, an int where it counts), a search space ranks only on a validation metric its method reports,
and no YAML alias expands beyond a small size. Each is one `error:` line naming the key, exit code 2."""

from __future__ import annotations

import time
import typing
from pathlib import Path

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from service.cli.run import main as run_main
from service.data.splits import load_splits
from service.methods.search_space import check_against_config, load_search_space
from trainers.config import MAX_YAML_NODES, UNBOUNDED_ABOVE, build_config, load_yaml, parse_override
from trainers.configs import CoCoDiffConfig, EncoderConfig, TDSMConfig
from trainers.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def one_line_error(cls, overrides) -> str:
    with pytest.raises(InputError) as info:
        build_config(cls, {}, overrides)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message
    return message


# ---------------------------------------------------------------------------------------------------------------
# §3 numbers that pass a type check and break the run
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, expected", [
    ("train.threads", 100000, "less than or equal to 1024"),                  # segfaulted in OpenMP
    ("model.mlp_ratio", float("inf"), "finite number"),
    ("model.mlp_ratio", float("nan"), "finite number"),
    ("optim.lr", float("inf"), "finite number"),
    ("train.seed", 1e20, "train.seed"),                                       # torch.manual_seed overflowed
    ("train.seed", 2**32, "less than or equal to 4294967295"),
    ("data.val_seed", -1, "greater than or equal to 0"),
    ("eval.seed", -1, "greater than or equal to 0"),
    ("optim.batch_size", 100000000, "less than or equal to 65536"),
    ("eval.batch_size", 10**9, "less than or equal to 65536"),
    ("train.steps", 10**12, "less than or equal to 100000000"),
    ("diffusion.num_train_timesteps", 10**9, "less than or equal to 100000"),
    ("model.hidden_size", 10**7, "less than or equal to 16384"),
    ("data.val_unseen", 0, "greater than or equal to 1"),
    ("data.val_unseen", [1, -2], "greater than or equal to 0"),
    ("data.unseen", [-1], "greater than or equal to 0"),
    ("eval.t_test_grid", [-1, 10], "greater than or equal to 0"),
    ("data.synthetic.noise", float("inf"), "finite number"),
])
def test_tdsm_numbers_out_of_bounds_are_one_line(key, value, expected):
    message = one_line_error(TDSMConfig, {key: value})
    assert f"config key '{key}" in message and expected in message, message


@pytest.mark.parametrize("key, value, expected", [
    ("train.threads", 100000, "less than or equal to 1024"),
    ("module.w_diff", float("inf"), "finite number"),
    ("module.kl_temperature", float("nan"), "finite number"),
    ("data.val_seed", -1, "greater than or equal to 0"),
    ("optim.batch_size", 100000000, "less than or equal to 65536"),
    ("backbone.units_per_stage", [1, 10**6], "less than or equal to 64"),
])
def test_cocodiff_numbers_out_of_bounds_are_one_line(key, value, expected):
    message = one_line_error(CoCoDiffConfig, {key: value})
    assert f"config key '{key}" in message and expected in message, message


@pytest.mark.parametrize("key, value", [("seed", 1e20), ("lr", float("inf")), ("batch_size", 10**8),
                                        ("units_per_stage", [0]), ("weight_decay", float("nan"))])
def test_encoder_numbers_out_of_bounds_are_one_line(key, value):
    assert f"config key '{key}" in one_line_error(EncoderConfig, {key: value})


def _numeric_fields(cls: type[BaseModel], prefix: str = ""):
    """(dotted key, annotation, constraints) of every int/float a config holds, lists' elements included."""
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _numeric_fields(ann, f"{prefix}{name}.")
            continue
        yield from _numeric_leaves(f"{prefix}{name}", ann, field.metadata)


def _numeric_leaves(key, ann, metadata):
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        extra = [c for m in ann.__metadata__ for c in (m.metadata if isinstance(m, FieldInfo) else [m])]
        yield from _numeric_leaves(key, args[0], [*metadata, *extra])
    elif ann in (int, float):
        yield key, ann, metadata
    elif origin is list:
        yield from _numeric_leaves(f"{key}[]", args[0], [])
    elif args:                                          # a union: each member on its own
        for arg in args:
            yield from _numeric_leaves(key, arg, metadata)


@pytest.mark.parametrize("cls", [TDSMConfig, CoCoDiffConfig, EncoderConfig])
def test_every_numeric_config_field_has_both_bounds(cls):
    """Fix the class, not one case: a new int/float field without a lower and an upper bound fails here."""
    missing = []
    for key, _, metadata in _numeric_fields(cls):
        low = any(isinstance(m, (Ge, Gt)) for m in metadata)
        high = any(isinstance(m, (Le, Lt)) for m in metadata) or key.rsplit(".", 1)[-1] in UNBOUNDED_ABOVE
        if not (low and high):
            missing.append(key)
    assert not missing, f"numeric config fields without both bounds: {missing}"


def test_defaults_and_shipped_configs_stay_valid():
    for cls in (TDSMConfig, CoCoDiffConfig):
        build_config(cls, {}, {})
    EncoderConfig()
    for path in (REPO / "service" / "configs").glob("*.yaml"):
        tree = load_yaml(path)
        if path.name.startswith("cocodiff"):        # the paper config names its data on the command line
            build_config(CoCoDiffConfig, tree, {"data.prepared_dir": "/data/ntu60"}, path)
        else:
            build_config(TDSMConfig, tree, {}, path)


def test_the_run_cli_refuses_a_bad_number_before_anything_starts(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_main(["tdsm", "--set", "train.threads=100000", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: config key 'train.threads': Input should be less than or equal to 1024 (got 100000)"]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# §3 search spaces: finite range ends, ranked only on a validation metric the method reports
# ---------------------------------------------------------------------------------------------------------------

def space_file(tmp_path, method="tdsm", params=None, **top) -> Path:
    space = yaml.safe_load((REPO / "search_spaces" / f"{method}.yaml").read_text())
    space.update(top)
    space["params"].update(params or {})
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.parametrize("dist", [{"uniform": [0.0, float("inf")]}, {"loguniform": [1e-5, float("inf")]},
                                  {"uniform": [float("nan"), 1.0]}, {"uniform": [float("-inf"), 1.0]}])
def test_search_space_range_ends_must_be_finite(tmp_path, dist):
    """`.inf` used to pass skeldiff's validation and fail inside Ray after the sweep had started."""
    path = space_file(tmp_path, params={"loss.margin": dist})
    with pytest.raises(InputError, match=r"space.yaml: key 'params.loss.margin.*finite number"):
        load_search_space(path)


def test_a_choice_of_inf_fails_against_the_config(tmp_path):
    path = space_file(tmp_path, params={"model.mlp_ratio": {"choice": [2.0, float("inf")]}})
    space = load_search_space(path)
    with pytest.raises(InputError, match=r"params.model.mlp_ratio=inf: config key 'model.mlp_ratio'.*finite"):
        check_against_config(space, TDSMConfig, {}, path)


@pytest.mark.parametrize("method, metric", [("tdsm", "test/zsl_top1"), ("tdsm", "val/zsl_top1_std_typo"),
                                            ("tdsm", "zsl_top1"), ("cocodiff", "test/top1"),
                                            ("cocodiff", "val/zsl_top1")])
def test_a_search_space_ranks_only_on_a_reported_validation_metric(tmp_path, method, metric):
    path = space_file(tmp_path, method, metric=metric)
    with pytest.raises(InputError) as info:
        load_search_space(path)
    assert f"metric '{metric}': trials of {method} can only be ranked on a validation metric" in str(info.value)


@pytest.mark.parametrize("method, metric", [("tdsm", "val/zsl_top1_ensemble"), ("cocodiff", "val/top5")])
def test_other_reported_validation_metrics_may_be_ranked_on(tmp_path, method, metric):
    assert load_search_space(space_file(tmp_path, method, metric=metric)).metric == metric


# ---------------------------------------------------------------------------------------------------------------
# §4 YAML alias bombs: refused on the composed graph, before anything is built or formatted
# ---------------------------------------------------------------------------------------------------------------

BOMB = "\n".join(['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
                  *[f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)],
                  "optim:", "  lr: *i", ""])


def test_a_billion_laughs_config_is_refused_at_once(tmp_path):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    start = time.monotonic()
    with pytest.raises(InputError) as info:
        load_yaml(tmp_path / "bomb.yaml")
    assert time.monotonic() - start < 2
    assert str(info.value).startswith(f"{tmp_path / 'bomb.yaml'}: aliases expand to more than {MAX_YAML_NODES:,}")


def test_a_recursive_alias_is_refused(tmp_path):
    (tmp_path / "loop.yaml").write_text("a: &a [1, *a]\n")
    with pytest.raises(InputError, match="loop.yaml: an alias on line 1 contains itself"):
        load_yaml(tmp_path / "loop.yaml")


def test_the_run_cli_refuses_a_bomb_config_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bomb.yaml").write_text(BOMB)
    start = time.monotonic()
    assert run_main(["tdsm", "--config", str(tmp_path / "bomb.yaml"), "--no-progress"]) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "aliases expand" in err[0]


def test_a_bomb_in_set_or_a_splits_file_is_refused(tmp_path):
    flow = "[" + ", ".join(["&a [1,1,1,1,1,1,1,1,1,1]"] + ["[" + ",".join(["*a"] * 10) + "]"] * 3) + "]"
    small = parse_override("optim.lr=" + flow)                       # 1 + 10 + 3 * 10 * 11 nodes: allowed
    assert isinstance(small[1], list)
    deep = "&a [1,1,1,1,1,1,1,1,1,1]"
    for i in range(6):
        deep = f"&{chr(98 + i)} [" + ",".join([deep if j == 0 else "*" + chr(97 + i) for j in range(10)]) + "]"
    with pytest.raises(InputError, match="--set 'optim.lr': aliases expand"):
        parse_override("optim.lr=" + deep)
    (tmp_path / "splits.yaml").write_text(BOMB)
    with pytest.raises(InputError, match="splits.yaml: aliases expand"):
        load_splits(tmp_path / "splits.yaml", ["a"])


def test_an_error_never_formats_a_large_input_whole():
    """A value far past any bound (50,000 numbers for one float) is quoted in a few characters."""
    message = one_line_error(TDSMConfig, {"optim.lr": list(range(50_000))})
    assert "config key 'optim.lr'" in message and "..." in message and len(message) < 200
