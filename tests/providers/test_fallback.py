"""Fallback: the next member serves when one fails retryably; terminal errors surface."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from contextlib import aclosing as closing

import pytest

from perdure.providers import (
    Anthropic,
    AuthenticationError,
    Fallback,
    LLMRequest,
    Message,
    OpenAI,
    ProviderUnavailableError,
    RateLimitError,
    ResponseCompleted,
    RetryPolicy,
    Scripted,
    StreamEvent,
    TextDelta,
)
from tests.providers.conftest import SleepRecorder
from tests.support.anthropic_server import AnthropicServer, message
from tests.support.openai_server import OpenAIServer, completion, error

pytestmark = pytest.mark.anyio

REQUEST = LLMRequest(model="whatever-the-agent-said", messages=[Message("user", "Hi")])


def policy(sleeps: SleepRecorder, attempts: int = 2) -> RetryPolicy:
    return RetryPolicy(max_attempts=attempts, sleep=sleeps)


@pytest.mark.skipif(
    importlib.util.find_spec("anthropic") is None,
    reason="the optional 'anthropic' extra is not installed (pip install '.[dev]')",
)
async def test_persistent_503_falls_back_to_the_secondary(
    openai_server: OpenAIServer, anthropic_server: AnthropicServer, sleeps: SleepRecorder
) -> None:
    openai_server.handler = lambda request: error(503, "overloaded", type="server_error")
    anthropic_server.push(message("Hello from Claude", model="claude-served"))
    async with (
        OpenAI(
            "gpt-primary", base_url=openai_server.base_url, api_key="sk-x", retry=policy(sleeps)
        ) as primary,
        Anthropic(
            "claude-backup", base_url=anthropic_server.base_url, api_key="k", name="backup"
        ) as secondary,
    ):
        chain = Fallback([primary, secondary])
        response = await chain.complete(REQUEST)

    assert response.message.content == "Hello from Claude"
    assert response.provider == "backup"  # which member served
    assert response.model == "claude-served"
    assert len(openai_server.chat_requests) == 2  # the primary's own retries, then on
    # Each member is asked for its own model, not the request's.
    assert openai_server.chat_requests[0].json["model"] == "gpt-primary"
    assert anthropic_server.message_requests[0].json["model"] == "claude-backup"
    assert chain.model == "gpt-primary"


async def test_401_on_the_primary_does_not_fall_back(
    openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    openai_server.push(error(401, "Incorrect API key provided"))
    secondary = Scripted(["never"], name="backup")
    async with OpenAI(
        "gpt-primary", base_url=openai_server.base_url, api_key="sk-x", retry=policy(sleeps)
    ) as primary:
        with pytest.raises(AuthenticationError):
            await Fallback([primary, secondary]).complete(REQUEST)
    assert secondary.calls == 0
    assert len(openai_server.chat_requests) == 1


async def test_every_member_failing_raises_the_last_with_all_attached() -> None:
    first = ProviderUnavailableError("down", status=503)
    second = RateLimitError("slow", status=429)
    a = Scripted([first], name="a", model="ma")
    b = Scripted([second], name="b", model="mb")
    chain = Fallback([a, b], name="chain")
    with pytest.raises(RateLimitError) as caught:
        await chain.complete(REQUEST)
    err = caught.value
    assert err is second
    assert err.failures == (first, second)
    assert err.__cause__ is first
    assert (first.provider, first.model, second.provider, second.model) == ("a", "ma", "b", "mb")
    assert any("chain: every member failed" in note for note in err.__notes__)
    assert [r.model for r in a.requests + b.requests] == ["ma", "mb"]


async def test_the_primary_serves_when_healthy() -> None:
    a = Scripted(["from a"], name="a", model="ma")
    b = Scripted(["from b"], name="b", model="mb")
    response = await Fallback([a, b]).complete(REQUEST)
    assert (response.message.content, response.provider, response.model) == ("from a", "a", "ma")
    assert b.calls == 0


async def test_nested_chains_report_the_leaf_that_served() -> None:
    down = Scripted([ProviderUnavailableError("down")], name="down")
    leaf = Scripted(["leaf"], name="leaf", model="m-leaf")
    response = await Fallback([down, Fallback([leaf], name="inner")]).complete(REQUEST)
    assert (response.provider, response.model) == ("leaf", "m-leaf")


def test_an_empty_chain_is_rejected() -> None:
    with pytest.raises(ValueError):
        Fallback([])


async def test_stream_falls_back_before_the_first_event(
    openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    openai_server.handler = lambda request: error(502, "bad gateway", type="server_error")
    backup = Scripted(["streamed by the backup"], name="backup")
    async with OpenAI(
        "gpt-primary", base_url=openai_server.base_url, api_key="sk-x", retry=policy(sleeps)
    ) as primary:
        events = [e async for e in Fallback([primary, backup]).stream(REQUEST)]
    assert isinstance(events[-1], ResponseCompleted)
    assert events[-1].response.provider == "backup"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "streamed by the backup"


async def test_stream_does_not_fall_back_once_it_has_started(
    openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    openai_server.push(completion("half an answer and then", drop_after=3))
    backup = Scripted(["never"], name="backup")
    seen = []
    async with OpenAI(
        "gpt-primary", base_url=openai_server.base_url, api_key="sk-x", retry=policy(sleeps)
    ) as primary:
        with pytest.raises(ProviderUnavailableError):
            async for event in Fallback([primary, backup]).stream(REQUEST):
                seen.append(event)
    assert seen and backup.calls == 0


async def test_aclose_closes_every_member() -> None:
    closed: list[str] = []

    class Closable(Scripted):
        async def aclose(self) -> None:
            closed.append(self.name)

    chain = Fallback([Closable(["a"], name="a"), Scripted(["b"]), Closable(["c"], name="c")])
    await chain.aclose()
    assert closed == ["a", "c"]


async def test_abandoning_the_stream_closes_the_members_stream_at_once() -> None:
    closed: list[str] = []

    class Tracked(Scripted):
        async def stream(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
            try:
                async for event in super().stream(request):
                    yield event
            finally:
                closed.append(self.name)

    chain = Fallback([Tracked(["many words in this answer"], name="tracked")])
    async with closing(chain.stream(REQUEST)) as events:
        async for _ in events:
            break
    assert closed == ["tracked"]
