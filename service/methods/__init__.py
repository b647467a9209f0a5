"""The methods the service runs, by name: every per-method decision of the CLIs, the sweep and the trials is an
attribute of one of these objects (`service.methods.base.Method`)."""

from service.methods.base import Method
from service.methods.cocodiff import CoCoDiff
from service.methods.tdsm import TDSM

METHODS: dict[str, Method] = {m.name: m for m in (TDSM(), CoCoDiff())}
