"""The OpenAI provider, with the real ``openai`` client, against a fake server on loopback."""

from __future__ import annotations

import json
import logging
import threading
import traceback
from collections.abc import AsyncIterator

import anyio
import pytest

pytest.importorskip(
    "openai", reason="the optional 'openai' extra is not installed (pip install '.[dev]')"
)

from perdure.providers import (
    AuthenticationError,
    BadRequestError,
    ContextLengthError,
    LLMRequest,
    MalformedResponseError,
    Message,
    OpenAI,
    ProviderError,
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
from perdure.providers.errors import redact, url_secrets
from tests.providers.conftest import CutTransport, SleepRecorder
from tests.support.http_server import (
    DropConnection,
    Hang,
    JSONReply,
    RawReply,
    RecordedRequest,
    SSEEvent,
    SSEReply,
)
from tests.support.openai_server import OpenAIServer, completion, error

pytestmark = pytest.mark.anyio

KEY = "sk-test-0123456789abcdefghijklmnopqrstuvwxyz"

WEATHER = ToolSpec(
    name="get_weather",
    description="Get the weather for a location",
    parameters={"type": "object", "properties": {"location": {"type": "string"}}},
)


def ask(text: str = "What is the weather in Paris?", **kwargs: object) -> LLMRequest:
    messages = (Message("system", "You are terse."), Message("user", text))
    return LLMRequest(model="", messages=messages, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def provider(openai_server: OpenAIServer, retry: RetryPolicy) -> AsyncIterator[OpenAI]:
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=retry
    ) as provider:
        yield provider


async def collect(provider: OpenAI, request: LLMRequest) -> list[StreamEvent]:
    return [event async for event in provider.stream(request)]


# -- answers -------------------------------------------------------------------------


async def test_text_reply_and_the_request_on_the_wire(
    provider: OpenAI, openai_server: OpenAIServer
) -> None:
    openai_server.push(completion("It is sunny.", usage=(21, 4), model="gpt-test-2024-01-01"))
    response = await provider.complete(ask(tools=(WEATHER,)))

    assert response.message == Message("assistant", "It is sunny.")
    assert response.finish_reason == "stop"
    assert response.usage == Usage(21, 4)
    assert response.model == "gpt-test-2024-01-01"  # the model that served, not the alias
    assert response.provider == "openai"

    (sent,) = openai_server.chat_requests
    assert sent.method == "POST" and sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    body = sent.json
    assert body["model"] == "gpt-test"  # the provider's model when the request names none
    assert body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    assert body["tools"] == [{"type": "function", "function": WEATHER.to_dict()}]
    assert "stream" not in body


async def test_several_tool_calls_in_one_turn(
    provider: OpenAI, openai_server: OpenAIServer
) -> None:
    openai_server.push(
        completion(
            None,
            [
                ("call_a", "get_weather", {"location": "Paris"}),
                ("call_b", "get_weather", {"location": "Oslo"}),
                ("call_c", "get_weather", '{"location": "Ro'),  # truncated JSON
            ],
        )
    )
    response = await provider.complete(ask())

    assert response.finish_reason == "tool_calls"
    assert response.message.content == ""
    assert response.message.tool_calls == (
        ToolCall("call_a", "get_weather", {"location": "Paris"}),
        ToolCall("call_b", "get_weather", {"location": "Oslo"}),
        # Invalid JSON is kept verbatim for the runtime to report, never an exception.
        ToolCall("call_c", "get_weather", '{"location": "Ro'),
    )


async def test_conversation_with_tool_results_maps_to_the_wire_format(
    provider: OpenAI, openai_server: OpenAIServer
) -> None:
    openai_server.push(completion("Paris is sunny, Oslo rainy."))
    calls = (
        ToolCall("call_a", "get_weather", {"location": "Paris"}),
        ToolCall("call_b", "get_weather", "not json"),
    )
    messages = [
        Message("user", "Weather?"),
        Message("assistant", "", tool_calls=calls),
        Message("tool", '{"sky": "sunny"}', tool_call_id="call_a", name="get_weather"),
        Message("tool", "bad arguments", tool_call_id="call_b", name="get_weather", is_error=True),
    ]
    await provider.complete(LLMRequest(model="gpt-other", messages=messages))

    body = openai_server.chat_requests[0].json
    assert body["model"] == "gpt-other"  # the request's model wins
    assert body["messages"] == [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "not json"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": '{"sky": "sunny"}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "bad arguments"},
    ]


async def test_params_merge_provider_defaults_under_request_params(
    openai_server: OpenAIServer, retry: RetryPolicy
) -> None:
    openai_server.push(completion("ok"))
    async with OpenAI(
        "gpt-test",
        base_url=openai_server.base_url,
        api_key=KEY,
        retry=retry,
        params={"temperature": 0.2, "seed": 7},
    ) as provider:
        await provider.complete(ask(params={"temperature": 0.9, "max_tokens": 50}))
    body = openai_server.chat_requests[0].json
    assert (body["temperature"], body["seed"], body["max_tokens"]) == (0.9, 7, 50)


async def test_streaming_text_and_tool_calls(provider: OpenAI, openai_server: OpenAIServer) -> None:
    turn = completion(
        "Let me check both.",
        [
            ("call_a", "get_weather", {"location": "Paris"}),
            ("call_b", "get_weather", {"location": "Oslo"}),
        ],
        usage=(30, 12),
    )
    openai_server.push(turn, turn)
    events = await collect(provider, ask())
    response = await provider.complete(ask())

    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert texts == ["Let", " me", " check", " both."]
    pieces = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [(p.index, p.id, p.name) for p in pieces if p.id] == [
        (0, "call_a", "get_weather"),
        (1, "call_b", "get_weather"),
    ]
    assert "".join(p.arguments for p in pieces if p.index == 1) == '{"location": "Oslo"}'
    assert isinstance(events[-1], ResponseCompleted)
    assert sum(isinstance(e, ResponseCompleted) for e in events) == 1
    streamed = events[-1].response
    assert streamed == response
    assert streamed.usage == Usage(30, 12)
    assert streamed.finish_reason == "tool_calls"

    body = openai_server.chat_requests[0].json
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


# -- configuration -------------------------------------------------------------------


async def test_missing_key_fails_at_construction_for_openai_itself() -> None:
    with pytest.raises(AuthenticationError, match="OPENAI_API_KEY"):
        OpenAI("gpt-4o-mini")
    with pytest.raises(AuthenticationError):
        OpenAI("gpt-4o-mini", base_url="https://api.openai.com/v1")


async def test_local_server_needs_no_key(openai_server: OpenAIServer, retry: RetryPolicy) -> None:
    openai_server.push(completion("hi"))
    async with OpenAI("llama3", base_url=openai_server.base_url, retry=retry) as provider:
        assert (await provider.complete(ask())).message.content == "hi"
    assert openai_server.chat_requests[0].headers["authorization"] == "Bearer not-needed"


async def test_key_and_base_url_fall_back_to_the_environment(
    openai_server: OpenAIServer, retry: RetryPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    openai_server.push(completion("from env"))
    async with OpenAI("gpt-test", retry=retry) as provider:
        assert (await provider.complete(ask())).message.content == "from env"
    assert openai_server.chat_requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_an_existing_client_is_used_with_retries_off(
    openai_server: OpenAIServer, retry: RetryPolicy, sleeps: SleepRecorder
) -> None:
    import openai

    client = openai.AsyncOpenAI(api_key=KEY, base_url=openai_server.base_url, max_retries=5)
    openai_server.push(error(503, "busy", type="server_error"), completion("served"))
    provider = OpenAI("gpt-test", client=client, retry=retry)
    try:
        assert (await provider.complete(ask())).message.content == "served"
    finally:
        await client.close()
    # Two requests, one recorded sleep: our policy retried, the client's did not.
    assert len(openai_server.chat_requests) == 2
    assert len(sleeps.delays) == 1
    assert openai_server.chat_requests[1].headers["x-stainless-retry-count"] == "0"


# -- retryable failures --------------------------------------------------------------


async def test_429_with_retry_after_then_success(
    provider: OpenAI, openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    openai_server.push(
        error(429, "Rate limit reached", type="requests", headers={"Retry-After": "7"}),
        error(429, "Rate limit reached", type="requests", headers={"retry-after-ms": "250"}),
        completion("finally"),
    )
    response = await provider.complete(ask())
    assert response.message.content == "finally"
    assert sleeps.delays == [7.0, 0.25]  # exactly what the server asked for
    assert len(openai_server.chat_requests) == 3


async def test_500_then_success_backs_off(
    provider: OpenAI, openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    openai_server.push(
        error(500, "The server had an error", type="server_error"),
        error(502, "Bad gateway", type="server_error"),
        completion("recovered"),
    )
    response = await provider.complete(ask())
    assert response.message.content == "recovered"
    assert sleeps.delays == [0.5, 1.0]  # initial, then doubled (jitter fixed at 0 here)


async def test_persistent_503_gives_up_after_max_attempts(
    openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    openai_server.handler = lambda request: error(503, "overloaded", type="server_error")
    policy = RetryPolicy(max_attempts=3, sleep=sleeps, rng=lambda: 0.5)
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=policy
    ) as provider:
        with pytest.raises(ProviderUnavailableError) as caught:
            await provider.complete(ask())
    assert len(openai_server.chat_requests) == 3
    assert len(sleeps.delays) == 2
    err = caught.value
    assert err.status == 503 and err.attempts == 3
    assert "openai" in str(err) and "gpt-test" in str(err) and "503" in str(err)
    assert "gave up after 3 attempts" in str(err)


async def test_retry_after_beyond_the_cap_is_not_waited_for(
    provider: OpenAI, openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    openai_server.push(error(429, "slow down", type="requests", headers={"Retry-After": "3600"}))
    with pytest.raises(RateLimitError) as caught:
        await provider.complete(ask())
    assert caught.value.retry_after == 3600
    assert sleeps.delays == []
    assert "max_retry_after" in str(caught.value)


async def test_malformed_body_is_retried_and_bounded(
    openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    policy = RetryPolicy(max_attempts=3, sleep=sleeps, rng=lambda: 0.5)
    openai_server.push(RawReply(b"<html>proxy error</html>"), JSONReply({"choices": []}))
    openai_server.handler = lambda request: JSONReply({"unexpected": True})
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=policy
    ) as provider:
        with pytest.raises(MalformedResponseError) as caught:
            await provider.complete(ask())
    assert len(openai_server.chat_requests) == 3
    assert "choices" in str(caught.value)
    assert openai_server.url in str(caught.value)


async def test_malformed_body_then_success(provider: OpenAI, openai_server: OpenAIServer) -> None:
    openai_server.push(RawReply(b"not json at all"), completion("good"))
    assert (await provider.complete(ask())).message.content == "good"


async def test_connection_dropped_before_any_response_is_retried(
    provider: OpenAI, openai_server: OpenAIServer
) -> None:
    openai_server.push(DropConnection(), completion("second time lucky"))
    assert (await provider.complete(ask())).message.content == "second time lucky"
    assert len(openai_server.chat_requests) == 2


async def test_timeout_is_retryable(openai_server: OpenAIServer, sleeps: SleepRecorder) -> None:
    policy = RetryPolicy(max_attempts=2, sleep=sleeps)
    hang = Hang()
    openai_server.push(hang, completion("after the timeout"))
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=policy, timeout=0.3
    ) as provider:
        response = await provider.complete(ask())
    hang.release.set()
    assert response.message.content == "after the timeout"
    assert len(sleeps.delays) == 1


async def test_connection_dropped_mid_stream(provider: OpenAI, openai_server: OpenAIServer) -> None:
    openai_server.push(completion("one two three four", drop_after=3))
    seen: list[StreamEvent] = []
    with pytest.raises(ProviderUnavailableError) as caught:
        async for event in provider.stream(ask()):
            seen.append(event)
    # Part of the answer was seen, so the failure surfaces rather than being replayed.
    assert [e.text for e in seen if isinstance(e, TextDelta)] == ["one", " two"]
    assert not any(isinstance(e, ResponseCompleted) for e in seen)
    assert len(openai_server.chat_requests) == 1
    assert "connection" in str(caught.value)


async def test_stream_dropped_before_its_first_event_is_retried(
    provider: OpenAI, openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    openai_server.push(completion("never", drop_after=0), completion("whole answer"))
    events = await collect(provider, ask())
    assert isinstance(events[-1], ResponseCompleted)
    assert events[-1].response.message.content == "whole answer"
    assert len(openai_server.chat_requests) == 2
    assert len(sleeps.delays) == 1


async def test_stream_ending_without_a_finish_is_retryable(
    openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    policy = RetryPolicy(max_attempts=1, sleep=sleeps)
    openai_server.push(completion("cut short", finish=False))
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=policy
    ) as provider:
        with pytest.raises(ProviderUnavailableError, match="ended before the model finished"):
            await collect(provider, ask())


async def test_error_event_inside_a_stream_is_retryable(
    provider: OpenAI, openai_server: OpenAIServer
) -> None:
    events = [SSEEvent('{"error": {"message": "The server had an error", "type": "server_error"}}')]
    openai_server.push(SSEReply(events), completion("fine now"))
    streamed = await collect(provider, ask())
    assert isinstance(streamed[-1], ResponseCompleted)
    assert streamed[-1].response.message.content == "fine now"
    assert len(openai_server.chat_requests) == 2


# -- terminal failures ---------------------------------------------------------------


async def test_401_is_terminal_and_never_shows_the_key(
    provider: OpenAI, openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    # A server that echoes the whole key (OpenAI's own echoes a masked one).
    openai_server.push(error(401, f"Incorrect API key provided: {KEY}. Header was 'Bearer {KEY}'."))
    with pytest.raises(AuthenticationError) as caught:
        await provider.complete(ask())
    err = caught.value
    assert isinstance(err, TerminalProviderError)
    assert err.status == 401 and err.provider == "openai" and err.model == "gpt-test"
    assert len(openai_server.chat_requests) == 1 and sleeps.delays == []
    rendered = "".join(traceback.format_exception(err)) + repr(err) + str(err.__dict__)
    assert KEY not in rendered
    assert KEY[8:24] not in rendered
    assert "[REDACTED]" in str(err)
    # The SDK's exception holds the request and its Authorization header: not attached.
    assert err.__cause__ is None and err.__context__ is None


async def test_masked_key_echo_is_redacted_too(
    provider: OpenAI, openai_server: OpenAIServer
) -> None:
    openai_server.push(error(401, "Incorrect API key provided: sk-proj-****************wxyz."))
    with pytest.raises(AuthenticationError) as caught:
        await provider.complete(ask())
    assert "sk-proj" not in str(caught.value)


async def test_400_is_terminal(provider: OpenAI, openai_server: OpenAIServer) -> None:
    openai_server.push(error(400, "Invalid schema for function 'get_weather'", code="invalid"))
    with pytest.raises(BadRequestError) as caught:
        await provider.complete(ask())
    assert not isinstance(caught.value, ContextLengthError)
    assert caught.value.status == 400 and caught.value.code == "invalid"
    assert "Invalid schema" in str(caught.value)
    assert len(openai_server.chat_requests) == 1


async def test_404_unknown_model_is_a_bad_request(
    provider: OpenAI, openai_server: OpenAIServer
) -> None:
    openai_server.push(error(404, "The model 'gpt-nope' does not exist", code="model_not_found"))
    with pytest.raises(BadRequestError, match="does not exist"):
        await provider.complete(ask())


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("This model's maximum context length is 128000 tokens.", "context_length_exceeded"),
        # vLLM's wording, no code
        ("This model's maximum context length is 4096 tokens. However, you requested 5000", None),
    ],
)
async def test_context_length(
    provider: OpenAI, openai_server: OpenAIServer, message: str, code: str | None
) -> None:
    openai_server.push(error(400, message, code=code))
    with pytest.raises(ContextLengthError) as caught:
        await provider.complete(ask())
    assert caught.value.status == 400
    assert "context" in str(caught.value)
    assert len(openai_server.chat_requests) == 1


async def test_exhausted_quota_is_terminal(
    provider: OpenAI, openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    openai_server.push(error(429, "You exceeded your current quota", code="insufficient_quota"))
    with pytest.raises(TerminalProviderError, match="quota"):
        await provider.complete(ask())
    assert sleeps.delays == []


# -- cancellation --------------------------------------------------------------------


async def test_cancelling_a_call_cancels_it_and_is_not_a_provider_error(
    provider: OpenAI, openai_server: OpenAIServer
) -> None:
    arrived = threading.Event()
    hang = Hang()

    def hang_after_arrival(request: RecordedRequest) -> Hang:
        arrived.set()
        return hang

    openai_server.handler = hang_after_arrival
    outcome: list[object] = []

    async def call() -> None:
        try:
            outcome.append(await provider.complete(ask()))
        except ProviderError as err:  # pragma: no cover - the failure this test guards
            outcome.append(err)
            raise

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.to_thread.run_sync(arrived.wait)
            tg.cancel_scope.cancel()
    hang.release.set()
    assert outcome == []  # cancelled: neither a response nor a provider error
    assert len(openai_server.chat_requests) == 1  # and not retried


async def test_cancelling_a_stream_midway(provider: OpenAI, openai_server: OpenAIServer) -> None:
    openai_server.push(completion("one two three four five"))
    seen: list[StreamEvent] = []
    with anyio.CancelScope() as scope:
        async for event in provider.stream(ask()):
            seen.append(event)
            if len(seen) == 2:
                scope.cancel()
                await anyio.sleep(0)  # a checkpoint: the cancellation lands here
    assert scope.cancelled_caught
    assert [e.text for e in seen if isinstance(e, TextDelta)] == ["one", " two"]


@pytest.mark.parametrize(
    "raw",
    [
        OSError("connection reset by peer"),
        anyio.BrokenResourceError(),
        pytest.importorskip("httpx2").StreamClosed(),
    ],
    ids=["OSError", "BrokenResourceError", "httpx2.StreamClosed"],
)
async def test_a_raw_transport_error_mid_stream_is_a_typed_retryable_error(
    openai_server: OpenAIServer, retry: RetryPolicy, raw: BaseException
) -> None:
    import openai

    cut = CutTransport(raw)
    client = openai.AsyncOpenAI(
        api_key=KEY, base_url=openai_server.base_url, http_client=cut.client()
    )
    openai_server.push(completion("one two three four"))
    provider = OpenAI("gpt-test", client=client, retry=retry)
    try:
        with pytest.raises(ProviderUnavailableError) as caught:
            await collect(provider, ask())
    finally:
        await client.close()
    assert "connection to" in str(caught.value) and type(raw).__name__ in str(caught.value)
    assert caught.value.__context__ is None  # the raw error (with its request) is not kept


def _chunk(delta: dict[str, object], finish: str | None = None) -> SSEEvent:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return SSEEvent(json.dumps({"id": "c", "model": "gpt-test", "choices": [choice]}))


async def test_a_streamed_tool_call_without_a_name_is_malformed(
    provider: OpenAI, openai_server: OpenAIServer
) -> None:
    unnamed = {"index": 0, "id": "call_1", "function": {"arguments": '{"location": "Paris"}'}}
    events = [_chunk({"tool_calls": [unnamed]}), _chunk({}, "tool_calls"), SSEEvent("[DONE]")]
    policy = RetryPolicy(max_attempts=1)
    openai_server.push(SSEReply(events))
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=policy
    ) as one_try:
        with pytest.raises(MalformedResponseError, match="tool call 0 has no function name"):
            await collect(one_try, ask())
    # as the same answer is when not streamed
    openai_server.push(completion(None, [("call_1", "", {"location": "Paris"})]))
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=policy
    ) as one_try:
        with pytest.raises(MalformedResponseError, match="tool call 0 has no function name"):
            await one_try.complete(ask())


async def test_index_less_tool_calls_in_separate_chunks_stay_separate(
    provider: OpenAI, openai_server: OpenAIServer
) -> None:
    # Some OpenAI-compatible servers send no index: each id starts a call, and a piece
    # without an id continues the one before it.
    pieces = [
        {"id": "call_a", "function": {"name": "get_weather", "arguments": '{"location": '}},
        {"function": {"arguments": '"Paris"}'}},
        {"id": "call_b", "function": {"name": "get_weather", "arguments": '{"location": '}},
        {"function": {"arguments": '"Oslo"}'}},
    ]
    events = [_chunk({"tool_calls": [p]}) for p in pieces]
    events += [_chunk({}, "tool_calls"), SSEEvent("[DONE]")]
    openai_server.push(SSEReply(events))
    streamed = await collect(provider, ask())
    assert [(e.index, e.id) for e in streamed if isinstance(e, ToolCallDelta)] == [
        (0, "call_a"),
        (0, None),
        (1, "call_b"),
        (1, None),
    ]
    final = streamed[-1]
    assert isinstance(final, ResponseCompleted)
    assert final.response.message.tool_calls == (
        ToolCall("call_a", "get_weather", {"location": "Paris"}),
        ToolCall("call_b", "get_weather", {"location": "Oslo"}),
    )


async def test_401_on_the_stream_path_is_terminal_and_never_shows_the_key(
    provider: OpenAI,
    openai_server: OpenAIServer,
    sleeps: SleepRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and the HTTP stack's too
    openai_server.push(error(401, f"Incorrect API key provided: {KEY}."))
    with pytest.raises(AuthenticationError) as caught:
        await collect(provider, ask())
    err = caught.value
    assert err.status == 401 and len(openai_server.chat_requests) == 1 and sleeps.delays == []
    rendered = "".join(traceback.format_exception(err)) + repr(err) + str(err.__dict__)
    assert KEY not in rendered and KEY[8:24] not in rendered
    assert err.__cause__ is None and err.__context__ is None
    assert caplog.records and not [r for r in caplog.records if KEY in r.getMessage()]
    assert KEY not in repr(provider)


async def test_credentials_in_base_url_never_show_in_messages_or_repr(
    openai_server: OpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    password = "hunter2"  # short: redacted as URL userinfo, whatever its length
    base_url = openai_server.base_url.replace("://", f"://bob:{password}@")
    caplog.set_level(logging.DEBUG, logger="perdure")
    openai_server.push(DropConnection(), error(503, "overloaded"))
    async with OpenAI(
        "gpt-test", base_url=base_url, api_key=KEY, retry=RetryPolicy(max_attempts=1)
    ) as provider:
        failures = []
        for _ in range(2):
            with pytest.raises(ProviderUnavailableError) as caught:
                await provider.complete(ask())
            failures.append(caught.value)
        shown = repr(provider)
    assert "base_url='http://[REDACTED]@127.0.0.1" in shown
    assert "connection to http://[REDACTED]@127.0.0.1" in str(failures[0])
    # (the HTTP library's own log lines: see test_url_credentials.py)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("perdure"))
    for text in (shown, *map(str, failures), *(repr(f.__dict__) for f in failures), logged):
        assert password not in text and KEY not in text


def test_redact_scrubs_credentials_written_into_urls() -> None:
    text = redact("GET https://bob:pw@host/v1?api-key=abc&x=1 and http://h/?key=AIza9&sig=s")
    assert text == (
        "GET https://[REDACTED]@host/v1?api-key=[REDACTED]&x=1 and "
        "http://h/?key=[REDACTED]&sig=[REDACTED]"
    )
    assert url_secrets("https://bob:p%40ss@host/?token=t0k") == (
        "p%40ss",
        "p@ss",
        "t0k",
        "Ym9iOnBAc3M=",
    )
