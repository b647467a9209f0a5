"""The registered CoCoDiff classifier, as MLflow "models from code": this file travels inside the model and runs at
load time with the model's copy of `trainers/` on the path (code_paths); it imports nothing else of skeldiff, so
the model loads where only its requirements.txt is installed. Never import it: it calls `set_model`.

Input: (N, C, T, V, M) float32 joint sequences of the training layout. Output: (N,) int64 class ids (names in the
artifact classes.json). Bad input: an MLflow INVALID_PARAMETER_VALUE error (HTTP 400 when served).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from trainers.cocodiff_classifier import ClassifierEnsemble
from trainers.errors import InputError


class _PythonModel(mlflow.pyfunc.PythonModel):
    """PythonModel without the warning MLflow prints when predict() has no type hints (the signature says them;
    MLflow resets the warning filters inside, so only recording swallows it). Each served file travels alone inside
    its model, so each has this small class."""

    def __init_subclass__(cls, **kwargs):
        with warnings.catch_warnings(record=True):
            super().__init_subclass__(**kwargs)


class ServedClassifier(_PythonModel):
    """pyfunc wrapper of trainers.cocodiff_classifier.ClassifierEnsemble."""

    def load_context(self, context) -> None:
        keys = sorted((k for k in context.artifacts if k.startswith("bundle")), key=lambda k: int(k[6:] or 0))
        fusion = context.artifacts.get("fusion")
        self.ensemble = ClassifierEnsemble.load([context.artifacts[k] for k in keys],
                                                json.loads(Path(fusion).read_text()) if fusion else None)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        try:
            return self.ensemble.predict(model_input)
        except InputError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from None


mlflow.models.set_model(ServedClassifier())
