"""``Scripted``: a deterministic provider with no network, for tests and demos."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeAlias

from perdure.providers.errors import ProviderError, TerminalProviderError
from perdure.providers.streams import events_from_response
from perdure.providers.types import (
    LLMRequest,
    LLMResponse,
    Message,
    StreamEvent,
    ToolCall,
    Usage,
)

__all__ = ["Reply", "Script", "Scripted"]

#: What a script may answer with: text, one tool call, several tool calls in one turn,
#: a whole assistant message, a whole response, or an exception to raise.
Reply: TypeAlias = str | ToolCall | Sequence[ToolCall] | Message | LLMResponse | BaseException

#: A list of replies (one per turn) or a function of the request (sync or async).
Script: TypeAlias = Sequence[Reply] | Callable[[LLMRequest], Reply | Awaitable[Reply]]


class Scripted:
    """A provider that answers from a script: deterministic, no network.

    ``script`` is either

    - a **sequence of replies**: the reply to a request is
      ``script[k]`` where *k* is the number of assistant messages already in
      ``request.messages``. The answer depends only on the conversation, so a process
      that crashed and replays its log asks the same question at the same turn and gets
      the same answer. Counting costs O(len(messages)) per call; past the end of the
      script the call fails with an error naming the turn and the script's length;
    - a **function** ``(LLMRequest) -> reply`` (sync or async), as cheap as the function.

    A reply is a ``str`` (text), a :class:`ToolCall` (see :meth:`call`), a list of
    tool calls (one turn calling several tools), a :class:`Message`, an
    :class:`LLMResponse` (used as is, e.g. to script usage or a finish reason), or an
    exception instance, which is raised (e.g. a ``RateLimitError`` to test retries and
    fallbacks; provider errors get this provider's name and model filled in).

    ``calls`` counts calls; with ``record=True`` ``requests`` keeps a snapshot of every
    request (its messages copied into a tuple) for tests to inspect. Each snapshot
    costs O(len(messages)) time and memory, so a run of *n* turns keeps O(n^2)
    references: pass ``record=False`` for long runs and benchmarks.
    """

    def __init__(
        self,
        script: Script,
        *,
        model: str = "scripted",
        name: str = "scripted",
        usage: Usage = Usage(10, 5),  # noqa: B008 - Usage is frozen, sharing it is safe
        record: bool = True,
    ) -> None:
        self.name = name
        self.model = model
        self.usage = usage
        self.record = record
        self.calls = 0
        self.requests: list[LLMRequest] = []
        self._function: Callable[[LLMRequest], Any] | None = None
        self._script: tuple[Reply, ...] = ()
        if isinstance(script, str | bytes):
            raise TypeError(
                "Scripted(script): pass a list of replies (e.g. ['hello']) or a function, "
                "not a bare string"
            )
        if callable(script) and not isinstance(script, Sequence):
            self._function = script
        else:
            self._script = tuple(script)
            for index, reply in enumerate(self._script):
                _check_reply(reply, where=f"script[{index}]")

    # -- readable constructors ---------------------------------------------------

    @staticmethod
    def call(
        name: str, arguments: Mapping[str, Any] | str | None = None, /, **kwargs: Any
    ) -> ToolCall:
        """A tool call with a deterministic id: ``Scripted.call("get_weather", location="Paris")``.

        Arguments come as keywords, or as a mapping (for names that are not Python
        identifiers), or as a raw string (to script arguments that are not valid JSON).
        The id is derived from the name and arguments, so it is the same in every run.
        """
        if isinstance(arguments, str):
            if kwargs:
                raise TypeError("Scripted.call: give raw string arguments or keywords, not both")
            args: dict[str, Any] | str = arguments
        else:
            args = {**(arguments or {}), **kwargs}
        digest = hashlib.sha256(
            json.dumps([name, args], sort_keys=True, default=str).encode()
        ).hexdigest()[:12]
        return ToolCall(id=f"call_{digest}", name=name, arguments=args)

    # -- the protocol ------------------------------------------------------------

    async def complete(self, request: LLMRequest) -> LLMResponse:
        """The scripted reply to ``request``."""
        self.calls += 1
        if self.record:
            self.requests.append(replace(request, messages=tuple(request.messages)))
        reply = await self._reply(request)
        return self._response(reply, request)

    async def stream(self, request: LLMRequest) -> AsyncIterator[StreamEvent]:
        """The scripted reply as word-sized text deltas, tool-call deltas, then the whole."""
        response = await self.complete(request)
        for event in events_from_response(response):
            yield event

    # -- internals ---------------------------------------------------------------

    async def _reply(self, request: LLMRequest) -> Reply:
        if self._function is not None:
            reply = self._function(request)
            if inspect.isawaitable(reply):
                reply = await reply
            _check_reply(reply, where=f"the script function's reply to call {self.calls}")
            return reply
        turn = sum(1 for message in request.messages if message.role == "assistant")
        if turn >= len(self._script):
            raise TerminalProviderError(
                f"script exhausted: the request is for turn {turn + 1} (the conversation "
                f"already has {turn} assistant messages) but the script has only "
                f"{len(self._script)} replies; add replies or script a function",
                provider=self.name,
                model=request.model or self.model,
            )
        return self._script[turn]

    def _response(self, reply: Reply, request: LLMRequest) -> LLMResponse:
        model = request.model or self.model
        if isinstance(reply, BaseException):
            if isinstance(reply, ProviderError):
                reply.provider = reply.provider or self.name
                reply.model = reply.model or model
            # The one instance is raised at every call: without this, each raise adds
            # its frames to the traceback it keeps, and with them every execution.
            raise reply.with_traceback(None)
        if isinstance(reply, LLMResponse):
            return replace(reply, model=reply.model or model, provider=reply.provider or self.name)
        if isinstance(reply, str):
            message = Message(role="assistant", content=reply)
        elif isinstance(reply, ToolCall):
            message = Message(role="assistant", tool_calls=(reply,))
        elif isinstance(reply, Message):
            message = reply
        else:
            message = Message(role="assistant", tool_calls=tuple(reply))
        message = _with_unique_ids(message)
        return LLMResponse(
            message=message,
            finish_reason="tool_calls" if message.tool_calls else "stop",
            usage=self.usage,
            model=model,
            provider=self.name,
        )

    async def aclose(self) -> None:
        """Nothing to release (present so every provider can be closed alike)."""

    def __repr__(self) -> str:
        mode = "function" if self._function is not None else f"{len(self._script)} replies"
        return f"Scripted({mode}, model={self.model!r}, name={self.name!r})"


def _check_reply(reply: object, *, where: str) -> None:
    if isinstance(reply, str | ToolCall | Message | LLMResponse | BaseException):
        if isinstance(reply, Message) and reply.role != "assistant":
            raise TypeError(
                f"Scripted: {where} is a {reply.role!r} message; replies are assistant messages"
            )
        return
    if isinstance(reply, Sequence) and reply and all(isinstance(c, ToolCall) for c in reply):
        return
    raise TypeError(
        f"Scripted: {where} is {reply!r}; a reply is a str, a ToolCall, a list of ToolCalls, "
        "a Message, an LLMResponse or an exception instance"
    )


def _with_unique_ids(message: Message) -> Message:
    # Two identical calls in one turn (same name and arguments) would get the same
    # deterministic id; real APIs never repeat an id within a turn, so neither do we.
    seen: set[str] = set()
    calls = []
    changed = False
    for position, call in enumerate(message.tool_calls):
        if call.id in seen:
            call = replace(call, id=f"{call.id}_{position}")
            changed = True
        seen.add(call.id)
        calls.append(call)
    return replace(message, tool_calls=tuple(calls)) if changed else message
