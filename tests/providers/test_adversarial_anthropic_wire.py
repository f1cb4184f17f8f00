"""The Anthropic provider against Messages API answers the basic tests do not send.

Thinking, redacted-thinking and server-tool blocks, block types that do not exist yet,
a turn cut off by ``max_tokens`` in the middle of a tool call, and cached prompt
tokens restated in ``message_delta``: real HTTP, real ``anthropic`` client.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip(
    "anthropic", reason="the optional 'anthropic' extra is not installed (pip install '.[dev]')"
)

from perdure.providers import (
    Anthropic,
    LLMRequest,
    LLMResponse,
    Message,
    ResponseCompleted,
    RetryPolicy,
    StreamEvent,
    TextDelta,
    ToolCall,
    Usage,
)
from tests.support.anthropic_server import AnthropicServer, message
from tests.support.http_server import JSONReply, SSEEvent, SSEReply

pytestmark = pytest.mark.anyio

KEY = "sk-ant-api03-0123456789abcdefghijklmnopqrstuvwxyz"
REQUEST = LLMRequest(model="", messages=(Message("user", "Search, then answer."),))


def event(kind: str, **data: Any) -> SSEEvent:
    return SSEEvent(json.dumps({"type": kind, **data}), event=kind)


def started(**usage: int) -> SSEEvent:
    message = {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "claude-served",
        "content": [],
        "stop_reason": None,
        "usage": {"output_tokens": 1, **usage},
    }
    return event("message_start", message=message)


def block(index: int, content: dict[str, Any], *deltas: dict[str, Any]) -> list[SSEEvent]:
    return [
        event("content_block_start", index=index, content_block=content),
        *(event("content_block_delta", index=index, delta=d) for d in deltas),
        event("content_block_stop", index=index),
    ]


def finished(stop_reason: str, **usage: int) -> list[SSEEvent]:
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    return [event("message_delta", delta=delta, usage=usage), event("message_stop")]


async def answer(server: AnthropicServer, reply: Any, streaming: bool) -> LLMResponse:
    server.push(reply)
    async with Anthropic(
        "claude-x", base_url=server.base_url, api_key=KEY, retry=RetryPolicy(max_attempts=1)
    ) as provider:
        if not streaming:
            return await provider.complete(REQUEST)
        events: list[StreamEvent] = [e async for e in provider.stream(REQUEST)]
    assert isinstance(events[-1], ResponseCompleted)
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(texts) == events[-1].response.message.content  # no hidden text leaked
    return events[-1].response


async def test_blocks_the_canonical_format_does_not_hold_are_skipped(
    anthropic_server: AnthropicServer,
) -> None:
    body = {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "claude-served",
        "stop_reason": "tool_use",
        "content": [
            {"type": "thinking", "thinking": "Let me search.", "signature": "c2ln"},
            {"type": "redacted_thinking", "data": "ZW5jcnlwdGVk"},
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
            {"type": "block_from_the_future", "payload": {"x": 1}},
            {"type": "text", "text": "Found it."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
        ],
        "usage": {"input_tokens": 30, "output_tokens": 12},
    }
    response = await answer(anthropic_server, JSONReply(body), streaming=False)
    assert response.message == Message(
        "assistant", "Found it.", tool_calls=(ToolCall("toolu_1", "get_weather", {"city": "Oslo"}),)
    )
    assert (response.finish_reason, response.usage) == ("tool_calls", Usage(30, 12))


async def test_streamed_blocks_the_canonical_format_does_not_hold_are_skipped(
    anthropic_server: AnthropicServer,
) -> None:
    events = [
        started(input_tokens=30),
        *block(
            0,
            {"type": "thinking", "thinking": "", "signature": ""},
            {"type": "thinking_delta", "thinking": "Let me search."},
            {"type": "signature_delta", "signature": "c2ln"},
        ),
        # a server tool's input streams like a tool_use's: it must not become a call
        *block(
            1,
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
            {"type": "input_json_delta", "partial_json": '{"query": "oslo"}'},
        ),
        *block(2, {"type": "block_from_the_future"}, {"type": "delta_from_the_future", "x": 1}),
        *block(3, {"type": "text", "text": ""}, {"type": "text_delta", "text": "Found it."}),
        *block(
            4,
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
            {"type": "input_json_delta", "partial_json": '{"city": '},
            {"type": "input_json_delta", "partial_json": '"Oslo"}'},
        ),
        *finished("tool_use", output_tokens=12),
    ]
    response = await answer(anthropic_server, SSEReply(events), streaming=True)
    assert response.message == Message(
        "assistant", "Found it.", tool_calls=(ToolCall("toolu_1", "get_weather", {"city": "Oslo"}),)
    )
    assert (response.finish_reason, response.usage) == ("tool_calls", Usage(30, 12))


async def test_max_tokens_in_the_middle_of_a_tool_call(anthropic_server: AnthropicServer) -> None:
    # The arguments are cut short: kept verbatim for the runtime to report as invalid,
    # and the turn says it ran out of tokens.
    events = [
        started(input_tokens=30),
        event(
            "content_block_start",
            index=0,
            content_block={"type": "tool_use", "id": "toolu_1", "name": "write", "input": {}},
        ),
        event(
            "content_block_delta",
            index=0,
            delta={"type": "input_json_delta", "partial_json": '{"text": "a very long'},
        ),
        *finished("max_tokens", output_tokens=4096),
    ]
    response = await answer(anthropic_server, SSEReply(events), streaming=True)
    assert response.message.tool_calls == (ToolCall("toolu_1", "write", '{"text": "a very long'),)
    assert response.finish_reason == "length"
    assert response.usage == Usage(30, 4096)


async def test_cached_prompt_tokens_survive_a_message_delta_that_restates_some_usage(
    anthropic_server: AnthropicServer,
) -> None:
    events = [
        started(input_tokens=3, cache_read_input_tokens=1000, cache_creation_input_tokens=200),
        *block(0, {"type": "text", "text": ""}, {"type": "text_delta", "text": "Hi."}),
        # cumulative counts; this one restates input_tokens only
        *finished("end_turn", output_tokens=9, input_tokens=3),
    ]
    response = await answer(anthropic_server, SSEReply(events), streaming=True)
    assert response.usage == Usage(1203, 9)
    # the same counts, not streamed
    body = {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "claude-served",
        "stop_reason": "end_turn",
        "content": [{"type": "text", "text": "Hi."}],
        "usage": {
            "input_tokens": 3,
            "cache_read_input_tokens": 1000,
            "cache_creation_input_tokens": 200,
            "output_tokens": 9,
        },
    }
    assert (await answer(anthropic_server, JSONReply(body), streaming=False)).usage == Usage(
        1203, 9
    )


async def test_a_tool_input_nested_absurdly_deep_is_kept_as_text(
    anthropic_server: AnthropicServer,
) -> None:
    deep: Any = []
    for _ in range(500):
        deep = [deep]
    body = {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "claude-served",
        "stop_reason": "tool_use",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": deep}}],
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    response = await answer(anthropic_server, JSONReply(body), streaming=False)
    (call,) = response.message.tool_calls
    assert isinstance(call.arguments, str) and call.arguments.startswith('{"a": [[[')


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_tool_use_ids_repeated_in_a_turn_are_made_distinct(
    anthropic_server: AnthropicServer, streaming: bool
) -> None:
    # Kimi's Anthropic-compatible endpoint gives parallel calls one id ("grep:3"); the
    # next request would carry two tool_results for it, which the API refuses.
    uses = [("grep:3", "grep", {"q": "a"}), ("grep:3", "grep", {"q": "b"})]
    response = await answer(anthropic_server, message("", uses), streaming)
    assert response.message.tool_calls == (
        ToolCall("grep:3", "grep", {"q": "a"}),
        ToolCall("grep:3_1", "grep", {"q": "b"}),
    )
