"""The methods that run: each spec's implementation (imports torch, MLflow and the fit loops)."""

from __future__ import annotations

from service.methods.base import Method
from service.methods.cocodiff import CoCoDiff
from service.methods.cocodiff_spec import CoCoDiffSpec
from service.methods.tdsm import TDSM
from service.methods.tdsm_spec import TDSMSpec

IMPLEMENTATIONS: dict[type[Method], Method] = {TDSMSpec: TDSM(), CoCoDiffSpec: CoCoDiff()}


def implementation(method: Method) -> Method:
    """The method that runs `method`: the method itself when it implements its hooks (a built-in implementation, a
    registered method defined whole, as tests/integration/test_third_method.py does), else its spec's."""
    if type(method).fit_trial is not Method.fit_trial:
        return method
    for spec, impl in IMPLEMENTATIONS.items():
        if type(method) is spec:
            return impl
    raise TypeError(f"{method!r}: a spec without an implementation (register one that implements fit_trial, run, "
                    "final)")
