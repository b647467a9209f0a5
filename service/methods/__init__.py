"""The methods the service runs, by name: every per-method decision of the CLIs, the sweep and the trials is an
attribute or hook of one of these objects (`service.methods.base.Method`).

Light on purpose: `METHODS` holds the specs, which the CLIs parse with before anything heavy is imported;
`service.methods.implemented.implementation` gives the method that runs (a registered method that implements its
own hooks, such as a test's, is its own implementation)."""

from service.methods.base import Method
from service.methods.cocodiff_spec import CoCoDiffSpec
from service.methods.tdsm_spec import TDSMSpec

METHODS: dict[str, Method] = {m.name: m for m in (TDSMSpec(), CoCoDiffSpec())}


def register(method: Method) -> Method:
    """Add (or replace) a method by its name: the CLIs, search spaces and `service.final --from` then know it."""
    METHODS[method.name] = method
    return method
