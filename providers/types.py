"""The canonical chat format every provider speaks, and the provider protocol.

These are plain frozen dataclasses with ``to_dict`` / ``from_dict`` so that a response
can be recorded in the log (as CBOR) and read back identically; nothing specific to one
vendor's API appears here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from .fast_init import fast_init

__all__ = [
    "LLMRequest",
    "LLMResponse",
    "Message",
    "Provider",
    "ResponseCompleted",
    "Role",
    "StreamEvent",
    "TextDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolSpec",
    "Usage",
]

Role = Literal["system", "user", "assistant", "tool"]


@fast_init
@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call requested by the model.

    ``arguments`` is the decoded JSON object; when the model sent something that is not
    a JSON object it is kept verbatim as a ``str`` so the runtime can report it back to
    the model as invalid arguments instead of failing.
    """

    id: str
    name: str
    arguments: dict[str, Any] | str

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the log."""
        return {"id": self.id, "name": self.name, "arguments": self.arguments}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCall:
        """Inverse of :meth:`to_dict`."""
        return cls(id=data["id"], name=data["name"], arguments=data["arguments"])


@fast_init
@dataclass(frozen=True, slots=True)
class Message:
    """One chat message.

    - ``system`` / ``user``: ``content`` is the text.
    - ``assistant``: ``content`` is the text (may be empty) and ``tool_calls`` the calls.
    - ``tool``: the result of the call ``tool_call_id`` of tool ``name``; ``content`` is
      the result as text (JSON for structured results) and ``is_error`` marks a failure
      (unknown tool, bad arguments, the tool raised or timed out, a rejection).
    """

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    is_error: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the log; default fields are omitted to keep records small."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            d["name"] = self.name
        if self.is_error:
            d["is_error"] = True
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Message:
        """Inverse of :meth:`to_dict`."""
        calls = data.get("tool_calls")
        return cls(
            role=data["role"],
            content=data.get("content", ""),
            tool_calls=tuple(ToolCall.from_dict(c) for c in calls) if calls else (),
            tool_call_id=data.get("tool_call_id"),
            name=data.get("name"),
            is_error=data.get("is_error", False),
        )


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the model may call: name, description and a JSON Schema for arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the shape of OpenAI's ``function`` object)."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
        }


@fast_init
@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage reported by the provider for one call."""

    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the log."""
        return {"input": self.input_tokens, "output": self.output_tokens}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        """Inverse of :meth:`to_dict`."""
        return cls(input_tokens=data.get("input", 0), output_tokens=data.get("output", 0))


@fast_init
@dataclass(frozen=True, slots=True)
class LLMRequest:
    """One call to a model.

    ``messages`` starts with the system message when there are instructions. Providers
    must treat ``messages`` as read-only: the runtime passes its live conversation
    without copying it, so building a request stays O(1) however long the conversation.
    ``params`` holds sampling parameters (``temperature``, ``max_tokens``, ...).
    """

    model: str
    messages: Sequence[Message]
    tools: Sequence[ToolSpec] = ()
    params: Mapping[str, Any] = field(default_factory=dict)


@fast_init
@dataclass(frozen=True, slots=True)
class LLMResponse:
    """What a model answered: an assistant message plus accounting.

    ``model`` is the model that actually served the call (it may differ from the one
    requested); ``provider`` names the provider that served it (for a fallback chain,
    the member that answered).
    """

    message: Message
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    provider: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the log."""
        return {
            "message": self.message.to_dict(),
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "model": self.model,
            "provider": self.provider,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LLMResponse:
        """Inverse of :meth:`to_dict`."""
        return cls(
            message=Message.from_dict(data["message"]),
            finish_reason=data.get("finish_reason", "stop"),
            usage=Usage.from_dict(data.get("usage", {})),
            model=data.get("model", ""),
            provider=data.get("provider", ""),
        )


@fast_init
@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of assistant text, as it streams."""

    text: str


@fast_init
@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a streaming tool call (``index`` is its position in the turn)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@fast_init
@dataclass(frozen=True, slots=True)
class ResponseCompleted:
    """The last event of every stream: the whole response, as ``complete`` returns it."""

    response: LLMResponse


StreamEvent = TextDelta | ToolCallDelta | ResponseCompleted


@runtime_checkable
class Provider(Protocol):
    """A model endpoint.

    ``name`` identifies the provider in usage and logs (``"openai"``, ``"scripted"``);
    ``model`` is the default model, used when the agent names none. ``complete`` raises
    only :class:`~perdure.providers.errors.ProviderError` subclasses, after its own
    bounded retries. ``stream`` yields deltas and ends with exactly one
    :class:`ResponseCompleted`.
    """

    name: str
    model: str

    async def complete(self, request: LLMRequest) -> LLMResponse:
        """Answer ``request`` in one piece."""
        ...

    def stream(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
        """Answer ``request`` as a stream of events ending in ``ResponseCompleted``."""
        ...
