"""A fake OpenAI-compatible Chat Completions server on 127.0.0.1.

It speaks the real wire format: ``POST /v1/chat/completions`` answered with a
``chat.completion`` JSON body, or, when the request asks for ``"stream": true``, with
``chat.completion.chunk`` server-sent events ending in ``data: [DONE]``. Script it per
test with :meth:`OpenAIServer.push` (a queue) or a ``handler`` function of the request
(to serve a multi-turn agent by request content), and read back ``requests``.

Use it as a pytest fixture (``openai_server``; import it into a ``conftest.py``) or as
a plain context manager::

    with OpenAIServer() as server:
        server.push(completion("hello"))
        client = OpenAI("gpt-test", base_url=server.base_url, api_key="sk-test")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.http_server import (
    Gate,
    JSONReply,
    RecordedRequest,
    Reply,
    ScriptedHTTPServer,
    SSEEvent,
    SSEReply,
)

__all__ = ["Completion", "OpenAIServer", "completion", "error", "openai_server"]


@dataclass(frozen=True)
class Completion:
    """One assistant turn, rendered as JSON or as SSE chunks as the request asks.

    ``tool_calls`` are ``(id, name, arguments)``; ``arguments`` is a dict (sent as a JSON
    string, as the API does) or a raw string sent verbatim (to script invalid JSON).
    Stream options: ``drop_after`` drops the connection after that many events;
    ``gate`` pauses the stream at a :class:`~tests.support.http_server.Gate`;
    ``finish=False`` ends the stream (with ``[DONE]``) without any finish reason.
    """

    content: str | None = ""
    tool_calls: Sequence[tuple[str, str, Any]] = ()
    usage: tuple[int, int] | None = (10, 5)
    model: str = "gpt-test"
    finish_reason: str | None = None
    drop_after: int | None = None
    gate: Gate | None = None
    finish: bool = True

    @property
    def _finish_reason(self) -> str:
        if self.finish_reason is not None:
            return self.finish_reason
        return "tool_calls" if self.tool_calls else "stop"

    @staticmethod
    def _arguments(arguments: Any) -> str:
        return arguments if isinstance(arguments, str) else json.dumps(arguments)

    def body(self) -> dict[str, Any]:
        """The ``chat.completion`` object."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": self._arguments(arguments)},
                }
                for call_id, name, arguments in self.tool_calls
            ]
        body: dict[str, Any] = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self._finish_reason,
                }
            ],
        }
        if self.usage is not None:
            body["usage"] = _usage(self.usage)
        return body

    def chunks(self) -> list[dict[str, Any]]:
        """The ``chat.completion.chunk`` objects of the streamed form of this turn."""
        chunks = [self._chunk({"role": "assistant", "content": ""})]
        # Word-sized text pieces, as a real server sends them.
        for word in _words(self.content or ""):
            chunks.append(self._chunk({"content": word}))
        for index, (call_id, name, arguments) in enumerate(self.tool_calls):
            text = self._arguments(arguments)
            half = len(text) // 2
            head = {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": text[:half]},
            }
            chunks.append(self._chunk({"tool_calls": [head]}))
            tail = {"index": index, "function": {"arguments": text[half:]}}
            chunks.append(self._chunk({"tool_calls": [tail]}))
        if self.finish:
            chunks.append(self._chunk({}, finish_reason=self._finish_reason))
        if self.usage is not None:
            usage_chunk = self._chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = _usage(self.usage)
            chunks.append(usage_chunk)
        return chunks

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def events(self) -> list[SSEEvent]:
        """The SSE events of the streamed form, ``[DONE]`` included."""
        events = [SSEEvent(json.dumps(chunk)) for chunk in self.chunks()]
        events.append(SSEEvent("[DONE]"))
        return events

    def render(self, request: RecordedRequest) -> Reply:
        """JSON, or SSE when the request asked for a stream."""
        if request.wants_stream:
            return SSEReply(self.events(), drop_after=self.drop_after, gate=self.gate)
        return JSONReply(self.body())


def completion(
    content: str | None = "",
    tool_calls: Sequence[tuple[str, str, Any]] = (),
    **options: Any,
) -> Completion:
    """Shorthand for :class:`Completion`."""
    return Completion(content=content, tool_calls=tuple(tool_calls), **options)


def error(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONReply:
    """An OpenAI-style error response."""
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return JSONReply(body, status=status, headers=headers or {})


def _usage(usage: tuple[int, int]) -> dict[str, int]:
    prompt, completion_tokens = usage
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def _words(text: str) -> list[str]:
    words: list[str] = []
    for i, word in enumerate(text.split(" ")):
        words.append(word if i == 0 else " " + word)
    return [w for w in words if w]


class OpenAIServer(ScriptedHTTPServer):
    """A :class:`ScriptedHTTPServer` with OpenAI's URL layout."""

    def __init__(
        self, handler: Callable[[RecordedRequest], Any] | None = None, port: int = 0
    ) -> None:
        super().__init__(handler, port)

    @property
    def base_url(self) -> str:
        """What to pass as ``base_url`` (``http://127.0.0.1:PORT/v1``)."""
        return self.url + "/v1"

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The Chat Completions requests received (what an LLM call costs)."""
        return [r for r in self.requests if r.path.endswith("/chat/completions")]


@pytest.fixture
def openai_server() -> Iterator[OpenAIServer]:
    """A running :class:`OpenAIServer`, stopped after the test."""
    with OpenAIServer() as server:
        yield server


def demo_handler(request: RecordedRequest) -> Completion:
    """Serve a two-step weather conversation by request content (no script needed).

    The first turn calls ``get_weather`` for the city named last in the user's message;
    once a tool result is in the conversation, it answers with that result.
    """
    messages = request.json["messages"]
    tool_results = [m for m in messages if m.get("role") == "tool"]
    if not tool_results:
        city = messages[-1]["content"].rstrip("?.! ").split()[-1]
        return completion(None, [("call_demo_1", "get_weather", {"city": city})])
    return completion(f"Here is what I found: {tool_results[-1]['content']}")


def main() -> None:
    """``python -m tests.support.openai_server [PORT]``: serve :func:`demo_handler`."""
    import signal
    import sys

    server = OpenAIServer(demo_handler, int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    with server:
        print(f"OPENAI_BASE_URL={server.base_url} (Ctrl-C to stop)", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    main()
