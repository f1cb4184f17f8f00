"""Building streams from responses and responses from streams.

- :func:`events_from_response` turns a whole response into the events of a stream
  (word-sized text deltas, one delta per tool call, then ``ResponseCompleted``): what
  providers without native streaming (Scripted, CallableProvider) yield.
- :class:`ResponseAssembler` accumulates text and tool-call deltas (by index) into the
  final response: what the OpenAI and Anthropic adapters build while streaming.
- :func:`parse_arguments` decodes tool-call arguments, keeping invalid JSON verbatim.
- :func:`distinct_call_ids` gives every tool call of a turn an id of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from perdure.providers.errors import MalformedResponseError
from perdure.providers.types import (
    LLMResponse,
    Message,
    ResponseCompleted,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__all__ = [
    "MAX_ARGUMENT_DEPTH",
    "ResponseAssembler",
    "closing",
    "arguments_json",
    "distinct_call_ids",
    "used_call_ids",
    "events_from_response",
    "parse_arguments",
    "shallow",
    "split_words",
]

T = TypeVar("T")

_WORD = re.compile(r"\s*\S+|\s+")


def split_words(text: str) -> list[str]:
    """``text`` cut into word-sized pieces (each word with its leading whitespace).

    The pieces join back to ``text`` exactly.
    """
    return _WORD.findall(text)


def parse_arguments(text: str) -> dict[str, Any] | str:
    """Tool-call arguments from their JSON text.

    A JSON object becomes a dict; empty text means no arguments (``{}``); an object
    encoded twice (a JSON string holding it, as some servers send) is decoded twice.
    Anything else (invalid JSON -- ``NaN`` and ``Infinity`` included, which no strict
    parser takes back --, a JSON list or number, an object nested more than
    :data:`MAX_ARGUMENT_DEPTH` deep) is kept verbatim as a ``str`` so the runtime can
    tell the model its arguments were invalid instead of failing the step.
    """
    if not text.strip():
        return {}
    try:
        value = _strict_json(text)
        if isinstance(value, str) and value.lstrip().startswith("{"):
            value = _strict_json(value)
    except (ValueError, RecursionError):
        return text
    if not isinstance(value, dict) or not shallow(value):
        return text
    return value


def _strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=_not_json)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


#: Arguments nested deeper than this are kept as text: what walks them later (the
#: cleaning of a response, the next request's JSON, a tool's schema check) recurses
#: once per level, and would fail near Python's recursion limit.
MAX_ARGUMENT_DEPTH = 100


def shallow(value: Any, limit: int = MAX_ARGUMENT_DEPTH) -> bool:
    """True if ``value`` (decoded JSON) nests at most ``limit`` containers deep."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return True


def arguments_json(arguments: dict[str, Any] | str) -> str:
    """The JSON text of tool-call arguments (a raw string is sent back verbatim)."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def distinct_call_ids(ids: Sequence[str | None], taken: Iterable[str] = ()) -> list[str]:
    """The ids of one turn's tool calls, each present and unique, derived deterministically.

    ``ids`` are what the server sent, in call order; ``taken`` the ids already used in
    the conversation (the ids of earlier turns' calls). An id that is present and new is
    kept. A missing or empty one becomes ``call_N`` and one already used becomes
    ``ID_N``, where ``N`` counts the calls of the conversation up to this one (so the
    first call of a first turn is ``call_0``), raised until the id is new. Nothing
    random: the same conversation and the same answer give the same ids, so a request
    rebuilt from the log is the one first sent.

    Why it matters: each tool result is paired with its call by this id in the next
    request. Some servers send no id (older llama.cpp builds, Jan), one id for every
    call of a turn, or the same ids in every turn; two results under one id are
    indistinguishable to the model, and Anthropic refuses a conversation whose
    ``tool_use`` ids repeat (which a :class:`~perdure.providers.Fallback` may send it).
    """
    used = set(taken)
    first = len(used)
    kept: list[str | None] = []
    for given in ids:
        # Every id worth keeping is reserved before any is made up, so a made-up id
        # never takes one the server gives a later call of the turn.
        if given and given not in used:
            used.add(given)
            kept.append(given)
        else:
            kept.append(None)
    out: list[str] = []
    for position, (given, call_id) in enumerate(zip(ids, kept, strict=True)):
        if call_id is None:
            base = given or "call"
            number = first + position
            call_id = f"{base}_{number}"
            while call_id in used:
                number += 1
                call_id = f"{base}_{number}"
            used.add(call_id)
        out.append(call_id)
    return out


def used_call_ids(messages: Iterable[Message]) -> frozenset[str]:
    """The tool-call ids a conversation already uses (``taken`` for :func:`distinct_call_ids`)."""
    return frozenset(call.id for message in messages for call in message.tool_calls)


def events_from_response(response: LLMResponse) -> Iterator[StreamEvent]:
    """The stream a provider without native streaming yields for ``response``."""
    for word in split_words(response.message.content):
        yield TextDelta(word)
    for index, call in enumerate(response.message.tool_calls):
        yield ToolCallDelta(
            index=index, id=call.id, name=call.name, arguments=arguments_json(call.arguments)
        )
    yield ResponseCompleted(response)


class ResponseAssembler:
    """Accumulates streamed deltas into an :class:`LLMResponse`.

    Tool-call pieces are keyed by their index in the turn: the first piece of a call
    carries its id and name, later pieces append to its JSON arguments.
    """

    def __init__(self) -> None:
        self._text: list[str] = []
        self._calls: dict[int, list[Any]] = {}  # index -> [id, name, [argument pieces]]

    def add_text(self, text: str) -> None:
        """Append assistant text."""
        if text:
            self._text.append(text)

    def add_tool_call(self, delta: ToolCallDelta) -> None:
        """Merge one tool-call piece."""
        entry = self._calls.setdefault(delta.index, [None, None, []])
        if delta.id:
            entry[0] = delta.id
        if delta.name and not entry[1]:
            entry[1] = delta.name
        if delta.arguments:
            entry[2].append(delta.arguments)

    @property
    def text(self) -> str:
        """The text so far."""
        return "".join(self._text)

    def tool_calls(self, taken: Iterable[str] = ()) -> tuple[ToolCall, ...]:
        """The tool calls so far, in index order, arguments decoded.

        Ids are made present and unique by :func:`distinct_call_ids` (``taken``: the
        ids the conversation already uses). A call whose name has not arrived (yet) has
        the name ``""``; :meth:`build` refuses such a call.
        """
        entries = [self._calls[index] for index in sorted(self._calls)]
        ids = distinct_call_ids([entry[0] for entry in entries], taken)
        return tuple(
            ToolCall(id=call_id, name=name or "", arguments=parse_arguments("".join(pieces)))
            for call_id, (_, name, pieces) in zip(ids, entries, strict=True)
        )

    def build(
        self,
        *,
        finish_reason: str,
        usage: Usage,
        model: str,
        provider: str,
        where: str = "",
        taken: Iterable[str] = (),
    ) -> LLMResponse:
        """The assembled response (``taken``: see :meth:`tool_calls`).

        Raises :class:`MalformedResponseError` for a tool call that never got a name, as
        the non-streaming paths do for an unnamed call (``where``, e.g. the server's URL,
        is named in the message).
        """
        calls = self.tool_calls(taken)
        for position, call in enumerate(calls):
            if not call.name:
                origin = f" (from {where})" if where else ""
                raise MalformedResponseError(
                    f"streamed tool call {position} has no function name{origin}",
                    provider=provider,
                    model=model,
                )
        return LLMResponse(
            message=Message(role="assistant", content=self.text, tool_calls=calls),
            finish_reason=finish_reason,
            usage=usage,
            model=model,
            provider=provider,
        )


@asynccontextmanager
async def closing(stream: AsyncIterator[T]) -> AsyncGenerator[AsyncIterator[T], None]:
    """Use ``stream``, then close it (if it can be closed) however the block ends.

    Like :func:`contextlib.aclosing`, but a stream without ``aclose`` (any async
    iterator satisfies the provider protocol) is accepted. Closing at once matters: an
    abandoned stream would otherwise hold its HTTP response open until garbage
    collection.
    """
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
