"""The Anthropic provider, with the real ``anthropic`` client, against a fake server."""

from __future__ import annotations

import json
import traceback
from collections.abc import AsyncIterator

import pytest

pytest.importorskip(
    "anthropic", reason="the optional 'anthropic' extra is not installed (pip install '.[dev]')"
)

from perdure.providers import (
    Anthropic,
    AuthenticationError,
    BadRequestError,
    ContextLengthError,
    LLMRequest,
    MalformedResponseError,
    Message,
    ProviderUnavailableError,
    RateLimitError,
    ResponseCompleted,
    RetryPolicy,
    StreamEvent,
    TerminalProviderError,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)
from perdure.providers.anthropic import to_anthropic_messages
from tests.providers.conftest import CutTransport, SleepRecorder
from tests.support.anthropic_server import AnthropicServer, error, message
from tests.support.http_server import (
    DropConnection,
    JSONReply,
    RawReply,
    SSEEvent,
    SSEReply,
)

pytestmark = pytest.mark.anyio

KEY = "sk-ant-api03-0123456789abcdefghijklmnopqrstuvwxyz"

WEATHER = ToolSpec(
    name="get_weather",
    description="Get the weather for a location",
    parameters={"type": "object", "properties": {"location": {"type": "string"}}},
)


def ask(text: str = "What is the weather in Paris?", **kwargs: object) -> LLMRequest:
    messages = (Message("system", "You are terse."), Message("user", text))
    return LLMRequest(model="", messages=messages, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def provider(
    anthropic_server: AnthropicServer, retry: RetryPolicy
) -> AsyncIterator[Anthropic]:
    async with Anthropic(
        "claude-test", base_url=anthropic_server.base_url, api_key=KEY, retry=retry
    ) as provider:
        yield provider


async def collect(provider: Anthropic, request: LLMRequest) -> list[StreamEvent]:
    return [event async for event in provider.stream(request)]


# -- the format ----------------------------------------------------------------------


def test_tool_results_merge_into_one_user_message() -> None:
    calls = (
        ToolCall("toolu_a", "get_weather", {"location": "Paris"}),
        ToolCall("toolu_b", "get_weather", "not json"),
    )
    system, wire = to_anthropic_messages(
        [
            Message("system", "Be brief."),
            Message("system", "Use metric units."),
            Message("user", "Weather?"),
            Message("assistant", "Checking.", tool_calls=calls),
            Message("tool", '{"sky": "sunny"}', tool_call_id="toolu_a"),
            Message("tool", "bad arguments", tool_call_id="toolu_b", is_error=True),
            Message("user", "And tomorrow?"),
        ]
    )
    assert system == "Be brief.\n\nUse metric units."
    assert wire == [
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_a",
                    "name": "get_weather",
                    "input": {"location": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_b",
                    "name": "get_weather",
                    "input": {"_invalid_arguments": "not json"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": '{"sky": "sunny"}'},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_b",
                    "content": "bad arguments",
                    "is_error": True,
                },
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]


# -- answers -------------------------------------------------------------------------


async def test_text_reply_and_the_request_on_the_wire(
    provider: Anthropic, anthropic_server: AnthropicServer
) -> None:
    anthropic_server.push(message("It is sunny.", usage=(21, 4), model="claude-test-20250101"))
    response = await provider.complete(ask(tools=(WEATHER,), params={"temperature": 0.1}))

    assert response.message == Message("assistant", "It is sunny.")
    assert response.finish_reason == "stop"
    assert response.usage == Usage(21, 4)
    assert response.model == "claude-test-20250101"
    assert response.provider == "anthropic"

    (sent,) = anthropic_server.message_requests
    assert sent.path == "/v1/messages"
    assert KEY in sent.headers.get("x-api-key", "") + sent.headers.get("authorization", "")
    body = sent.json
    assert body["model"] == "claude-test"
    assert body["max_tokens"] == 4096
    assert body["system"] == "You are terse."
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"}]}
    ]
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Get the weather for a location",
            "input_schema": dict(WEATHER.parameters),
        }
    ]
    assert body["temperature"] == 0.1


async def test_max_tokens_from_request_params(
    provider: Anthropic, anthropic_server: AnthropicServer
) -> None:
    anthropic_server.push(message("ok"))
    await provider.complete(ask(params={"max_tokens": 64}))
    body = anthropic_server.message_requests[0].json
    assert body["max_tokens"] == 64
    assert "extra_body" not in body


async def test_several_tool_calls_in_one_turn(
    provider: Anthropic, anthropic_server: AnthropicServer
) -> None:
    anthropic_server.push(
        message(
            "Checking both.",
            [
                ("toolu_a", "get_weather", {"location": "Paris"}),
                ("toolu_b", "get_weather", {"location": "Oslo"}),
            ],
        )
    )
    response = await provider.complete(ask())
    assert response.finish_reason == "tool_calls"
    assert response.message.content == "Checking both."
    assert response.message.tool_calls == (
        ToolCall("toolu_a", "get_weather", {"location": "Paris"}),
        ToolCall("toolu_b", "get_weather", {"location": "Oslo"}),
    )


async def test_cached_prompt_tokens_count_as_input(
    provider: Anthropic, anthropic_server: AnthropicServer
) -> None:
    body = message("cached").body()
    body["usage"] = {
        "input_tokens": 5,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 1000,
        "output_tokens": 3,
    }
    anthropic_server.push(JSONReply(body))
    assert (await provider.complete(ask())).usage == Usage(1105, 3)


async def test_streaming_text_and_tool_calls(
    provider: Anthropic, anthropic_server: AnthropicServer
) -> None:
    turn = message(
        "Let me check both.",
        [
            ("toolu_a", "get_weather", {"location": "Paris"}),
            ("toolu_b", "get_weather", {"location": "Oslo"}),
        ],
        usage=(30, 12),
    )
    anthropic_server.push(turn, turn)
    events = await collect(provider, ask())
    response = await provider.complete(ask())

    assert [e.text for e in events if isinstance(e, TextDelta)] == [
        "Let",
        " me",
        " check",
        " both.",
    ]
    pieces = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [(p.index, p.id, p.name) for p in pieces if p.id] == [
        (0, "toolu_a", "get_weather"),
        (1, "toolu_b", "get_weather"),
    ]
    assert json.loads("".join(p.arguments for p in pieces if p.index == 1)) == {"location": "Oslo"}
    assert isinstance(events[-1], ResponseCompleted)
    assert sum(isinstance(e, ResponseCompleted) for e in events) == 1
    assert events[-1].response == response
    assert events[-1].response.usage == Usage(30, 12)
    assert anthropic_server.message_requests[0].json["stream"] is True


# -- retryable failures --------------------------------------------------------------


async def test_429_with_retry_after_then_success(
    provider: Anthropic, anthropic_server: AnthropicServer, sleeps: SleepRecorder
) -> None:
    anthropic_server.push(
        error(
            429,
            "Number of requests exceeded",
            type="rate_limit_error",
            headers={"retry-after": "3"},
        ),
        message("finally"),
    )
    assert (await provider.complete(ask())).message.content == "finally"
    assert sleeps.delays == [3.0]
    assert len(anthropic_server.message_requests) == 2


async def test_500_and_529_overloaded_then_success(
    provider: Anthropic, anthropic_server: AnthropicServer, sleeps: SleepRecorder
) -> None:
    anthropic_server.push(
        error(500, "Internal server error", type="api_error"),
        error(529, "Overloaded", type="overloaded_error"),
        message("recovered"),
    )
    assert (await provider.complete(ask())).message.content == "recovered"
    assert sleeps.delays == [0.5, 1.0]


async def test_persistent_overload_gives_up(
    anthropic_server: AnthropicServer, sleeps: SleepRecorder
) -> None:
    anthropic_server.handler = lambda request: error(529, "Overloaded", type="overloaded_error")
    policy = RetryPolicy(max_attempts=2, sleep=sleeps)
    async with Anthropic(
        "claude-test", base_url=anthropic_server.base_url, api_key=KEY, retry=policy
    ) as provider:
        with pytest.raises(ProviderUnavailableError) as caught:
            await provider.complete(ask())
    assert caught.value.status == 529 and caught.value.attempts == 2
    assert len(anthropic_server.message_requests) == 2


async def test_rate_limit_without_retry_after_backs_off(
    anthropic_server: AnthropicServer, sleeps: SleepRecorder
) -> None:
    anthropic_server.handler = lambda request: error(429, "slow", type="rate_limit_error")
    policy = RetryPolicy(max_attempts=3, sleep=sleeps, rng=lambda: 0.5)
    async with Anthropic(
        "claude-test", base_url=anthropic_server.base_url, api_key=KEY, retry=policy
    ) as provider:
        with pytest.raises(RateLimitError):
            await provider.complete(ask())
    assert sleeps.delays == [0.5, 1.0]


async def test_malformed_body(anthropic_server: AnthropicServer, sleeps: SleepRecorder) -> None:
    policy = RetryPolicy(max_attempts=2, sleep=sleeps)
    anthropic_server.push(RawReply(b"<html>bad gateway</html>"), JSONReply({"content": "nope"}))
    async with Anthropic(
        "claude-test", base_url=anthropic_server.base_url, api_key=KEY, retry=policy
    ) as provider:
        with pytest.raises(MalformedResponseError, match="content"):
            await provider.complete(ask())
    assert len(anthropic_server.message_requests) == 2


async def test_malformed_body_then_success(
    provider: Anthropic, anthropic_server: AnthropicServer
) -> None:
    anthropic_server.push(RawReply(b"not json"), message("good"))
    assert (await provider.complete(ask())).message.content == "good"


async def test_connection_dropped_before_any_response_is_retried(
    provider: Anthropic, anthropic_server: AnthropicServer
) -> None:
    anthropic_server.push(DropConnection(), message("again"))
    assert (await provider.complete(ask())).message.content == "again"


async def test_connection_dropped_mid_stream(
    provider: Anthropic, anthropic_server: AnthropicServer
) -> None:
    # message_start, ping, content_block_start, "one", " two", then the socket closes.
    anthropic_server.push(message("one two three four", drop_after=5))
    seen: list[StreamEvent] = []
    with pytest.raises(ProviderUnavailableError) as caught:
        async for event in provider.stream(ask()):
            seen.append(event)
    assert [e.text for e in seen if isinstance(e, TextDelta)] == ["one", " two"]
    assert len(anthropic_server.message_requests) == 1
    assert "connection" in str(caught.value)


async def test_stream_dropped_before_its_first_event_is_retried(
    provider: Anthropic, anthropic_server: AnthropicServer, sleeps: SleepRecorder
) -> None:
    anthropic_server.push(message("never", drop_after=1), message("whole answer"))
    events = await collect(provider, ask())
    assert isinstance(events[-1], ResponseCompleted)
    assert events[-1].response.message.content == "whole answer"
    assert len(sleeps.delays) == 1


async def test_stream_ending_without_a_stop_is_retryable(
    anthropic_server: AnthropicServer, sleeps: SleepRecorder
) -> None:
    policy = RetryPolicy(max_attempts=1, sleep=sleeps)
    anthropic_server.push(message("cut short", finish=False))
    async with Anthropic(
        "claude-test", base_url=anthropic_server.base_url, api_key=KEY, retry=policy
    ) as provider:
        with pytest.raises(ProviderUnavailableError, match="ended before the model finished"):
            await collect(provider, ask())


async def test_error_event_inside_a_stream_is_retryable(
    provider: Anthropic, anthropic_server: AnthropicServer
) -> None:
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    anthropic_server.push(
        SSEReply([SSEEvent(json.dumps(overloaded), event="error")]), message("fine now")
    )
    events = await collect(provider, ask())
    assert isinstance(events[-1], ResponseCompleted)
    assert events[-1].response.message.content == "fine now"
    assert len(anthropic_server.message_requests) == 2


# -- terminal failures ---------------------------------------------------------------


async def test_401_is_terminal_and_never_shows_the_key(
    provider: Anthropic, anthropic_server: AnthropicServer, sleeps: SleepRecorder
) -> None:
    anthropic_server.push(error(401, f"invalid x-api-key: {KEY}", type="authentication_error"))
    with pytest.raises(AuthenticationError) as caught:
        await provider.complete(ask())
    err = caught.value
    assert isinstance(err, TerminalProviderError)
    assert err.status == 401 and err.provider == "anthropic" and err.model == "claude-test"
    assert len(anthropic_server.message_requests) == 1 and sleeps.delays == []
    rendered = "".join(traceback.format_exception(err)) + repr(err) + str(err.__dict__)
    assert KEY not in rendered and KEY[10:30] not in rendered
    assert err.__cause__ is None and err.__context__ is None


async def test_400_is_terminal(provider: Anthropic, anthropic_server: AnthropicServer) -> None:
    anthropic_server.push(error(400, "tools.0.input_schema: JSON schema is invalid"))
    with pytest.raises(BadRequestError) as caught:
        await provider.complete(ask())
    assert not isinstance(caught.value, ContextLengthError)
    assert "input_schema" in str(caught.value) and "400" in str(caught.value)
    assert len(anthropic_server.message_requests) == 1


async def test_context_length(provider: Anthropic, anthropic_server: AnthropicServer) -> None:
    anthropic_server.push(error(400, "prompt is too long: 208310 tokens > 200000 maximum"))
    with pytest.raises(ContextLengthError) as caught:
        await provider.complete(ask())
    assert caught.value.status == 400
    assert "shorten the conversation" in str(caught.value)


def test_no_credentials_at_all_is_a_clear_error() -> None:
    # The fixture emptied the environment and pointed the client at an empty config dir.
    with pytest.raises(AuthenticationError, match="ANTHROPIC_API_KEY"):
        Anthropic("claude-test")


async def test_key_from_the_environment(
    anthropic_server: AnthropicServer, retry: RetryPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", anthropic_server.base_url)
    anthropic_server.push(message("from env"))
    async with Anthropic("claude-test", retry=retry) as provider:
        assert (await provider.complete(ask())).message.content == "from env"
    headers = anthropic_server.message_requests[0].headers
    assert KEY in headers.get("x-api-key", "") + headers.get("authorization", "")


async def test_a_raw_transport_error_mid_stream_is_a_typed_retryable_error(
    anthropic_server: AnthropicServer, retry: RetryPolicy
) -> None:
    import anthropic

    cut = CutTransport(OSError("connection reset by peer"))
    client = anthropic.AsyncAnthropic(
        api_key=KEY, base_url=anthropic_server.base_url, http_client=cut.client()
    )
    anthropic_server.push(message("one two three four"))
    provider = Anthropic("claude-test", client=client, retry=retry)
    try:
        with pytest.raises(ProviderUnavailableError) as caught:
            await collect(provider, ask())
    finally:
        await client.close()
    assert "connection to" in str(caught.value) and "OSError" in str(caught.value)
