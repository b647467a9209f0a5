"""Catalogue of checkpoints of the right kind with the wrong contents (issue 22 §2): a `last.pt` or `best.pt` written
by this run, then edited. Each is refused before use with one line naming the file and the entry, never resumed
(step 10**9 / -5 / 3.5), scored (NaN weights gave chance accuracy and exit 0) or a traceback (shapes, keys, an empty
optimizer state, a bad RNG state, `step='abc'`).

Loaders exercised: the TDSM resume (`fit_tdsm` on a run dir), `tdsm_fit.load_best` (service.run after training),
the CoCoDiff resume and `load_classifier` (its best.pt), the encoder resume and `load_encoder`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from trainers import cocodiff_classifier, cocodiff_fit, encoder_fit, tdsm_fit
from trainers.config import build_config
from trainers.configs import CoCoDiffConfig, EncoderConfig
from trainers.data import FeatureSplit
from trainers.errors import InputError
from trainers.text import TextFeatures
from trainers.tracking import ListReporter

pytestmark = pytest.mark.usefixtures("one_thread")

TDSM_CFG = {"train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2}


def tdsm_inputs():
    g = torch.Generator().manual_seed(0)
    train = FeatureSplit(torch.randn(8, 16, generator=g), torch.arange(2).repeat(4))
    val = FeatureSplit(torch.randn(4, 16, generator=g), torch.tensor([2, 3, 2, 3]))
    text = TextFeatures(torch.randn(4, 12, generator=g), torch.randn(4, 4, 10, generator=g))
    return train, val, text


def fit(run_dir: Path, reporter=None):
    train, val, text = tdsm_inputs()
    return tdsm_fit.fit_tdsm(tiny_config(**TDSM_CFG), train, [0, 1], val, [2, 3], text, reporter or ListReporter(),
                             run_dir, progress=False)


@pytest.fixture(scope="module")
def tdsm_run(tmp_path_factory) -> Path:
    """A finished 4-step run dir (last.pt at step 4, best.pt), written once; each test edits a copy."""
    run_dir = tmp_path_factory.mktemp("tdsm") / "run"
    fit(run_dir)
    return run_dir


def edit(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def first_weight(state, key="model") -> str:
    return next(k for k, v in state[key].items() if v.is_floating_point() and v.dim() == 2)


def _set(key, value):
    return lambda s: s.__setitem__(key, value)


LAST_CASES = {
    "step_huge": ("step", _set("step", 10**9), "1000000000 is outside 0..4 (train.steps)"),
    "step_negative": ("step", _set("step", -5), "outside"),
    "step_float": ("step", _set("step", 3.5), "float"),
    "step_string": ("step", _set("step", "abc"), "str"),
    "weights_nan": ("model", lambda s: s["model"][first_weight(s)].fill_(float("nan")), "NaN"),
    "weights_shape": ("model", lambda s: s["model"].__setitem__(first_weight(s), torch.zeros(3, 3)), "shape"),
    "weights_extra_key": ("model", lambda s: s["model"].__setitem__("extra.weight", torch.zeros(1)), "unexpected"),
    "weights_missing_key": ("model", lambda s: s["model"].pop(first_weight(s)), "missing"),
    "extra_top_level_key": ("surprise", _set("surprise", 1), "unexpected"),
    "optimizer_empty": ("optimizer", _set("optimizer", {}), "optimizer state"),
    "optimizer_shape": ("optimizer", lambda s: s["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(2)),
                        "shape"),
    "optimizer_nan": ("optimizer", lambda s: s["optimizer"]["state"][0]["exp_avg_sq"].fill_(float("nan")), "NaN"),
    "torch_rng_short": ("torch_rng", _set("torch_rng", torch.zeros(5, dtype=torch.uint8)), "RNG state"),
    "generator_string": ("generator", _set("generator", "abc"), "RNG state"),
    "best_string": ("best", _set("best", "x"), "expected a number"),
}


@pytest.mark.parametrize("case", LAST_CASES)
def test_an_edited_tdsm_last_pt_is_refused_naming_the_entry(tdsm_run, tmp_path, case):
    entry, change, expected = LAST_CASES[case]
    run_dir = tmp_path / "run"
    shutil.copytree(tdsm_run, run_dir)
    edit(run_dir / tdsm_fit.LAST, change)
    reporter = ListReporter()
    with pytest.raises(InputError) as info:
        fit(run_dir, reporter)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{run_dir / tdsm_fit.LAST}: entry '{entry}': "), message
    assert expected in message, message
    assert not reporter.metrics                                     # refused before any step or evaluation


@pytest.mark.parametrize("case, change, entry", [
    ("nan", lambda s: [v.fill_(float("nan")) for v in s["model"].values() if v.is_floating_point()], "model"),
    ("inf", lambda s: s["model"][first_weight(s)].fill_(float("inf")), "model"),
    ("shape", lambda s: s["model"].__setitem__(first_weight(s), torch.zeros(1)), "model"),
    ("step", _set("step", 10**9), "step"),
    ("metrics", _set("metrics", ["x"]), "metrics"),
])
def test_an_edited_tdsm_best_pt_is_refused_before_scoring_and_on_resume(tdsm_run, tmp_path, case, change, entry):
    """service.run loads best.pt to score the unseen classes: NaN weights scored chance and exited 0."""
    run_dir = tmp_path / "run"
    shutil.copytree(tdsm_run, run_dir)
    edit(run_dir / tdsm_fit.BEST, change)
    model = fit(tmp_path / "fresh").model
    with pytest.raises(InputError, match=rf"^{run_dir / tdsm_fit.BEST}: entry '{entry}': "):
        tdsm_fit.load_best(run_dir, model, 4)
    with pytest.raises(InputError, match=rf"^{run_dir / tdsm_fit.BEST}: entry '{entry}': "):
        fit(run_dir)


def test_the_untouched_run_dir_still_resumes(tdsm_run, tmp_path):
    """The checks refuse edits only: the same files as written resume (here: finished, so re-evaluated)."""
    run_dir = tmp_path / "run"
    shutil.copytree(tdsm_run, run_dir)
    assert fit(run_dir).step == 4
    assert tdsm_fit.load_best(run_dir, fit(tmp_path / "fresh").model, 4)["step"] in (2, 4)


# ---------------------------------------------------------------------------------------------------------------
# CoCoDiff and the encoder: the same checks through their own loaders
# ---------------------------------------------------------------------------------------------------------------

COCO = {"backbone.encoder": "stgcn", "backbone.base_channels": 4, "backbone.units_per_stage": [1],
        "module.hidden": 16, "module.depth": 1, "module.align_dim": 8, "optim.batch_size": 4,
        "optim.warmup_steps": 1, "train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
        "train.device": "cpu", "train.precision": "fp32"}


def coco_fit(run_dir: Path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 25, 2, generator=g), torch.arange(4).repeat(2)
    fine, coarse = torch.randn(4, 12, generator=g), torch.randn(4, 10, generator=g)
    cfg = build_config(CoCoDiffConfig, {}, COCO)
    return cocodiff_fit.fit_cocodiff(cfg, x, y, x[:4], y[:4], fine, coarse, ListReporter(), run_dir, progress=False,
                                     num_classes=4)


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("coco") / "run"
    coco_fit(run_dir)
    return run_dir


@pytest.mark.parametrize("name, entry, change", [
    ("last.pt", "step", _set("step", -5)),
    ("last.pt", "best_step", _set("best_step", 10**9)),
    ("last.pt", "classifier", lambda s: s["classifier"][first_weight(s, "classifier")].fill_(float("nan"))),
    ("last.pt", "module", lambda s: s["module"].pop(next(iter(s["module"])))),
    ("last.pt", "optimizer", _set("optimizer", {"state": {}, "param_groups": []})),
    ("last.pt", "cuda_rng", _set("cuda_rng", "abc")),
    ("best.pt", "classifier", lambda s: s["classifier"][first_weight(s, "classifier")].fill_(float("nan"))),
    ("best.pt", "val_logits", _set("val_logits", torch.full((4, 4), float("nan")))),
])
def test_an_edited_cocodiff_checkpoint_is_refused_naming_the_entry(coco_run, tmp_path, name, entry, change):
    run_dir = tmp_path / "run"
    shutil.copytree(coco_run, run_dir)
    edit(run_dir / name, change)
    with pytest.raises(InputError, match=rf"^{run_dir / name}: entry '{entry}': "):
        coco_fit(run_dir)


def test_a_cocodiff_best_pt_with_nan_weights_is_refused_by_load_classifier(coco_run, tmp_path):
    path = tmp_path / "best.pt"
    shutil.copy(coco_run / "best.pt", path)
    edit(path, lambda s: [v.fill_(float("nan")) for v in s["classifier"].values() if v.is_floating_point()])
    with pytest.raises(InputError, match=rf"^{path}: entry 'classifier': .* holds NaN or inf"):
        cocodiff_classifier.load_classifier(path)
    cocodiff_classifier.load_classifier(coco_run / "best.pt")                        # the untouched one loads


def test_encoder_checkpoints_are_checked_too(tmp_path):
    cfg = EncoderConfig(name="stgcn", base_channels=4, units_per_stage=[1], batch_size=4, steps=2,
                        checkpoint_every=2, precision="fp32", device="cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 25, 2, generator=g), torch.arange(4).repeat(2)
    encoder_fit.fit_encoder(cfg, x, y, [0, 1, 2, 3], ListReporter(), tmp_path / "run", progress=False)
    last, enc = tmp_path / "run" / encoder_fit.LAST, tmp_path / "run" / encoder_fit.ENCODER
    edit(last, _set("step", 3.5))
    with pytest.raises(InputError, match=rf"^{last}: entry 'step': 3.5 is a float"):
        encoder_fit.fit_encoder(cfg, x, y, [0, 1, 2, 3], ListReporter(), tmp_path / "run", progress=False)
    edit(enc, lambda s: s["model"][first_weight(s)].fill_(float("nan")))
    with pytest.raises(InputError, match=rf"^{enc}: entry 'model': .* holds NaN or inf"):
        encoder_fit.load_encoder(enc)
