"""A fake Anthropic Messages API server on 127.0.0.1.

It speaks the real wire format: ``POST /v1/messages`` answered with a ``message`` JSON
body, or, when the request asks for ``"stream": true``, with the Messages streaming
events (``message_start``, ``content_block_start``/``_delta``/``_stop``,
``message_delta``, ``message_stop``, and a ``ping``). Script it like
:class:`~tests.support.openai_server.OpenAIServer`: a queue of replies, or a handler
function of the request; ``requests`` records what arrived.

Use it as a pytest fixture (``anthropic_server``) or a plain context manager.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.http_server import (
    JSONReply,
    RecordedRequest,
    Reply,
    ScriptedHTTPServer,
    SSEEvent,
    SSEReply,
)

__all__ = ["AnthropicServer", "MessageReply", "anthropic_server", "error", "message"]


@dataclass(frozen=True)
class MessageReply:
    """One assistant turn, rendered as a ``message`` body or as streaming events.

    ``tool_uses`` are ``(id, name, input)``. Stream options: ``drop_after`` drops the
    connection after that many events; ``finish=False`` ends the stream without
    ``message_delta``/``message_stop``.
    """

    text: str = ""
    tool_uses: Sequence[tuple[str, str, dict[str, Any]]] = ()
    usage: tuple[int, int] = (10, 5)
    model: str = "claude-test"
    stop_reason: str | None = None
    drop_after: int | None = None
    finish: bool = True

    @property
    def _stop_reason(self) -> str:
        if self.stop_reason is not None:
            return self.stop_reason
        return "tool_use" if self.tool_uses else "end_turn"

    def _blocks(self) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if self.text:
            blocks.append({"type": "text", "text": self.text})
        for tool_id, name, tool_input in self.tool_uses:
            blocks.append({"type": "tool_use", "id": tool_id, "name": name, "input": tool_input})
        return blocks

    def body(self) -> dict[str, Any]:
        """The ``message`` object."""
        return {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self._blocks(),
            "stop_reason": self._stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": self.usage[0], "output_tokens": self.usage[1]},
        }

    def events(self) -> list[SSEEvent]:
        """The streaming events of this turn."""
        events: list[tuple[str, dict[str, Any]]] = []
        start = self.body()
        start["content"] = []
        start["stop_reason"] = None
        start["usage"] = {"input_tokens": self.usage[0], "output_tokens": 1}
        events.append(("message_start", {"type": "message_start", "message": start}))
        events.append(("ping", {"type": "ping"}))
        for index, block in enumerate(self._blocks()):
            if block["type"] == "text":
                events.append(_block_start(index, {"type": "text", "text": ""}))
                words = block["text"].split(" ")
                for i, word in enumerate(words):
                    piece = word if i == 0 else " " + word
                    events.append(_block_delta(index, {"type": "text_delta", "text": piece}))
            else:
                head = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                events.append(_block_start(index, head))
                text = json.dumps(block["input"])
                half = len(text) // 2
                for part in (text[:half], text[half:]):
                    delta = {"type": "input_json_delta", "partial_json": part}
                    events.append(_block_delta(index, delta))
            events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        if self.finish:
            delta = {
                "type": "message_delta",
                "delta": {"stop_reason": self._stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": self.usage[1]},
            }
            events.append(("message_delta", delta))
            events.append(("message_stop", {"type": "message_stop"}))
        return [SSEEvent(json.dumps(data), event=name) for name, data in events]

    def render(self, request: RecordedRequest) -> Reply:
        """JSON, or SSE when the request asked for a stream."""
        if request.wants_stream:
            return SSEReply(self.events(), drop_after=self.drop_after)
        return JSONReply(self.body())


def _block_start(index: int, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return (
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def _block_delta(index: int, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def message(
    text: str = "",
    tool_uses: Sequence[tuple[str, str, dict[str, Any]]] = (),
    **options: Any,
) -> MessageReply:
    """Shorthand for :class:`MessageReply`."""
    return MessageReply(text=text, tool_uses=tuple(tool_uses), **options)


def error(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONReply:
    """An Anthropic-style error response."""
    body = {"type": "error", "error": {"type": type, "message": message}}
    return JSONReply(body, status=status, headers=headers or {})


class AnthropicServer(ScriptedHTTPServer):
    """A :class:`ScriptedHTTPServer` with Anthropic's URL layout."""

    def __init__(self, handler: Callable[[RecordedRequest], Any] | None = None) -> None:
        super().__init__(handler)

    @property
    def base_url(self) -> str:
        """What to pass as ``base_url`` (the client appends ``/v1/messages``)."""
        return self.url

    @property
    def message_requests(self) -> list[RecordedRequest]:
        """The Messages requests received (what an LLM call costs)."""
        return [r for r in self.requests if r.path.startswith("/v1/messages")]


@pytest.fixture
def anthropic_server() -> Iterator[AnthropicServer]:
    """A running :class:`AnthropicServer`, stopped after the test."""
    with AnthropicServer() as server:
        yield server
