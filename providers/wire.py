"""Reading vendor responses defensively.

The vendor clients build response objects without validating them, so a field may be
missing, ``None``, of the wrong type, a model object or a plain dict. These readers
treat all of those alike, so a malformed body becomes a clear
:class:`~perdure.providers.errors.MalformedResponseError`, never an ``AttributeError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["field", "integer", "text"]


def field(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]``; ``None`` when absent (or when ``obj`` is ``None``)."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def text(value: Any) -> str:
    """``value`` if it is a ``str``, else ``""``."""
    return value if isinstance(value, str) else ""


def integer(value: Any) -> int:
    """``value`` if it is an ``int`` (not a bool), else ``0``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
