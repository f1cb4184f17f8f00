"""Durable streaming and custom providers, through the runtime, when things go wrong.

A consumer that stops listening mid-stream, a provider that fails half way through
an answer, a custom function returning what the log cannot hold, a server sending
text no UTF-8 encoder takes: what the consumer sees, what is recorded, how often the
model is asked.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip(
    "openai", reason="the optional 'openai' extra is not installed (pip install '.[dev]')"
)

from perdure import Agent, Result, Runtime
from perdure.events import decode, execution_stream
from perdure.providers import (
    CallableProvider,
    Fallback,
    LLMRequest,
    MalformedResponseError,
    OpenAI,
    RetryPolicy,
    Scripted,
    StreamEvent,
    TerminalProviderError,
    TextDelta,
)
from tests.support.http_server import Gate, JSONReply, RawReply, SSEEvent, SSEReply
from tests.support.openai_server import OpenAIServer, completion

pytestmark = pytest.mark.anyio

ANSWER = "one two three four five"


async def no_sleep(seconds: float) -> None:
    return None


def llm(server: OpenAIServer, attempts: int = 2) -> OpenAI:
    return OpenAI(
        "gpt-test",
        base_url=server.base_url,
        api_key="sk-test-0123456789",
        retry=RetryPolicy(max_attempts=attempts, sleep=no_sleep),
    )


async def recorded_types(rt: Runtime, execution_id: str) -> list[str]:
    return [decode(r).type async for r in rt.log.read(execution_stream(execution_id))]


@pytest.mark.parametrize("how", ["cancel", "break"])
async def test_a_consumer_that_stops_mid_stream_does_not_stop_the_execution(
    tmp_path: Path, how: str
) -> None:
    gate = Gate(after=3)  # the role chunk, "one", " two": then the server waits
    with OpenAIServer(lambda r: completion(ANSWER)) as server:
        server.push(completion(ANSWER, gate=gate))
        agent = Agent("listener", llm=llm(server))
        async with Runtime(tmp_path / "data", durability="process") as rt:
            seen: list[Any] = []
            with anyio.fail_after(20):
                with anyio.CancelScope() as scope:
                    async for item in rt.stream(agent, "count", execution_id="c-1"):
                        seen.append(item)
                        if isinstance(item, TextDelta):
                            if how == "break":
                                break
                            scope.cancel()
                            await anyio.sleep(0)  # the cancellation lands here
                gate.release.set()  # the model finishes its answer after we left
                result = await rt.wait("c-1")
            again = [i async for i in rt.stream(agent, "count", execution_id="c-1")]
            types = await recorded_types(rt, "c-1")
        assert len(server.chat_requests) == 1  # the call was neither cut nor repeated
    assert seen == [TextDelta("one")]
    assert result.status == "completed" and result.output == ANSWER
    assert types.count("llm.completed") == 1
    assert len(again) == 1 and isinstance(again[0], Result) and again[0].output == ANSWER


class _BreaksHalfWay:
    """A custom provider whose stream fails after part of the answer (no retry policy)."""

    name = "halfway"
    model = "m-half"

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    async def complete(self, request: LLMRequest) -> Any:  # pragma: no cover - unused
        raise AssertionError("streaming was expected")

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
        self.calls += 1
        yield TextDelta("The answer is ")
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        TerminalProviderError("content policy", status=400),
        MalformedResponseError("truncated event"),  # retryable, but nothing bounds a re-ask
    ],
    ids=["terminal", "retryable-without-policy"],
)
async def test_a_provider_failing_half_way_fails_the_step_and_records_no_answer(
    tmp_path: Path, error: Exception
) -> None:
    provider = _BreaksHalfWay(error)
    async with Runtime(tmp_path / "data", durability="process") as rt:
        with anyio.fail_after(20):
            items = [i async for i in rt.stream(Agent("h", llm=provider), "q", execution_id="h-1")]
        types = await recorded_types(rt, "h-1")
    assert items[0] == TextDelta("The answer is ")  # the consumer saw the part...
    result = items[-1]
    assert isinstance(result, Result) and result.status == "failed"  # ...then the failure
    assert result.error is not None and result.error["type"] == type(error).__name__
    assert "execution 'h-1' step 1" in result.error["message"]
    assert "halfway" in result.error["message"]
    assert "llm.completed" not in types and types[-1] == "execution.failed"  # no half answer
    assert provider.calls == 1


@pytest.mark.parametrize("streaming", [False, True], ids=["run", "stream"])
async def test_a_custom_function_returning_garbage_names_execution_and_step(
    tmp_path: Path, streaming: bool
) -> None:
    calls = 0

    def answer(messages: list[dict], tools: list[dict], model: str) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {
            "tool_calls": [{"name": "lookup", "arguments": {"when": datetime.date(2026, 1, 1)}}]
        }

    agent = Agent("custom", llm=CallableProvider(answer, name="mine"))
    async with Runtime(tmp_path / "data", durability="process") as rt:
        if streaming:
            r = [i async for i in rt.stream(agent, "go", execution_id="cg-1")][-1]
        else:
            r = await rt.run(agent, "go", execution_id="cg-1")
        types = await recorded_types(rt, "cg-1")
    assert r.status == "failed" and r.error is not None
    message = r.error["message"]
    assert r.error["type"] == "MalformedResponseError"
    assert "execution 'cg-1' step 1" in message
    assert "'tool_calls'[0]['arguments'] that are not JSON data" in message
    assert "date is not JSON serializable" in message
    # refused before anything was recorded: no answer in the log to break a later turn
    assert "llm.completed" not in types and calls == 1


async def test_custom_arguments_arrive_as_json_would_deliver_them() -> None:
    def answer(messages: list[dict], tools: list[dict], model: str) -> dict[str, Any]:
        return {"tool_calls": [{"name": "f", "arguments": {"ids": (1, 2), "nested": {"k": 1}}}]}

    request = LLMRequest(model="", messages=())
    (call,) = (await CallableProvider(answer).complete(request)).message.tool_calls
    assert call.arguments == {"ids": [1, 2], "nested": {"k": 1}}


_LONE_SURROGATE = '{"choices": [{"message": {"role": "assistant", "content": "bad \\ud800 text"}}]}'


@pytest.mark.parametrize("streaming", [False, True], ids=["run", "stream"])
async def test_text_no_utf8_encoder_takes_is_recorded_with_a_replacement_character(
    tmp_path: Path, streaming: bool
) -> None:
    # JSON may escape a lone surrogate; Python decodes it; the log (CBOR, UTF-8) cannot
    # hold it. Before, the step crashed the engine on every restart, each asking again.
    chunk = {"choices": [{"index": 0, "delta": {"content": "bad \ud800 text"}}]}
    done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    def reply(request: Any) -> Any:
        if request.wants_stream:
            return SSEReply([SSEEvent(json.dumps(chunk)), SSEEvent(json.dumps(done))])
        return RawReply(_LONE_SURROGATE.encode())

    with OpenAIServer(reply) as server:
        agent = Agent("u", llm=llm(server, attempts=1))
        async with Runtime(tmp_path / "data", durability="process") as rt:
            with anyio.fail_after(20):
                if streaming:
                    items = [i async for i in rt.stream(agent, "q", execution_id="u-1")]
                    r = items[-1]
                    shown = "".join(i.text for i in items if isinstance(i, TextDelta))
                    assert shown == "bad \ufffd text"
                else:
                    r = await rt.run(agent, "q", execution_id="u-1")
        assert len(server.chat_requests) == 1
    assert r.status == "completed" and r.output == "bad \ufffd text"


async def test_a_custom_function_returning_a_lone_surrogate_is_recorded_too(
    tmp_path: Path,
) -> None:
    agent = Agent(
        "c", llm=CallableProvider(lambda m, t, model: {"content": "x\udcff"}, name="mine")
    )
    async with Runtime(tmp_path / "data", durability="process") as rt:
        r = await rt.run(agent, "q", execution_id="cs-1")
    assert r.status == "completed" and r.output == "x\ufffd"


async def test_a_primary_that_keeps_breaking_mid_stream_hands_over_to_the_backup(
    tmp_path: Path,
) -> None:
    # Once the primary's retries for a stream cut mid-answer are spent, the next member
    # serves, as it does for a call nobody watches.
    with OpenAIServer(lambda r: completion(ANSWER, drop_after=3)) as down:
        chain = Fallback([llm(down, attempts=2), Scripted(["from the backup"], name="backup")])
        async with Runtime(tmp_path / "data", durability="process") as rt:
            with anyio.fail_after(20):
                items = [i async for i in rt.stream(Agent("f", llm=chain), "q", execution_id="f")]
        asked = len(down.chat_requests)
    result = items[-1]
    assert isinstance(result, Result) and result.output == "from the backup"
    assert asked == 2  # the primary's two attempts, no more
    assert list(result.usage.by_model) == ["backup/scripted"]
    retrying = [
        i
        for i, item in enumerate(items)
        if isinstance(item, dict) and item.get("event") == "retrying"
    ]
    assert len(retrying) == 2  # one before the second attempt, one before the handover
    after = [item.text for item in items[retrying[-1] :] if isinstance(item, TextDelta)]
    assert "".join(after) == "from the backup"  # what the consumer keeps is the backup's


async def test_without_a_watcher_the_same_chain_completes_on_the_backup(tmp_path: Path) -> None:
    # The same chain, not streamed: the primary's retries run out and the backup serves.
    with OpenAIServer(lambda r: JSONReply(completion(ANSWER).body(), status=503)) as down:
        chain = Fallback([llm(down), Scripted(["from the backup"], name="backup")])
        async with Runtime(tmp_path / "data", durability="process") as rt:
            r = await rt.run(Agent("f", llm=chain), "q", execution_id="f")
    assert r.status == "completed" and r.output == "from the backup"


async def test_closing_a_provider_stream_closes_its_http_response_at_once(
    openai_server: OpenAIServer,
) -> None:
    # The runtime closes a stream it stops reading (a consumer gone, a malformed event);
    # the HTTP response under it must be released then, not when the garbage collector
    # finalizes an abandoned generator.
    closed: list[str] = []

    class Tracked(OpenAI):
        async def _stream_once(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
            try:
                async for event in super()._stream_once(request):
                    yield event
            finally:
                closed.append("attempt")

    openai_server.push(completion(ANSWER))
    async with Tracked(
        "gpt-test", base_url=openai_server.base_url, api_key="sk-test-0123456789"
    ) as provider:
        events = provider.stream(LLMRequest(model="", messages=()))
        assert await events.__anext__() == TextDelta("one")
        await events.aclose()  # type: ignore[attr-defined]
        assert closed == ["attempt"]
