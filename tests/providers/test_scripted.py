"""Scripted: deterministic replies by turn or by function, no network."""

from __future__ import annotations

import pytest

from perdure.providers import (
    LLMRequest,
    LLMResponse,
    Message,
    RateLimitError,
    ResponseCompleted,
    Scripted,
    TerminalProviderError,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)

pytestmark = pytest.mark.anyio


def conversation(*messages: Message) -> LLMRequest:
    return LLMRequest(model="", messages=list(messages))


USER = Message("user", "Weather in Paris?")


async def test_list_mode_answers_by_turn() -> None:
    call = Scripted.call("get_weather", location="Paris")
    scripted = Scripted([call, "It is sunny."])

    first = await scripted.complete(conversation(USER))
    assert first.message.tool_calls == (call,)
    assert first.finish_reason == "tool_calls"
    assert first.usage == Usage(10, 5)
    assert (first.model, first.provider) == ("scripted", "scripted")

    assistant = first.message
    tool = Message("tool", '{"sky": "sunny"}', tool_call_id=call.id)
    second = await scripted.complete(conversation(USER, assistant, tool))
    assert second.message == Message("assistant", "It is sunny.")
    assert second.finish_reason == "stop"

    # A restarted process replaying the conversation asks the same question at the same
    # turn and gets the same answer: the reply depends on the conversation only.
    again = await Scripted([call, "It is sunny."]).complete(conversation(USER, assistant, tool))
    assert again == second
    assert scripted.calls == 2


async def test_past_the_end_names_the_turn_and_the_length() -> None:
    scripted = Scripted(["only one"])
    request = conversation(USER, Message("assistant", "only one"), Message("user", "more?"))
    with pytest.raises(TerminalProviderError) as caught:
        await scripted.complete(request)
    text = str(caught.value)
    assert "turn 2" in text and "only 1 replies" in text and "scripted" in text


async def test_every_reply_kind() -> None:
    calls = [Scripted.call("a", x=1), Scripted.call("b", y=2)]
    message = Message("assistant", "text and a call", tool_calls=(calls[0],))
    response = LLMResponse(Message("assistant", "custom"), "length", Usage(1, 2), "m-x", "")
    scripted = Scripted(["text", calls[0], calls, message, response], model="m1", name="s1")
    history: list[Message] = [USER]
    results = []
    for _ in range(5):
        result = await scripted.complete(conversation(*history))
        results.append(result)
        history.append(result.message)
    assert results[0].message.content == "text"
    assert results[1].message.tool_calls == (calls[0],)
    assert results[2].message.tool_calls == tuple(calls)
    assert results[3].message == message and results[3].finish_reason == "tool_calls"
    assert results[4].finish_reason == "length" and results[4].usage == Usage(1, 2)
    assert results[4].model == "m-x" and results[4].provider == "s1"  # filled in
    assert all(r.provider == "s1" for r in results)
    assert results[0].model == "m1"


async def test_exceptions_are_raised_with_provider_and_model_filled_in() -> None:
    scripted = Scripted([RateLimitError("scripted 429", status=429, retry_after=1.0)], model="m")
    with pytest.raises(RateLimitError) as caught:
        await scripted.complete(conversation(USER))
    assert (caught.value.provider, caught.value.model) == ("scripted", "m")
    with pytest.raises(ZeroDivisionError):
        await Scripted([ZeroDivisionError("boom")]).complete(conversation(USER))


async def test_request_model_is_reported_as_served() -> None:
    scripted = Scripted(["hi"], model="default")
    response = await scripted.complete(LLMRequest(model="asked-for", messages=[USER]))
    assert response.model == "asked-for"


async def test_function_mode_sync_and_async() -> None:
    def by_content(request: LLMRequest) -> str:
        return f"you said {request.messages[-1].content!r}"

    async def tool_then_text(request: LLMRequest) -> ToolCall | str:
        if request.messages[-1].role == "tool":
            return "done"
        return Scripted.call("lookup", q=request.messages[-1].content)

    assert (await Scripted(by_content).complete(conversation(USER))).message.content == (
        "you said 'Weather in Paris?'"
    )
    response = await Scripted(tool_then_text).complete(conversation(USER))
    assert response.message.tool_calls[0].arguments == {"q": "Weather in Paris?"}


async def test_function_mode_bad_reply_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="a reply is a str"):
        await Scripted(lambda request: 42).complete(conversation(USER))


def test_bad_scripts_are_rejected_up_front() -> None:
    with pytest.raises(TypeError, match=r"script\[1\]"):
        Scripted(["ok", 42])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not a bare string"):
        Scripted("hello")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'user' message"):
        Scripted([Message("user", "x")])


def test_call_ids_are_deterministic_and_distinct() -> None:
    a1 = Scripted.call("get_weather", location="Paris")
    a2 = Scripted.call("get_weather", {"location": "Paris"})
    b = Scripted.call("get_weather", location="Oslo")
    assert a1 == a2 and a1.id.startswith("call_")
    assert b.id != a1.id
    raw = Scripted.call("get_weather", '{"location": ')
    assert raw.arguments == '{"location": '


async def test_identical_calls_in_one_turn_get_distinct_ids() -> None:
    call = Scripted.call("ping")
    response = await Scripted([[call, call]]).complete(conversation(USER))
    ids = [c.id for c in response.message.tool_calls]
    assert len(set(ids)) == 2 and ids[0] == call.id


async def test_requests_are_recorded_as_snapshots() -> None:
    scripted = Scripted(["a", "b"])
    live = [USER]
    await scripted.complete(LLMRequest(model="", messages=live))
    live.append(Message("assistant", "a"))  # the runtime keeps appending to its list
    assert scripted.requests[0].messages == (USER,)
    quiet = Scripted(["a"], record=False)
    await quiet.complete(conversation(USER))
    assert quiet.requests == [] and quiet.calls == 1


async def test_stream_yields_words_tool_calls_then_the_response() -> None:
    call = Scripted.call("get_weather", location="Paris")
    message = Message("assistant", "Let me check.", tool_calls=(call,))
    scripted = Scripted([message])
    events = [event async for event in scripted.stream(conversation(USER))]
    assert events[:3] == [TextDelta("Let"), TextDelta(" me"), TextDelta(" check.")]
    assert events[3] == ToolCallDelta(
        index=0, id=call.id, name="get_weather", arguments='{"location":"Paris"}'
    )
    assert events[4] == ResponseCompleted(await scripted.complete(conversation(USER)))
    assert len(events) == 5 and scripted.calls == 2
