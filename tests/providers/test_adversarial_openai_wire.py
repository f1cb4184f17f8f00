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
    BadRequestError,
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
from tests.support.http_server import JSONReply, RawReply, SSEEvent, SSEReply
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


# -- tool-call ids: missing, empty, repeated ----------------------------------------------


def with_calls(*calls: dict[str, Any], finish: str | None = "tool_calls") -> dict[str, Any]:
    message = {"role": "assistant", "content": None, "tool_calls": list(calls)}
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}


def call(call_id: Any, name: str, arguments: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        out["id"] = call_id
    return out


async def answer(
    server: OpenAIServer, calls: list[dict[str, Any]], streaming: bool, finish: str | None
) -> LLMResponse:
    """The response to REQUEST when the server sends ``calls`` (whole, or one per chunk)."""
    if not streaming:
        return await complete(server, with_calls(*calls, finish=finish))
    pieces = [{**c, "index": i} for i, c in enumerate(calls)]
    return final(await stream(server, [chunk({"tool_calls": pieces}), chunk({}, finish)]))


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_a_turn_whose_calls_share_an_id_gets_one_id_per_call(
    openai_server: OpenAIServer, streaming: bool
) -> None:
    # Servers that give every call of a turn the same id: two results under one id
    # would be indistinguishable in the next request.
    calls = [
        call("call_x", "get_weather", '{"location": "Paris"}'),
        call("call_x", "get_weather", '{"location": "Oslo"}'),
        call("", "get_time", ""),
        call(None, "get_time", "{}"),
    ]
    response = await answer(openai_server, calls, streaming, "tool_calls")
    assert [c.id for c in response.message.tool_calls] == [
        "call_x",
        "call_x_1",
        "call_2",
        "call_3",
    ]
    assert [c.arguments for c in response.message.tool_calls] == [
        {"location": "Paris"},
        {"location": "Oslo"},
        {},
        {},
    ]


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_ids_an_earlier_turn_used_are_not_given_again(
    openai_server: OpenAIServer, streaming: bool
) -> None:
    # A server without ids would make "call_0" the first call of every turn; one that
    # numbers calls per turn repeats its own. Anthropic (a Fallback's next member)
    # refuses a conversation whose tool_use ids repeat.
    earlier = ToolCall("call_0", "get_weather", {"location": "Paris"})
    request = LLMRequest(
        model="",
        messages=(
            Message("user", "Weather in Paris, then Oslo?"),
            Message("assistant", "", tool_calls=(earlier,)),
            Message("tool", "sunny", tool_call_id="call_0"),
        ),
    )
    body = with_calls(call(None, "get_weather", {"location": "Oslo"}), call("call_0", "f", "{}"))
    async with OpenAI("m", base_url=openai_server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
        if streaming:
            pieces = [
                {**c, "index": i} for i, c in enumerate(body["choices"][0]["message"]["tool_calls"])
            ]
            openai_server.push(SSEReply([chunk({"tool_calls": pieces}), chunk({}, "tool_calls")]))
            first = final([e async for e in provider.stream(request)])
            openai_server.push(SSEReply([chunk({"tool_calls": pieces}), chunk({}, "tool_calls")]))
            again = final([e async for e in provider.stream(request)])
        else:
            openai_server.push(JSONReply(body), JSONReply(body))
            first = await provider.complete(request)
            again = await provider.complete(request)
    assert [c.id for c in first.message.tool_calls] == ["call_1", "call_0_2"]
    # derived, not drawn: the same conversation and answer give the same ids
    assert again == first


# -- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ({"location": "Paris"}, {"location": "Paris"}),  # an object, not a string
        ("", {}),  # a tool without arguments
        ('{"location": "Par', '{"location": "Par'),  # cut short: kept for the runtime
        ("[1, 2]", "[1, 2]"),  # JSON, but not an object
    ],
    ids=["object", "empty", "invalid-json", "not-an-object"],
)
async def test_arguments_as_servers_send_them(
    openai_server: OpenAIServer, streaming: bool, sent: Any, kept: Any
) -> None:
    response = await answer(openai_server, [call("c", "get_weather", sent)], streaming, "stop")
    assert response.message.tool_calls == (ToolCall("c", "get_weather", kept),)


# -- finish reasons -----------------------------------------------------------------------


FINISHES = [
    ("stop", True, "tool_calls"),  # vLLM with a named tool_choice, older Ollama
    (None, True, "tool_calls"),
    ("function_call", True, "tool_calls"),
    ("eos", True, "tool_calls"),
    ("eos_token", True, "tool_calls"),  # text-generation-inference before 2.2
    ("end_turn", True, "tool_calls"),  # a gateway passing Anthropic's word through
    ("length", True, "length"),  # cut short: said so even with (broken) calls
    ("", True, "tool_calls"),  # older Ollama: "" for "not yet", the last chunk too
    ("eos_token", False, "stop"),
    ("stop_sequence", False, "stop"),
    ("tool_calls", False, "stop"),  # it said so, but no call came
    ("", False, "stop"),
    ("content_filter", False, "content_filter"),
]


@pytest.mark.parametrize(
    ("streaming", "finish", "calls", "expected"),
    [
        (streaming, *case)
        for streaming in (False, True)
        for case in FINISHES
        # A stream must say that it finished: one that does not is taken as cut.
        if not (streaming and case[0] is None)
    ],
)
async def test_finish_reasons_as_servers_send_them(
    openai_server: OpenAIServer,
    streaming: bool,
    finish: str | None,
    calls: bool,
    expected: str,
) -> None:
    if calls:
        response = await answer(openai_server, [call("c", "get_time", "{}")], streaming, finish)
        assert response.message.tool_calls == (ToolCall("c", "get_time", {}),)
    elif streaming:
        response = final(
            await stream(openai_server, [chunk({"content": "Done."}), chunk({}, finish)])
        )
    else:
        body = completion("Done.").body()
        body["choices"][0]["finish_reason"] = finish
        response = await complete(openai_server, body)
    assert response.finish_reason == expected


async def test_a_legacy_function_call_is_a_tool_call(openai_server: OpenAIServer) -> None:
    # The API before tools: message.function_call, one call, no id.
    message = {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
    }
    body = {"choices": [{"message": message, "finish_reason": "function_call"}]}
    response = await complete(openai_server, body)
    assert response.message.tool_calls == (
        ToolCall("call_0", "get_weather", {"location": "Paris"}),
    )
    assert response.finish_reason == "tool_calls"
    events = await stream(
        openai_server,
        [
            chunk({"function_call": {"name": "get_weather", "arguments": '{"location": '}}),
            chunk({"function_call": {"arguments": '"Paris"}'}}),
            chunk({}, "function_call"),
        ],
    )
    assert final(events).message == response.message
    assert final(events).finish_reason == "tool_calls"


# -- streams ------------------------------------------------------------------------------


async def test_chunks_without_choices_are_skipped_wherever_they_come(
    openai_server: OpenAIServer,
) -> None:
    # Azure sends its prompt filter results first, in a chunk with no choices; usage
    # chunks have none; some proxies send keep-alive chunks with none in between.
    events = await stream(
        openai_server,
        [
            raw({"model": "", "choices": [], "prompt_filter_results": [{"prompt_index": 0}]}),
            chunk({"role": "assistant", "content": "Sun"}),
            raw({"model": "served-model", "choices": []}),
            chunk({"content": "ny."}),
            chunk({}, "stop"),
            raw({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}),
        ],
    )
    response = final(events)
    assert response.message.content == "Sunny." and response.usage == Usage(9, 2)
    assert response.model == "served-model"


@pytest.mark.parametrize(
    "usage_chunks",
    [
        # usage: null in every chunk but the last (OpenAI's own shape with include_usage)
        [raw({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}})],
        # running totals in every chunk (vLLM's continuous_usage_stats): the last counts
        [
            raw({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}),
            raw({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}),
        ],
        # Groq, under its own field, in the finishing chunk
        [
            raw(
                {
                    "choices": [],
                    "x_groq": {
                        "id": "req_1",
                        "usage": {"prompt_tokens": 9, "completion_tokens": 2},
                    },
                }
            )
        ],
    ],
    ids=["final-chunk", "running-totals", "x_groq"],
)
async def test_usage_wherever_the_server_puts_it(
    openai_server: OpenAIServer, usage_chunks: list[SSEEvent]
) -> None:
    nulls = [chunk({"content": "Sunny."}, usage=None), chunk({}, "stop")]
    body_with_null = json.loads(nulls[0].data)
    body_with_null["usage"] = None
    events = await stream(
        openai_server, [SSEEvent(json.dumps(body_with_null)), nulls[1], *usage_chunks]
    )
    assert final(events).usage == Usage(9, 2)


async def test_usage_null_throughout_is_no_usage(openai_server: OpenAIServer) -> None:
    def null_usage(delta: dict[str, Any], finish: str | None = None) -> SSEEvent:
        body = json.loads(chunk(delta, finish).data)
        body["usage"] = None
        return SSEEvent(json.dumps(body))

    events = await stream(openai_server, [null_usage({"content": "Hi."}), null_usage({}, "stop")])
    assert final(events).usage == Usage()
    body = completion("Hi.").body()
    body["usage"] = None
    assert (await complete(openai_server, body)).usage == Usage()


async def test_null_and_empty_content_stream_no_empty_deltas(openai_server: OpenAIServer) -> None:
    events = await stream(
        openai_server,
        [
            chunk({"role": "assistant", "content": None}),
            chunk({"content": ""}),
            chunk({"content": "Hi."}),
            chunk({"content": None}, "stop"),
        ],
    )
    assert [e for e in events if isinstance(e, TextDelta)] == [TextDelta("Hi.")]
    assert final(events).message.content == "Hi."


async def test_a_stream_naming_no_model_records_the_requested_one(
    openai_server: OpenAIServer,
) -> None:
    events = await stream(
        openai_server,
        [
            raw({"choices": [{"index": 0, "delta": {"content": "Hi."}}]}),
            raw({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        ],
    )
    assert final(events).model == "m"


def refusing_stream_options(status: int, body: dict[str, Any]) -> Any:
    """A server that answers ``body`` with ``status`` whenever stream_options is sent."""

    def handler(request: Any) -> Any:
        if "stream_options" in request.json:
            return JSONReply(body, status=status)
        return completion("Sunny.")

    return handler


REFUSALS = {
    # Azure AI model inference
    "azure-400": (
        400,
        {
            "error": {
                "code": "extra_parameters_not_allowed",
                "message": "Extra parameters ['stream_options'] are not allowed when "
                "extra-parameters is not set or set to be 'error'.",
            }
        },
    ),
    # Mistral's API: a validation error whose message is not even a string
    "mistral-422": (
        422,
        {
            "object": "error",
            "message": {
                "detail": [
                    {
                        "type": "extra_forbidden",
                        "loc": ["body", "stream_options", "include_usage"],
                        "msg": "Extra inputs are not permitted",
                    }
                ]
            },
            "type": "invalid_request_error",
        },
    ),
}


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
async def test_a_server_refusing_stream_options_is_asked_again_without_them_once(
    refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    status, body = REFUSALS[refusal]
    with OpenAIServer(refusing_stream_options(status, body)) as server:
        async with OpenAI("m", base_url=server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
            with caplog.at_level("DEBUG", logger="perdure.providers"):
                first = final([e async for e in provider.stream(REQUEST)])
            second = final([e async for e in provider.stream(REQUEST)])
        sent = [r.json for r in server.chat_requests]
    assert first.message.content == second.message.content == "Sunny."
    # asked with them, at once again without, and never with them again
    assert ["stream_options" in body for body in sent] == [True, False, False]
    assert sent[0]["messages"] == sent[1]["messages"]
    said = [r.getMessage() for r in caplog.records if "stream_options" in r.getMessage()]
    assert len(said) == 1 and "asking again without it, and never sending it again" in said[0]
    assert server.base_url in said[0] and KEY not in caplog.text


async def test_other_bad_requests_on_a_stream_are_not_asked_again() -> None:
    body = {"error": {"message": "Unknown model 'm'", "type": "invalid_request_error"}}
    with OpenAIServer(lambda r: JSONReply(body, status=400)) as server:
        async with OpenAI("m", base_url=server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
            with pytest.raises(BadRequestError, match="Unknown model"):
                [e async for e in provider.stream(REQUEST)]
            with pytest.raises(BadRequestError):
                [e async for e in provider.stream(REQUEST)]
        sent = [r.json for r in server.chat_requests]
    assert ["stream_options" in b for b in sent] == [True, True]  # still asked for usage


# -- reasoning ----------------------------------------------------------------------------


async def test_reasoning_fields_are_left_out_of_the_message(openai_server: OpenAIServer) -> None:
    # DeepSeek and vLLM before 0.10 send reasoning_content; vLLM and OpenRouter reasoning.
    body = completion("Sunny.").body()
    body["choices"][0]["message"]["reasoning_content"] = "Let me think."
    body["choices"][0]["message"]["reasoning"] = "Let me think."
    response = await complete(openai_server, body)
    assert response.message == Message("assistant", "Sunny.")
    events = await stream(
        openai_server,
        [
            chunk({"role": "assistant", "content": None, "reasoning_content": "Let me"}),
            chunk({"content": None, "reasoning": " think."}),
            chunk({"content": "Calling.", "reasoning_content": None}),
            chunk({"tool_calls": [piece(0, "call_t", "get_time", "{}")]}),
            chunk({}, "tool_calls"),
        ],
    )
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Calling."]
    assert final(events).message == Message(
        "assistant", "Calling.", tool_calls=(ToolCall("call_t", "get_time", {}),)
    )


async def test_a_server_wanting_its_reasoning_back_says_how_to_do_without(
    openai_server: OpenAIServer,
) -> None:
    said = (
        "Missing `reasoning_content` field in the assistant message at message index 2. "
        "For more information, please refer to "
        "https://api-docs.deepseek.com/guides/thinking_mode#tool-calls"
    )
    body = {"error": {"message": said, "type": "invalid_request_error", "code": None}}
    openai_server.push(JSONReply(body, status=400), JSONReply(body, status=400))
    async with OpenAI("m", base_url=openai_server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
        with pytest.raises(BadRequestError) as caught:
            await provider.complete(REQUEST)
        with pytest.raises(BadRequestError) as streamed:
            [e async for e in provider.stream(REQUEST)]
    for err in (caught.value, streamed.value):
        message = str(err)
        assert "Missing `reasoning_content`" in message
        assert "'thinking': {'type': 'disabled'}" in message
    assert len(openai_server.chat_requests) == 2  # not retried, nor asked again


async def test_blank_finish_reasons_on_every_chunk_neither_mask_nor_make_a_finish(
    openai_server: OpenAIServer,
) -> None:
    # Older Ollama builds send finish_reason "" on every chunk: such a stream has
    # finished when it ends, and a real reason sent before a trailing "" stands.
    events = await stream(
        openai_server,
        [
            chunk({"content": "Cut"}, ""),
            chunk({"content": " short"}, "length"),
            chunk({}, ""),
        ],
    )
    assert final(events).finish_reason == "length"
    assert final(events).message.content == "Cut short"


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_a_numeric_tool_call_id_is_kept_as_text(
    openai_server: OpenAIServer, streaming: bool
) -> None:
    response = await answer(openai_server, [call(7, "get_time", "{}")], streaming, "tool_calls")
    assert response.message.tool_calls == (ToolCall("7", "get_time", {}),)


async def test_sse_comments_between_chunks_are_ignored(openai_server: OpenAIServer) -> None:
    # OpenRouter keeps slow streams alive with ": OPENROUTER PROCESSING" comment lines.
    body = b"".join(
        [
            b": OPENROUTER PROCESSING\n\n",
            chunk({"role": "assistant", "content": "Sun"}).encode(),
            b": OPENROUTER PROCESSING\n\n",
            chunk({"content": "ny."}).encode(),
            chunk({}, "stop").encode(),
            b"data: [DONE]\n\n",
        ]
    )
    openai_server.push(RawReply(body, content_type="text/event-stream"))
    async with OpenAI("m", base_url=openai_server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
        events = [e async for e in provider.stream(REQUEST)]
    assert final(events).message.content == "Sunny."


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        # text-generation-inference: the error member is the message itself
        (
            422,
            {"error": "Input validation error: `temperature` must be strictly positive"},
            "Input validation error: `temperature` must be strictly positive",
        ),
        # a FastAPI server's own 404 (wrong base_url path)
        (404, {"detail": "Not Found"}, "Not Found"),
        # vLLM's validation errors: a list of problems naming the field
        (
            400,
            {"object": "error", "message": [{"loc": ["body", "top_k"], "msg": "bad"}]},
            '[{"loc": ["body", "top_k"], "msg": "bad"}]',
        ),
    ],
    ids=["tgi-string-error", "fastapi-detail", "structured-message"],
)
async def test_what_an_error_body_says_is_quoted_whatever_its_shape(
    openai_server: OpenAIServer, status: int, body: dict[str, Any], said: str
) -> None:
    openai_server.push(JSONReply(body, status=status))
    async with OpenAI("m", base_url=openai_server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
        with pytest.raises(BadRequestError) as caught:
            await provider.complete(REQUEST)
    assert caught.value.detail == said and caught.value.status == status


async def test_an_error_string_sent_with_status_200_is_quoted(openai_server: OpenAIServer) -> None:
    # LM Studio and llama.cpp-based apps, with no model loaded
    body = {"error": f"No models loaded (key {KEY})"}
    with pytest.raises(MalformedResponseError) as caught:
        await complete(openai_server, body)
    assert "the body says: 'No models loaded (key [REDACTED])'" in str(caught.value)


TOOL_TURN = LLMRequest(
    model="",
    messages=(
        Message("user", "Time?"),
        Message("assistant", "", tool_calls=(ToolCall("call_t", "get_time", {}),)),
        Message("tool", "12:00", tool_call_id="call_t"),
    ),
)

NULL_REFUSALS = {
    "ollama": "invalid message content type: <nil>",
    "lm-studio": "Invalid 'content': 'content' field must be a string or an array of objects.",
}


@pytest.mark.parametrize("refusal", sorted(NULL_REFUSALS))
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_a_server_refusing_null_content_gets_an_empty_string_from_then_on(
    refusal: str, streaming: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # OpenAI's own shape for a turn of tool calls alone is content: null; older Ollama
    # and LM Studio builds refuse it (and this one refuses stream_options too).
    def handler(request: Any) -> Any:
        body = request.json
        if "stream_options" in body:
            return JSONReply({"detail": "Extra inputs: stream_options"}, status=422)
        if any(m.get("content", "") is None for m in body["messages"]):
            return JSONReply({"error": {"message": NULL_REFUSALS[refusal]}}, status=400)
        return completion("It is noon.")

    with OpenAIServer(handler) as server:
        async with OpenAI("m", base_url=server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
            for _ in range(2):
                with caplog.at_level("DEBUG", logger="perdure.providers"):
                    if streaming:
                        response = final([e async for e in provider.stream(TOOL_TURN)])
                    else:
                        response = await provider.complete(TOOL_TURN)
                assert response.message.content == "It is noon."
        sent = [r.json for r in server.chat_requests]
    contents = [b["messages"][1]["content"] for b in sent]
    if streaming:  # refused stream_options, then null; then never either again
        assert contents == [None, None, "", ""]
        assert ["stream_options" in b for b in sent] == [True, False, False, False]
    else:
        assert contents == [None, "", ""]
    assert all(b["messages"][1]["tool_calls"][0]["id"] == "call_t" for b in sent)
    said = [r.getMessage() for r in caplog.records if "refused content: null" in r.getMessage()]
    assert len(said) == 1 and KEY not in caplog.text


async def test_a_bad_request_naming_null_is_not_adapted_to_when_nothing_was_null(
    openai_server: OpenAIServer,
) -> None:
    body = {"error": {"message": "'content' must not be null in message 0"}}
    openai_server.push(JSONReply(body, status=400))
    async with OpenAI("m", base_url=openai_server.base_url, api_key=KEY, retry=ONE_TRY) as provider:
        with pytest.raises(BadRequestError, match="must not be null"):
            await provider.complete(REQUEST)  # no null content in it: nothing to change
    assert len(openai_server.chat_requests) == 1
