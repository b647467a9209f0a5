"""The methods that run: each spec's implementation (imports torch, MLflow and the fit loops)."""

from __future__ import annotations

from service.methods.base import Method
from service.methods.cocodiff import CoCoDiff
from service.methods.cocodiff_spec import CoCoDiffSpec
from service.methods.tdsm import TDSM
from service.methods.tdsm_spec import TDSMSpec

IMPLEMENTATIONS: dict[type[Method], Method] = {TDSMSpec: TDSM(), CoCoDiffSpec: CoCoDiff()}


def implementation(method: Method) -> Method:
    """The method that runs `method`: the built-in spec's implementation, else the method itself (a registered
    method that implements its hooks)."""
    return IMPLEMENTATIONS.get(type(method), method)
