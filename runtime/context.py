"""What a running tool can know about the step it runs in (context variables only).

``current_idempotency_key()`` is the one promise tools build on: the same value on every
attempt of the same tool call (derived from the execution, its run and the step), a
different value for every other call. Pass it to downstream APIs that deduplicate
(payment providers, ``INSERT ... ON CONFLICT DO NOTHING``) and a re-invoked tool cannot
repeat its effect.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from perdure.errors import SignalTimeout

__all__ = [
    "SuspendExecution",
    "ToolContext",
    "current_execution_id",
    "current_idempotency_key",
    "current_step",
    "current_tool_context",
    "sleep",
    "sleep_until",
    "timer_name",
    "wait_for_signal",
]


@dataclass(frozen=True, slots=True)
class ToolContext:
    """The step a tool call runs in."""

    execution_id: str
    step: int
    tool: str
    idempotency_key: str
    attempt: int
    signals: Mapping[str, Any] = field(default_factory=dict)
    #: The runtime's services, for built-in tools (delegation); not public API.
    services: Any = None
    #: How many timers this invocation has asked for so far (see :func:`sleep`): a
    #: one-item list, so the frozen context can count. Each invocation has its own.
    timers: list[int] = field(default_factory=lambda: [0])


@dataclass(frozen=True, slots=True)
class ChildCharge:
    """A delegate call's outcome with what its child used (not public API).

    The delegation service returns it (or attaches it, as ``charge``, to the ToolError
    it raises for a failed child); the engine records the usage as charged to the
    caller in the same append as the call's outcome, so it is charged exactly once.
    """

    value: Any
    child: str
    usage: Mapping[str, Any]


_current: ContextVar[ToolContext | None] = ContextVar("perdure_tool_context", default=None)


def current_tool_context() -> ToolContext:
    """The context of the tool call running now; RuntimeError outside a tool."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError(
            "no perdure tool call is running here: current_idempotency_key() and friends "
            "work only inside a tool invoked by the runtime"
        )
    return ctx


def current_idempotency_key() -> str:
    """The idempotency key of the running tool call: stable across its retries."""
    return current_tool_context().idempotency_key


def current_execution_id() -> str:
    """The id of the execution whose tool call is running."""
    return current_tool_context().execution_id


def current_step() -> int:
    """The step number of the running tool call."""
    return current_tool_context().step


class SuspendExecution(BaseException):
    """Control flow: the execution must wait (for a signal); never catch it.

    It derives from BaseException so that ``except Exception`` in user code cannot
    swallow it, the same way trio's ``Cancelled`` works.
    """

    def __init__(self, kind: str, detail: Mapping[str, Any]) -> None:
        super().__init__(kind, dict(detail))
        self.kind = kind
        self.detail = dict(detail)


def wait_for_signal(name: str, *, timeout: float | None = None) -> Any:
    """Inside a tool: the payload of the signal ``name``, or suspend until it arrives.

    The first call suspends the execution (no task, no memory); when
    ``rt.signal(execution_id, name, payload)`` arrives, the execution resumes and the
    tool is invoked again from the top with the same idempotency key, and this time
    ``wait_for_signal`` returns the payload. Call it before any side effect of the tool,
    and give each wait its own name (e.g. include the idempotency key): a name is
    satisfied by the first signal of that name the execution receives.

    With ``timeout`` (seconds), the wait is also a durable timer (see :func:`sleep`):
    if the timer fires first, the tool is invoked again and this call raises
    :class:`~perdure.errors.SignalTimeout` (a signal that arrived by then wins).
    """
    if timeout is not None:
        _check_seconds("wait_for_signal(timeout=...)", timeout)
    ctx = current_tool_context()
    if timeout is None:
        if name in ctx.signals:
            return ctx.signals[name]
        raise SuspendExecution("signal", {"name": name, "step": ctx.step, "tool": ctx.tool})
    # A timed wait takes a timer number as a sleep does, signal or not: the names of
    # the timers after it are the same on every invocation.
    n = ctx.timers[0]
    ctx.timers[0] = n + 1
    if name in ctx.signals:
        return ctx.signals[name]
    timer = timer_name(ctx.step, n)
    if timer not in ctx.signals:
        now = getattr(ctx.services, "wall_clock", time.time)()
        if timeout > 0:
            detail = {"name": name, "step": ctx.step, "tool": ctx.tool}
            detail.update(timer=timer, until=now + float(timeout))
            raise SuspendExecution("signal", detail)
    raise SignalTimeout(
        f"execution {ctx.execution_id!r} step {ctx.step} (tool {ctx.tool!r}): no signal "
        f"{name!r} within {timeout:g}s",
        name,
        float(timeout),
    )


def _check_seconds(what: str, seconds: Any) -> None:
    """Refuse a duration that is not a finite number of seconds >= 0."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"perdure.{what} takes a number of seconds, not {seconds!r}")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(
            f"perdure.{what} takes a finite number of seconds >= 0, not {seconds!r}"
            + ("; to wait without a deadline use wait_for_signal()" if seconds > 0 else "")
        )


def timer_name(step: int, n: int) -> str:
    """The signal name of the ``n``-th timer (from 0) a tool call at ``step`` asks for."""
    return f"timer:{step}:{n}"


def sleep(seconds: float) -> None:
    """Inside a tool: wait ``seconds`` durably, then return.

    The execution suspends (no task, no memory beyond its index entry) with reason
    ``timer``; the runtime that owns the data dir fires the timer at or after the
    deadline (at its next open if none runs then) and the tool is invoked again from
    the top with the same idempotency key, this ``sleep`` then returning at once. So
    the code before the sleep runs again: put sleeps first, or in a tool of their own.
    ``sleep(0)`` returns at once. Raises TypeError for a non-number and ValueError for
    a negative, NaN or infinite duration.
    """
    _check_seconds("sleep()", seconds)
    ctx = current_tool_context()
    _timer(ctx, lambda now: now + float(seconds))


def sleep_until(timestamp: float | datetime.datetime) -> None:
    """Inside a tool: wait durably until ``timestamp``, then return (see :func:`sleep`).

    ``timestamp`` is wall-clock time: seconds since the epoch (as ``time.time()``) or a
    timezone-aware ``datetime``. A deadline already past returns at once. Raises
    TypeError for anything else and ValueError for a naive datetime, NaN or infinity.
    """
    if isinstance(timestamp, datetime.datetime):
        if timestamp.tzinfo is None or timestamp.utcoffset() is None:
            raise ValueError(
                f"perdure.sleep_until() needs a timezone-aware datetime, not the naive "
                f"{timestamp!r} (whose time zone is anyone's guess): add tzinfo"
            )
        until = timestamp.timestamp()
    elif isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        raise TypeError(
            f"perdure.sleep_until() takes seconds since the epoch or an aware datetime, "
            f"not {timestamp!r}"
        )
    elif math.isnan(timestamp) or math.isinf(timestamp):
        raise ValueError(f"perdure.sleep_until() takes a finite timestamp, not {timestamp!r}")
    else:
        until = float(timestamp)
    ctx = current_tool_context()
    _timer(ctx, lambda now: until)


def _timer(ctx: ToolContext, deadline: Any) -> None:
    """Ask for the invocation's next timer: return if it fired or its deadline is past,
    else suspend until it fires. ``deadline(now)`` gives the deadline."""
    # Every call takes a number, also one that returns at once: the names of the timers
    # after it are then the same on every invocation of this call.
    n = ctx.timers[0]
    ctx.timers[0] = n + 1
    name = timer_name(ctx.step, n)
    if name in ctx.signals:
        return
    # The runtime's wall clock (tests move it); time.time outside a runtime's services.
    now = getattr(ctx.services, "wall_clock", time.time)()
    until = deadline(now)
    if until <= now:
        return
    raise SuspendExecution(
        "timer", {"name": name, "step": ctx.step, "tool": ctx.tool, "until": until}
    )
