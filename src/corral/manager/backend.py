"""Moved to :mod:`corral.manager.backends` (a re-export for older importers)."""

from corral.manager.backends.base import Backend, EventCallback, Observed
from corral.manager.backends.embedded import EmbeddedBackend

__all__ = ["Backend", "EmbeddedBackend", "EventCallback", "Observed"]
