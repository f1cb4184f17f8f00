"""Bounded retries: exponential backoff with jitter, honouring the server's Retry-After.

Providers wrap every call in :meth:`RetryPolicy.call` (and every stream in
:func:`retry_stream`); only :class:`~perdure.providers.errors.RetryableProviderError`
is retried, terminal errors surface at once. The sleep function is a field of the
policy so tests observe the delays without waiting for them.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, TypeVar

import anyio

from perdure.providers.errors import RetryableProviderError
from perdure.providers.streams import closing

__all__ = ["RetryPolicy", "parse_retry_after", "retry_stream"]

T = TypeVar("T")
E = TypeVar("E")

log = logging.getLogger("perdure.providers")


@dataclass(frozen=True)
class RetryPolicy:
    """How a provider retries retryable failures.

    ``max_attempts`` counts every attempt, the first included (1 disables retries).
    Retry *n* (n = 1, 2, ...) waits ``initial * multiplier**(n-1)`` seconds, capped at
    ``max_delay``, then moved by a random fraction of at most ``jitter`` either way
    (and capped again), so clients that failed together do not retry together. When the
    server sent Retry-After, that delay is used as is; if it exceeds
    ``max_retry_after`` the error surfaces at once instead (a caller such as
    :class:`~perdure.providers.Fallback` can do better than wait that long).

    ``sleep`` (default ``anyio.sleep``) and ``rng`` (default ``random.random``) are
    injectable so that tests can record the delays and make jitter deterministic.
    """

    max_attempts: int = 5
    initial: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.25
    max_retry_after: float = 60.0
    sleep: Callable[[float], Awaitable[Any]] = anyio.sleep
    rng: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("RetryPolicy delays must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"RetryPolicy.multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"RetryPolicy.jitter must be in [0, 1), got {self.jitter}")

    def base_delay(self, retry: int) -> float:
        """The un-jittered delay before retry number ``retry`` (1 for the first retry)."""
        # The exponent is capped so that a huge retry number cannot overflow a float.
        exponent = min(max(retry - 1, 0), 64)
        return min(self.initial * self.multiplier**exponent, self.max_delay)

    def backoff(self, retry: int) -> float:
        """The jittered delay before retry number ``retry``, within ``[0, max_delay]``."""
        base = self.base_delay(retry)
        spread = base * self.jitter * (2.0 * self.rng() - 1.0)
        return min(max(base + spread, 0.0), self.max_delay)

    def delay_for(self, error: RetryableProviderError, attempt: int) -> float | None:
        """The delay before the attempt after ``attempt``, or ``None`` to give up now.

        Records ``attempt`` on the error, and explains in its hint why it gave up.
        """
        error.attempts = attempt
        if attempt >= self.max_attempts:
            return None
        retry_after = error.retry_after
        if retry_after is not None and math.isfinite(retry_after):
            if retry_after > self.max_retry_after:
                error.hint = (
                    f"the server asked to wait {retry_after:g} s, more than "
                    f"max_retry_after={self.max_retry_after:g} s, so it was not retried; "
                    "try again later, lower the request rate, or add a Fallback"
                )
                return None
            return max(retry_after, 0.0)
        return self.backoff(attempt)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` until it succeeds, a terminal error, or the attempts run out."""
        attempt = 1
        while True:
            try:
                return await fn()
            except RetryableProviderError as err:
                failure = err
            # Sleep outside the except block: the next failure must not chain this one.
            delay = self.delay_for(failure, attempt)
            if delay is None:
                raise failure
            _log_retry(failure, attempt, self.max_attempts, delay)
            await self.sleep(delay)
            attempt += 1


async def retry_stream(
    policy: RetryPolicy, open_stream: Callable[[], AsyncIterator[E]]
) -> AsyncIterator[E]:
    """Yield from ``open_stream()``, retrying retryable failures before the first event.

    Once an event has been yielded the caller has seen part of an answer, so a failure
    after that point is raised (the caller may retry the whole call) rather than
    silently restarted.
    """
    attempt = 1
    while True:
        started = False
        try:
            # Closing: if our consumer stops early, the attempt's HTTP response is
            # closed now rather than whenever the garbage collector gets to it.
            async with closing(open_stream()) as events:
                async for event in events:
                    started = True
                    yield event
            return
        except RetryableProviderError as err:
            if started:
                raise
            failure = err
        delay = policy.delay_for(failure, attempt)
        if delay is None:
            raise failure
        _log_retry(failure, attempt, policy.max_attempts, delay)
        await policy.sleep(delay)
        attempt += 1


def _log_retry(error: RetryableProviderError, attempt: int, limit: int, delay: float) -> None:
    # The error's message is already redacted: safe to log.
    log.info("attempt %d/%d failed, retrying in %.2f s: %s", attempt, limit, delay, error)


def parse_retry_after(
    headers: Mapping[str, str] | Any, *, now: float | None = None
) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date).

    ``headers`` is any mapping of header names (matched case-insensitively) to values.
    Returns ``None`` when neither header is present or parseable.
    """
    lowered = {str(name).lower(): str(value) for name, value in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(value, 0.0)
    text = lowered.get("retry-after")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return max(value, 0.0) if math.isfinite(value) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are GMT; a zone-less one is read as UTC rather than local.
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)
