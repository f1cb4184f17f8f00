"""Retries and fallback chains pushed to their edges.

Retry-After as an HTTP date and as one far in the future, a retry budget running out
on the streaming path, every member of a chain failing (the message must name them
all: it is what an execution's failure records), and terminal errors at either end of
a chain.
"""

from __future__ import annotations

import email.utils
import time
from pathlib import Path

import pytest

pytest.importorskip(
    "openai", reason="the optional 'openai' extra is not installed (pip install '.[dev]')"
)

from perdure import Agent, Runtime
from perdure.providers import (
    AuthenticationError,
    BadRequestError,
    Fallback,
    LLMRequest,
    Message,
    OpenAI,
    ProviderUnavailableError,
    RateLimitError,
    ResponseCompleted,
    RetryPolicy,
    Scripted,
)
from tests.providers.conftest import SleepRecorder
from tests.support.openai_server import OpenAIServer, completion, error

pytestmark = pytest.mark.anyio

KEY = "sk-test-0123456789abcdefghijklmnopqrstuvwxyz"
REQUEST = LLMRequest(model="", messages=[Message("user", "Hi")])


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


# -- Retry-After ----------------------------------------------------------------------


async def test_retry_after_as_an_http_date_is_honoured(
    openai_server: OpenAIServer, retry: RetryPolicy, sleeps: SleepRecorder
) -> None:
    openai_server.push(
        error(429, "slow down", type="requests", headers={"Retry-After": http_date(20)}),
        completion("served"),
    )
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=retry
    ) as provider:
        assert (await provider.complete(REQUEST)).message.content == "served"
    (delay,) = sleeps.delays
    assert 17.0 <= delay <= 20.0  # HTTP dates have whole seconds; the clock moved on


@pytest.mark.parametrize(
    "headers",
    [{"Retry-After": "Fri, 01 Jan 2100 00:00:00 GMT"}, {"retry-after-ms": "86400000"}],
    ids=["far-http-date", "a-day-in-ms"],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_a_huge_retry_after_is_not_waited_for_and_the_next_member_serves(
    openai_server: OpenAIServer,
    retry: RetryPolicy,
    sleeps: SleepRecorder,
    headers: dict[str, str],
    streaming: bool,
) -> None:
    openai_server.push(error(429, "come back tomorrow", type="requests", headers=headers))
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=retry
    ) as provider:
        with pytest.raises(RateLimitError) as caught:
            if streaming:
                [e async for e in provider.stream(REQUEST)]
            else:
                await provider.complete(REQUEST)
        err = caught.value
        assert err.retry_after is not None and err.retry_after > retry.max_retry_after
        assert sleeps.delays == [] and len(openai_server.chat_requests) == 1
        text = str(err)
        assert "openai (model 'gpt-test')" in text and "[HTTP 429]" in text
        assert "max_retry_after" in text
        # and in a chain the backup serves at once, nobody having slept
        openai_server.push(error(429, "come back tomorrow", type="requests", headers=headers))
        backup = Scripted(["from the backup"], name="backup")
        response = await Fallback([provider, backup]).complete(REQUEST)
    assert response.provider == "backup" and sleeps.delays == []


async def test_a_retry_budget_spent_on_the_stream_path_names_provider_model_and_status(
    openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    openai_server.handler = lambda r: error(
        429, "busy", type="requests", headers={"Retry-After": "1"}
    )
    policy = RetryPolicy(max_attempts=3, sleep=sleeps)
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=policy, name="primary"
    ) as provider:
        with pytest.raises(RateLimitError) as caught:
            [e async for e in provider.stream(REQUEST)]
    err = caught.value
    assert (err.provider, err.model, err.status, err.attempts) == ("primary", "gpt-test", 429, 3)
    assert sleeps.delays == [1.0, 1.0] and len(openai_server.chat_requests) == 3
    assert "primary (model 'gpt-test'): rate limited [HTTP 429]" in str(err)
    assert "gave up after 3 attempts" in str(err)


# -- chains that fail -------------------------------------------------------------------


def _down(name: str, model: str, status: int) -> Scripted:
    cls = RateLimitError if status == 429 else ProviderUnavailableError
    return Scripted([cls(f"{name} is down", status=status)], name=name, model=model)


async def test_every_member_failing_names_each_member_in_the_message() -> None:
    chain = Fallback(
        [_down("a", "ma", 503), Fallback([_down("b", "mb", 502), _down("c", "mc", 429)])],
        name="chain",
    )
    with pytest.raises(RateLimitError) as caught:
        await chain.complete(REQUEST)
    err = caught.value
    # the inner chain contributes its own members: one flat list, in order
    assert [(f.provider, f.model, f.status) for f in err.failures] == [
        ("a", "ma", 503),
        ("b", "mb", 502),
        ("c", "mc", 429),
    ]
    text = str(err)
    assert text.startswith("c (model 'mc'): rate limited [HTTP 429]: c is down")
    assert "earlier in the chain: a (model 'ma'): unavailable [HTTP 503]: a is down" in text
    assert "b (model 'mb'): unavailable [HTTP 502]: b is down" in text
    assert text.count(" -- ") == 1  # one hint (the last member's), not one per member
    assert err.__cause__ is err.failures[1] and err.failures[1].__cause__ is err.failures[0]


async def test_a_failed_execution_records_every_member_of_the_chain(tmp_path: Path) -> None:
    chain = Fallback([_down("a", "ma", 503), _down("b", "mb", 429)])
    async with Runtime(tmp_path / "data", durability="process") as rt:
        r = await rt.run(Agent("f", llm=chain), "hi", execution_id="fb-1")
    assert r.status == "failed" and r.error is not None
    message = r.error["message"]
    assert "b (model 'mb'): rate limited [HTTP 429]" in message
    assert "a (model 'ma'): unavailable [HTTP 503]" in message
    assert "'fb-1' step 1" in message  # and which execution and step it was


@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_a_terminal_error_after_a_fallback_says_what_failed_before_it(
    streaming: bool,
) -> None:
    rejected = AuthenticationError("bad key", status=401)
    third = Scripted(["never asked"], name="c")
    chain = Fallback([_down("a", "ma", 503), Scripted([rejected], name="b", model="mb"), third])
    with pytest.raises(AuthenticationError) as caught:
        if streaming:
            [e async for e in chain.stream(REQUEST)]
        else:
            await chain.complete(REQUEST)
    err = caught.value
    assert err is rejected and third.calls == 0  # terminal: the chain stops there
    assert [f.provider for f in err.failures] == ["a", "b"]
    assert "b (model 'mb'): authentication failed [HTTP 401]" in str(err)
    assert "earlier in the chain: a (model 'ma'): unavailable [HTTP 503]" in str(err)


async def test_a_terminal_error_in_the_primary_stream_does_not_fall_through(
    openai_server: OpenAIServer, retry: RetryPolicy
) -> None:
    openai_server.push(error(400, "Invalid schema for function 'f'"))
    backup = Scripted(["never"], name="backup")
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=retry
    ) as primary:
        with pytest.raises(BadRequestError) as caught:
            [e async for e in Fallback([primary, backup]).stream(REQUEST)]
    assert backup.calls == 0 and len(openai_server.chat_requests) == 1
    assert caught.value.failures == ()  # nothing failed before it
    assert "earlier in the chain" not in str(caught.value)


async def test_a_chain_that_recovers_streams_only_the_member_that_served(
    openai_server: OpenAIServer, sleeps: SleepRecorder
) -> None:
    openai_server.handler = lambda r: error(503, "overloaded", type="server_error")
    policy = RetryPolicy(max_attempts=2, sleep=sleeps)
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=policy
    ) as primary:
        events = [
            e
            async for e in Fallback([primary, Scripted(["backup text"], name="b")]).stream(REQUEST)
        ]
    assert isinstance(events[-1], ResponseCompleted)
    response = events[-1].response
    assert response.provider == "b" and response.message.content == "backup text"
    assert len(openai_server.chat_requests) == 2 and len(sleeps.delays) == 1


async def test_a_huge_error_page_is_cut_in_the_message_logged_at_every_retry(
    openai_server: OpenAIServer, sleeps: SleepRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    page = "<html>" + "x" * 200_000 + f" {KEY}</html>"  # the key at the very end, too
    openai_server.handler = lambda r: error(502, page, type="server_error")
    policy = RetryPolicy(max_attempts=3, sleep=sleeps)
    caplog.set_level("INFO", logger="perdure")
    async with OpenAI(
        "gpt-test", base_url=openai_server.base_url, api_key=KEY, retry=policy
    ) as provider:
        with pytest.raises(ProviderUnavailableError) as caught:
            await provider.complete(REQUEST)
    text = str(caught.value)
    assert len(text) < 3_000 and "more characters)" in text and "[HTTP 502]" in text
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retried) == 2 and all(len(line) < 3_000 for line in retried)
    assert KEY not in text and KEY[:12] not in text
