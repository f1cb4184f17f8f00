"""One conformance suite that every provider passes.

Each harness builds a provider that answers successive calls with successive scripted
turns, through whatever that provider really talks to: Scripted and CallableProvider
in process, OpenAI and Anthropic over HTTP to their fake servers (OpenAI's twice: once
as OpenAI answers, once as loosely compatible servers do), and a Fallback whose
primary is an OpenAI endpoint that is down.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import cbor2
import pytest

from perdure.providers import (
    Anthropic,
    AuthenticationError,
    CallableProvider,
    Fallback,
    LLMRequest,
    LLMResponse,
    Message,
    OpenAI,
    Provider,
    ProviderError,
    ProviderUnavailableError,
    ResponseAssembler,
    ResponseCompleted,
    RetryableProviderError,
    RetryPolicy,
    Scripted,
    StreamEvent,
    TerminalProviderError,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)
from perdure.providers.streams import split_words
from tests.providers.conftest import SleepRecorder
from tests.support import anthropic_server as anthropic_wire
from tests.support import openai_server as openai_wire
from tests.support.anthropic_server import AnthropicServer
from tests.support.http_server import JSONReply, RecordedRequest, SSEEvent, SSEReply
from tests.support.openai_server import OpenAIServer

pytestmark = pytest.mark.anyio

USAGE = (12, 7)


@dataclass(frozen=True)
class Turn:
    """What the model answers to one call: text, tool calls, or a failure."""

    text: str = ""
    calls: tuple[tuple[str, str, dict[str, Any]], ...] = ()
    fail: str | None = None  # "retryable" or "terminal"


TEXT = Turn(text="The weather in Paris is sunny, 21 degrees.")
CALLS = Turn(
    calls=(
        ("call_1", "get_weather", {"location": "Paris", "unit": "celsius"}),
        ("call_2", "get_time", {"zone": "Europe/Paris"}),
    )
)
RETRYABLE = Turn(fail="retryable")
TERMINAL = Turn(fail="terminal")

TOOLS = (
    ToolSpec("get_weather", "Weather for a place", {"type": "object", "properties": {}}),
    ToolSpec("get_time", "Time in a zone", {"type": "object", "properties": {}}),
)


def request() -> LLMRequest:
    messages = [Message("system", "Be helpful."), Message("user", "Weather and time in Paris?")]
    return LLMRequest(model="", messages=messages, tools=TOOLS)


# -- harnesses: turns -> a provider --------------------------------------------------


def _scripted_reply(turn: Turn) -> Any:
    if turn.fail == "retryable":
        return ProviderUnavailableError("scripted outage", status=503)
    if turn.fail == "terminal":
        return AuthenticationError("scripted bad key", status=401)
    calls = tuple(ToolCall(i, n, a) for i, n, a in turn.calls)
    return Message("assistant", turn.text, tool_calls=calls)


def scripted(turns: list[Turn], ctx: Context) -> Provider:
    queue = list(turns)
    return Scripted(lambda req: _scripted_reply(queue.pop(0)), usage=Usage(*USAGE))


def callable_(turns: list[Turn], ctx: Context) -> Provider:
    queue = list(turns)

    def fn(messages: list[dict[str, Any]], tools: list[dict[str, Any]], model: str) -> dict:
        turn = queue.pop(0)
        if turn.fail == "retryable":
            raise ProviderUnavailableError("function outage")
        if turn.fail == "terminal":
            raise AuthenticationError("function bad key")
        return {
            "content": turn.text,
            "tool_calls": [{"id": i, "name": n, "arguments": a} for i, n, a in turn.calls],
            "usage": {"input_tokens": USAGE[0], "output_tokens": USAGE[1]},
        }

    return CallableProvider(fn, name="custom", model="custom-1")


def _openai_reply(turn: Turn) -> Any:
    if turn.fail == "retryable":
        return openai_wire.error(503, "overloaded", type="server_error")
    if turn.fail == "terminal":
        return openai_wire.error(401, "Incorrect API key provided")
    return openai_wire.completion(turn.text, turn.calls, usage=USAGE)


def openai(turns: list[Turn], ctx: Context) -> Provider:
    server: OpenAIServer = ctx.fixture("openai_server")
    server.push(*[_openai_reply(t) for t in turns])
    return ctx.closing(
        OpenAI("gpt-test", base_url=server.base_url, api_key="sk-conformance", retry=ctx.retry)
    )


def _loose_reply(turn: Turn, streaming: bool) -> Any:
    """``turn`` as OpenAI-compatible servers often send it (see openai_loose)."""
    if turn.fail is not None:
        return _openai_reply(turn)
    usage = {"prompt_tokens": USAGE[0], "completion_tokens": USAGE[1]}
    if not streaming:
        # text-generation-inference's shape: arguments as objects, "stop" with calls,
        # no model, no response id, no choice index.
        message: dict[str, Any] = {"role": "assistant", "content": turn.text or None}
        if turn.calls:
            message["tool_calls"] = [
                {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                for i, n, a in turn.calls
            ]
        return JSONReply(
            {"choices": [{"message": message, "finish_reason": "stop"}], "usage": usage}
        )
    # Older Ollama's: finish_reason "" on every chunk, each whole call in one piece and
    # all numbered 0, usage in the finishing chunk, no model.
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": word} for word in split_words(turn.text)]
    for i, n, a in turn.calls:
        function = {"name": n, "arguments": json.dumps(a)}
        deltas.append(
            {"tool_calls": [{"index": 0, "id": i, "type": "function", "function": function}]}
        )
    chunks = [{"choices": [{"delta": d, "finish_reason": ""}]} for d in deltas]
    chunks.append({"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": usage})
    return SSEReply([SSEEvent(json.dumps(c)) for c in chunks] + [SSEEvent("[DONE]")])


def openai_loose(turns: list[Turn], ctx: Context) -> Provider:
    # The OpenAI provider against a server that strays from the format as real ones do,
    # and refuses stream_options (as Azure AI model inference does).
    server: OpenAIServer = ctx.fixture("openai_server")
    queue = list(turns)

    def handler(request: RecordedRequest) -> Any:
        body = request.json
        if body.get("stream") and "stream_options" in body:
            return openai_wire.error(400, "Extra parameters ['stream_options'] are not allowed")
        return _loose_reply(queue.pop(0), streaming=bool(body.get("stream")))

    server.handler = handler
    return ctx.closing(
        OpenAI("gpt-test", base_url=server.base_url, api_key="sk-conformance", retry=ctx.retry)
    )


def _anthropic_reply(turn: Turn) -> Any:
    if turn.fail == "retryable":
        return anthropic_wire.error(529, "Overloaded", type="overloaded_error")
    if turn.fail == "terminal":
        return anthropic_wire.error(401, "invalid x-api-key", type="authentication_error")
    return anthropic_wire.message(turn.text, turn.calls, usage=USAGE)


def anthropic(turns: list[Turn], ctx: Context) -> Provider:
    if importlib.util.find_spec("anthropic") is None:
        pytest.skip("the optional 'anthropic' extra is not installed")
    server: AnthropicServer = ctx.fixture("anthropic_server")
    server.push(*[_anthropic_reply(t) for t in turns])
    return ctx.closing(
        Anthropic("claude-test", base_url=server.base_url, api_key="k-conf", retry=ctx.retry)
    )


def fallback(turns: list[Turn], ctx: Context) -> Provider:
    # The primary is an OpenAI endpoint that is down for good; the secondary serves.
    server: OpenAIServer = ctx.fixture("openai_server")
    server.handler = lambda req: openai_wire.error(503, "down", type="server_error")
    primary = ctx.closing(
        OpenAI("gpt-down", base_url=server.base_url, api_key="sk-conformance", retry=ctx.retry)
    )
    return Fallback([primary, callable_(turns, ctx)])


HARNESSES: dict[str, Callable[[list[Turn], Context], Provider]] = {
    "scripted": scripted,
    "callable": callable_,
    "openai": openai,
    "openai-loose": openai_loose,
    "anthropic": anthropic,
    "fallback": fallback,
}


class Context:
    """What a harness may use: fixtures, a fast retry policy, cleanup."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self.retry = RetryPolicy(max_attempts=1, sleep=SleepRecorder())
        self.to_close: list[Any] = []

    def fixture(self, name: str) -> Any:
        return self._request.getfixturevalue(name)

    def closing(self, provider: Any) -> Any:
        self.to_close.append(provider)
        return provider


@pytest.fixture(params=sorted(HARNESSES))
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Provider]]:
    """``make(turn, ...)``: a provider answering successive calls with those turns."""
    ctx = Context(request)
    harness = HARNESSES[request.param]
    yield lambda *turns: harness(list(turns), ctx)
    for provider in ctx.to_close:
        await provider.aclose()


async def stream_all(provider: Provider, req: LLMRequest) -> list[StreamEvent]:
    return [event async for event in provider.stream(req)]


# -- the suite -----------------------------------------------------------------------


async def test_is_a_provider(make: Callable[..., Provider]) -> None:
    provider = make()
    assert isinstance(provider, Provider)
    assert isinstance(provider.name, str) and provider.name
    assert isinstance(provider.model, str) and provider.model


async def test_text_reply(make: Callable[..., Provider]) -> None:
    provider = make(TEXT)
    response = await provider.complete(request())
    assert response.message == Message("assistant", TEXT.text)
    assert response.finish_reason == "stop"
    assert response.usage == Usage(*USAGE)
    assert response.provider and response.model


async def test_tool_calls_with_parsed_arguments(make: Callable[..., Provider]) -> None:
    provider = make(CALLS)
    response = await provider.complete(request())
    assert response.finish_reason == "tool_calls"
    assert response.message.tool_calls == tuple(ToolCall(i, n, a) for i, n, a in CALLS.calls)
    assert all(isinstance(c.arguments, dict) for c in response.message.tool_calls)


@pytest.mark.parametrize("turn", [TEXT, CALLS], ids=["text", "calls"])
async def test_stream_ends_with_the_response_complete_returns(
    make: Callable[..., Provider], turn: Turn
) -> None:
    provider = make(turn, turn)
    events = await stream_all(provider, request())
    response = await provider.complete(request())

    assert isinstance(events[-1], ResponseCompleted)
    assert sum(isinstance(e, ResponseCompleted) for e in events) == 1
    assert events[-1].response == response
    # The deltas carry the whole answer: assembling them gives the final message.
    assembler = ResponseAssembler()
    for event in events[:-1]:
        if isinstance(event, TextDelta):
            assembler.add_text(event.text)
        else:
            assert isinstance(event, ToolCallDelta)
            assembler.add_tool_call(event)
    assert assembler.text == response.message.content
    assert assembler.tool_calls() == response.message.tool_calls


@pytest.mark.parametrize("turn", [TEXT, CALLS], ids=["text", "calls"])
async def test_responses_round_trip_through_dicts_and_cbor(
    make: Callable[..., Provider], turn: Turn
) -> None:
    response = await make(turn).complete(request())
    data = response.to_dict()
    assert LLMResponse.from_dict(data) == response
    assert LLMResponse.from_dict(cbor2.loads(cbor2.dumps(data))) == response


async def test_the_request_is_left_untouched(make: Callable[..., Provider]) -> None:
    provider = make(TEXT)
    req = request()
    before = list(req.messages)
    await provider.complete(req)
    assert list(req.messages) == before
    assert isinstance(req.messages, list) and len(req.messages) == 2


async def test_retryable_failure_is_a_retryable_provider_error(
    make: Callable[..., Provider],
) -> None:
    provider = make(RETRYABLE, RETRYABLE)
    with pytest.raises(RetryableProviderError) as caught:
        await provider.complete(request())
    assert isinstance(caught.value, ProviderError)
    with pytest.raises(RetryableProviderError):
        await stream_all(provider, request())


async def test_terminal_failure_is_a_terminal_provider_error(
    make: Callable[..., Provider],
) -> None:
    provider = make(TERMINAL, TERMINAL)
    with pytest.raises(TerminalProviderError) as caught:
        await provider.complete(request())
    assert isinstance(caught.value, ProviderError)
    assert caught.value.provider and caught.value.model
    with pytest.raises(TerminalProviderError):
        await stream_all(provider, request())
