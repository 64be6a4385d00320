"""Registry of recovery methods (accuracy repair without retraining): one module per method."""

from __future__ import annotations

from compressor.recovery.base import RecoveryContext, RecoveryMethod
from compressor.registry import Registry

RECOVERIES: Registry[RecoveryMethod] = Registry(__name__, "recovery method", " (see `compress --help`)")
register = RECOVERIES.register


def list_recoveries() -> list[str]:
    """Names of all registered recovery methods, sorted."""
    return RECOVERIES.names()


def get_recovery(name: str) -> RecoveryMethod:
    """A new instance of the recovery method registered as ``name``."""
    return RECOVERIES.create(name)


__all__ = ["RECOVERIES", "RecoveryContext", "RecoveryMethod", "get_recovery", "list_recoveries", "register"]
