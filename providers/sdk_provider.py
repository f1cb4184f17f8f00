"""What the providers built on a vendor SDK have in common: lifecycle and retries.

A subclass supplies one attempt (``_complete_once`` / ``_stream_once``) and keeps its
SDK clients in ``self._clients`` (a :class:`~perdure.providers.clients.LoopClient`);
this base class retries attempts per ``self.retry`` and closes the clients.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any, Self

from perdure.providers.retry import RetryPolicy, retry_stream
from perdure.providers.types import LLMRequest, LLMResponse, StreamEvent

__all__ = ["SDKProvider"]


class SDKProvider:
    """Base class of :class:`~perdure.providers.OpenAI` and ``Anthropic``."""

    name: str
    model: str
    retry: RetryPolicy
    _clients: Any

    async def aclose(self) -> None:
        """Close the HTTP client (if this provider created it)."""
        await self._clients.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def complete(self, request: LLMRequest) -> LLMResponse:
        """One call, retried per ``retry``."""
        return await self.retry.call(functools.partial(self._complete_once, request))

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
        """A streamed call; retried only until its first event."""
        async for event in retry_stream(self.retry, functools.partial(self._stream_once, request)):
            yield event

    async def _complete_once(self, request: LLMRequest) -> LLMResponse:
        raise NotImplementedError

    def _stream_once(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
        raise NotImplementedError
