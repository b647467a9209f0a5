"""Registered models name their pyfunc classes by module path: models logged before service/ had layers load them
from here (their code lives in service.tracking.registry)."""

from service.tracking.registry import SkeletonClassifierModel, ZeroShotTDSM  # noqa: F401
