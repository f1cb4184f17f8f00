"""The provider layer's error vocabulary.

Two families, because the only question a caller has is "will trying again help?":

- :class:`RetryableProviderError` -- rate limits, 5xx, timeouts, dropped connections,
  malformed bodies. Providers retry these themselves (bounded, see
  :class:`~perdure.providers.retry.RetryPolicy`); a :class:`~perdure.providers.Fallback`
  moves on to its next member when one still surfaces.
- :class:`TerminalProviderError` -- bad credentials, bad requests, a conversation too
  long for the model. Trying again cannot help; they surface at once.

Every message names the provider, the model and the HTTP status, and says what to do.
No message ever contains an API key: servers that echo the key back (OpenAI's 401 body
does) are redacted with :func:`redact`, and the vendor client's exception (whose request
carries the ``Authorization`` header) is never chained to ours.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from perdure.errors import PerdureError

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ContextLengthError",
    "MalformedResponseError",
    "ProviderError",
    "ProviderUnavailableError",
    "RateLimitError",
    "RetryableProviderError",
    "TerminalProviderError",
    "basic_credentials",
    "error_for_status",
    "is_context_length_error",
    "redact",
    "url_secrets",
]


#: The longest ``detail`` an error keeps; the rest of a server's explanation is cut.
MAX_DETAIL = 2000


class ProviderError(PerdureError):
    """Base class of every error raised by :mod:`perdure.providers`.

    ``provider`` and ``model`` say which endpoint failed, ``status`` is the HTTP status
    (``None`` when there was no response), ``code`` the API's error code when it sent
    one, ``detail`` the (redacted) explanation and ``attempts`` how many attempts were
    made before giving up. A :class:`~perdure.providers.Fallback` whose members all
    failed sets ``failures`` on the error it raises: every member's error, in order.
    """

    #: What happened, in a few words; subclasses refine it.
    summary: str = "provider error"
    #: What to do about it; subclasses refine it (an instance may override it).
    hint: str = ""

    def __init__(
        self,
        detail: str = "",
        *,
        provider: str = "",
        model: str = "",
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        if len(detail) > MAX_DETAIL:
            # A proxy's HTML error page, say: it would be logged at every retry and
            # recorded whole. (Secrets are redacted before, so the cut leaks nothing.)
            detail = f"{detail[:MAX_DETAIL]}... ({len(detail) - MAX_DETAIL} more characters)"
        super().__init__(detail)
        self.detail = detail
        self.provider = provider
        self.model = model
        self.status = status
        self.code = code
        self.attempts = 1
        self.failures: tuple[ProviderError, ...] = ()

    def __str__(self) -> str:
        # Built on demand so that a provider filling in ``provider``/``model`` after
        # construction (Scripted does, for errors users script) is reflected.
        text = self._headline()
        # A Fallback's error names every member that failed, not only the last: the
        # message is what gets recorded and shown when an execution fails.
        earlier = [f._headline() for f in self.failures if f is not self]
        if earlier:
            text += "; earlier in the chain: " + "; ".join(earlier)
        if self.hint:
            text += f" -- {self.hint}"
        return text

    def _headline(self) -> str:
        """What failed, where, and how often: the message without the hint."""
        where = self.provider or "provider"
        if self.model:
            where += f" (model {self.model!r})"
        text = f"{where}: {self.summary}"
        if self.status is not None:
            text += f" [HTTP {self.status}]"
        if self.detail:
            text += f": {self.detail}"
        if self.attempts > 1:
            text += f" (gave up after {self.attempts} attempts)"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments: rebuild from the instance dict so the
        # error survives pickling (e.g. crossing a process boundary).
        return (_rebuild, (type(self), self.detail), dict(self.__dict__))


def _rebuild(cls: type[ProviderError], detail: str) -> ProviderError:
    return cls.__new__(cls, detail)


class RetryableProviderError(ProviderError):
    """A failure that may go away if the call is made again later.

    ``retry_after`` is the delay in seconds the server asked for (``Retry-After``), or
    ``None``.
    """

    summary = "temporarily unavailable"
    hint = "retried with backoff; if it persists, check the provider's status"

    def __init__(
        self,
        detail: str = "",
        *,
        provider: str = "",
        model: str = "",
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail, provider=provider, model=model, status=status, code=code)
        self.retry_after = retry_after


class RateLimitError(RetryableProviderError):
    """HTTP 429: too many requests or tokens per minute."""

    summary = "rate limited"
    hint = "retried after the delay the server asked for; lower concurrency or raise the limit"


class ProviderUnavailableError(RetryableProviderError):
    """5xx, timeouts, connection errors, or a connection dropped mid-stream."""

    summary = "unavailable"
    hint = "retried with backoff; if it persists, check the endpoint or add a Fallback"


class MalformedResponseError(RetryableProviderError):
    """A response body that is not what the API promises (bad JSON, missing fields)."""

    summary = "malformed response"
    hint = "retried a bounded number of times; a server that keeps doing this is broken"


class TerminalProviderError(ProviderError):
    """A failure that will not go away by trying again; it surfaces at once."""

    summary = "request failed"
    hint = "not retried: fix the request or the configuration"


class AuthenticationError(TerminalProviderError):
    """HTTP 401/403, or no credentials at all."""

    summary = "authentication failed"
    hint = "check the API key (and its permissions for this model); not retried"


class BadRequestError(TerminalProviderError):
    """HTTP 400/404/422: the API rejected the request itself."""

    summary = "bad request"
    hint = "the API rejected the request (unknown model? invalid tool schema?); not retried"


class ContextLengthError(BadRequestError):
    """The conversation is longer than the model's context window."""

    summary = "context length exceeded"
    hint = "shorten the conversation or use a model with a larger context window"


# Error codes and message fragments that servers use for "prompt too long". OpenAI sends
# code "context_length_exceeded"; Anthropic says "prompt is too long"; vLLM and
# llama.cpp say "maximum context length" or "exceeds the available context size".
_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_WORDS = re.compile(
    r"context[ _]length|context window|context size|prompt is too long|too many tokens"
    r"|maximum context|model_context_window_exceeded",
    re.IGNORECASE,
)


def is_context_length_error(code: str | None, detail: str) -> bool:
    """True if an error code or message says the prompt exceeds the context window."""
    if code is not None and code in _CONTEXT_CODES:
        return True
    return bool(_CONTEXT_WORDS.search(detail))


def error_for_status(
    status: int,
    detail: str,
    *,
    provider: str,
    model: str,
    code: str | None = None,
    retry_after: float | None = None,
) -> ProviderError:
    """The error for an HTTP error ``status``; ``detail`` must already be redacted."""
    common: dict[str, Any] = {"provider": provider, "model": model, "status": status, "code": code}
    if status == 429:
        if code == "insufficient_quota":
            # OpenAI says 429 for an exhausted billing quota too; waiting will not help.
            err = TerminalProviderError(detail, **common)
            err.hint = "the account's quota is exhausted: add credits or raise the limit"
            return err
        return RateLimitError(detail, retry_after=retry_after, **common)
    if status in (401, 403):
        return AuthenticationError(detail, **common)
    if status == 402:
        err = TerminalProviderError(detail, **common)
        err.hint = "payment required: check the account's billing"
        return err
    if status in (408, 409) or status >= 500:
        # 408 request timeout and 409 (lock contention) are transient, like 5xx.
        return ProviderUnavailableError(detail, retry_after=retry_after, **common)
    if is_context_length_error(code, detail):
        return ContextLengthError(detail, **common)
    return BadRequestError(detail, **common)


# Anything that looks like an API key: OpenAI/Anthropic keys start with "sk-" (OpenAI's
# 401 echoes a masked key such as "sk-proj-****abcd"), bearer tokens follow "Bearer".
_KEYLIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{4,}|(?i:bearer)\s+[A-Za-z0-9_\-.~+/=*]{8,}")


# Credentials inside URLs, whatever their length: "scheme://user:password@" and the
# values of query parameters that carry credentials (Azure's api-key, Google's key=).
_URL_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^\s/@]+@")
_URL_SECRET_PARAM = re.compile(
    r"(?i)([?&](?:api[-_]?key|key|token|access[-_]?token|secret|password|sig|signature)=)"
    r"[^&#\s'\"]+"
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every secret and every key-like token replaced by ``[REDACTED]``.

    Key-like tokens are API keys (``sk-...``), bearer tokens, and credentials written
    into URLs (``https://user:password@host``, ``?api-key=...``).
    """
    for secret in secrets:
        # Very short "secrets" (a placeholder like "x") would shred the message.
        if secret and len(secret) >= 8:
            text = text.replace(secret, "[REDACTED]")
    text = _URL_USERINFO.sub(r"\1[REDACTED]@", text)
    text = _URL_SECRET_PARAM.sub(r"\1[REDACTED]", text)
    return _KEYLIKE.sub("[REDACTED]", text)


def url_secrets(url: str | None) -> tuple[str, ...]:
    """The credentials embedded in ``url`` (its password, key-like query values).

    Given as written and percent-decoded, for :func:`redact` to scrub wherever they
    appear outside the URL too; a password also in its Basic-auth encoding, the form in
    which the providers send it (a server may echo the header back).
    """
    if not url:
        return ()
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
        found += [v for k, v in parse_qsl(parts.query) if _SECRET_NAME.match(k)]
    except ValueError:
        return ()
    out: list[str] = []
    for value in found:
        for form in (value, unquote(value)):
            if form and form not in out:
                out.append(form)
    if parts.password:
        out.append(basic_credentials(unquote(parts.username or ""), unquote(parts.password)))
    return tuple(out)


def basic_credentials(username: str, password: str) -> str:
    """The token of an ``Authorization: Basic`` header for ``username`` and ``password``."""
    return base64.b64encode(f"{username}:{password}".encode()).decode()


_SECRET_NAME = re.compile(
    r"^(?:api[-_]?key|key|token|access[-_]?token|secret|password|sig|signature)$", re.IGNORECASE
)
