"""Credentials in a provider's ``base_url`` (``http://user:password@host/v1``) never logged.

The HTTP library under the SDKs logs every request's URL at INFO, and the Anthropic SDK
at DEBUG. The providers take the userinfo out of the URL and send it as the Basic
``Authorization`` header it stands for, so the server still gets the credentials while
no log record, error message or repr holds them. Real SDK clients, real HTTP, loopback.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
import traceback
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

pytest.importorskip(
    "openai", reason="the optional 'openai' extra is not installed (pip install '.[dev]')"
)

from perdure.providers import AuthenticationError, LLMRequest, Message, OpenAI, RetryPolicy
from perdure.providers.errors import redact, url_secrets
from tests.support.anthropic_server import AnthropicServer
from tests.support.anthropic_server import error as anthropic_error
from tests.support.anthropic_server import message as anthropic_message
from tests.support.http_server import RecordedRequest
from tests.support.openai_server import OpenAIServer, completion, error

pytestmark = pytest.mark.anyio

KEY = "sk-test-0123456789abcdefghijklmnopqrstuvwxyz"
USER = "bob"
# Percent-encoded in the URL: neither form may leak. Not key-like on purpose: only taking
# it out of the URL keeps it out of the HTTP library's log line.
PASSWORD_IN_URL = "s3cr%40t-pa55word"
PASSWORD = "s3cr@t-pa55word"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SECRETS = (PASSWORD_IN_URL, PASSWORD, BASIC, KEY)
# Every logger that sees a request: the HTTP stack's, the SDKs', ours.
LOGGERS = ("httpx2", "httpx", "httpcore2", "httpcore", "openai", "anthropic", "perdure")

needs_anthropic = pytest.mark.skipif(
    importlib.util.find_spec("anthropic") is None, reason="the 'anthropic' extra is not installed"
)


def ask() -> LLMRequest:
    return LLMRequest(model="", messages=(Message("user", "hi"),))


def with_userinfo(url: str) -> str:
    return url.replace("://", f"://{USER}:{PASSWORD_IN_URL}@", 1)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog at DEBUG for every logger a request goes through."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    caplog.set_level(logging.DEBUG)
    yield caplog


def assert_no_secret_logged(logs: pytest.LogCaptureFixture) -> None:
    # The HTTP library's own request line was captured (with a clean URL), so the
    # absence of secrets below is not merely the absence of records.
    request_lines = [
        r.getMessage() for r in logs.records if r.getMessage().startswith("HTTP Request")
    ]
    assert request_lines and all("://127.0.0.1:" in line for line in request_lines)
    for record in logs.records:
        text = record.getMessage() + repr(record.args) + repr(record.__dict__)
        leaked = [s for s in SECRETS if s in text]
        assert not leaked, f"{record.name} logged {leaked}: {record.getMessage()}"


def assert_error_is_clean(err: BaseException) -> None:
    rendered = "".join(traceback.format_exception(err)) + repr(err) + str(err.__dict__)
    for secret in SECRETS:
        assert secret not in rendered


def assert_basic_auth(request: RecordedRequest) -> None:
    # The credentials still reach the server, as the header their URL form stands for.
    assert request.headers["authorization"] == f"Basic {BASIC}"


async def test_openai_userinfo_is_sent_as_basic_auth_and_never_logged(
    openai_server: OpenAIServer, logs: pytest.LogCaptureFixture
) -> None:
    # A server echoing the credentials back in its 401 (the header included).
    openai_server.push(
        completion("hello"),
        error(401, f"rejected {USER}:{PASSWORD} (Authorization: Basic {BASIC}) key {KEY}"),
        error(401, f"rejected Basic {BASIC}"),
    )
    base_url = with_userinfo(openai_server.base_url)
    async with OpenAI(
        "gpt-test", base_url=base_url, api_key=KEY, retry=RetryPolicy(max_attempts=1)
    ) as provider:
        errors = await answer_then_refuse_twice(provider)
    assert [r.path for r in openai_server.chat_requests] == ["/v1/chat/completions"] * 3
    for request in openai_server.chat_requests:
        assert_basic_auth(request)
    assert "[REDACTED]" in str(errors[0])
    assert_no_secret_logged(logs)


async def answer_then_refuse_twice(provider: Any) -> list[AuthenticationError]:
    """One good answer, then a 401 from ``complete`` and one from ``stream``.

    Checks each error and the provider's repr hold no secret; returns the errors.
    """
    assert (await provider.complete(ask())).message.content == "hello"
    with pytest.raises(AuthenticationError) as on_complete:
        await provider.complete(ask())
    with pytest.raises(AuthenticationError) as on_stream:
        [event async for event in provider.stream(ask())]
    errors = [on_complete.value, on_stream.value]
    for err in errors:
        assert err.status == 401
        assert_error_is_clean(err)
    shown = repr(provider)
    assert not [s for s in SECRETS if s in shown]
    return errors


async def test_openai_client_given_by_the_user_is_cleaned_too(
    openai_server: OpenAIServer, logs: pytest.LogCaptureFixture
) -> None:
    import openai

    openai_server.push(completion("hello"), error(401, "no"))
    client = openai.AsyncOpenAI(base_url=with_userinfo(openai_server.base_url), api_key=KEY)
    async with OpenAI("gpt-test", client=client, retry=RetryPolicy(max_attempts=1)) as provider:
        assert (await provider.complete(ask())).message.content == "hello"
        with pytest.raises(AuthenticationError) as caught:
            await provider.complete(ask())
    await client.close()
    for request in openai_server.chat_requests:
        assert_basic_auth(request)
    assert_error_is_clean(caught.value)
    assert_no_secret_logged(logs)


@needs_anthropic
async def test_anthropic_userinfo_is_sent_as_basic_auth_and_never_logged(
    anthropic_server: AnthropicServer, logs: pytest.LogCaptureFixture
) -> None:
    from perdure.providers import Anthropic

    anthropic_server.push(
        anthropic_message("hello"),
        anthropic_error(
            401, f"rejected {USER}:{PASSWORD} (Basic {BASIC})", type="authentication_error"
        ),
        anthropic_error(401, "no", type="authentication_error"),
    )
    base_url = with_userinfo(anthropic_server.base_url)
    async with Anthropic(
        "claude-test", base_url=base_url, api_key=KEY, retry=RetryPolicy(max_attempts=1)
    ) as provider:
        await answer_then_refuse_twice(provider)
    assert len(anthropic_server.message_requests) == 3
    for request in anthropic_server.message_requests:
        assert_basic_auth(request)
    assert_no_secret_logged(logs)


def test_the_client_rebuilt_for_another_event_loop_is_cleaned_too(
    openai_server: OpenAIServer, logs: pytest.LogCaptureFixture
) -> None:
    provider = OpenAI("gpt-test", base_url=with_userinfo(openai_server.base_url), api_key=KEY)

    async def call() -> str:
        openai_server.push(completion("hello"))
        return (await provider.complete(ask())).message.content

    # The second loop gets a client built afresh by the provider's factory.
    assert [anyio.run(call, backend=b) for b in ("asyncio", "trio")] == ["hello", "hello"]
    anyio.run(provider.aclose, backend="trio")
    assert len(openai_server.chat_requests) == 2
    for request in openai_server.chat_requests:
        assert_basic_auth(request)
    assert_no_secret_logged(logs)


def test_url_secrets_include_the_basic_auth_token() -> None:
    secrets = url_secrets(with_userinfo("http://127.0.0.1:1/v1"))
    assert secrets == (PASSWORD_IN_URL, PASSWORD, BASIC)
    assert redact(f"Authorization: Basic {BASIC}", secrets) == "Authorization: Basic [REDACTED]"
