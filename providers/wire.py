"""Reading vendor responses defensively.

The vendor clients build response objects without validating them, so a field may be
missing, ``None``, of the wrong type, a model object or a plain dict. These readers
treat all of those alike, so a malformed body becomes a clear
:class:`~perdure.providers.errors.MalformedResponseError`, never an ``AttributeError``.
The ``clean`` functions make text a response brought in safe to record and print.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from perdure.providers.streams import shallow
from perdure.providers.types import (
    LLMResponse,
    ResponseCompleted,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
)

__all__ = ["clean", "clean_data", "clean_event", "clean_response", "field", "integer", "text"]


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


# Lone surrogates: JSON may spell them ("\ud800"), Python decodes them into a str, but
# no UTF-8 encoder takes them -- so such a str in a response could not be recorded in
# the log (CBOR text is UTF-8), nor printed. (A valid pair decodes to one code point.)
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(value: str) -> str:
    """``value`` with each lone surrogate replaced by U+FFFD (the replacement character)."""
    return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value


def clean_data(value: Any) -> Any:
    """``value`` (decoded JSON: dicts, lists, text, numbers) with all its text cleaned."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean_data(k): clean_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_data(v) for v in value]
    return value


def clean_response(response: LLMResponse) -> LLMResponse:
    """``response`` with every piece of text in it :func:`clean`."""
    message = response.message
    calls = tuple(
        ToolCall(clean(c.id), clean(c.name), _clean_arguments(c.arguments))
        for c in message.tool_calls
    )
    cleaned = replace(message, content=clean(message.content), tool_calls=calls)
    if cleaned == message and clean(response.model) == response.model:
        return response
    return replace(response, message=cleaned, model=clean(response.model))


def _clean_arguments(arguments: dict[str, Any] | str) -> dict[str, Any] | str:
    if isinstance(arguments, str):
        return clean(arguments)
    if shallow(arguments):
        return clean_data(arguments)
    # Too deep to walk (or to record): kept as text, as parse_arguments keeps it.
    try:
        return clean(json.dumps(arguments, ensure_ascii=False))
    except (RecursionError, TypeError, ValueError):
        return "(arguments nested too deeply to keep)"


def clean_event(event: StreamEvent) -> StreamEvent:
    """``event`` with its text :func:`clean`."""
    if isinstance(event, TextDelta):
        text = clean(event.text)
        return event if text == event.text else TextDelta(text)
    if isinstance(event, ToolCallDelta):
        cleaned = replace(
            event,
            id=clean(event.id) if event.id else event.id,
            name=clean(event.name) if event.name else event.name,
            arguments=clean(event.arguments),
        )
        return event if cleaned == event else cleaned
    return ResponseCompleted(clean_response(event.response))
