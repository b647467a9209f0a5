"""The CoCoDiff inference model (docs/METHODS.md §2): GCN backbone + linear head on one input stream, its export from
a fit and its loading from a best.pt. No diffusion code: inference never needs the CoCoDiff module."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from trainers.checkpoint import load_weights
from trainers.cocodiff_eval import ensemble_logits
from trainers.configs import BackboneConfig
from trainers.errors import InputError
from trainers.guards import check_model_input
from trainers.io import load_checkpoint
from trainers.skeleton.gcn import Encoder, build_encoder, joint_to_bone, joint_to_motion


class SkeletonClassifier(nn.Module):
    """GCN backbone + linear head on one input stream: everything that runs at inference.

    Reads the joint array (N, C, T, V, M) and derives its stream (bone / motion) itself, so every stream's
    classifier takes the same input and their logits can be ensembled. No parameters beyond the encoder's.
    """

    def __init__(self, encoder: Encoder, stream: str = "joint"):
        super().__init__()
        if stream not in ("joint", "bone", "motion"):
            raise InputError(f"backbone.stream {stream!r}: expected joint, bone or motion")
        self.encoder = encoder
        self.stream = stream

    def to_stream(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, V, M) joints -> the same shape in this classifier's stream."""
        if self.stream == "bone":
            return joint_to_bone(x, self.encoder.graph.bone_pairs)
        if self.stream == "motion":
            return joint_to_motion(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, V, M) joints -> pooled feature x_0 (N, D)."""
        return self.encoder.forward_features(self.to_stream(x))

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, D) features (real x_0 or generated x̂_0) -> logits (N, num_classes), dropout as in Encoder.forward."""
        return self.encoder.fc(self.encoder.drop(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))                                 # (N, num_classes)


def build_classifier(cfg: BackboneConfig, num_classes: int, in_channels: int = 3) -> SkeletonClassifier:
    """Backbone + head sized by the config; never builds any diffusion part."""
    encoder = build_encoder(cfg.encoder, num_classes, in_channels, cfg.layout, cfg.base_channels,
                            tuple(cfg.units_per_stage), cfg.dropout)
    return SkeletonClassifier(encoder, cfg.stream)


class Trained(Protocol):
    """What export_classifier reads of a fit's result (`trainers.cocodiff_fit.CoCoDiffResult`)."""

    classifier: SkeletonClassifier
    best_state: dict[str, torch.Tensor] | None


def export_classifier(result: Trained, weights: str = "best") -> SkeletonClassifier:
    """An independent copy of backbone + head (eval mode) with the best-on-validation weights, or the final
    ones (weights='last', or when nothing was evaluated). No diffusion part is copied or referenced."""
    if weights not in ("best", "last"):
        raise InputError(f"export_classifier: weights={weights!r}, expected 'best' or 'last'")
    model = copy.deepcopy(result.classifier)
    if weights == "best" and result.best_state is not None:
        model.load_state_dict(result.best_state)
    return model.eval()


def load_classifier(path: Path, map_location: str | torch.device = "cpu") -> tuple[SkeletonClassifier, dict[str, Any]]:
    """(classifier, checkpoint) from a best.pt: rebuilt from its stored backbone config, no diffusion code."""
    ckpt = load_checkpoint(Path(path), keys=("classifier", "config", "num_classes", "in_channels"))
    try:
        model = build_classifier(BackboneConfig.model_validate(ckpt["config"]["backbone"]), ckpt["num_classes"],
                                 ckpt["in_channels"])
    except Exception as err:  # noqa: BLE001 - a config that does not build: one line
        raise InputError(f"{path}: not a classifier checkpoint ({type(err).__name__})") from None
    load_weights(Path(path), "classifier", ckpt["classifier"], model)     # keys, shapes, finite: one line
    return model.to(map_location).eval(), ckpt


# Bounds of one call of a deployed classifier (requests past them are refused with a message).
MAX_SEQUENCES = 512


class ClassifierEnsemble:
    """Exported classifiers (one per input stream, each deriving its stream from the joints) and their fusion
    weights: joint sequences (N, C, T, V, M) -> class ids (N,), the argmax of the weighted sum of their logits."""

    def __init__(self, models: list[SkeletonClassifier], weights: list[float], input_shape: tuple[int, ...]):
        self.models, self.weights, self.input_shape = models, weights, tuple(input_shape)

    @classmethod
    def load(cls, bundles: list[str], fusion: dict[str, Any] | None = None) -> "ClassifierEnsemble":
        """From exported bundles (the best.pt layout) and fusion.json's {"streams", "weights"} when several."""
        loaded = [load_classifier(b) for b in bundles]
        models = [m for m, _ in loaded]
        fusion = fusion or {}
        streams = [m.stream for m in models]
        if fusion.get("streams", streams) != streams:          # bundles and weights must pair up in order
            raise InputError(f"fusion.json names streams {fusion['streams']} but the bundles hold {streams}")
        ckpt = loaded[0][1]
        shape = tuple(ckpt.get("input_shape", (ckpt["in_channels"], -1, -1, -1)))
        return cls(models, list(fusion.get("weights", [1.0] * len(models))), shape)

    @torch.no_grad()
    def predict(self, x) -> np.ndarray:
        """Class ids (N,) of checked input (shape, finite, bounded: one-line InputError otherwise)."""
        x = torch.from_numpy(np.ascontiguousarray(check_model_input(x, self.input_shape, MAX_SEQUENCES, 10_000)))
        logits = ensemble_logits([m(x) for m in self.models], self.weights)     # (N, classes)
        return logits.argmax(-1).numpy()
