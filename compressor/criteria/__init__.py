"""Registry of channel-importance criteria: one module per criterion, registered by name."""

from __future__ import annotations

from compressor.criteria.base import Criterion, ScoringContext
from compressor.registry import Registry

CRITERIA: Registry[Criterion] = Registry(__name__, "criterion", " (see `compress criteria`)")
register = CRITERIA.register


def list_criteria() -> list[str]:
    """Names of all registered criteria, sorted."""
    return CRITERIA.names()


def get_criterion(name: str) -> Criterion:
    """A new instance of the criterion registered as ``name``."""
    return CRITERIA.create(name)


__all__ = ["CRITERIA", "Criterion", "ScoringContext", "get_criterion", "list_criteria", "register"]
