"""The registered artefacts of final runs, as MLflow pyfunc models.

TDSM (`ZeroShotTDSM`): input (N, D) float32 pooled skeleton features (the encoder's pooled output, one row per
sequence; the signature says so); output (N,) predicted class ids among the unseen classes it was built with.
The registered model and version carry a description, tags (split, source sweep and run, test top-1, t_test,
text encoder), the class-id -> name map (`classes.json`) and an input example of real feature rows. The bundle
holds the denoiser weights, the resolved config and the candidate classes' encoded text, so the model scores
without the text encoder or the datasets. Each sample's evaluation noise is
keyed by (eval.seed, the sample's values), so its prediction is the same whatever batch it arrives in.

CoCoDiff (`SkeletonClassifierModel`): input (N, C, T, V, M) joint sequences; output (N,) class ids. The bundle
is the exported classifier only (backbone + head, the best.pt layout): no diffusion module, no text. A stream
ensemble (`service.final --streams`) is one bundle per stream, each classifier deriving its own stream from the
joints, and the fusion weights: the prediction is the argmax of the weighted sum of their logits.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from service.tracking.store import MLflowReporter
from trainers.checkpoint import load_weights
from trainers.cocodiff import CoCoDiffConfig
from trainers.cocodiff_classifier import SkeletonClassifier, load_classifier
from trainers.cocodiff_eval import ensemble_logits
from trainers.config import TDSMConfig, to_plain
from trainers.io import load_torch
from trainers.tdsm_fit import build_model, build_schedule
from trainers.text import TextFeatures
from trainers.zsl import sample_keyed_noise, score_candidates


class _PythonModel(mlflow.pyfunc.PythonModel):
    """MLflow's PythonModel without the warning it prints when a subclass's predict() has no type hints (every CLI
    imports this module); the logged signatures say the types."""

    def __init_subclass__(cls, **kwargs):
        with warnings.catch_warnings(record=True):   # MLflow resets the filters inside; recording still swallows
            super().__init_subclass__(**kwargs)


class ZeroShotTDSM(_PythonModel):
    """pyfunc wrapper: features -> argmin over candidate classes of the draw-averaged denoising error."""

    def load_context(self, context) -> None:
        blob = load_torch(context.artifacts["bundle"], "TDSM zero-shot bundle",
                          ("config", "classes", "text_global", "text_local", "feature_dim", "model"))
        self.cfg = TDSMConfig.model_validate(blob["config"])
        self.classes = list(blob["classes"])
        self.text = TextFeatures(blob["text_global"], blob["text_local"])
        self.model = build_model(self.cfg, blob["feature_dim"], self.text)
        load_weights(Path(context.artifacts["bundle"]), "model", blob["model"], self.model)
        self.model.eval()
        self.schedule = build_schedule(self.cfg)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        x = torch.as_tensor(np.ascontiguousarray(model_input, dtype=np.float32))   # (N, D); views may be strided
        e = self.cfg.eval
        # Per-sample noise keyed by the sample itself: its class does not depend on the batch it arrives in.
        noise = sample_keyed_noise(x, e.noise_draws, e.seed)                   # (K, N, D)
        errors = score_candidates(self.model, self.schedule, x, noise, e.t_test, self.text.global_feats,
                                  self.text.local_feats)                     # (K, N, C)
        return np.asarray(self.classes)[errors.mean(0).argmin(-1).numpy()]


def _pip_requirements() -> list[str]:
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "skeldiff"]


def zero_shot_signature(feature_dim: int) -> ModelSignature:
    """(N, D) float32 pooled skeleton features in, (N,) int64 class ids out."""
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, feature_dim))]),
                          outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,), "class_id")]))


def classes_artifact(folder: Path, classes: list[int], names: list[str]) -> Path:
    """classes.json: {class id: class name} of the classes the model can answer, in id order."""
    path = folder / "classes.json"
    path.write_text(json.dumps({str(c): names[c] for c in classes}, indent=1))
    return path


def describe_model(name: str, version: str, description: str, tags: dict[str, Any]) -> None:
    """The same description and tags on the registered model (its latest 'final') and on this version."""
    client = mlflow.tracking.MlflowClient()
    client.update_registered_model(name, description=description)
    client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        client.set_registered_model_tag(name, key, str(value))
        client.set_model_version_tag(name, version, key, str(value))


def accuracy_headline(tags: dict[str, Any]) -> str:
    """The test top-1 in words: the mean ± std over seeds first (the result), then this model's own figure (one
    seed of them, which can sit far from the mean)."""
    top1, mean = tags.get("test_top1"), tags.get("test_top1_mean_over_seeds")
    own = f"{float(top1):.2f} %" if top1 is not None else None
    seed = f" (train.seed={tags['registered_seed']})" if tags.get("registered_seed") is not None else ""
    if mean is None:
        return f"Test top-1 {own}" if own else "Test top-1 not measured"
    std = float(tags.get("test_top1_std_over_seeds", 0.0))
    head = f"Test top-1 {float(mean):.2f} ± {std:.2f} % (mean ± std over {tags.get('seeds', '?')} seeds)"
    return head + (f"; this registered model, the first seed{seed}: {own}" if own else "")


def zero_shot_description(split: str, feature_dim: int, classes: list[int], tags: dict[str, Any]) -> str:
    """What the model takes and answers, in words (the registry's description field); its accuracy first."""
    return (f"TDSM zero-shot skeleton action classifier, split {split}. {accuracy_headline(tags)}, at "
            f"t_test={tags.get('t_test')}, text encoder {tags.get('text_encoder')}. Input: an (N, {feature_dim}) "
            f"float32 array of pooled skeleton features, one row per sequence: the globally pooled output of the "
            f"skeleton encoder that produced the training features (SA-DVAE layout), not raw joints. Output: (N,) "
            f"int64 class ids among its {len(classes)} unseen classes; their names are in the artifact classes.json.")


def log_zero_shot_model(run_id: str, cfg: TDSMConfig, model, classes: list[int], names: list[str],
                        text: TextFeatures, registered_name: str, example: np.ndarray | None = None,
                        tags: dict[str, Any] | None = None) -> str:
    """Log the bundle as a pyfunc model under `run_id`, register it, alias it 'final', describe and tag it;
    returns the version.

    example: a few (n, D) feature rows (default: zeros) for the input example; tags: what final knows of the
    run (split, source sweep, test top-1 ...), set on the model and the version with t_test and text encoder.
    """
    idx = torch.tensor(classes)
    dim = model.skeleton_dim
    example = np.zeros((2, dim), dtype=np.float32) if example is None else np.asarray(example, dtype=np.float32)
    tags = {**(tags or {}), "method": "tdsm", "t_test": cfg.eval.t_test, "text_encoder": cfg.text.encoder,
            "feature_dim": dim, "classes": len(classes), "final_run_id": run_id}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "tdsm_zero_shot.pt"
        torch.save({"config": to_plain(cfg), "model": {k: v.cpu() for k, v in model.state_dict().items()},
                    "classes": classes, "class_names": [names[c] for c in classes],
                    "feature_dim": dim, "text_global": text.global_feats[idx],
                    "text_local": text.local_feats[idx]}, bundle)
        artifacts = {"bundle": str(bundle), "classes": str(classes_artifact(Path(tmp), classes, names))}
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="zero_shot_model", python_model=ZeroShotTDSM(), artifacts=artifacts,
                signature=zero_shot_signature(dim), input_example=example,
                registered_model_name=registered_name,
                pip_requirements=_pip_requirements())
    client = mlflow.tracking.MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(registered_name, "final", version)
    describe_model(registered_name, version,
                   zero_shot_description(tags.get("split", registered_name), dim, classes, tags), tags)
    return version


class SkeletonClassifierModel(_PythonModel):
    """pyfunc wrapper of exported CoCoDiff classifiers: joint sequences -> argmax class ids of one classifier's
    logits, or of the weighted sum of several (one per input stream)."""

    def load_context(self, context) -> None:
        keys = sorted((k for k in context.artifacts if k.startswith("bundle")), key=lambda k: int(k[6:] or 0))
        self.models = [load_classifier(context.artifacts[k])[0] for k in keys]
        fusion = json.loads(Path(context.artifacts["fusion"]).read_text()) if "fusion" in context.artifacts else {}
        self.weights = fusion.get("weights", [1.0] * len(self.models))
        streams = [m.stream for m in self.models]
        if fusion.get("streams", streams) != streams:          # bundles and weights must pair up in order
            raise ValueError(f"fusion.json names streams {fusion['streams']} but the bundles hold {streams}")

    def predict(self, context, model_input, params=None) -> np.ndarray:
        x = torch.as_tensor(np.ascontiguousarray(model_input, dtype=np.float32))   # (N, C, T, V, M)
        with torch.no_grad():
            logits = ensemble_logits([m(x) for m in self.models], self.weights)  # (N, classes)
        return logits.argmax(-1).numpy()                                     # (N,)


def log_classifier_model(run_id: str, members: list[tuple[CoCoDiffConfig, SkeletonClassifier]], num_classes: int,
                         input_shape: tuple[int, ...], names: list[str], registered_name: str,
                         weights: list[float] | None = None) -> str:
    """Log backbone + head (several: a stream ensemble, fused by `weights`, equal by default) as a pyfunc under
    `run_id`, register it, alias it 'final'; returns the version.

    input_shape: one sample's (C, T, V, M), for the input example.
    """
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        for i, (cfg, classifier) in enumerate(members):
            bundle = Path(tmp) / f"cocodiff_classifier{i or ''}.pt"
            torch.save({"classifier": {k: v.cpu() for k, v in classifier.state_dict().items()},
                        "config": to_plain(cfg), "num_classes": num_classes, "in_channels": input_shape[0],
                        "class_names": names}, bundle)
            artifacts[f"bundle{i or ''}"] = str(bundle)
        if len(members) > 1:
            fusion = Path(tmp) / "fusion.json"
            streams = [cfg.backbone.stream for cfg, _ in members]
            fusion.write_text(json.dumps({"streams": streams, "weights": weights or [1.0] * len(members)}))
            artifacts["fusion"] = str(fusion)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="classifier", python_model=SkeletonClassifierModel(), artifacts=artifacts,
                input_example=np.zeros((2, *input_shape), dtype=np.float32), registered_model_name=registered_name,
                pip_requirements=_pip_requirements())
    client = mlflow.tracking.MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(registered_name, "final", version)
    return version


def register_model(reporter: MLflowReporter, uri: str, cfg: TDSMConfig, model, task, names, text,
                   name: str, example=None, tags: dict[str, Any] | None = None) -> str:
    """Log the seed-0 model as an MLflow pyfunc zero-shot classifier and register it; returns the version."""
    mlflow.set_tracking_uri(uri)
    version = log_zero_shot_model(reporter.run_id, cfg, model, task.unseen, names, text, name, example, tags)
    reporter.set_tags({"registered_model": f"{name}/{version}"})
    return version


def register_classifier(reporter: MLflowReporter, uri: str, members: list[tuple[CoCoDiffConfig, Any]], data,
                        names: list[str], name: str) -> str:
    """Log the seed-0 exported classifier (backbone + head; with --streams one per stream, fused with equal
    weights) as a pyfunc and register it; returns the version."""
    mlflow.set_tracking_uri(uri)
    version = log_classifier_model(reporter.run_id, members, data.num_classes, tuple(data.test_x.shape[1:]),
                                   names, name)
    reporter.set_tags({"registered_model": f"{name}/{version}"})
    return version
