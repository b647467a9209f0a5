"""Search-space validation happens before any trial starts: unknown keys, bad values, t_test >= T."""

from pathlib import Path

import pytest
import yaml

from service.methods import METHODS
from service.methods.search_space import check_against_config, load_search_space
from trainers.config import build_config, to_plain
from trainers.configs import TDSMConfig
from trainers.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def write_space(tmp_path, **changes):
    space = yaml.safe_load((REPO / "search_spaces" / "tdsm.yaml").read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if value is None:
            space[section].pop(name)
        else:
            space.setdefault(section, {})[name] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def base():
    return to_plain(TDSMConfig())


def test_shipped_spaces_are_valid():
    for path in [REPO / "search_spaces" / "tdsm.yaml"]:
        space = load_search_space(path)
        check_against_config(space, TDSMConfig, base(), path)
        smoke = space.for_smoke()
        check_against_config(smoke, TDSMConfig,
                             build_config(TDSMConfig, base(), space.smoke.config).model_dump(mode="json"), path)


def test_unknown_key_fails_naming_it(tmp_path):
    path = write_space(tmp_path, params__optim__lrr={"choice": [1e-3]})
    path.write_text(path.read_text().replace("optim__lrr", "optim.lrr"))
    space = load_search_space(path)
    with pytest.raises(InputError, match=r"params\.optim\.lrr.*unknown config key 'optim\.lrr'"):
        check_against_config(space, TDSMConfig, base(), path)


def test_bad_value_fails(tmp_path):
    path = write_space(tmp_path)
    text = path.read_text().replace("epsilon", "eps")
    path.write_text(text)
    with pytest.raises(InputError, match="diffusion.prediction_type"):
        check_against_config(load_search_space(path), TDSMConfig, base(), path)


def test_t_test_must_fit_below_every_T(tmp_path):
    path = write_space(tmp_path, inference__t_test=[20, 30])
    space = load_search_space(path)   # T choices include 10: no t_test < 10
    with pytest.raises(InputError, match=r"t_test.*T=10"):
        check_against_config(space, TDSMConfig, base(), path)


def test_data_and_text_are_not_searchable(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"method": "tdsm", "params": {"text.max_tokens": {"choice": [20, 35]}},
                                    "inference": {"t_test": [5]}}))
    with pytest.raises(InputError, match="per sweep"):
        check_against_config(load_search_space(path), TDSMConfig, base(), path)


@pytest.mark.parametrize("dist,msg", [({"uniform": [2, 1]}, "low < high"), ({"choice": []}, "at least one"),
                                      ({"choice": [1], "uniform": [0, 1]}, "exactly one"),
                                      ({"loguniform": [0, 1]}, "0 < low")])
def test_malformed_distributions(tmp_path, dist, msg):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"method": "tdsm", "params": {"optim.lr": dist}, "inference": {"t_test": [5]}}))
    with pytest.raises(InputError, match=msg):
        load_search_space(path)


def test_unknown_top_level_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"method": "tdsm", "params": {}, "inference": {"t_test": [5]}, "sceduler": 1}))
    with pytest.raises(InputError, match="sceduler"):
        load_search_space(path)


def test_trial_grid_drops_values_at_or_above_T():
    space = load_search_space(REPO / "search_spaces" / "tdsm.yaml")
    over = METHODS["tdsm"].trial_overrides(space, {"diffusion.num_train_timesteps": 10}, base())
    assert max(over["eval.t_test_grid"]) < 10 and over["eval.tune_t_test"] is True
    cfg = build_config(TDSMConfig, base(), over)
    assert cfg.eval.t_test in cfg.eval.t_test_grid
