"""Vendor SDK clients, one per event loop.

An SDK client's connection pool belongs to the event loop that opened its connections:
reused from another loop (a second ``anyio.run``, a new ``Runtime`` in the same
script, asyncio after trio) it fails with "Event loop is closed" or worse. So a
provider keeps its client in a :class:`LoopClient`, which builds a fresh one when it is
first used from a different event loop.

The SDKs' default HTTP client schedules its own ``aclose()`` on whatever asyncio loop
is running when it is garbage-collected; for a client whose connections belong to
another loop (or to trio) that task fails noisily. :func:`plain_http_client` is the
same client with the SDK's defaults, without that finalizer.

Credentials written into a ``base_url`` (``http://user:password@host/v1``) are taken
out of it by :func:`without_url_credentials`: the HTTP library and the SDKs log every
request's URL (httpx2 at INFO), so a URL must never carry a secret.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import anyio.lowlevel

from perdure.providers.errors import basic_credentials

__all__ = ["LoopClient", "plain_http_client", "without_url_credentials"]

C = TypeVar("C")


class LoopClient(Generic[C]):
    """An SDK client for the current event loop.

    ``factory`` builds a client; ``None`` means the client was handed to us by the
    user, and is used as is whatever the loop (we cannot rebuild what we did not build).
    One loop at a time: a provider used from two loops concurrently would rebuild its
    client at every switch.
    """

    def __init__(self, client: C, factory: Callable[[], C] | None) -> None:
        self._client = client
        self._factory = factory
        self._token: Any = None
        self._closed = False

    @property
    def current(self) -> C:
        """The client, without regard to the event loop (for reading its settings)."""
        return self._client

    def get(self) -> C:
        """The client to use from the running event loop."""
        token = anyio.lowlevel.current_token()
        if self._factory is not None and (self._closed or token != self._token):
            if self._closed or self._token is not None:
                # Closed, or its connections belong to another loop (which cannot
                # close them from here: they are left to the garbage collector).
                self._client = self._factory()
            self._closed = False
        self._token = token
        return self._client

    async def aclose(self) -> None:
        """Close the client if we built it.

        Its connections can only be closed from the loop that opened them; called from
        another loop, this leaves them to the garbage collector instead of failing.
        """
        if self._factory is None or self._closed:
            return
        if self._token is None or anyio.lowlevel.current_token() == self._token:
            await self._client.close()  # type: ignore[attr-defined]
        # A later call builds a fresh client rather than fail on a closed one.
        self._closed = True


def plain_http_client(sdk: Any) -> Any:
    """The SDK's default async HTTP client, minus its asyncio-only finalizer."""
    return sdk.DefaultAsyncHttpxClient()


def without_url_credentials(client: C) -> C:
    """``client``, with the user and password in its ``base_url`` sent as Basic auth instead.

    The HTTP library logs each request's full URL at INFO ("HTTP Request: POST
    http://user:password@host/...") and the Anthropic SDK at DEBUG, so credentials left
    in the URL end up in the application's logs. Moving them into an ``Authorization:
    Basic`` default header keeps the requests identical on the wire -- for a URL with
    userinfo the HTTP library already sends exactly that header, in place of the SDK's
    own ``Authorization`` -- while no URL that gets logged holds a secret. A copy is
    returned (sharing the connection pool); a client without credentials in its URL is
    returned as is.
    """
    url = str(client.base_url)  # type: ignore[attr-defined]
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return client
    username, _, password = userinfo.partition(":")
    token = basic_credentials(unquote(username), unquote(password))
    return client.with_options(  # type: ignore[attr-defined,no-any-return]
        base_url=urlunsplit(parts._replace(netloc=host)),
        default_headers={"Authorization": f"Basic {token}"},
    )
