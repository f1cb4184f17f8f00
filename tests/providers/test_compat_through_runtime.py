"""A tool-using agent, through the runtime, on a server that speaks Chat Completions loosely.

The server answers as llama.cpp builds, Ollama, text-generation-inference and small
proxies do: tool calls without ids, arguments as an object or as broken JSON, finish
reason "stop" for a turn that calls tools, no model and no usage. What matters is what
the runtime makes of it: each call runs (or is refused) once, the next request pairs
every result with its own call, the model is told which arguments were bad, and the
recorded history replays to the same execution without a request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip(
    "openai", reason="the optional 'openai' extra is not installed (pip install '.[dev]')"
)

from perdure import Agent, Replayer, Result, Runtime, tool
from perdure.events import decode, execution_stream
from perdure.providers import OpenAI, RetryPolicy
from tests.support.http_server import JSONReply, RecordedRequest, SSEEvent, SSEReply
from tests.support.openai_server import OpenAIServer, completion

pytestmark = pytest.mark.anyio

ANSWER = "Paris is sunny and so is Oslo."


def loose_turn(calls: list[dict[str, Any]], streaming: bool) -> Any:
    """A turn calling ``calls`` ({"name", "arguments"}) with no ids, as a loose server does."""
    wire = [{"type": "function", "function": c} for c in calls]
    if not streaming:
        message = {"role": "assistant", "content": None, "tool_calls": wire}
        return JSONReply({"choices": [{"message": message, "finish_reason": "stop"}]})
    # Each whole call in a chunk of its own, with neither index nor id.
    chunks = [{"choices": [{"delta": {"tool_calls": [w]}}]} for w in wire]
    chunks.append({"choices": [{"delta": {}, "finish_reason": "stop"}]})
    return SSEReply([SSEEvent(json.dumps(c)) for c in chunks] + [SSEEvent("[DONE]")])


def loose_server(streaming: bool) -> Any:
    """Turn 1: Paris (arguments as an object) and Oslo (broken JSON); turn 2: Oslo again."""

    def handler(request: RecordedRequest) -> Any:
        turns = sum(1 for m in request.json["messages"] if m["role"] == "assistant")
        if turns == 0:
            return loose_turn(
                [
                    {"name": "get_weather", "arguments": {"city": "Paris"}},
                    {"name": "get_weather", "arguments": '{"city": "Os'},
                ],
                streaming,
            )
        if turns == 1:
            return loose_turn([{"name": "get_weather", "arguments": '{"city": "Oslo"}'}], streaming)
        return completion(ANSWER, model="")

    return handler


async def run(rt: Runtime, agent: Agent, streaming: bool) -> Result:
    with anyio.fail_after(30):
        if not streaming:
            return await rt.run(agent, "Weather in Paris and Oslo?", execution_id="loose-1")
        items = [
            i async for i in rt.stream(agent, "Weather in Paris and Oslo?", execution_id="loose-1")
        ]
    result = items[-1]
    assert isinstance(result, Result)
    return result


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_a_loose_server_drives_a_tool_using_agent_and_replays(
    tmp_path: Path, streaming: bool
) -> None:
    looked_up: list[str] = []

    @tool("get_weather", description="The weather in a city")
    def get_weather(city: str) -> dict[str, str]:
        looked_up.append(city)
        return {"city": city, "sky": "sunny"}

    with OpenAIServer(loose_server(streaming)) as server:
        llm = OpenAI(
            "local-model",
            base_url=server.base_url,
            retry=RetryPolicy(max_attempts=1),
        )
        agent = Agent("weather", instructions="Answer briefly.", tools=[get_weather], llm=llm)
        async with Runtime(tmp_path / "data", durability="process") as rt:
            result = await run(rt, agent, streaming)
        asked = len(server.chat_requests)
        last = server.chat_requests[-1].json["messages"]

        # A new process on the same data: the execution is done, nothing is asked again.
        async with Runtime(tmp_path / "data", durability="process") as rt:
            again = await rt.run(agent, "Weather in Paris and Oslo?", execution_id="loose-1")
            events = [decode(r) async for r in rt.log.read(execution_stream("loose-1"))]
        assert len(server.chat_requests) == asked == 3
        await llm.aclose()

    assert result.status == "completed" and result.output == ANSWER
    assert again.output == ANSWER and again.status == "completed"
    assert looked_up == ["Paris", "Oslo"]  # the broken call never ran; none ran twice

    calls = [c for m in last if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    results = [m for m in last if m["role"] == "tool"]
    ids = [c["id"] for c in calls]
    assert ids == ["call_0", "call_1", "call_2"]  # one per call of the conversation
    assert [r["tool_call_id"] for r in results] == ids  # each result under its own call
    assert calls[1]["function"]["arguments"] == '{"city": "Os'  # sent back as it came
    assert "JSON object" in results[1]["content"]  # the model is told what was wrong
    assert "sunny" in results[0]["content"] and "sunny" in results[2]["content"]

    report = Replayer([agent]).replay(events)
    assert report.ok and report.status == "completed"
    served = [e for e in events if type(e).__name__ == "LLMCompleted"]
    # no model in the answers: the one asked for is recorded as the one that served
    assert {e.response["model"] for e in served} == {"local-model"}
