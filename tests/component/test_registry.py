"""The registered TDSM pyfunc: a sample is classified the same whatever batch, and wherever in it, it arrives."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config

from trainers.config import to_plain
from trainers.tdsm_fit import build_model
from trainers.text import TextFeatures

FEATURE_DIM, CLASSES = 16, [3, 5, 8, 11, 13, 17, 19, 23]


@pytest.fixture(scope="module")
def pyfunc(tmp_path_factory):
    """A loaded ZeroShotTDSM over a perturbed tiny denoiser, one noise draw: its answers hinge on the noise."""
    pytest.importorskip("mlflow")
    from service.tracking.registry import ZeroShotTDSM

    gen = torch.Generator().manual_seed(0)
    cfg = tiny_config(**{"eval.noise_draws": 1, "eval.t_test": 40, "eval.t_test_grid": [40]})
    text = TextFeatures(torch.randn(len(CLASSES), 12, generator=gen), torch.randn(len(CLASSES), 5, 10, generator=gen))
    model = build_model(cfg, FEATURE_DIM, text)
    with torch.no_grad():      # adaLN-Zero makes a fresh model's output zero for every class: give it a function
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    bundle = tmp_path_factory.mktemp("bundle") / "tdsm_zero_shot.pt"
    torch.save({"config": to_plain(cfg), "model": model.state_dict(), "classes": CLASSES,
                "class_names": [f"c{c}" for c in CLASSES], "feature_dim": FEATURE_DIM,
                "text_global": text.global_feats, "text_local": text.local_feats}, bundle)
    wrapper = ZeroShotTDSM()
    wrapper.load_context(SimpleNamespace(artifacts={"bundle": str(bundle)}))
    return wrapper


def test_prediction_does_not_depend_on_the_batch(pyfunc):
    x = np.random.default_rng(1).normal(size=(24, FEATURE_DIM)).astype(np.float32)
    batch = pyfunc.predict(None, x)
    assert batch.shape == (24,) and set(batch.tolist()) <= set(CLASSES)
    alone = np.array([pyfunc.predict(None, x[i:i + 1])[0] for i in range(len(x))])
    perm = np.random.default_rng(2).permutation(len(x))
    shuffled = pyfunc.predict(None, x[perm])
    assert alone.tolist() == batch.tolist()                        # alone = first in a batch of one
    assert shuffled.tolist() == batch[perm].tolist()               # every sample, at any position
    assert pyfunc.predict(None, x[::-1])[-1] == batch[0]            # the first sample, last in a reversed batch
    assert len(set(batch.tolist())) > 1                            # not a constant classifier
