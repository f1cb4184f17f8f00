"""The OpenAI provider against what real OpenAI-compatible servers actually send.

vLLM, Ollama, llama.cpp, LM Studio, Mistral and proxies in front of them all speak
"the" Chat Completions format with their own quirks: tool calls numbered 0 every
time, pieces with no index and no id, arguments streamed as objects, content as a
list of parts, whole-float token counts, or a body that is not what was asked for.
Each test sends one such quirk over real HTTP through the real ``openai`` client.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip(
    "openai", reason="the optional 'openai' extra is not installed (pip install '.[dev]')"
)

from perdure.providers import (
    LLMRequest,
    LLMResponse,
    MalformedResponseError,
    Message,
    OpenAI,
    ResponseCompleted,
    RetryPolicy,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from tests.support.http_server import JSONReply, SSEEvent, SSEReply
from tests.support.openai_server import OpenAIServer, completion

pytestmark = pytest.mark.anyio

KEY = "sk-test-0123456789abcdefghijklmnopqrstuvwxyz"
REQUEST = LLMRequest(model="", messages=(Message("user", "Weather in Paris and Oslo?"),))
ONE_TRY = RetryPolicy(max_attempts=1)


def chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    *,
    usage: dict[str, Any] | None = None,
) -> SSEEvent:
    body: dict[str, Any] = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "model": "served-model",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return SSEEvent(json.dumps(body))


def raw(body: dict[str, Any]) -> SSEEvent:
    return SSEEvent(json.dumps({"id": "chatcmpl-x", **body}))


async def stream(server: OpenAIServer, events: list[SSEEvent]) -> list[StreamEvent]:
    server.push(SSEReply([*events, SSEEvent("[DONE]")]))
    async with OpenAI("m", base_url=server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
        return [event async for event in provider.stream(REQUEST)]


async def complete(server: OpenAIServer, body: dict[str, Any]) -> LLMResponse:
    server.push(JSONReply(body))
    async with OpenAI("m", base_url=server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
        return await provider.complete(REQUEST)


def final(events: list[StreamEvent]) -> LLMResponse:
    assert isinstance(events[-1], ResponseCompleted)
    assert sum(isinstance(e, ResponseCompleted) for e in events) == 1
    return events[-1].response


PARIS = ToolCall("call_a", "get_weather", {"location": "Paris"})
OSLO = ToolCall("call_b", "get_weather", {"location": "Oslo"})


def piece(
    index: int | None = None, call_id: str | None = None, name: str | None = None, args: Any = ""
) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": args}
    if name is not None:
        function["name"] = name
    out: dict[str, Any] = {"type": "function", "function": function}
    if index is not None:
        out["index"] = index
    if call_id is not None:
        out["id"] = call_id
    return out


# -- streamed tool calls ----------------------------------------------------------------


async def test_two_calls_both_numbered_zero_stay_two_calls(openai_server: OpenAIServer) -> None:
    # Servers that send each whole call in one piece and number every one of them 0:
    # glued together they would be ONE call with arguments '{...}{...}'.
    pieces = [
        piece(0, "call_a", "get_weather", '{"location": "Paris"}'),
        piece(0, "call_b", "get_weather", '{"location": "Oslo"}'),
    ]
    events = await stream(openai_server, [chunk({"tool_calls": pieces}), chunk({}, "tool_calls")])
    assert final(events).message.tool_calls == (PARIS, OSLO)
    assert [e.index for e in events if isinstance(e, ToolCallDelta)] == [0, 1]


async def test_a_call_numbered_zero_again_keeps_its_continuation_pieces(
    openai_server: OpenAIServer,
) -> None:
    # The second call reuses index 0; its id-less continuation belongs to it, not to
    # the first call, and a third call at a fresh index 1 collides with neither.
    events = await stream(
        openai_server,
        [
            chunk({"tool_calls": [piece(0, "call_a", "get_weather", '{"location": "Paris"}')]}),
            chunk({"tool_calls": [piece(0, "call_b", "get_weather", '{"location": ')]}),
            chunk({"tool_calls": [piece(0, args='"Oslo"}')]}),
            chunk({"tool_calls": [piece(1, "call_c", "get_time", "{}")]}),
            chunk({}, "tool_calls"),
        ],
    )
    assert final(events).message.tool_calls == (PARIS, OSLO, ToolCall("call_c", "get_time", {}))


async def test_interleaved_pieces_of_several_calls(openai_server: OpenAIServer) -> None:
    pieces = [
        piece(0, "call_a", "get_weather", '{"loca'),
        piece(1, "call_b", "get_weather", '{"location"'),
        piece(0, args='tion": "Par'),
        piece(1, args=': "Oslo"}'),
        piece(0, args='is"}'),
    ]
    events = await stream(
        openai_server, [*(chunk({"tool_calls": [p]}) for p in pieces), chunk({}, "tool_calls")]
    )
    assert final(events).message.tool_calls == (PARIS, OSLO)


async def test_indices_given_out_of_order_keep_their_order(openai_server: OpenAIServer) -> None:
    pieces = [
        piece(1, "call_b", "get_weather", '{"location": "Oslo"}'),
        piece(0, "call_a", "get_weather", '{"location": "Paris"}'),
    ]
    events = await stream(openai_server, [chunk({"tool_calls": pieces}), chunk({}, "tool_calls")])
    assert final(events).message.tool_calls == (PARIS, OSLO)


async def test_id_and_name_repeated_on_every_piece(openai_server: OpenAIServer) -> None:
    pieces = [
        piece(0, "call_a", "get_weather", '{"location": '),
        piece(0, "call_a", "get_weather", '"Paris"}'),
    ]
    events = await stream(
        openai_server, [*(chunk({"tool_calls": [p]}) for p in pieces), chunk({}, "tool_calls")]
    )
    assert final(events).message.tool_calls == (PARIS,)


async def test_calls_with_neither_index_nor_id_are_told_apart_by_their_names(
    openai_server: OpenAIServer,
) -> None:
    pieces = [
        piece(name="get_weather", args='{"location": '),
        piece(args='"Paris"}'),
        piece(name="get_weather", args='{"location": "Oslo"}'),
    ]
    events = await stream(
        openai_server, [*(chunk({"tool_calls": [p]}) for p in pieces), chunk({}, "tool_calls")]
    )
    calls = final(events).message.tool_calls
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"location": "Paris"}),
        ("get_weather", {"location": "Oslo"}),
    ]
    assert len({c.id for c in calls}) == 2


async def test_arguments_streamed_as_an_object(openai_server: OpenAIServer) -> None:
    events = await stream(
        openai_server,
        [
            chunk({"tool_calls": [piece(0, "call_a", "get_weather", {"location": "Paris"})]}),
            chunk({}, "tool_calls"),
        ],
    )
    assert final(events).message.tool_calls == (PARIS,)


@pytest.mark.parametrize("arguments", ["", None], ids=["empty", "null"])
async def test_a_call_without_arguments_has_none(
    openai_server: OpenAIServer, arguments: str | None
) -> None:
    events = await stream(
        openai_server,
        [chunk({"tool_calls": [piece(0, "call_t", "get_time", arguments)]}), chunk({}, "stop")],
    )
    response = final(events)
    assert response.message.tool_calls == (ToolCall("call_t", "get_time", {}),)
    assert response.finish_reason == "tool_calls"  # "stop" with calls is still a tool turn


# -- text, usage, finish ------------------------------------------------------------------


async def test_usage_in_the_finishing_chunk_and_whole_float_counts(
    openai_server: OpenAIServer,
) -> None:
    events = await stream(
        openai_server,
        [
            chunk({"content": "Sunny."}),
            chunk({}, "stop", usage={"prompt_tokens": 12.0, "completion_tokens": 3.0}),
        ],
    )
    assert final(events).usage == Usage(12, 3)
    # and the same body not streamed
    body = completion("Sunny.").body()
    body["usage"] = {"prompt_tokens": 12.0, "completion_tokens": 3.0}
    assert (await complete(openai_server, body)).usage == Usage(12, 3)


async def test_no_usage_and_no_done_marker(openai_server: OpenAIServer) -> None:
    openai_server.push(SSEReply([chunk({"content": "Sunny."}), chunk({}, "stop")]))
    async with OpenAI("m", base_url=openai_server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
        response = final([e async for e in provider.stream(REQUEST)])
    assert response.message.content == "Sunny." and response.usage == Usage()


async def test_content_as_a_list_of_parts(openai_server: OpenAIServer) -> None:
    parts = [
        {"type": "thinking", "thinking": [{"type": "text", "text": "hidden"}]},
        {"type": "text", "text": "Sunny "},
        {"type": "text", "text": "in Paris."},
    ]
    body = completion("").body()
    body["choices"][0]["message"]["content"] = parts
    assert (await complete(openai_server, body)).message.content == "Sunny in Paris."
    events = await stream(openai_server, [chunk({"content": parts}), chunk({}, "stop")])
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Sunny in Paris."]
    assert final(events).message.content == "Sunny in Paris."


async def test_a_streamed_refusal_is_text_as_when_not_streamed(
    openai_server: OpenAIServer,
) -> None:
    body = completion(None).body()
    body["choices"][0]["message"]["refusal"] = "I can't help with that."
    answered = await complete(openai_server, body)
    refusal = [
        chunk({"content": None, "refusal": "I can't "}),
        chunk({"refusal": "help with that."}),
    ]
    events = await stream(openai_server, [*refusal, chunk({}, "stop")])
    assert final(events).message.content == answered.message.content == "I can't help with that."


async def test_a_minimal_body_missing_every_optional_field(openai_server: OpenAIServer) -> None:
    response = await complete(
        openai_server, {"choices": [{"message": {"role": "assistant", "content": "yo"}}]}
    )
    assert response == LLMResponse(
        message=Message("assistant", "yo"),
        finish_reason="stop",
        usage=Usage(),
        model="m",
        provider="openai",
    )


async def test_null_content_with_tool_calls_without_ids(openai_server: OpenAIServer) -> None:
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": None, "type": "function", "function": {"name": "get_time", "arguments": ""}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"x": 1}}},
        ],
    }
    response = await complete(openai_server, {"choices": [{"message": message}]})
    assert response.message.content == ""
    assert response.message.tool_calls == (
        ToolCall("call_0", "get_time", {}),
        ToolCall("call_1", "get_weather", {"x": 1}),
    )
    assert response.finish_reason == "tool_calls"


# -- bodies that are not what the API promises --------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"choices": {"0": {"delta": {"content": "x"}}}},
        {"choices": [{"delta": {"tool_calls": 5}, "finish_reason": "stop"}]},
        {"choices": [{"delta": {"tool_calls": {"index": 0}}, "finish_reason": "stop"}]},
    ],
    ids=["choices-not-a-list", "tool-calls-a-number", "tool-calls-an-object"],
)
async def test_a_chunk_of_the_wrong_shape_is_a_malformed_response(
    openai_server: OpenAIServer, body: dict[str, Any]
) -> None:
    # Not a TypeError escaping the provider: the protocol promises ProviderErrors only.
    with pytest.raises(MalformedResponseError, match="not a list"):
        await stream(openai_server, [raw(body)])


@pytest.mark.parametrize("tool_calls", [5, {"id": "x"}], ids=["number", "object"])
async def test_a_body_of_the_wrong_shape_is_a_malformed_response(
    openai_server: OpenAIServer, tool_calls: object
) -> None:
    body = {"choices": [{"message": {"content": "x", "tool_calls": tool_calls}}]}
    with pytest.raises(MalformedResponseError, match="'tool_calls' is a"):
        await complete(openai_server, body)


async def test_a_server_that_ignores_the_stream_flag_is_named_as_such(
    openai_server: OpenAIServer,
) -> None:
    openai_server.push(JSONReply(completion("not streamed").body()))
    async with OpenAI("m", base_url=openai_server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
        with pytest.raises(MalformedResponseError) as caught:
            [e async for e in provider.stream(REQUEST)]
    message = str(caught.value)
    assert "'application/json', not an event stream" in message
    assert openai_server.url in message and "connection was probably cut" not in message


async def test_with_several_choices_only_one_is_assembled(openai_server: OpenAIServer) -> None:
    # params={"n": 2}: vLLM streams both choices' pieces, each chunk naming its choice.
    def of(index: int, delta: dict[str, Any], finish: str | None = None) -> SSEEvent:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        return raw({"model": "served-model", "choices": [choice]})

    events = await stream(
        openai_server,
        [
            of(0, {"content": "Sunny"}),
            of(1, {"content": "Rainy"}),
            of(1, {"content": " in Oslo."}, "stop"),
            of(0, {"content": " in Paris."}),
            of(0, {}, "stop"),
        ],
    )
    assert final(events).message.content == "Sunny in Paris."
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Sunny in Paris."
    body = completion("").body()
    body["choices"] = [
        {"index": 1, "message": {"role": "assistant", "content": "Rainy"}, "finish_reason": "stop"},
        {"index": 0, "message": {"role": "assistant", "content": "Sunny"}, "finish_reason": "stop"},
    ]
    assert (await complete(openai_server, body)).message.content == "Sunny"


async def test_an_error_sent_with_status_200_is_quoted_in_the_malformed_response(
    openai_server: OpenAIServer,
) -> None:
    body = {"error": {"message": f"Upstream rejected key {KEY}", "code": 502}}
    with pytest.raises(MalformedResponseError) as caught:
        await complete(openai_server, body)
    message = str(caught.value)
    assert (
        "no 'choices'" in message and "the body says: 'Upstream rejected key [REDACTED]'" in message
    )
    assert KEY not in message


@pytest.mark.parametrize("depth", [500, 100_000], ids=["too-deep-to-keep", "too-deep-to-parse"])
async def test_arguments_nested_absurdly_deep_are_kept_verbatim(
    openai_server: OpenAIServer, depth: int
) -> None:
    deep = '{"a": ' + "[" * depth + "]" * depth + "}"
    response = await complete(
        openai_server, completion(None, [("call_a", "get_weather", deep)]).body()
    )
    # for the runtime to report as invalid arguments, not a RecursionError escaping
    # here or later, where the log's encoder and the next request walk them
    assert response.message.tool_calls == (ToolCall("call_a", "get_weather", deep),)


async def test_arguments_encoded_twice_are_decoded_twice(openai_server: OpenAIServer) -> None:
    twice = json.dumps(json.dumps({"location": "Paris"}))
    head, tail = twice[:9], twice[9:]
    events = await stream(
        openai_server,
        [
            chunk({"tool_calls": [piece(0, "call_a", "get_weather", head)]}),
            chunk({"tool_calls": [piece(0, args=tail)]}),
            chunk({}, "tool_calls"),
        ],
    )
    assert final(events).message.tool_calls == (PARIS,)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_arguments_only_a_lenient_parser_takes_are_invalid(
    openai_server: OpenAIServer, constant: str
) -> None:
    # Python's json takes NaN; sent back to the API in the next turn, it is not JSON.
    text = '{"temperature": ' + constant + "}"
    response = await complete(openai_server, completion(None, [("call_a", "set", text)]).body())
    assert response.message.tool_calls == (ToolCall("call_a", "set", text),)
