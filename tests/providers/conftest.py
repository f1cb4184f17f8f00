"""Fixtures for the provider tests: fake servers, recorded sleeps, no real credentials."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from perdure.providers import RetryPolicy
from tests.support.anthropic_server import anthropic_server as anthropic_server
from tests.support.openai_server import openai_server as openai_server

_CREDENTIAL_VARIABLES = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_PROFILE",
    "ANTHROPIC_CUSTOM_HEADERS",
)


@pytest.fixture(autouse=True)
def no_real_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Tests never see a developer's real keys, and never reach beyond loopback."""
    for name in _CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # The anthropic client reads profiles from its config dir: point it at nothing.
    monkeypatch.setenv("ANTHROPIC_CONFIG_DIR", str(tmp_path / "anthropic-config"))
    yield


class SleepRecorder:
    """An injectable ``sleep`` that records the delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def sleeps() -> SleepRecorder:
    """Records what a RetryPolicy would have slept."""
    return SleepRecorder()


@pytest.fixture
def retry(sleeps: SleepRecorder) -> RetryPolicy:
    """The default policy, with sleeps recorded instead of waited and jitter fixed at 0."""
    return RetryPolicy(sleep=sleeps, rng=lambda: 0.5)


class CutTransport:
    """An httpx2 transport to the real fake server whose response bodies break midway.

    After the first chunk of a body, reading on raises ``error`` as the HTTP stack under
    an SDK may (a raw, unwrapped transport error: some SDK versions do not wrap what is
    raised while a stream's body is read).
    """

    def __init__(self, error: BaseException) -> None:
        import httpx2

        self.error = error
        self._inner = httpx2.AsyncHTTPTransport()

    def client(self) -> object:
        """An ``httpx2.AsyncClient`` on this transport (for an SDK's ``http_client``)."""
        import httpx2

        outer = self

        class Transport(httpx2.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
                response = await outer._inner.handle_async_request(request)
                return httpx2.Response(
                    response.status_code,
                    headers=response.headers,
                    stream=outer._cut(response),
                    extensions=response.extensions,
                )

            async def aclose(self) -> None:
                await outer._inner.aclose()

        return httpx2.AsyncClient(transport=Transport())

    def _cut(self, response: object) -> object:
        import httpx2

        error = self.error

        class Body(httpx2.AsyncByteStream):
            async def __aiter__(self):  # type: ignore[no-untyped-def]
                async for chunk in response.aiter_raw():  # type: ignore[attr-defined]
                    yield chunk
                    raise error

            async def aclose(self) -> None:
                await response.aclose()  # type: ignore[attr-defined]

        return Body()
