"""``Anthropic``: Claude models through the Messages API, on the official ``anthropic`` client.

The ``anthropic`` package is an optional extra (``pip install 'perdure[anthropic]'``),
imported when a provider is constructed. The canonical chat format maps onto the
Messages API like this:

- system messages become the ``system`` parameter (several are joined by blank lines);
- an assistant message becomes a text block followed by one ``tool_use`` block per
  tool call;
- tool results become ``tool_result`` blocks (with ``is_error``) in a user message;
  consecutive messages that land on the same role (several tool results, or tool
  results followed by user text) are merged into one message, as the API requires.

The client is created with ``max_retries=0``: our :class:`RetryPolicy` is the only
retry loop. As with :class:`~perdure.providers.OpenAI`, use one instance from one event
loop and ``aclose()`` it when done.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from perdure.providers.clients import LoopClient, plain_http_client, without_url_credentials
from perdure.providers.errors import (
    AuthenticationError,
    MalformedResponseError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitError,
    TerminalProviderError,
    error_for_status,
    redact,
    url_secrets,
)
from perdure.providers.retry import RetryPolicy, parse_retry_after
from perdure.providers.sdk_provider import END, SDKProvider
from perdure.providers.streams import (
    ResponseAssembler,
    distinct_call_ids,
    parse_arguments,
    used_call_ids,
)
from perdure.providers.types import (
    LLMRequest,
    LLMResponse,
    Message,
    ResponseCompleted,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    Usage,
)
from perdure.providers.wire import field as _field
from perdure.providers.wire import integer as _int
from perdure.providers.wire import text as _text

if TYPE_CHECKING:
    import anthropic as anthropic_sdk

__all__ = ["Anthropic", "to_anthropic_messages", "to_anthropic_tools"]

# Anthropic's stop reasons in the canonical (OpenAI) vocabulary.
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}


class Anthropic(SDKProvider):
    """A Claude model through Anthropic's Messages API.

    ``api_key`` and ``base_url`` fall back to what the ``anthropic`` client resolves
    (``ANTHROPIC_API_KEY``, ``ANTHROPIC_BASE_URL``, its profiles). ``max_tokens`` is
    required by the API; a request's ``params["max_tokens"]`` overrides it, and other
    ``params`` (``temperature``, ``tool_choice``, ...) are sent as body fields.
    ``client`` is an existing ``anthropic.AsyncAnthropic`` to use (retries turned off).
    """

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_tokens: int = 4096,
        timeout: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, sharing it is safe
        name: str = "anthropic",
        client: anthropic_sdk.AsyncAnthropic | None = None,
    ) -> None:
        sdk = _import_sdk(name, model)
        self.model = model
        self.name = name
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.retry = retry
        self._sdk = sdk
        if client is not None:
            raw = client.with_options(max_retries=0)
            self._clients: LoopClient[Any] = LoopClient(without_url_credentials(raw), None)
        else:

            def build() -> Any:
                return sdk.AsyncAnthropic(
                    api_key=api_key,
                    base_url=base_url,
                    timeout=timeout,
                    max_retries=0,
                    http_client=plain_http_client(sdk),
                )

            def factory() -> Any:
                return without_url_credentials(build())

            credentials_error = getattr(sdk, "CredentialsError", ())
            try:
                raw = build()
            except credentials_error as err:
                # The client found no key, token or profile to use.
                failure = AuthenticationError(
                    f"no credentials: pass Anthropic(..., api_key=...) or set "
                    f"ANTHROPIC_API_KEY ({err})",
                    provider=name,
                    model=model,
                )
                raise failure from None
            self._clients = LoopClient(without_url_credentials(raw), factory)
        current = self._clients.current
        # As resolved (from the argument, ANTHROPIC_BASE_URL or a profile), credentials
        # included: what the error messages must never show.
        self.base_url = str(raw.base_url)
        # Kept only to scrub them from error messages; never logged.
        secrets = (
            api_key,
            getattr(current, "api_key", None),
            getattr(current, "auth_token", None),
            os.environ.get("ANTHROPIC_API_KEY"),
        )
        self._secrets = tuple(s for s in secrets if isinstance(s, str) and s)
        self._secrets += url_secrets(self.base_url)
        #: The endpoint, as shown in messages and repr (credentials in it redacted).
        self.base_url = redact(self.base_url, self._secrets)

    # -- lifecycle ---------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Anthropic({self.model!r}, base_url={self.base_url!r}, name={self.name!r})"

    # -- one attempt -------------------------------------------------------------

    def _arguments(self, request: LLMRequest, model: str) -> dict[str, Any]:
        system, messages = to_anthropic_messages(request.messages)
        params = dict(request.params)
        kwargs: dict[str, Any] = {
            "model": model,
            "max_tokens": params.pop("max_tokens", self.max_tokens),
            "messages": messages,
        }
        if system is not None:
            kwargs["system"] = system
        if request.tools:
            kwargs["tools"] = to_anthropic_tools(request.tools)
        if params:
            kwargs["extra_body"] = params
        return kwargs

    async def _complete_once(self, request: LLMRequest) -> LLMResponse:
        model = request.model or self.model
        create = self._clients.get().messages.create
        reply = await self._sdk_call(
            model, functools.partial(create, **self._arguments(request, model))
        )
        return self._response(reply, model, used_call_ids(request.messages))

    async def _stream_once(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
        model = request.model or self.model
        create = self._clients.get().messages.create
        stream = await self._sdk_call(
            model, functools.partial(create, **self._arguments(request, model), stream=True)
        )

        assembler = ResponseAssembler()
        tool_index: dict[int, int] = {}  # content block index -> position among tool calls
        stop_reason: Any = None
        # Prompt tokens by kind (see _INPUT_FIELDS): message_start sends them all, and a
        # message_delta may send any of them again (cumulative), not necessarily all.
        inputs: dict[str, int] = {}
        output_tokens = 0
        served = ""
        async with stream:
            events = stream.__aiter__()
            while (event := await self._sdk_next(model, events)) is not END:
                kind = _field(event, "type")
                if kind == "message_start":
                    message = _field(event, "message")
                    served = _text(_field(message, "model"))
                    usage = _field(message, "usage")
                    inputs = {f: _int(_field(usage, f)) for f in _INPUT_FIELDS}
                    output_tokens = _int(_field(usage, "output_tokens"))
                elif kind == "content_block_start":
                    block = _field(event, "content_block")
                    block_kind = _field(block, "type")
                    if block_kind == "text":
                        text = _text(_field(block, "text"))
                        if text:
                            assembler.add_text(text)
                            yield TextDelta(text)
                    elif block_kind == "tool_use":
                        position = len(tool_index)
                        tool_index[_int(_field(event, "index"))] = position
                        tool_input = _field(block, "input")
                        delta = ToolCallDelta(
                            index=position,
                            # The id complete() gives a block without one, for the same answer.
                            id=_text(_field(block, "id")) or f"toolu_{position}",
                            name=_text(_field(block, "name")) or None,
                            # Normally {} here with the JSON following in deltas.
                            arguments=json.dumps(tool_input) if tool_input else "",
                        )
                        assembler.add_tool_call(delta)
                        yield delta
                elif kind == "content_block_delta":
                    delta_obj = _field(event, "delta")
                    delta_kind = _field(delta_obj, "type")
                    if delta_kind == "text_delta":
                        text = _text(_field(delta_obj, "text"))
                        if text:
                            assembler.add_text(text)
                            yield TextDelta(text)
                    elif delta_kind == "input_json_delta":
                        position = tool_index.get(_int(_field(event, "index")))
                        if position is not None:
                            piece = ToolCallDelta(
                                index=position,
                                arguments=_text(_field(delta_obj, "partial_json")),
                            )
                            assembler.add_tool_call(piece)
                            yield piece
                elif kind == "message_delta":
                    stop_reason = _field(_field(event, "delta"), "stop_reason") or stop_reason
                    usage = _field(event, "usage")
                    output_tokens = _int(_field(usage, "output_tokens")) or output_tokens
                    for f in _INPUT_FIELDS:
                        if _field(usage, f) is not None:
                            inputs[f] = _int(_field(usage, f))
        if stop_reason is None:
            raise ProviderUnavailableError(
                "the stream ended before the model finished (no stop_reason): the "
                "connection was probably cut",
                provider=self.name,
                model=model,
            )
        yield ResponseCompleted(
            assembler.build(
                finish_reason=_finish_reason(stop_reason),
                usage=Usage(sum(inputs.values()), output_tokens),
                model=served or model,
                provider=self.name,
                where=self.base_url,
                taken=used_call_ids(request.messages),
            )
        )

    # -- wire format -> canonical ------------------------------------------------

    def _response(self, reply: Any, model: str, taken: frozenset[str]) -> LLMResponse:
        blocks = _field(reply, "content")
        if not isinstance(blocks, list):
            raise MalformedResponseError(
                f"the response has no 'content' list (from {self.base_url})",
                provider=self.name,
                model=model,
            )
        texts: list[str] = []
        calls: list[ToolCall] = []
        for block in blocks:
            kind = _field(block, "type")
            if kind == "text":
                texts.append(_text(_field(block, "text")))
            elif kind == "tool_use":
                if not _text(_field(block, "name")):
                    raise MalformedResponseError(
                        f"tool_use block {len(calls)} has no name (from {self.base_url})",
                        provider=self.name,
                        model=model,
                    )
                tool_input = _field(block, "input")
                calls.append(
                    ToolCall(
                        id=_text(_field(block, "id")) or f"toolu_{len(calls)}",
                        name=_text(_field(block, "name")),
                        arguments=dict(tool_input)
                        if isinstance(tool_input, Mapping)
                        else parse_arguments(_text(tool_input)),
                    )
                )
            # Thinking and server-tool blocks carry nothing the canonical format holds.
        # Repeated ids (Kimi's Anthropic-compatible endpoint reuses them) made distinct,
        # as the stream's assembler does.
        ids = distinct_call_ids([c.id for c in calls], taken)
        calls = [replace(c, id=call_id) for c, call_id in zip(calls, ids, strict=True)]
        usage = _field(reply, "usage")
        return LLMResponse(
            message=Message(role="assistant", content="".join(texts), tool_calls=tuple(calls)),
            finish_reason=_finish_reason(_field(reply, "stop_reason")),
            usage=Usage(_input_tokens(usage), _int(_field(usage, "output_tokens"))),
            model=_text(_field(reply, "model")) or model,
            provider=self.name,
        )

    # -- SDK exceptions -> ours --------------------------------------------------

    def _error(self, err: Exception, model: str) -> ProviderError:
        sdk = self._sdk
        common: dict[str, Any] = {"provider": self.name, "model": model}
        if isinstance(err, sdk.APIStatusError):
            detail = redact(_api_message(err), self._secrets)
            error_type = _text(getattr(err, "type", None)) or _error_type(err.body)
            code = _text(getattr(err, "error_code", None)) or error_type or None
            if err.status_code < 400:
                # An ``error`` event inside a 200 stream: the server gave up mid-answer.
                cls = (
                    RateLimitError if error_type == "rate_limit_error" else ProviderUnavailableError
                )
                return cls(detail, code=code, **common)
            return error_for_status(
                err.status_code,
                detail,
                code=code,
                retry_after=parse_retry_after(err.response.headers),
                **common,
            )
        if isinstance(err, sdk.APITimeoutError):
            return ProviderUnavailableError(
                f"no response within the {self.timeout:g} s timeout from {self.base_url}",
                **common,
            )
        if isinstance(err, sdk.APIConnectionError):
            cause = err.__cause__
            reason = f"{type(cause).__name__}: {cause}" if cause is not None else err.message
            return self._connection_failed(reason, model)
        if isinstance(err, sdk.APIResponseValidationError | ValueError):
            return MalformedResponseError(
                redact(f"the body is not a valid response: {err}", self._secrets), **common
            )
        credentials_error = getattr(sdk, "CredentialsError", None)
        if credentials_error is not None and isinstance(err, credentials_error):
            return AuthenticationError(
                redact(f"no usable credentials: {err}", self._secrets), **common
            )
        if isinstance(err, sdk.APIError):
            return ProviderUnavailableError(
                redact(f"the server reported an error: {err.message}", self._secrets), **common
            )
        if isinstance(err, sdk.AnthropicError):
            return TerminalProviderError(redact(str(err), self._secrets), **common)
        raise err


def to_anthropic_messages(
    messages: Sequence[Message],
) -> tuple[str | None, list[dict[str, Any]]]:
    """``(system, messages)`` for the Messages API from canonical messages."""
    system: list[str] = []
    wire: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            system.append(message.content)
            continue
        blocks: list[dict[str, Any]] = []
        if message.role == "tool":
            role = "user"
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id or "",
                "content": message.content,
            }
            if message.is_error:
                result["is_error"] = True
            blocks.append(result)
        else:
            role = message.role
            # The API rejects empty text blocks.
            if message.content:
                blocks.append({"type": "text", "text": message.content})
            for call in message.tool_calls:
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": _tool_input(call.arguments),
                    }
                )
        if not blocks:
            continue
        if wire and wire[-1]["role"] == role:
            # The API wants roles to alternate: merge, tool results first as they came.
            wire[-1]["content"].extend(blocks)
        else:
            wire.append({"role": role, "content": blocks})
    return ("\n\n".join(system) if system else None), wire


def to_anthropic_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """``tools`` as Messages API tool definitions."""
    return [
        {"name": t.name, "description": t.description, "input_schema": dict(t.parameters)}
        for t in tools
    ]


def _tool_input(arguments: dict[str, Any] | str) -> dict[str, Any]:
    # tool_use input must be an object; arguments another model sent as invalid JSON
    # (kept verbatim) travel under one key rather than being dropped.
    if isinstance(arguments, dict):
        return arguments
    parsed = parse_arguments(arguments)
    return parsed if isinstance(parsed, dict) else {"_invalid_arguments": arguments}


def _finish_reason(stop_reason: Any) -> str:
    if not isinstance(stop_reason, str) or not stop_reason:
        return "stop"
    return _STOP_REASONS.get(stop_reason, stop_reason)


def _api_message(err: Any) -> str:
    message = getattr(err, "api_message", None)
    if isinstance(message, str) and message:
        return message
    error = _field(err.body, "error")
    message = _field(error, "message")
    return message if isinstance(message, str) and message else str(err.message)


def _error_type(body: Any) -> str:
    return _text(_field(_field(body, "error"), "type"))


# Cached prompt tokens are prompt tokens too (billed at other rates; see README).
_INPUT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _input_tokens(usage: Any) -> int:
    return sum(_int(_field(usage, f)) for f in _INPUT_FIELDS)


def _import_sdk(name: str, model: str) -> Any:
    try:
        import anthropic as sdk
    except ImportError:
        err = TerminalProviderError(
            "the 'anthropic' package is not installed", provider=name, model=model
        )
        err.hint = "install the optional extra: pip install 'perdure[anthropic]'"
        raise err from None
    return sdk
