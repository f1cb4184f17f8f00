"""``OpenAI``: OpenAI and any OpenAI-compatible server, on the official ``openai`` client.

It speaks the Chat Completions API, which vLLM, Ollama, llama.cpp's server and LM
Studio also speak, so ``base_url`` is all it takes to point it at a local model. The
``openai`` package is imported when a provider is constructed (it is the optional
``perdure[openai]`` extra); its async client runs on httpx2/anyio, so it works under
asyncio and trio alike. The client is created with ``max_retries=0``: our
:class:`~perdure.providers.retry.RetryPolicy` is the only retry loop.

A client's connection pool belongs to the event loop that first used it: use one
``OpenAI`` instance from one event loop (the runtime does), and ``aclose()`` it, or use
it as an async context manager, when done.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from perdure.providers.clients import LoopClient, plain_http_client, without_url_credentials
from perdure.providers.errors import (
    AuthenticationError,
    BadRequestError,
    MalformedResponseError,
    ProviderError,
    ProviderUnavailableError,
    TerminalProviderError,
    error_for_status,
    redact,
    url_secrets,
)
from perdure.providers.openai_format import (
    finish_reason_from_openai,
    to_openai_messages,
    to_openai_tools,
)
from perdure.providers.retry import RetryPolicy, parse_retry_after
from perdure.providers.sdk_provider import END, SDKProvider
from perdure.providers.streams import (
    ResponseAssembler,
    arguments_json,
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
    Usage,
)
from perdure.providers.wire import field as _field
from perdure.providers.wire import text as _text

if TYPE_CHECKING:
    import openai as openai_sdk

__all__ = ["OpenAI"]

log = logging.getLogger("perdure.providers")

_UNSET: Any = object()

#: What local servers get as a key when none is configured: the client insists on one.
PLACEHOLDER_API_KEY = "not-needed"


class OpenAI(SDKProvider):
    """A model served by the OpenAI API or any OpenAI-compatible server.

    ``api_key`` falls back to ``OPENAI_API_KEY`` and ``base_url`` to ``OPENAI_BASE_URL``.
    Without a key, construction fails only when the endpoint is OpenAI's own; local
    servers usually need none and get a placeholder. ``params`` are default request
    parameters (``temperature``, ``max_tokens``, ...) that each request's ``params``
    override; they are sent as fields of the request body. ``client`` is an existing
    ``openai.AsyncOpenAI`` to use instead of creating one (its retries are turned off).

    What OpenAI-compatible servers send that OpenAI does not is read, not refused:

    - Tool calls: a missing, empty or repeated id is replaced by one derived from the
      conversation and the call's position (:func:`~perdure.providers.streams.distinct_call_ids`;
      never random, so a replayed request is the one first sent). Arguments may come as
      a JSON string, an object, an empty string (no arguments) or as text that is not
      a JSON object, which is kept verbatim for the runtime to report back to the model.
      A legacy ``function_call`` counts as one tool call. A turn with tool calls finishes
      with ``"tool_calls"`` whatever word the server used for a natural end.
    - Streams: tool-call pieces without an index, several calls all numbered 0, a whole
      call in one piece, chunks with no choices, usage in any chunk (or under Groq's
      ``x_groq``), or never.
    - Requests: ``stream_options`` (asking for usage) and ``content: null`` in a turn of
      tool calls alone are OpenAI's shape, which some servers refuse with a 400/422;
      then the request is sent again at once without it, and this instance never sends
      it again (said once in a DEBUG log line).
    - Content as a list of parts (text parts are joined), null content, a refusal
      (kept as the text), no ``model`` (the requested one is recorded as the one that
      served).
    - Reasoning (``reasoning_content`` from DeepSeek and older vLLM, ``reasoning`` from
      vLLM and OpenRouter, thinking parts in a content list) is left out of the
      canonical message: it is neither streamed as text nor recorded, and never sent
      back. The log keeps what the conversation needs, and most servers ignore
      reasoning sent back. DeepSeek's thinking mode is the exception: with tools, it
      answers 400 when a turn's reasoning is not sent back; that error says to turn
      thinking off (``params={"thinking": {"type": "disabled"}}``).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        organization: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, sharing it is safe
        params: Mapping[str, Any] | None = None,
        name: str = "openai",
        client: openai_sdk.AsyncOpenAI | None = None,
    ) -> None:
        sdk = _import_sdk(name, model)
        self.model = model
        self.name = name
        self.retry = retry
        self.timeout = timeout
        self.params: dict[str, Any] = dict(params or {})
        self._sdk = sdk
        # Each cleared, for the life of this instance, by the first refusal of what it
        # stands for (see _send): stream_options, and content: null beside tool calls.
        self._stream_usage = True
        self._null_content = True
        if client is not None:
            # with_options copies the client and shares its connection pool.
            raw = client.with_options(max_retries=0)
            self._clients: LoopClient[Any] = LoopClient(without_url_credentials(raw), None)
            key = getattr(client, "api_key", None)
        else:
            base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
            key = api_key or os.environ.get("OPENAI_API_KEY") or None
            if key is None:
                if _is_openai_host(base_url):
                    raise AuthenticationError(
                        "no API key: pass OpenAI(..., api_key=...) or set OPENAI_API_KEY "
                        "(or set base_url / OPENAI_BASE_URL to an OpenAI-compatible server "
                        "that needs no key)",
                        provider=name,
                        model=model,
                    )
                key = PLACEHOLDER_API_KEY

            def build() -> Any:
                return sdk.AsyncOpenAI(
                    api_key=key,
                    base_url=base_url,
                    organization=organization,
                    timeout=timeout,
                    max_retries=0,
                    http_client=plain_http_client(sdk),
                )

            def factory() -> Any:
                return without_url_credentials(build())

            raw = build()
            self._clients = LoopClient(without_url_credentials(raw), factory)
        # As given, credentials included: what the error messages must never show.
        raw_url = str(raw.base_url)
        # Kept only to scrub them from error messages; never logged.
        self._secrets: tuple[str, ...] = ((key,) if isinstance(key, str) else ()) + url_secrets(
            raw_url
        )
        #: The endpoint, as shown in messages and repr (credentials in it redacted).
        self.base_url = redact(raw_url, self._secrets)

    # -- lifecycle ---------------------------------------------------------------

    def __repr__(self) -> str:
        return f"OpenAI({self.model!r}, base_url={self.base_url!r}, name={self.name!r})"

    # -- one attempt -------------------------------------------------------------

    def _arguments(self, request: LLMRequest, model: str) -> dict[str, Any]:
        messages = to_openai_messages(request.messages)
        if not self._null_content:
            for message in messages:
                if message.get("content", "") is None:
                    message["content"] = ""
        kwargs: dict[str, Any] = {"model": model, "messages": messages}
        if request.tools:
            kwargs["tools"] = to_openai_tools(request.tools)
        params = {**self.params, **request.params}
        if params:
            # As body fields: any server-specific parameter passes through unchanged.
            kwargs["extra_body"] = params
        return kwargs

    async def _complete_once(self, request: LLMRequest) -> LLMResponse:
        model = request.model or self.model
        completion = await self._send(request, model, stream=False)
        return self._response(completion, model, used_call_ids(request.messages))

    async def _stream_once(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
        model = request.model or self.model
        stream = await self._send(request, model, stream=True)

        assembler = ResponseAssembler()
        indices = _StreamIndices()
        finish: Any = None
        usage = Usage()
        served = ""
        received = 0
        followed: Any = _UNSET  # the index of the choice whose pieces we assemble
        async with stream:
            chunks = stream.__aiter__()
            while (chunk := await self._sdk_next(model, chunks)) is not END:
                received += 1
                served = served or _text(_field(chunk, "model"))
                # Groq has sent usage under its own x_groq field, in the last chunk.
                chunk_usage = _field(chunk, "usage") or _field(_field(chunk, "x_groq"), "usage")
                if chunk_usage is not None:
                    usage = self._usage(chunk_usage, model)
                choices = self._items(_field(chunk, "choices"), "a chunk's 'choices'", model)
                # With n > 1 chunks carry pieces of several choices: follow one of them
                # (the first seen; servers number it 0), never splice them together.
                if choices and followed is _UNSET:
                    followed = _field(choices[0], "index")
                for choice in [c for c in choices if _field(c, "index") == followed][:1]:
                    delta = _field(choice, "delta")
                    # A refusal streams instead of content: text, as when not streamed.
                    text = _content_text(_field(delta, "content")) or _text(
                        _field(delta, "refusal")
                    )
                    if text:
                        assembler.add_text(text)
                        yield TextDelta(text)
                    pieces = self._items(_field(delta, "tool_calls"), "'tool_calls'", model)
                    legacy = _field(delta, "function_call")
                    if not pieces and legacy is not None:
                        # The pre-tools API: one call per turn, streamed in pieces.
                        pieces = [{"index": 0, "function": legacy}]
                    for piece in pieces:
                        event = self._tool_call_delta(piece, indices)
                        assembler.add_tool_call(event)
                        yield event
                    reason = _field(choice, "finish_reason")
                    # Older Ollama builds send "" on every chunk, the last included: it
                    # must count as a finish, but never mask a real reason sent before.
                    if reason or (reason == "" and finish is None):
                        finish = reason
        if finish is None and not received:
            headers = getattr(getattr(stream, "response", None), "headers", None) or {}
            kind = str(headers.get("content-type", ""))
            if kind and "event-stream" not in kind:
                # A server that ignores "stream": true answers with one JSON body.
                raise self._malformed(
                    f"a streaming request was answered with {kind!r}, not an event "
                    "stream: the server does not seem to support streaming",
                    model,
                )
        if finish is None:
            raise ProviderUnavailableError(
                "the stream ended before the model finished (no finish_reason): the "
                "connection was probably cut",
                provider=self.name,
                model=model,
            )
        response = assembler.build(
            finish_reason=finish_reason_from_openai(
                finish, has_tool_calls=bool(assembler.tool_calls())
            ),
            usage=usage,
            model=served or model,
            provider=self.name,
            where=self.base_url,
            taken=used_call_ids(request.messages),
        )
        yield ResponseCompleted(response)

    async def _send(self, request: LLMRequest, model: str, *, stream: bool) -> Any:
        """The SDK's answer to ``request`` (a stream if ``stream``), in a shape the server takes.

        Two fields of OpenAI's own request shape are refused by some OpenAI-compatible
        servers with a 400 or 422: ``stream_options``, which asks for usage at the end
        of a stream (Mistral's API, Azure AI model inference, Bedrock behind Databricks
        or a gateway), and ``content: null`` in an assistant turn that only calls
        tools (older Ollama and LM Studio builds want ``""``). On such a refusal the
        request is sent again at once without it, and this instance never sends it
        again (each adaptation is made once, so this loop ends). Without
        ``stream_options``, a stream reports the usage the server sends unasked, or none.
        """
        create = self._clients.get().chat.completions.create
        while True:
            arguments = self._arguments(request, model)
            if stream:
                arguments["stream"] = True
                if self._stream_usage:
                    arguments["stream_options"] = {"include_usage": True}
            try:
                return await self._sdk_call(model, functools.partial(create, **arguments))
            except BadRequestError as err:
                if not self._adapt(err, arguments, model):
                    raise

    def _adapt(self, err: BadRequestError, sent: dict[str, Any], model: str) -> bool:
        """Stop sending what ``err`` refuses, if it is one of the fields :meth:`_send` names."""
        if "stream_options" in sent and _refuses(err, _STREAM_OPTIONS_WORDS):
            self._stream_usage = False
            what, instead = "stream_options", "usage is then only what the server sends unasked"
        elif (
            self._null_content
            and any(m.get("content", "") is None for m in sent["messages"])
            and _refuses(err, _NULL_CONTENT_WORDS)
        ):
            self._null_content = False
            what, instead = "content: null", 'an assistant turn of tool calls alone has content ""'
        else:
            return False
        # The detail is already redacted; the key is never in it.
        log.debug(
            "%s (model %r) at %s refused %s (%s): asking again without it, and never sending "
            "it again from this provider; %s",
            self.name,
            model,
            self.base_url,
            what,
            err.detail,
            instead,
        )
        return True

    # -- wire format -> canonical ------------------------------------------------

    def _malformed(self, what: str, model: str) -> MalformedResponseError:
        return MalformedResponseError(
            f"{what} (from {self.base_url})", provider=self.name, model=model
        )

    def _items(self, value: Any, what: str, model: str) -> list[Any]:
        """``value`` if it is a list (``None`` meaning empty), else a malformed response."""
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._malformed(f"{what} is a {type(value).__name__}, not a list", model)
        return value

    def _response(self, completion: Any, model: str, taken: frozenset[str]) -> LLMResponse:
        choices = _field(completion, "choices")
        if not isinstance(choices, list) or not choices:
            # Some servers answer an error with HTTP 200: what they said is the clue.
            said = _said(_field(completion, "error"))
            said = f" (the body says: {redact(said, self._secrets)!r})" if said else ""
            raise self._malformed(f"the response has no 'choices'{said}", model)
        choice = _first_choice(choices)
        message = _field(choice, "message")
        if message is None:
            raise self._malformed("the first choice has no 'message'", model)
        raw_content = _field(message, "content")
        if raw_content is None:
            # A refusal comes instead of content; the caller should see it as text.
            raw_content = _field(message, "refusal") or ""
        content = _content_text(raw_content)
        if content is None:
            raise self._malformed(f"'content' is a {type(raw_content).__name__}, not text", model)
        raw_calls = self._items(_field(message, "tool_calls"), "'tool_calls'", model)
        legacy = _field(message, "function_call")
        if not raw_calls and _field(legacy, "name"):
            # The pre-tools API, still spoken by some servers: one call, without an id.
            raw_calls = [{"type": "function", "function": legacy}]
        ids = distinct_call_ids([_call_id(_field(raw, "id")) for raw in raw_calls], taken)
        calls = tuple(
            self._tool_call(raw, position, call_id, model)
            for position, (raw, call_id) in enumerate(zip(raw_calls, ids, strict=True))
        )
        return LLMResponse(
            message=Message(role="assistant", content=content, tool_calls=calls),
            finish_reason=finish_reason_from_openai(
                _field(choice, "finish_reason"), has_tool_calls=bool(calls)
            ),
            usage=self._usage(_field(completion, "usage"), model),
            model=_text(_field(completion, "model")) or model,
            provider=self.name,
        )

    def _tool_call(self, raw: Any, position: int, call_id: str, model: str) -> ToolCall:
        function = _field(raw, "function") or _field(raw, "custom")
        name = _field(function, "name")
        if not isinstance(name, str) or not name:
            raise self._malformed(f"tool call {position} has no function name", model)
        arguments = _field(function, "arguments")
        if arguments is None:
            arguments = _field(function, "input")
        if isinstance(arguments, Mapping):
            parsed: dict[str, Any] | str = dict(arguments)
        elif isinstance(arguments, str):
            parsed = parse_arguments(arguments)
        elif arguments is None:
            parsed = {}
        else:
            parsed = str(arguments)
        return ToolCall(id=call_id, name=name, arguments=parsed)

    def _tool_call_delta(self, piece: Any, indices: _StreamIndices) -> ToolCallDelta:
        index = _field(piece, "index")
        call_id = _call_id(_field(piece, "id")) or None
        function = _field(piece, "function")
        name = _text(_field(function, "name")) or None
        arguments = _field(function, "arguments")
        if isinstance(arguments, Mapping):
            # Some servers stream the arguments as an object, as they send them whole.
            arguments = arguments_json(dict(arguments))
        return ToolCallDelta(
            index=indices.of(index if isinstance(index, int) else None, call_id, name),
            id=call_id,
            name=name,
            arguments=arguments if isinstance(arguments, str) else "",
        )

    def _usage(self, raw: Any, model: str) -> Usage:
        if raw is None:
            return Usage()
        prompt = _token_count(_field(raw, "prompt_tokens"))
        completion = _token_count(_field(raw, "completion_tokens"))
        if prompt is None or completion is None:
            raise self._malformed(f"usage is not a pair of token counts: {raw!r}", model)
        return Usage(prompt, completion)

    # -- SDK exceptions -> ours --------------------------------------------------

    def _error(self, err: Exception, model: str) -> ProviderError:
        sdk = self._sdk
        common: dict[str, Any] = {"provider": self.name, "model": model}
        if isinstance(err, sdk.APIStatusError):
            detail = redact(_said(err.body) or err.message, self._secrets)
            failure = error_for_status(
                err.status_code,
                detail,
                code=err.code,
                retry_after=parse_retry_after(err.response.headers),
                **common,
            )
            if isinstance(failure, BadRequestError) and "reasoning_content" in detail:
                failure.hint = _REASONING_HINT
            return failure
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
            return self._malformed(
                redact(f"the body is not a valid response: {err}", self._secrets), model
            )
        if isinstance(err, sdk.APIError):
            # An error event inside a stream: the server gave up mid-answer.
            return ProviderUnavailableError(
                redact(f"the server reported an error: {err.message}", self._secrets), **common
            )
        if isinstance(err, sdk.OpenAIError):
            return TerminalProviderError(redact(str(err), self._secrets), **common)
        raise err


class _StreamIndices:
    """The position in the turn of each streamed tool-call piece.

    Servers send ``index``, and then a call keeps it -- except that some
    OpenAI-compatible servers number every call of a turn 0 (Ollama does,
    ollama/ollama#15457; so do gateways translating Gemini): a piece whose id differs
    from the one already at its index starts a new call rather than being glued onto
    the call before (which would merge two calls into one with garbage arguments).
    Some servers send no index at all. Then a piece with an id starts a call at the
    next free position (the same id again means the same call); a piece with neither
    index nor id starts one when it carries a name and the call before already has
    one, and otherwise continues the call before it.
    """

    __slots__ = ("_by_id", "_ids", "_last", "_named", "_next", "_raw", "_used")

    def __init__(self) -> None:
        self._by_id: dict[str, int] = {}  # call id -> position
        self._ids: dict[int, str] = {}  # position -> the id its call was given
        self._raw: dict[int, int] = {}  # server index -> position of its latest call
        self._named: set[int] = set()  # positions whose call has its name
        self._used: set[int] = set()
        self._next = 0
        self._last = 0

    def of(self, index: int | None, call_id: str | None, name: str | None = None) -> int:
        if index is not None:
            position = self._raw.get(index)
            if position is None:
                position = self._next if index in self._used else index
            elif call_id is not None and self._ids.get(position, call_id) != call_id:
                position = self._next
            self._raw[index] = position
        elif call_id is not None:
            position = self._by_id.get(call_id, self._next)
        elif name is not None and self._last in self._named:
            position = self._next
        else:
            position = self._last
        if call_id is not None:
            self._by_id.setdefault(call_id, position)
            self._ids.setdefault(position, call_id)
        if name is not None:
            self._named.add(position)
        self._used.add(position)
        self._next = max(self._next, position + 1)
        self._last = position
        return position


#: What to do when a server wants reasoning sent back (see the class docstring).
_REASONING_HINT = (
    "the server wants each assistant turn's reasoning_content sent back (DeepSeek's "
    "thinking mode does, for turns that call tools), and perdure keeps no reasoning in "
    "the conversation: turn thinking off, e.g. OpenAI(..., params={'thinking': "
    "{'type': 'disabled'}}), or use a model without it; not retried"
)


def _said(body: Any) -> str:
    """What an error body says: its ``message`` (OpenAI's shape) or ``detail`` (FastAPI's).

    Either may be a structure rather than text (Mistral's and vLLM's validation errors
    are lists of problems): then its JSON, which names the offending field. ``body`` is
    what the SDK kept (the ``error`` member when there is one): a string when that
    member is one (text-generation-inference and LM Studio send ``{"error": "..."}``)
    or when the body is not JSON (kept too, unless it is markup: a proxy's HTML page
    says nothing useful). ``""`` when the body says nothing. Not cut here: a cut could
    halve a secret, which the caller redacts whole first.
    """
    if isinstance(body, str):
        text = body.strip()
        return "" if text.startswith("<") else text
    if not isinstance(body, Mapping):
        return ""
    said = body.get("message")
    if said is None:
        said = body.get("detail")
    if said is None or isinstance(said, str):
        return said or ""
    try:
        return json.dumps(said, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return ""


#: What a server's refusal of stream_options says (Azure, Mistral, Bedrock gateways).
_STREAM_OPTIONS_WORDS = re.compile(r"stream_options|include_usage", re.IGNORECASE)
#: What a refusal of content: null says: Ollama "invalid message content type: <nil>",
#: LM Studio "'content' field must be a string or an array of objects", pydantic servers
#: "content ... Input should be a valid string".
_NULL_CONTENT_WORDS = re.compile(
    r"content.*(<nil>|\bnull\b|\bnone\b|must be a string|valid string)", re.IGNORECASE | re.DOTALL
)


def _refuses(err: BadRequestError, words: re.Pattern[str]) -> bool:
    """True if ``err`` is a 400/422 whose explanation matches ``words``."""
    return err.status in (400, 422) and bool(words.search(err.detail))


def _call_id(value: Any) -> str:
    """A tool call's id as sent: text, or a number some servers send (``""`` if neither)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value)


def _first_choice(choices: list[Any]) -> Any:
    """The choice with index 0 (servers may list the ``n`` choices in any order)."""
    for choice in choices:
        if _field(choice, "index") == 0:
            return choice
    return choices[0]


def _content_text(value: Any) -> str | None:
    """Message text from ``content``: a string, or a list of content parts.

    Some OpenAI-compatible servers (Mistral's, for reasoning models) answer with a list
    of parts; the text parts are joined and the others (reasoning, images) skipped.
    ``None`` when ``value`` is neither.
    """
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if not isinstance(value, list):
        return None
    texts = []
    for part in value:
        if isinstance(part, str):
            texts.append(part)
        elif _field(part, "type") in ("text", "output_text", None):
            texts.append(_text(_field(part, "text")))
    return "".join(texts)


def _token_count(value: Any) -> int | None:
    """A token count: ``None`` (not sent) is 0; a whole float (``12.0``) is accepted.

    ``None`` for anything else, a negative count included (it would be a credit).
    """
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _import_sdk(name: str, model: str) -> Any:
    try:
        import openai as sdk
    except ImportError:
        err = TerminalProviderError(
            "the 'openai' package is not installed", provider=name, model=model
        )
        err.hint = "install it with: pip install 'perdure[openai]'"
        raise err from None
    return sdk


def _is_openai_host(base_url: str | None) -> bool:
    if base_url is None:
        return True
    host = urlsplit(base_url).hostname or ""
    return host == "openai.com" or host.endswith(".openai.com")
