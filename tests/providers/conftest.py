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
