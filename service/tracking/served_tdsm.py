"""The registered TDSM zero-shot model, as MLflow "models from code": this file travels inside the model and is run
at load time, with the model's copy of `trainers/` on the path (code_paths). It imports nothing else of skeldiff,
so the model loads where only its requirements.txt is installed. Never import it: it calls `set_model`.

Input: (N, C, T, V, M) float32 skeleton sequences as `service.prepare` writes them (any T: resampled to the
encoder's frames), or (N, D) pooled features for a chain without an encoder; the signature says which.
Params: `classes` (default: the split's unseen classes), `descriptions` (one per class, optional), `top_k`.
Output: one row per sequence: label, score, error, top_k_labels, top_k_scores (trainers/zero_shot.py says what the
numbers are). Bad input: an MLflow INVALID_PARAMETER_VALUE error (HTTP 400 when served) with a one-line message.
"""

from __future__ import annotations

import warnings

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from trainers.errors import InputError
from trainers.zero_shot import MAX_CLASSES, load_chain


class _PythonModel(mlflow.pyfunc.PythonModel):
    """PythonModel without the warning MLflow prints when predict() has no type hints (the signature says them;
    MLflow resets the warning filters inside, so only recording swallows it). Each served file travels alone inside
    its model, so each has this small class."""

    def __init_subclass__(cls, **kwargs):
        with warnings.catch_warnings(record=True):
            super().__init_subclass__(**kwargs)


class ZeroShotChainModel(_PythonModel):
    """pyfunc wrapper of trainers.zero_shot.ZeroShotChain."""

    def load_context(self, context) -> None:
        self.chain = load_chain(context.artifacts["bundle"], context.artifacts.get("text_weights"))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        params = params or {}
        try:
            top_k = int(params.get("top_k", 5))
            if not 1 <= top_k <= MAX_CLASSES:
                raise InputError(f"top_k={top_k}: expected 1..{MAX_CLASSES}")
            ranking = self.chain.rank(np.asarray(model_input), params.get("classes"), params.get("descriptions"))
        except InputError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from None
        best = ranking.top(top_k)
        return pd.DataFrame({
            "label": ranking.labels,
            "score": [row[0][1] for row in best],
            "error": ranking.errors.min(1),
            "top_k_labels": [[label for label, _ in row] for row in best],
            "top_k_scores": [[score for _, score in row] for row in best],
        })


mlflow.models.set_model(ZeroShotChainModel())
