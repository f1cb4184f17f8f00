"""The error tree: classification by status, messages, redaction, pickling."""

from __future__ import annotations

import pickle

import pytest

from perdure.errors import PerdureError
from perdure.providers import (
    AuthenticationError,
    BadRequestError,
    ContextLengthError,
    MalformedResponseError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitError,
    RetryableProviderError,
    TerminalProviderError,
)
from perdure.providers.errors import error_for_status, redact


def test_the_tree() -> None:
    assert issubclass(ProviderError, PerdureError)
    for cls in (RateLimitError, ProviderUnavailableError, MalformedResponseError):
        assert issubclass(cls, RetryableProviderError)
        assert not issubclass(cls, TerminalProviderError)
    for cls in (AuthenticationError, BadRequestError, ContextLengthError):
        assert issubclass(cls, TerminalProviderError)
        assert not issubclass(cls, RetryableProviderError)
    assert issubclass(ContextLengthError, BadRequestError)


@pytest.mark.parametrize(
    ("status", "code", "detail", "expected"),
    [
        (429, None, "slow down", RateLimitError),
        (500, None, "oops", ProviderUnavailableError),
        (503, None, "busy", ProviderUnavailableError),
        (529, None, "overloaded", ProviderUnavailableError),
        (408, None, "timeout", ProviderUnavailableError),
        (401, None, "bad key", AuthenticationError),
        (403, None, "forbidden", AuthenticationError),
        (400, None, "bad", BadRequestError),
        (404, None, "no such model", BadRequestError),
        (422, None, "unprocessable", BadRequestError),
        (400, "context_length_exceeded", "too long", ContextLengthError),
        (400, None, "prompt is too long: 300000 tokens > 200000 maximum", ContextLengthError),
        (400, None, "the request exceeds the available context size", ContextLengthError),
        (429, "insufficient_quota", "quota", TerminalProviderError),
        (402, None, "pay", TerminalProviderError),
    ],
)
def test_error_for_status(status: int, code: str | None, detail: str, expected: type) -> None:
    err = error_for_status(status, detail, provider="p", model="m", code=code, retry_after=2.0)
    assert type(err) is expected
    assert err.status == status and err.code == code
    if isinstance(err, RetryableProviderError):
        assert err.retry_after == 2.0


def test_message_names_provider_model_status_and_what_to_do() -> None:
    err = RateLimitError("Rate limit reached", provider="openai", model="gpt-4o", status=429)
    text = str(err)
    assert text.startswith("openai (model 'gpt-4o'): rate limited [HTTP 429]: Rate limit reached")
    assert "lower concurrency" in text
    err.attempts = 5
    assert "gave up after 5 attempts" in str(err)


def test_message_follows_late_filled_fields() -> None:
    err = RateLimitError("scripted failure")
    err.provider, err.model = "scripted", "m1"
    assert str(err).startswith("scripted (model 'm1'): rate limited: scripted failure")


def test_instance_hint_overrides_the_class_hint() -> None:
    err = BadRequestError("x", provider="p", model="m")
    err.hint = "do this instead"
    assert str(err).endswith("-- do this instead")
    assert "not retried" in str(BadRequestError("x"))


def test_errors_pickle() -> None:
    err = RateLimitError("slow", provider="p", model="m", status=429, retry_after=1.5)
    err.attempts = 3
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is RateLimitError
    assert (copy.provider, copy.model, copy.status, copy.retry_after, copy.attempts) == (
        "p",
        "m",
        429,
        1.5,
        3,
    )
    assert str(copy) == str(err)


def test_redact_removes_keys_and_key_like_tokens() -> None:
    key = "my-very-secret-key-0123456789"
    text = (
        f"key {key} rejected; masked sk-proj-****abcd; "
        "Authorization: Bearer abc.def-ghi_jklmnop; other sk-ant-api03-XYZxyz123"
    )
    clean = redact(text, [key, None])
    assert key not in clean
    assert "sk-proj" not in clean and "sk-ant" not in clean
    assert "abc.def-ghi_jklmnop" not in clean
    assert clean.count("[REDACTED]") == 4
    # Ordinary words survive.
    assert redact("the task-list is ok") == "the task-list is ok"
    # A short placeholder "secret" is not scrubbed from every word.
    assert redact("nothing here", ["x"]) == "nothing here"
