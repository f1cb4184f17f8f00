"""``Fallback``: a chain of providers where the next one serves when one is down."""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from perdure.providers.errors import ProviderError, RetryableProviderError
from perdure.providers.streams import closing
from perdure.providers.types import LLMRequest, LLMResponse, Provider, StreamEvent

__all__ = ["Fallback"]

log = logging.getLogger("perdure.providers")


class Fallback:
    """Try each provider in turn; the first that answers serves the request.

    A member that fails with a :class:`RetryableProviderError` (after its own retries)
    hands the request to the next member; a terminal error (bad key, bad request)
    surfaces at once, since the next member would most likely reject the same request.
    Each member is asked for its own ``model`` (the request's model is replaced), and
    the response's ``provider`` and ``model`` say which member served. ``model`` is the
    primary's model.

    When every member fails, the last member's error is raised with ``failures`` set to
    every member's error in order (and each chained to the one before as
    ``__cause__``); its message names them all. A terminal error from a member tried
    after others failed carries their errors the same way. A member that is itself a
    chain contributes the errors of its own members. Streaming falls back only while
    the failing member has not yielded anything: once part of an answer has been seen,
    the failure is raised.
    """

    def __init__(self, providers: Sequence[Provider], *, name: str = "fallback") -> None:
        self.providers: tuple[Provider, ...] = tuple(providers)
        if not self.providers:
            raise ValueError("Fallback needs at least one provider")
        self.name = name

    @property
    def model(self) -> str:
        """The primary's model."""
        return self.providers[0].model

    async def complete(self, request: LLMRequest) -> LLMResponse:
        """The first member's answer that does not fail retryably."""
        failures: list[ProviderError] = []
        for member in self.providers:
            try:
                return await member.complete(replace(request, model=member.model))
            except RetryableProviderError as err:
                failures.append(err)
                self._log_fallback(member, err)
            except ProviderError as err:
                if not failures:
                    raise
                failures.append(err)
                break
        raise self._all_failed(failures)

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
        """The first member's stream that does not fail retryably before its first event."""
        failures: list[ProviderError] = []
        for member in self.providers:
            started = False
            try:
                stream = member.stream(replace(request, model=member.model))
                async with closing(stream) as events:
                    async for event in events:
                        started = True
                        yield event
                return
            except RetryableProviderError as err:
                if started:
                    raise
                failures.append(err)
                self._log_fallback(member, err)
            except ProviderError as err:
                if started or not failures:
                    raise
                failures.append(err)
                break
        raise self._all_failed(failures)

    async def aclose(self) -> None:
        """Close every member that can be closed."""
        for member in self.providers:
            close = getattr(member, "aclose", None)
            if close is not None:
                await close()

    def _log_fallback(self, member: Provider, error: ProviderError) -> None:
        log.warning("%s: member %r failed, trying the next one: %s", self.name, member.name, error)

    def _all_failed(self, failures: list[ProviderError]) -> ProviderError:
        # A member that is a chain itself failed with all of its members' errors.
        flat: list[ProviderError] = []
        for failure in failures:
            for leaf in failure.failures or (failure,):
                if not any(leaf is seen for seen in flat):
                    flat.append(leaf)
        last = failures[-1]
        if not any(leaf is last for leaf in flat):
            flat.append(last)
        last.failures = tuple(flat)
        for earlier, later in itertools.pairwise(flat):
            if later.__cause__ is None and later is not earlier:
                later.__cause__ = earlier
        what = "every member failed" if len(failures) == len(self.providers) else "members failed"
        note = f"{self.name}: {what}: " + "; ".join(f._headline() for f in flat)
        if note not in getattr(last, "__notes__", ()):
            last.add_note(note)
        return last

    def __repr__(self) -> str:
        members = ", ".join(f"{p.name}:{p.model}" for p in self.providers)
        return f"Fallback([{members}], name={self.name!r})"
