"""RetryPolicy: bounded attempts, jittered exponential backoff, Retry-After."""

from __future__ import annotations

import email.utils
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perdure.providers import (
    AuthenticationError,
    ProviderUnavailableError,
    RateLimitError,
    RetryPolicy,
)
from perdure.providers.retry import parse_retry_after, retry_stream
from tests.providers.conftest import SleepRecorder


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(0.0, 10.0),
    multiplier=st.floats(1.0, 4.0),
    max_delay=st.floats(0.0, 120.0),
    jitter=st.floats(0.0, 0.99),
    retry=st.integers(1, 200),
    draw=st.floats(0.0, 1.0, exclude_max=True),
)
def test_backoff_is_jittered_exponential_within_bounds(
    initial: float, multiplier: float, max_delay: float, jitter: float, retry: int, draw: float
) -> None:
    policy = RetryPolicy(
        initial=initial, multiplier=multiplier, max_delay=max_delay, jitter=jitter, rng=lambda: draw
    )
    base = min(initial * multiplier ** min(retry - 1, 64), max_delay)
    delay = policy.backoff(retry)
    assert 0.0 <= delay <= max_delay
    assert base * (1 - jitter) - 1e-9 <= delay <= base * (1 + jitter) + 1e-9


def test_backoff_grows_exponentially_and_caps() -> None:
    policy = RetryPolicy(initial=0.5, multiplier=2.0, max_delay=30.0, rng=lambda: 0.5)
    assert [policy.backoff(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_jitter_spreads_delays() -> None:
    low = RetryPolicy(rng=lambda: 0.0).backoff(3)
    high = RetryPolicy(rng=lambda: 0.999999).backoff(3)
    assert low == pytest.approx(2.0 * 0.75)
    assert high == pytest.approx(2.0 * 1.25, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"initial": -1}, {"multiplier": 0.5}, {"jitter": 1.0}],
)
def test_nonsense_policies_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_attempts_are_bounded(sleeps: SleepRecorder) -> None:
    policy = RetryPolicy(max_attempts=4, sleep=sleeps, rng=lambda: 0.5)
    calls = 0

    async def always_down() -> str:
        nonlocal calls
        calls += 1
        raise ProviderUnavailableError("down", provider="p", model="m", status=503)

    with pytest.raises(ProviderUnavailableError) as caught:
        await policy.call(always_down)
    assert calls == 4
    assert sleeps.delays == [0.5, 1.0, 2.0]
    assert caught.value.attempts == 4
    # Each failure is raised afresh, not chained to the previous attempt's.
    assert caught.value.__context__ is None


@pytest.mark.anyio
async def test_terminal_errors_are_never_retried(sleeps: SleepRecorder) -> None:
    policy = RetryPolicy(sleep=sleeps)
    calls = 0

    async def bad_key() -> str:
        nonlocal calls
        calls += 1
        raise AuthenticationError("bad key", provider="p", model="m", status=401)

    with pytest.raises(AuthenticationError):
        await policy.call(bad_key)
    assert calls == 1 and sleeps.delays == []


@pytest.mark.anyio
async def test_other_exceptions_are_not_retried(sleeps: SleepRecorder) -> None:
    policy = RetryPolicy(sleep=sleeps)

    async def buggy() -> str:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await policy.call(buggy)
    assert sleeps.delays == []


@pytest.mark.anyio
async def test_retry_after_is_honoured_then_success(sleeps: SleepRecorder) -> None:
    policy = RetryPolicy(sleep=sleeps, rng=lambda: 0.0)
    outcomes: list[Exception | str] = [
        RateLimitError("slow", retry_after=12.5),
        RateLimitError("slow", retry_after=0.0),
        ProviderUnavailableError("down"),
        "ok",
    ]

    async def flaky() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert await policy.call(flaky) == "ok"
    # Server delays as given; the third failure has none, so backoff(3) with jitter.
    assert sleeps.delays == [12.5, 0.0, pytest.approx(2.0 * 0.75)]


@pytest.mark.anyio
async def test_retry_after_beyond_the_cap_gives_up(sleeps: SleepRecorder) -> None:
    policy = RetryPolicy(max_retry_after=60.0, sleep=sleeps)

    async def long_wait() -> str:
        raise RateLimitError("daily quota", retry_after=3600.0)

    with pytest.raises(RateLimitError, match="more than max_retry_after=60"):
        await policy.call(long_wait)
    assert sleeps.delays == []


@pytest.mark.anyio
async def test_default_sleep_is_anyio_sleep() -> None:
    import anyio

    assert RetryPolicy().sleep is anyio.sleep


@pytest.mark.anyio
async def test_retry_stream_retries_only_before_the_first_event(sleeps: SleepRecorder) -> None:
    policy = RetryPolicy(sleep=sleeps)
    attempts = 0

    async def fails_at_once_then_mid_stream() -> AsyncIterator[int]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ProviderUnavailableError("refused")
        yield 1
        raise ProviderUnavailableError("cut")

    seen: list[int] = []
    with pytest.raises(ProviderUnavailableError, match="cut"):
        async for item in retry_stream(policy, fails_at_once_then_mid_stream):
            seen.append(item)
    assert attempts == 2 and seen == [1] and len(sleeps.delays) == 1


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "-3"}) == 0.0
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=now) == pytest.approx(42.0)
    past = email.utils.formatdate(now - 42, usegmt=True)
    assert parse_retry_after({"Retry-After": past}, now=now) == 0.0
