"""What a running tool can know about the step it runs in (context variables only).

``current_idempotency_key()`` is the one promise tools build on: the same value on every
attempt of the same tool call (derived from the execution, its run and the step), a
different value for every other call. Pass it to downstream APIs that deduplicate
(payment providers, ``INSERT ... ON CONFLICT DO NOTHING``) and a re-invoked tool cannot
repeat its effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SuspendExecution",
    "ToolContext",
    "current_execution_id",
    "current_idempotency_key",
    "current_step",
    "current_tool_context",
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


def wait_for_signal(name: str) -> Any:
    """Inside a tool: the payload of the signal ``name``, or suspend until it arrives.

    The first call suspends the execution (no task, no memory); when
    ``rt.signal(execution_id, name, payload)`` arrives, the execution resumes and the
    tool is invoked again from the top with the same idempotency key, and this time
    ``wait_for_signal`` returns the payload. Call it before any side effect of the tool,
    and give each wait its own name (e.g. include the idempotency key): a name is
    satisfied by the first signal of that name the execution receives.
    """
    ctx = current_tool_context()
    if name in ctx.signals:
        return ctx.signals[name]
    raise SuspendExecution("signal", {"name": name, "step": ctx.step, "tool": ctx.tool})
