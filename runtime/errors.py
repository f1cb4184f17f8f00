"""The root of perdure's exception tree, and the runtime's own errors.

Every layer (``perdure.log``, ``perdure.actors``, ``perdure.providers``) derives its
small error tree from :class:`PerdureError` defined here. This module imports nothing
from perdure, so importing it from a lower layer does not point the dependency graph
back up at the runtime.
"""

from __future__ import annotations

__all__ = ["PerdureError"]


class PerdureError(Exception):
    """Base class of every error perdure raises on purpose."""
