"""Tools: plain Python functions the model may call, each call a durable step.

``@tool`` turns a function into a :class:`Tool` with a JSON Schema derived from its type
hints and docstring. Arguments from the model are validated against that schema before
the tool runs; invalid ones are returned to the model as an error, never passed on.
Sync tools run in worker threads so they never block the event loop; async tools run in
the execution's task group. A tool is async when the code it runs is a coroutine
function: an ``async def`` function or method, a ``functools.partial`` of one, or an
instance of a class with an ``async def __call__``. A tool that returns an awaitable
instead of a result (a sync wrapper of an async function that hides it, not having used
``functools.wraps``) fails that call with a :class:`ToolError` saying so; a coroutine it
returned is closed, never left for the garbage collector to warn about.
"""

from __future__ import annotations

import copy
import datetime
import functools
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, overload

import anyio

from perdure.context import _current
from perdure.errors import AgentDefinitionError, ToolArgumentsError, ToolError
from perdure.fingerprint import code_digest, digest, short_json
from perdure.json_schema import (
    callable_doc,
    callable_function,
    doc_summary,
    schema_for_callable,
    validate,
)
from perdure.providers.types import ToolSpec
from perdure.timers import timeout_seconds

__all__ = ["ConfirmationRule", "Tool", "closed_awaitable", "fresh_arguments", "tool"]

#: A rule that says whether one call (given its arguments) needs a person's confirmation.
ConfirmationRule = Callable[[dict[str, Any]], Any]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Tool:
    """A function the model may call, with everything the runtime needs to call it safely.

    Calling the tool object directly (``get_weather("Paris")``) calls the function, which
    keeps tools easy to unit-test.
    """

    __slots__ = (
        "__dict__",
        "approval_timeout",
        "description",
        "fn",
        "idempotent",
        "is_async",
        "name",
        "parameters",
        "requires_confirmation",
        "retries",
        "retry_delay",
        "timeout",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        requires_confirmation: bool | ConfirmationRule = False,
        idempotent: bool = True,
        timeout: float | None = None,
        retries: int = 0,
        retry_delay: float = 0.5,
        parameters: Mapping[str, Any] | None = None,
        approval_timeout: float | datetime.timedelta | None = None,
    ) -> None:
        self.fn = fn
        self.name = name or _default_name(fn)
        if not _NAME.match(self.name):
            raise AgentDefinitionError(
                f"tool name {self.name!r} is not accepted by model APIs: use 1-64 letters, "
                f"digits, '_' or '-'"
            )
        self.description = description if description is not None else doc_summary(callable_doc(fn))
        if not isinstance(requires_confirmation, bool):
            if not callable(requires_confirmation):
                raise AgentDefinitionError(
                    f"tool {self.name!r}: requires_confirmation must be True, False or a "
                    f"function of the call's arguments, got "
                    f"{type(requires_confirmation).__name__}"
                )
            if inspect.iscoroutinefunction(callable_function(requires_confirmation)):
                # Its verdict would be a coroutine, which nothing awaits: refused here
                # rather than blocking (or waving through) every call at run time.
                raise AgentDefinitionError(
                    f"tool {self.name!r}: requires_confirmation must be a plain function "
                    f"(def, not async def): it is called before each call of the tool"
                )
        self.requires_confirmation = requires_confirmation
        self.idempotent = idempotent
        if timeout is not None and timeout <= 0:
            raise AgentDefinitionError(f"tool {self.name!r}: timeout must be > 0, got {timeout}")
        self.timeout = timeout
        if retries < 0:
            raise AgentDefinitionError(f"tool {self.name!r}: retries must be >= 0")
        if retries and not idempotent:
            # An exception may come after the effect (a timeout on the response, say):
            # re-invoking would do it twice, which idempotent=False says must not happen.
            raise AgentDefinitionError(
                f"tool {self.name!r}: retries={retries} with idempotent=False: a retry "
                f"re-invokes the tool after an exception, which may have been raised after "
                f"its effect happened. Set retries=0 (a failure then goes back to the "
                f"model, which may call again), or make the tool honour "
                f"current_idempotency_key() and declare it idempotent=True"
            )
        self.retries = retries
        self.retry_delay = retry_delay
        try:
            # Not part of the definition (changing it is not drift): each call's expiry is
            # fixed in its approval.requested record when it starts to wait.
            self.approval_timeout = timeout_seconds(approval_timeout, "approval_timeout")
        except (TypeError, ValueError) as exc:
            raise AgentDefinitionError(f"tool {self.name!r}: {exc}") from None
        self.parameters = (
            dict(parameters)
            if parameters is not None
            else schema_for_callable(fn, tool_name=self.name)
        )
        # Of the code that runs, not of fn: inspect.iscoroutinefunction is False for an
        # instance whose class has an async __call__, which would run in a worker thread
        # and "return" a coroutine that nothing awaits.
        self.is_async = inspect.iscoroutinefunction(callable_function(fn))
        # A callable instance's attributes are its state, not metadata: merged into this
        # object's __dict__ they could shadow methods (an instance with a ``spec``).
        updated = functools.WRAPPER_UPDATES if inspect.isroutine(fn) else ()
        functools.update_wrapper(self, fn, updated=updated)  # type: ignore[arg-type]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def spec(self) -> ToolSpec:
        """What the model is told about this tool."""
        return ToolSpec(self.name, self.description, self.parameters)

    def confirmation_needed(self, arguments: Mapping[str, Any]) -> str | None:
        """Why a call with these (checked) arguments waits for a person, or None.

        A rule that raises, or returns an awaitable, makes the call wait too: a check
        that cannot run must not let the call through; the message says it broke.
        """
        rule = self.requires_confirmation
        if rule is True:
            return f"tool {self.name!r} requires confirmation"
        if rule is False:
            return None
        try:
            # A copy: the arguments are recorded, the rule must not change them.
            verdict = rule(dict(fresh_arguments(arguments)))
        except Exception as exc:
            return (
                f"tool {self.name!r}: its requires_confirmation rule raised "
                f"{type(exc).__name__}: {exc} (a bug in the rule; the call waits for a "
                f"decision: approve or reject it)"
            )
        if closed_awaitable(verdict):
            return (
                f"tool {self.name!r}: its requires_confirmation rule returned an awaitable "
                f"(rules are plain functions), so the call waits for a decision"
            )
        if verdict:
            return f"tool {self.name!r} requires confirmation for these arguments"
        return None

    def check_arguments(self, arguments: Any) -> dict[str, Any]:
        """The arguments as a dict if they match the schema; else ToolArgumentsError."""
        if isinstance(arguments, str):
            raise ToolArgumentsError(
                f"arguments for tool {self.name!r} must be a JSON object; got text that is "
                f"not one: {arguments[:80]!r}"
            )
        if not isinstance(arguments, dict):
            raise ToolArgumentsError(
                f"arguments for tool {self.name!r} must be a JSON object, got "
                f"{type(arguments).__name__}"
            )
        validate(arguments, self.parameters)
        return arguments

    @functools.cached_property
    def fingerprint(self) -> dict[str, str]:
        """Digests of each part of the tool a recorded call depends on."""
        return {
            "description": digest(self.description),
            "schema": digest(self.parameters),
            "code": code_digest(self.fn),
        }

    @functools.cached_property
    def schema_text(self) -> str | None:
        """The schema as compact JSON if short enough to show in a drift report."""
        return short_json(self.parameters)

    @functools.cached_property
    def fingerprint_digest(self) -> str:
        """One digest over the whole fingerprint (recorded with every call)."""
        return digest([self.name, self.fingerprint])

    async def invoke(
        self,
        arguments: Mapping[str, Any],
        run_in_thread: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
    ) -> Any:
        """Run the function once with ``arguments`` (sync functions in a worker thread).

        ``run_in_thread`` is how the runtime runs sync tools (its own thread pool); by
        default anyio's worker threads are used.
        """
        # The tool gets its own copy: the recorded arguments are also the live
        # transcript's, and a tool that appended to a list argument would otherwise
        # change the conversation in a way replay (which decodes the log) never sees.
        arguments = fresh_arguments(arguments)
        if self.is_async:
            result = await self.fn(**arguments)
        else:
            call = functools.partial(self.fn, **arguments)
            if run_in_thread is not None:
                result = await run_in_thread(call)
            else:
                # abandon_on_cancel: a timeout or a cancel must be able to give up on a
                # thread we cannot interrupt; it finishes on its own, its result discarded.
                result = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        # The type test first: the usual results skip the slower awaitable check.
        if type(result) not in _PLAIN_RESULT_TYPES and inspect.isawaitable(result):
            raise self._awaitable_returned(result)
        return result

    def _awaitable_returned(self, result: Any) -> ToolError:
        ctx = _current.get()
        where = f"tool {self.name!r}"
        if ctx is not None:
            where = f"execution {ctx.execution_id!r} step {ctx.step} ({where})"
        if inspect.iscoroutine(result):
            # Never started, so closing runs none of its code; left alone, it would be
            # collected with a "coroutine ... was never awaited" RuntimeWarning.
            result.close()
            what = "a coroutine"
            fate = (
                "so that code never ran"
                if self.is_async
                else "so the async code it wraps never ran"
            )
        else:
            what, fate = f"an awaitable ({_kind(result)})", "which was never awaited"
            cancel = getattr(result, "cancel", None)
            if callable(cancel):
                # A task or future may already be running: the step is over, so it must
                # not go on doing things nobody will see the outcome of.
                cancel()
                fate = "which was cancelled (its code may have started)"
        if self.is_async:
            return ToolError(
                f"{where}: the tool returned {what} instead of its result, {fate}; await it "
                f"inside the tool and return what it gives"
            )
        return ToolError(
            f"{where}: a sync function returned {what} instead of a result, {fate}; "
            f"declare it `async def`, or keep its signature with functools.wraps so that "
            f"perdure sees the async function and awaits it"
        )


def _default_name(fn: Callable[..., Any]) -> str:
    # A partial is named after its function, a callable instance after its class.
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def closed_awaitable(value: object) -> bool:
    """Whether a check's verdict is an awaitable (the check is ``async def``); closed
    first, so Python does not warn that it was never awaited.

    Checks (contracts, confirmation rules) are plain functions whose verdict is taken
    as a bool, and a coroutine object is truthy: the caller blocks the call instead of
    letting an unrun check decide it.
    """
    if not inspect.isawaitable(value):
        return False
    close = getattr(value, "close", None)
    if close is not None:
        close()
    return True


def fresh_arguments(arguments: Mapping[str, Any]) -> Mapping[str, Any]:
    """``arguments`` with every nested container copied (itself if it holds none).

    Calling ``fn(**arguments)`` already copies the top level, so the common call with
    scalar arguments costs one scan of the values and no copy.
    """
    scalar = _SCALAR_TYPES
    for value in arguments.values():
        if type(value) not in scalar:
            return {k: _copy(v) for k, v in arguments.items()}
    return arguments


_SCALARS = (str, int, float, bool, bytes, type(None))
_SCALAR_TYPES = frozenset(_SCALARS)
_PLAIN_RESULT_TYPES = _SCALAR_TYPES | {dict, list}


def _kind(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _copy(value: Any) -> Any:
    # Arguments decoded from a model's JSON hold only dicts, lists and scalars; copy
    # those by hand (several times faster than deepcopy), anything else with deepcopy.
    if isinstance(value, _SCALARS):
        return value
    kind = type(value)
    if kind is dict:
        return {k: _copy(v) for k, v in value.items()}
    if kind is list:
        return [_copy(v) for v in value]
    if kind is tuple:
        return tuple(_copy(v) for v in value)
    return copy.deepcopy(value)


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    name: str | None = None,
    *,
    description: str | None = None,
    requires_confirmation: bool | ConfirmationRule = False,
    idempotent: bool = True,
    timeout: float | None = None,
    retries: int = 0,
    retry_delay: float = 0.5,
    approval_timeout: float | datetime.timedelta | None = None,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    name: str | Callable[..., Any] | None = None,
    *,
    description: str | None = None,
    requires_confirmation: bool | ConfirmationRule = False,
    idempotent: bool = True,
    timeout: float | None = None,
    retries: int = 0,
    retry_delay: float = 0.5,
    approval_timeout: float | datetime.timedelta | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Declare a tool: ``@tool`` or ``@tool("name", description=..., ...)``.

    - ``requires_confirmation``: the execution suspends before the call until a person
      approves (``rt.approve``) or rejects it (``rt.reject``, returned to the model).
      ``True`` for every call, or a plain function of the call's (validated) arguments
      that says whether this call needs it (``lambda a: a["amount"] > 1000``); its
      verdict is recorded (the call's ``approval.requested``, or its start), so replay
      never asks it again. A rule that raises makes the call wait, the message saying so.
    - ``idempotent``: if the process dies inside the call, re-invoke it with the same
      idempotency key on recovery (True), or suspend with reason ``unknown_outcome`` for
      a person to decide (False).
    - ``timeout``: seconds before the call is abandoned and reported to the model as a
      timeout (a sync tool's thread cannot be interrupted and finishes in the background).
    - ``retries``: extra attempts after an exception (``ToolError`` excepted), with
      exponential delays from ``retry_delay``, all under the same idempotency key.
      Refused for ``idempotent=False`` tools: an exception may follow the effect.
    - ``approval_timeout``: seconds (or a ``timedelta``) a call of this tool may wait
      for a person's decision (its confirmation, or an override of a contract that
      blocked it); when it passes undecided, the call is rejected (``by="timeout"``)
      and the model is told, as for ``rt.reject``. None (the default) waits for ever,
      unless the agent sets ``Agent(approval_timeout=...)``.
    """
    if callable(name):
        return Tool(name)

    def wrap(fn: Callable[..., Any]) -> Tool:
        return Tool(
            fn,
            name=name,
            description=description,
            requires_confirmation=requires_confirmation,
            idempotent=idempotent,
            timeout=timeout,
            retries=retries,
            retry_delay=retry_delay,
            approval_timeout=approval_timeout,
        )

    return wrap
