"""What the providers built on a vendor SDK have in common: lifecycle and retries.

A subclass supplies one attempt (``_complete_once`` / ``_stream_once``), the
translation of its SDK's exceptions (``_error``), and keeps its SDK clients in
``self._clients`` (a :class:`~perdure.providers.clients.LoopClient`); this base class
retries attempts per ``self.retry``, closes the clients, and makes every SDK call
through :meth:`_sdk_call` / :meth:`_sdk_next` so that no SDK exception escapes untyped.
Transport errors the SDK lets through unwrapped (a connection cut while a stream's
body is read surfaces as the HTTP library's own error in some SDK versions) are mapped
here, once, for every SDK.
"""

from __future__ import annotations

import functools
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Self, TypeVar

import anyio

from perdure.providers.errors import ProviderError, ProviderUnavailableError, redact
from perdure.providers.retry import RetryPolicy, retry_stream
from perdure.providers.streams import closing
from perdure.providers.types import LLMRequest, LLMResponse, StreamEvent
from perdure.providers.wire import clean_event, clean_response

__all__ = ["END", "SDKProvider", "transport_errors"]

T = TypeVar("T")

#: What :meth:`SDKProvider._sdk_next` returns once the stream is over.
END: Final = object()


class SDKProvider:
    """Base class of :class:`~perdure.providers.OpenAI` and ``Anthropic``."""

    name: str
    model: str
    retry: RetryPolicy
    base_url: str
    _clients: Any
    _secrets: tuple[str, ...] = ()

    async def aclose(self) -> None:
        """Close the HTTP client (if this provider created it)."""
        await self._clients.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def complete(self, request: LLMRequest) -> LLMResponse:
        """One call, retried per ``retry``."""
        response = await self.retry.call(functools.partial(self._complete_once, request))
        return clean_response(response)

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
        """A streamed call; retried only until its first event."""
        attempts = retry_stream(self.retry, functools.partial(self._stream_once, request))
        # Closed explicitly: when our consumer closes this stream, the attempt's HTTP
        # response is closed then, not when the abandoned generator is finalized.
        async with closing(attempts) as events:
            async for event in events:
                yield clean_event(event)

    async def _complete_once(self, request: LLMRequest) -> LLMResponse:
        raise NotImplementedError

    def _stream_once(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
        raise NotImplementedError

    def _error(self, err: Exception, model: str) -> ProviderError:
        raise NotImplementedError

    def _translate(self, err: Exception, model: str) -> ProviderError:
        """``err`` as a typed error: a raw transport error here, the SDK's by ``_error``."""
        if isinstance(err, transport_errors()):
            return self._connection_failed(f"{type(err).__name__}: {err}", model)
        return self._error(err, model)

    def _connection_failed(self, reason: str, model: str) -> ProviderUnavailableError:
        """The (retryable) error for a connection that failed or was cut, for ``reason``."""
        return ProviderUnavailableError(
            redact(f"connection to {self.base_url} failed ({reason})", self._secrets),
            provider=self.name,
            model=model,
        )

    # The typed error is raised after the except block has ended, so the SDK's exception
    # (whose request carries the API key or Authorization header) is not attached to it
    # as __context__ and cannot end up in a log.

    async def _sdk_call(self, model: str, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, an SDK exception turned into a typed :class:`ProviderError`."""
        try:
            return await call()
        except Exception as err:
            failure = self._translate(err, model)
        raise failure

    async def _sdk_next(self, model: str, items: Any) -> Any:
        """The next item of an SDK stream iterator (:data:`END` when it is over)."""
        try:
            return await items.__anext__()
        except StopAsyncIteration:
            return END
        except Exception as err:
            failure = self._translate(err, model)
        raise failure


def transport_errors() -> tuple[type[BaseException], ...]:
    """What the HTTP stack under an SDK raises when a connection fails or is cut.

    Looked up when an error happens, among the modules already loaded (an error class
    whose module was never imported cannot have been raised): importing perdure does
    not import any HTTP library.
    """
    errors: list[type[BaseException]] = [
        OSError,
        ssl.SSLError,
        anyio.EndOfStream,
        anyio.BrokenResourceError,
    ]
    for module_name in ("httpx2", "httpx", "httpcore2", "httpcore"):
        module = sys.modules.get(module_name)
        if module is None:
            continue
        # RequestError covers httpx's transport errors and a body that fails to decode;
        # StreamError a body that can no longer be read; httpcore's are its own.
        for attr in ("RequestError", "StreamError", "NetworkError", "ProtocolError"):
            cls = getattr(module, attr, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)
