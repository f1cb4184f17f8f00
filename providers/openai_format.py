"""The canonical chat format in OpenAI's Chat Completions wire shape, and back.

Pure functions with no dependency on the ``openai`` package: the OpenAI adapter sends
these dicts over HTTP, and :class:`~perdure.providers.CallableProvider` hands them to
user functions, so a function can forward them to any OpenAI-compatible API unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from perdure.providers.streams import arguments_json
from perdure.providers.types import Message, ToolSpec

__all__ = ["finish_reason_from_openai", "to_openai_messages", "to_openai_tools"]


def to_openai_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """``messages`` as Chat Completions message dicts.

    Assistant tool calls carry their arguments as a JSON string (raw strings, kept when
    a model sent invalid JSON, go back verbatim); tool results become ``tool`` messages
    with their ``tool_call_id``. The Chat Completions format has no error flag on tool
    results, so ``is_error`` must already be visible in the content.
    """
    return [_message(m) for m in messages]


def _message(message: Message) -> dict[str, Any]:
    role = message.role
    if role == "tool":
        return {
            "role": "tool",
            "tool_call_id": message.tool_call_id or "",
            "content": message.content,
        }
    if role == "assistant" and message.tool_calls:
        return {
            "role": "assistant",
            # OpenAI's own shape for a turn that only calls tools is content: null.
            "content": message.content or None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": arguments_json(call.arguments)},
                }
                for call in message.tool_calls
            ],
        }
    wire: dict[str, Any] = {"role": role, "content": message.content}
    if message.name is not None and role in ("user", "system"):
        wire["name"] = message.name
    return wire


def to_openai_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """``tools`` as Chat Completions ``function`` tools."""
    return [{"type": "function", "function": tool.to_dict()} for tool in tools]


def finish_reason_from_openai(reason: object, *, has_tool_calls: bool) -> str:
    """The canonical finish reason (OpenAI's vocabulary is the canonical one).

    Some OpenAI-compatible servers answer ``"stop"`` (or nothing, or the legacy
    ``"function_call"``, or their own word for a natural end) for a turn that calls
    tools; such a turn is reported as ``"tool_calls"`` so callers need check one value.
    The other words servers use for a natural end (text-generation-inference's
    ``"eos_token"`` and ``"stop_sequence"``, ``"eos"``, Anthropic's ``"end_turn"`` passed
    through by gateways) are reported as ``"stop"``, and so is ``"tool_calls"`` when no
    call came. ``"length"`` and ``"content_filter"`` are kept as they are, tool calls or
    not: they say the answer was cut.
    """
    calling = reason in ("tool_calls", "function_call")
    if has_tool_calls and (reason is None or reason in _ENDED or calling):
        return "tool_calls"
    if reason in _ENDED or calling:
        # Calling tools, it says, but no call came (one the server could not parse
        # reached us as text, if at all): the turn ended without calls.
        return "stop"
    if isinstance(reason, str) and reason:
        return reason
    return "stop"


#: The words OpenAI-compatible servers use for an answer that ended by itself.
_ENDED = frozenset({"", "stop", "eos", "eos_token", "stop_sequence", "end_turn", "tool_use"})
