"""The trained zero-shot chain as one object: skeleton sequences (or pooled features) and any class texts in, ranked
classes out (docs/METHODS.md §1, Inference). The MLflow pyfunc model (`service/tracking/served_tdsm.py`) and
`service.predict` are thin layers over `ZeroShotChain`.

A bundle (one torch file) holds what a chain needs besides the text encoder's weights: the TDSM config and
denoiser weights, the class texts it was trained with (strings and encoded features, a cache rather than a limit),
its default candidates (the split's unseen classes) and, when the features came from a skeldiff encoder, that
encoder's weights, config and the input layout its data was prepared in.

Scores. For each sequence and candidate the denoising error is averaged over the evaluation noise draws (the
official code's summed errors); the best class has the smallest error. `score` is its softmax over the candidates,
softmax(-D/2 * error / mean error) with D the feature width: the class posterior if the noise prediction's residual
were Gaussian with the variance of the sequence's mean error over the candidates, the classes equally likely. It
ranks exactly as the error does; it is not calibrated.

Noise. Each sequence's evaluation noise is a function of (eval.seed, the bytes of the input row as given), never
of its position in a batch: a sequence gets the same answer alone or among others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trainers.checkpoint import load_weights
from trainers.configs import EncoderConfig, TDSMConfig
from trainers.encoder_fit import encoder_from_state, extract_features
from trainers.errors import InputError, short_repr
from trainers.guards import check_model_input
from trainers.io import load_torch
from trainers.skeleton.gcn import Encoder
from trainers.skeleton.preprocess import resample
from trainers.tdsm_fit import build_model, build_schedule
from trainers.tdsm_model import TDSMDenoiser
from trainers.text import build_text_encoder
from trainers.text_encoders import TextFeatures
from trainers.zsl import sample_keyed_noise, score_candidates

# Bounds of one call: a request past them is refused with a message, not run out of memory or time.
MAX_SEQUENCES = 512           # sequences per call (split bigger batches)
MAX_FRAMES = 10_000           # raw frames per sequence before resampling (NTU's longest is ~300)
MAX_CLASSES = 1_000           # candidate classes per call
MAX_TEXT_CHARS = 1_000        # characters per class name or description
MAX_CACHED_TEXTS = 10_000     # encoded texts kept by a loaded chain (least recently used dropped first)
BUNDLE_KEYS = ("config", "model", "feature_dim", "class_names", "prompt_sets", "text_global", "text_local",
               "default_classes", "text_spec")


@dataclass(frozen=True)
class SkeletonLayout:
    """What the chain's skeleton encoder takes: (N, channels, frames, joints, bodies) sequences as
    `service.prepare` writes them (bodies padded, centred and aligned, then resampled to `frames`)."""

    channels: int
    frames: int
    joints: int
    bodies: int
    dataset: str = "ntu"                 # the reader family of the raw files it was prepared from

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.channels, self.frames, self.joints, self.bodies


@dataclass
class Ranking:
    """The answer for N sequences over C candidates: errors (N, C) draw-averaged, scores (N, C) their softmax."""

    candidates: list[str]
    errors: np.ndarray
    scores: np.ndarray

    @property
    def labels(self) -> list[str]:
        return [self.candidates[i] for i in self.errors.argmin(1)]

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """Per sequence, the k best (label, score), best first (ties: candidate order)."""
        order = np.argsort(self.errors, axis=1, kind="stable")[:, :k]                      # (N, k)
        return [[(self.candidates[j], float(self.scores[i, j])) for j in row] for i, row in enumerate(order)]


@dataclass
class ZeroShotChain:
    """A trained TDSM denoiser with its class texts and (optionally) the skeleton encoder in front of it."""

    cfg: TDSMConfig
    denoiser: TDSMDenoiser
    prompt_sets: list[list[str]]               # [class names, descriptions...] of the training class list
    text: TextFeatures                         # their encoded features, by class id
    default_classes: list[int]                 # the split's unseen classes: candidates when none are named
    text_spec: str                             # the text encoder spec new texts are encoded with
    encoder: Encoder | None = None
    encoder_cfg: EncoderConfig | None = None
    layout: SkeletonLayout | None = None
    _encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _text_encoder: Any = field(default=None, repr=False)

    def __post_init__(self):
        self.schedule = build_schedule(self.cfg)
        # The training texts seed the per-text cache, so a known class scores with exactly its training features.
        roles = len(self.prompt_sets)
        g_parts = self.text.global_feats.chunk(roles, dim=-1)
        l_parts = self.text.local_feats.chunk(roles, dim=-1)
        for r, prompts in enumerate(self.prompt_sets):
            for c, prompt in enumerate(prompts):
                self._encoded.setdefault(prompt, (g_parts[r][c], l_parts[r][c]))
        self._known = len(self._encoded)

    # ------------------------------------------------------------------------------------------------------------
    # What it takes
    # ------------------------------------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return self.prompt_sets[0]

    @property
    def feature_dim(self) -> int:
        return int(self.denoiser.skeleton_dim)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sequence's shape; -1 where any length is taken (frames are resampled)."""
        if self.layout is None:
            return (self.feature_dim,)
        c, _, v, m = self.layout.shape
        return c, -1, v, m

    def candidates(self, classes: Sequence[str] | None = None,
                   descriptions: Sequence[str] | None = None) -> tuple[list[str], TextFeatures]:
        """(names, text features (C, ...)) of the candidate classes; None: the split's unseen classes.

        Each class is its name plus one text per description role of training. A named class of the training
        list without `descriptions` keeps its training descriptions; any other class without them uses its name
        in every role. New texts are encoded once and kept."""
        names = list(classes) if classes is not None else [self.class_names[c] for c in self.default_classes]
        check_texts(names, "classes")
        if descriptions is not None and len(descriptions) > 0:
            descriptions = list(descriptions)
            check_texts(descriptions, "descriptions", allow_repeats=True)
            if len(descriptions) != len(names):
                raise InputError(f"descriptions: {len(descriptions)} given for {len(names)} classes (one per class)")
        else:
            descriptions = None
        known = {name: i for i, name in enumerate(self.class_names)}
        rows = []
        for i, name in enumerate(names):
            if descriptions is not None:
                roles = [name] + [descriptions[i]] * (len(self.prompt_sets) - 1)
            elif name in known:
                roles = [prompts[known[name]] for prompts in self.prompt_sets]
            else:
                roles = [name] * len(self.prompt_sets)
            rows.append(roles)
        self._encode_missing([t for roles in rows for t in roles])
        g = torch.stack([torch.cat([self._encoded[t][0] for t in roles]) for roles in rows])          # (C, D_g)
        loc = torch.stack([torch.cat([self._encoded[t][1] for t in roles], -1) for roles in rows])    # (C, M, D_l)
        return names, TextFeatures(g.contiguous(), loc.contiguous())

    def _encode_missing(self, texts: list[str]) -> None:
        missing = list(dict.fromkeys(t for t in texts if t not in self._encoded))
        if not missing:
            return
        if self._text_encoder is None:
            self._text_encoder = build_text_encoder(self.text_spec, layer=self.cfg.text.layer,
                                                    pooled=self.cfg.text.pooled)
        feats = self._text_encoder.encode(missing, self.cfg.text.max_tokens)
        if not (torch.isfinite(feats.global_feats).all() and torch.isfinite(feats.local_feats).all()):
            raise InputError(f"classes: the text encoder gave non-finite features for {short_repr(missing)}")
        learned = len(self._encoded) - self._known
        if learned + len(missing) > MAX_CACHED_TEXTS:          # drop the oldest new texts, never the training ones
            for key in list(self._encoded)[self._known:self._known + learned + len(missing) - MAX_CACHED_TEXTS]:
                del self._encoded[key]
        for t, g, loc in zip(missing, feats.global_feats, feats.local_feats):
            self._encoded[t] = (g, loc)

    # ------------------------------------------------------------------------------------------------------------
    # Scoring
    # ------------------------------------------------------------------------------------------------------------

    def features(self, x: np.ndarray) -> torch.Tensor:
        """Pooled features (N, D) of model input (checked here): skeleton sequences through the encoder, or
        features."""
        return self._features(check_model_input(x, self.input_shape, MAX_SEQUENCES, MAX_FRAMES))

    def _features(self, x: np.ndarray) -> torch.Tensor:
        if self.layout is None:
            return torch.from_numpy(x)
        if x.shape[2] != self.layout.frames:                   # raw lengths: resampled as prepare does
            x = np.stack([resample(s.transpose(3, 1, 2, 0), self.layout.frames).transpose(3, 1, 2, 0) for s in x])
        return extract_features(self.encoder, torch.from_numpy(np.ascontiguousarray(x)), self.encoder_cfg)

    @torch.no_grad()
    def rank(self, x: np.ndarray, classes: Sequence[str] | None = None,
             descriptions: Sequence[str] | None = None) -> Ranking:
        """Score every sequence of x against the candidates (see the module docstring)."""
        names, text = self.candidates(classes, descriptions)
        x = np.ascontiguousarray(check_model_input(x, self.input_shape, MAX_SEQUENCES, MAX_FRAMES))   # float32
        feats = self._features(x)                                                         # (N, D)
        e = self.cfg.eval
        keys = torch.from_numpy(x.reshape(len(x), -1))          # the noise key: the float32 input row's bytes
        noise = sample_keyed_noise(keys, e.noise_draws, e.seed, dim=feats.shape[1])      # (K, N, D)
        errors = score_candidates(self.denoiser, self.schedule, feats, noise, e.t_test, text.global_feats,
                                  text.local_feats).mean(0).double()                    # (N, C)
        scores = torch.softmax(-0.5 * feats.shape[1] * errors / errors.mean(1, keepdim=True), dim=1)   # (N, C)
        return Ranking(names, errors.numpy(), scores.numpy())


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------

def check_texts(texts: Sequence[str], what: str, allow_repeats: bool = False) -> None:
    """Class names / descriptions: 1..MAX_CLASSES non-empty strings of bounded length; names unique."""
    if len(texts) == 0:
        raise InputError(f"{what}: empty list (name at least one class)")
    if len(texts) > MAX_CLASSES:
        raise InputError(f"{what}: {len(texts)} given, at most {MAX_CLASSES} per call")
    bad = [t for t in texts if not isinstance(t, str) or not t.strip() or len(t) > MAX_TEXT_CHARS]
    if bad:
        raise InputError(f"{what}: {short_repr(bad[0])} is not a non-empty string of at most {MAX_TEXT_CHARS} "
                         "characters")
    if not allow_repeats and len(set(texts)) != len(texts):
        repeated = sorted({t for t in texts if list(texts).count(t) > 1})
        raise InputError(f"{what}: repeated {short_repr(repeated)} (each class once)")


# ----------------------------------------------------------------------------------------------------------------
# Bundles
# ----------------------------------------------------------------------------------------------------------------

def chain_bundle(cfg: TDSMConfig, denoiser: TDSMDenoiser, prompt_sets: list[list[str]], text: TextFeatures,
                 default_classes: list[int], encoder: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bundle dict (see the module docstring); encoder: {"config", "classes", "in_channels", "model", "layout"}
    (encoder.pt's keys plus the SkeletonLayout as a dict), or None for a chain that takes features."""
    blob = {"config": cfg.model_dump(mode="json"), "model": {k: v.cpu() for k, v in denoiser.state_dict().items()},
            "feature_dim": int(denoiser.skeleton_dim), "class_names": list(prompt_sets[0]),
            "prompt_sets": [list(p) for p in prompt_sets], "text_global": text.global_feats.cpu(),
            "text_local": text.local_feats.cpu(), "default_classes": list(default_classes),
            "text_spec": cfg.text.encoder}
    if encoder is not None:
        blob["encoder"] = encoder
    return blob


def load_chain(path: Path, text_weights: str | None = None) -> ZeroShotChain:
    """A chain from its bundle file; text_weights: a local copy of the open_clip text weights (model artifact)."""
    return chain_from_bundle(load_torch(path, "TDSM zero-shot chain bundle", BUNDLE_KEYS), Path(path), text_weights)


def chain_from_bundle(blob: dict[str, Any], path: Path | str = "bundle",
                      text_weights: str | None = None) -> ZeroShotChain:
    """A chain from the bundle dict (`path` names it in errors about its weights)."""
    cfg = TDSMConfig.model_validate(blob["config"])
    text = TextFeatures(blob["text_global"], blob["text_local"])
    denoiser = build_model(cfg, blob["feature_dim"], text)
    load_weights(Path(path), "model", blob["model"], denoiser)
    spec = blob["text_spec"]
    if text_weights is not None and spec.startswith("open_clip:"):
        spec = f"open_clip:{spec.split(':')[1]}:{text_weights}"
    chain = ZeroShotChain(cfg, denoiser.eval(), blob["prompt_sets"], text, blob["default_classes"], spec)
    if "encoder" in blob:
        chain.encoder, chain.encoder_cfg, _ = encoder_from_state(blob["encoder"], Path(path), "encoder.model")
        chain.layout = SkeletonLayout(**blob["encoder"]["layout"])
    return chain


def served_top1(chain: ZeroShotChain, inputs: np.ndarray, labels: Sequence[int]) -> float:
    """Top-1 (%) of the chain's own answers over its default candidates (what the registered model answers), in
    calls of at most MAX_SEQUENCES; labels are class ids of the training class list."""
    names = chain.class_names
    hits = 0
    for s in range(0, len(inputs), MAX_SEQUENCES):
        ranking = chain.rank(inputs[s:s + MAX_SEQUENCES])
        hits += sum(label == names[int(y)] for label, y in zip(ranking.labels, labels[s:s + MAX_SEQUENCES]))
    return 100.0 * hits / max(1, len(inputs))
