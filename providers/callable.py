"""``CallableProvider``: any ``(messages, tools, model) -> dict`` function as a provider."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio.to_thread

from perdure.providers.errors import MalformedResponseError, ProviderError, TerminalProviderError
from perdure.providers.openai_format import to_openai_messages, to_openai_tools
from perdure.providers.retry import RetryPolicy
from perdure.providers.streams import arguments_json, events_from_response, parse_arguments
from perdure.providers.types import LLMRequest, LLMResponse, Message, StreamEvent, ToolCall, Usage
from perdure.providers.wire import clean_response

__all__ = ["CallableProvider"]

_SHAPE = (
    "{'content': str, 'tool_calls': [{'id'?: str, 'name': str, 'arguments': dict | str}], "
    "'usage': {'input_tokens': int, 'output_tokens': int}, 'finish_reason'?: str, "
    "'model'?: str}"
)
_KEYS = ("content", "tool_calls", "usage", "finish_reason", "model")


class CallableProvider:
    """Adapts a plain function to the provider protocol.

    ``fn(messages, tools, model)`` receives OpenAI-style dicts (exactly what the Chat
    Completions API takes, see :func:`~perdure.providers.openai_format.to_openai_messages`)
    and returns a dict shaped like::

        {"content": str,
         "tool_calls": [{"id"?: str, "name": str, "arguments": dict | str}],
         "usage": {"input_tokens": int, "output_tokens": int},
         "finish_reason"?: str, "model"?: str}

    ``content``, ``tool_calls`` and ``usage`` may be omitted (empty text, no calls, zero
    usage). A missing tool-call id gets a deterministic one. An async ``fn`` is awaited;
    a sync one runs in a worker thread so it cannot block the event loop.

    A malformed return value raises :class:`MalformedResponseError` naming the key that
    is wrong and the shape expected. It is never retried here: a bug in the function
    will not fix itself. Exceptions the function raises: provider errors pass through
    (retryable ones are retried when a ``retry`` policy is given); any other exception
    becomes a :class:`TerminalProviderError` -- raise a ``RetryableProviderError`` from
    the function to mark a failure as worth retrying.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str = "custom",
        model: str = "custom",
        retry: RetryPolicy | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.model = model
        self.retry = retry
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
        )

    async def complete(self, request: LLMRequest) -> LLMResponse:
        """Call the function and check what it returned."""
        model = request.model or self.model
        invoke = functools.partial(self._invoke, request, model)
        # Only the call is retried; checking its return value is not (see above).
        result = await (invoke() if self.retry is None else self.retry.call(invoke))
        return self._parse(result, model, len(request.messages))

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
        """The function's answer as a stream (the function itself does not stream)."""
        response = await self.complete(request)
        for event in events_from_response(response):
            yield event

    async def _invoke(self, request: LLMRequest, model: str) -> Any:
        messages = to_openai_messages(request.messages)
        tools = to_openai_tools(request.tools)
        try:
            if self._is_async:
                result = await self.fn(messages, tools, model)
            else:
                result = await anyio.to_thread.run_sync(self.fn, messages, tools, model)
                if inspect.isawaitable(result):
                    result = await result
        except ProviderError as err:
            err.provider = err.provider or self.name
            err.model = err.model or model
            raise
        except Exception as err:
            failure = TerminalProviderError(
                f"the function {_fn_name(self.fn)} raised {type(err).__name__}: {err}",
                provider=self.name,
                model=model,
            )
            failure.hint = (
                "fix the function, or raise RetryableProviderError from it for failures "
                "worth retrying"
            )
            # Chained on purpose: the traceback into the user's function is the clue.
            raise failure from err
        return result

    def _parse(self, result: Any, model: str, turn: int) -> LLMResponse:
        def bad(what: str) -> MalformedResponseError:
            err = MalformedResponseError(
                f"the function {_fn_name(self.fn)} returned {what}; expected {_SHAPE}",
                provider=self.name,
                model=model,
            )
            err.hint = "this is a bug in the function and will not fix itself: not retried"
            return err

        if not isinstance(result, Mapping):
            raise bad(f"a {type(result).__name__} ({_short(result)})")
        unknown = [k for k in result if k not in _KEYS]
        if unknown:
            raise bad(f"unknown key {unknown[0]!r} (known keys: {', '.join(_KEYS)})")

        content = result.get("content")
        if content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad(f"'content' as a {type(content).__name__} ({_short(content)}), not a str")

        raw_calls = result.get("tool_calls")
        if raw_calls is None:
            raw_calls = []
        if not isinstance(raw_calls, list | tuple):
            raise bad(f"'tool_calls' as a {type(raw_calls).__name__}, not a list")
        calls = []
        for i, raw in enumerate(raw_calls):
            where = f"'tool_calls'[{i}]"
            if not isinstance(raw, Mapping):
                raise bad(f"{where} as a {type(raw).__name__}, not a dict")
            extra = [k for k in raw if k not in ("id", "name", "arguments", "type")]
            if extra:
                raise bad(f"{where} with unknown key {extra[0]!r}")
            name = raw.get("name")
            if not isinstance(name, str) or not name:
                raise bad(f"{where}['name'] = {name!r}, not a non-empty str")
            arguments = raw.get("arguments", {})
            if isinstance(arguments, str):
                arguments = parse_arguments(arguments)
            elif isinstance(arguments, Mapping):
                # As they would arrive over the wire: plain JSON data (a set or a
                # datetime would be recorded, then break the next request's JSON).
                try:
                    arguments = json.loads(arguments_json(dict(arguments)))
                except (TypeError, ValueError, RecursionError) as err:
                    raise bad(f"{where}['arguments'] that are not JSON data ({err})") from None
            else:
                raise bad(
                    f"{where}['arguments'] as a {type(arguments).__name__}, "
                    "not a dict or a JSON string"
                )
            call_id = raw.get("id")
            if call_id is None:
                # Deterministic: the same conversation and answer give the same id.
                seed = f"{turn}:{i}:{name}:{arguments!r}".encode()
                call_id = "call_" + hashlib.sha256(seed).hexdigest()[:12]
            elif not isinstance(call_id, str) or not call_id:
                raise bad(f"{where}['id'] = {call_id!r}, not a non-empty str")
            calls.append(ToolCall(id=call_id, name=name, arguments=arguments))

        raw_usage = result.get("usage")
        if raw_usage is None:
            usage = Usage()
        else:
            if not isinstance(raw_usage, Mapping):
                raise bad(f"'usage' as a {type(raw_usage).__name__}, not a dict")
            counts = []
            for key in ("input_tokens", "output_tokens"):
                value = raw_usage.get(key, 0)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise bad(f"'usage'[{key!r}] = {value!r}, not a non-negative int")
                counts.append(value)
            extra = [k for k in raw_usage if k not in ("input_tokens", "output_tokens")]
            if extra:
                raise bad(f"'usage' with unknown key {extra[0]!r}")
            usage = Usage(counts[0], counts[1])

        finish = result.get("finish_reason")
        if finish is None:
            finish = "tool_calls" if calls else "stop"
        elif not isinstance(finish, str):
            raise bad(f"'finish_reason' = {finish!r}, not a str")
        served = result.get("model")
        if served is None:
            served = model
        elif not isinstance(served, str):
            raise bad(f"'model' = {served!r}, not a str")

        response = LLMResponse(
            message=Message(role="assistant", content=content, tool_calls=tuple(calls)),
            finish_reason=finish,
            usage=usage,
            model=served,
            provider=self.name,
        )
        return clean_response(response)

    async def aclose(self) -> None:
        """Nothing to release (present so every provider can be closed alike)."""

    def __repr__(self) -> str:
        return f"CallableProvider({_fn_name(self.fn)}, name={self.name!r}, model={self.model!r})"


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
