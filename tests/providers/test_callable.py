"""CallableProvider: plain functions as providers, with clear errors for bad returns."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from perdure.providers import (
    CallableProvider,
    LLMRequest,
    MalformedResponseError,
    Message,
    RateLimitError,
    RetryPolicy,
    TerminalProviderError,
    ToolCall,
    ToolSpec,
    Usage,
)
from tests.providers.conftest import SleepRecorder

pytestmark = pytest.mark.anyio

TOOL = ToolSpec("get_weather", "Get the weather", {"type": "object", "properties": {}})
CALL = ToolCall("call_1", "get_weather", {"location": "Paris"})
REQUEST = LLMRequest(
    model="my-model",
    messages=[
        Message("system", "Be brief."),
        Message("user", "Weather?"),
        Message("assistant", "", tool_calls=(CALL,)),
        Message("tool", "sunny", tool_call_id="call_1", is_error=False),
    ],
    tools=[TOOL],
)


async def test_sync_function_gets_openai_style_dicts_in_a_worker_thread() -> None:
    seen: dict[str, Any] = {}
    loop_thread = threading.current_thread()

    def fn(messages: list[dict[str, Any]], tools: list[dict[str, Any]], model: str) -> dict:
        seen.update(messages=messages, tools=tools, model=model, thread=threading.current_thread())
        return {
            "content": "Sunny in Paris.",
            "usage": {"input_tokens": 11, "output_tokens": 3},
            "model": "my-model-v2",
        }

    provider = CallableProvider(fn, name="mine", model="default")
    response = await provider.complete(REQUEST)
    assert response.message == Message("assistant", "Sunny in Paris.")
    assert response.usage == Usage(11, 3)
    assert (response.model, response.provider, response.finish_reason) == (
        "my-model-v2",
        "mine",
        "stop",
    )
    assert seen["thread"] is not loop_thread
    assert seen["model"] == "my-model"
    assert seen["tools"] == [{"type": "function", "function": TOOL.to_dict()}]
    assert seen["messages"][2] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
            }
        ],
    }
    assert seen["messages"][3] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}


async def test_async_function_and_tool_calls() -> None:
    async def fn(messages: list[dict], tools: list[dict], model: str) -> dict:
        return {
            "content": "",
            "tool_calls": [
                {"id": "c1", "name": "get_weather", "arguments": {"location": "Paris"}},
                {"name": "get_weather", "arguments": '{"location": "Oslo"}'},
                {"name": "get_weather", "arguments": "{oops"},
            ],
        }

    response = await CallableProvider(fn).complete(REQUEST)
    calls = response.message.tool_calls
    assert calls[0] == ToolCall("c1", "get_weather", {"location": "Paris"})
    assert calls[1].arguments == {"location": "Oslo"}
    assert calls[2].arguments == "{oops"
    assert calls[1].id.startswith("call_") and calls[1].id != calls[2].id
    assert response.finish_reason == "tool_calls"
    assert response.usage == Usage()
    # Generated ids are deterministic: the same conversation gives the same ids.
    again = await CallableProvider(fn).complete(REQUEST)
    assert again.message.tool_calls == calls


@pytest.mark.parametrize(
    ("returned", "complaint"),
    [
        ("just text", "returned a str"),
        ({"content": 3}, "'content' as a int"),
        ({"contents": "typo"}, "unknown key 'contents'"),
        ({"tool_calls": {"name": "x"}}, "'tool_calls' as a dict, not a list"),
        ({"tool_calls": ["x"]}, "'tool_calls'[0] as a str, not a dict"),
        ({"tool_calls": [{"arguments": {}}]}, "'tool_calls'[0]['name'] = None"),
        ({"tool_calls": [{"name": "f", "arguments": 5}]}, "'tool_calls'[0]['arguments'] as a int"),
        ({"tool_calls": [{"name": "f", "args": {}}]}, "'tool_calls'[0] with unknown key 'args'"),
        ({"tool_calls": [{"name": "f", "id": 7}]}, "'tool_calls'[0]['id'] = 7"),
        ({"usage": {"input_tokens": "10"}}, "'usage'['input_tokens'] = '10'"),
        ({"usage": {"input_tokens": -1}}, "not a non-negative int"),
        ({"usage": {"prompt_tokens": 1}}, "'usage' with unknown key 'prompt_tokens'"),
        ({"usage": [1, 2]}, "'usage' as a list"),
        ({"finish_reason": 1}, "'finish_reason' = 1"),
        ({"model": None, "content": "x", "finish_reason": None, "extra": 1}, "unknown key 'extra'"),
    ],
)
async def test_malformed_returns_name_the_key_and_the_shape(
    returned: object, complaint: str
) -> None:
    calls = 0

    def fn(messages: list[dict], tools: list[dict], model: str) -> object:
        nonlocal calls
        calls += 1
        return returned

    provider = CallableProvider(fn, name="mine", retry=RetryPolicy(sleep=SleepRecorder()))
    with pytest.raises(MalformedResponseError) as caught:
        await provider.complete(REQUEST)
    text = str(caught.value)
    assert complaint in text
    assert "expected {'content': str" in text
    assert "will not fix itself" in text
    assert calls == 1  # never retried, even with a retry policy


async def test_provider_errors_pass_through_and_retry_with_a_policy(sleeps: SleepRecorder) -> None:
    outcomes: list[Any] = [RateLimitError("busy", retry_after=2.0), {"content": "ok"}]

    def fn(messages: list[dict], tools: list[dict], model: str) -> dict:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    provider = CallableProvider(fn, retry=RetryPolicy(sleep=sleeps))
    assert (await provider.complete(REQUEST)).message.content == "ok"
    assert sleeps.delays == [2.0]

    def limited(messages: list[dict], tools: list[dict], model: str) -> dict:
        raise RateLimitError("busy")

    with pytest.raises(RateLimitError) as caught:
        await CallableProvider(limited, name="mine").complete(REQUEST)
    assert (caught.value.provider, caught.value.model) == ("mine", "my-model")


async def test_other_exceptions_become_terminal_errors() -> None:
    def broken(messages: list[dict], tools: list[dict], model: str) -> dict:
        raise KeyError("missing")

    with pytest.raises(TerminalProviderError) as caught:
        await CallableProvider(broken).complete(REQUEST)
    assert "raised KeyError" in str(caught.value)
    assert "RetryableProviderError" in str(caught.value)


async def test_stream_is_derived_from_the_answer() -> None:
    def fn(messages: list[dict], tools: list[dict], model: str) -> dict:
        return {"content": "two words"}

    provider = CallableProvider(fn)
    events = [event async for event in provider.stream(REQUEST)]
    assert events[-1].response == await provider.complete(REQUEST)  # type: ignore[union-attr]


async def test_the_functions_own_exception_is_kept_as_the_cause() -> None:
    def broken(messages: list[dict], tools: list[dict], model: str) -> dict:
        raise KeyError("missing")

    with pytest.raises(TerminalProviderError) as caught:
        await CallableProvider(broken).complete(REQUEST)
    assert isinstance(caught.value.__cause__, KeyError)
