"""What users get back: a Result per execution, suspension reasons, index entries."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from perdure.budget import ExecutionUsage
from perdure.providers.types import Message
from perdure.state import ExecutionState

__all__ = ["ExecutionInfo", "Result", "SuspendReason"]


@dataclass(frozen=True, slots=True)
class SuspendReason:
    """Why an execution waits. ``kind`` is one of:

    - ``approval``: a tool requires confirmation (``confirmation_id``, ``tool``,
      ``arguments``); decide with ``rt.approve`` / ``rt.reject``. With an approval
      timeout, also ``until`` (when it is rejected undecided) and ``timer``.
    - ``contract``: a contract blocked a call (``contract``, ``message``); approve to
      override, reject to tell the model (``until`` and ``timer`` as for approval).
    - ``budget``: a limit was reached (``limit``, ``limit_value``, ``used``, counting
      what its finished children used, ``delegated``); raise it with
      ``rt.resume(execution_id, budget=Budget(...))``. When the limit is what its
      parent had left (``parent``; ``origin``, the execution whose budget it is),
      ``message`` says so: raise the origin's budget and it is handed down.
    - ``unknown_outcome``: a non-idempotent tool was interrupted (``tool``, ``step``,
      ``key``); decide with ``rt.resolve``.
    - ``drift``: the agent changed since the log was written (``changes``); accept with
      ``rt.resume(execution_id, accept_drift=True)``.
    - ``signal``: a tool waits for ``rt.signal(execution_id, name, ...)`` (``name``);
      with a timeout (``wait_for_signal(name, timeout=...)``) also ``until`` and
      ``timer``, the signal its timeout fires under.
    - ``timer``: a tool sleeps (``perdure.sleep``) until ``until`` (seconds since the
      epoch); its timer's signal is ``name``. It resumes by itself then.
    - ``child``: a delegated child execution is running (``child_id``). From
      ``rt.result`` it also has ``child``: the child as of now (``status``,
      ``status_text`` such as ``"suspended (approval c-1a2b)"``, ``reason``,
      ``confirmations``), so a child's approval shows from the parent; when that
      child itself waits on a child (and so on), ``child["blocked_at"]`` is the
      execution deepest down the chain, described the same way (a grandchild's
      approval, say), and ``status_text`` names it.

    ``pending`` lists every blocker when more than one call waits.
    """

    kind: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.details[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def confirmation_id(self) -> str | None:
        """The confirmation to approve or reject (approval and contract)."""
        return self.details.get("confirmation_id")

    @property
    def pending(self) -> list[Mapping[str, Any]]:
        """Every blocker, in call order."""
        return list(self.details.get("pending", [self.details]))

    @classmethod
    def from_dict(cls, reason: Mapping[str, Any] | None) -> SuspendReason | None:
        """From a recorded reason dict."""
        if reason is None:
            return None
        return cls(reason["kind"], dict(reason))

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return dict(self.details)


@dataclass(frozen=True, slots=True)
class Result:
    """The state of an execution as of now (final when completed, failed or cancelled)."""

    execution_id: str
    agent: str
    status: str
    output: str | None
    suspend_reason: SuspendReason | None
    error: Mapping[str, Any] | None
    #: What this execution used itself (its own LLM and tool calls).
    usage: ExecutionUsage
    steps: int
    transcript: tuple[Message, ...] = ()
    #: What its finished delegated children used, theirs included (charged to it).
    delegated_usage: ExecutionUsage = field(default_factory=ExecutionUsage)
    #: Why it was cancelled, as the canceller said (None unless cancelled).
    cancel_reason: str | None = None
    #: Who cancelled it: "api", "cli", "deadline" (its execution timeout passed), ...
    cancelled_by: str | None = None
    #: When its execution timeout cancels it, as a UTC datetime; None: no timeout.
    deadline: datetime.datetime | None = None

    @property
    def total_usage(self) -> ExecutionUsage:
        """``usage`` plus ``delegated_usage``: what its budget is checked against."""
        return self.usage.plus(self.delegated_usage)

    @property
    def is_suspended(self) -> bool:
        """True if the execution waits for a signal (see ``suspend_reason``)."""
        return self.status == "suspended"

    @property
    def is_completed(self) -> bool:
        """True if the model gave its final answer (``output``)."""
        return self.status == "completed"

    @property
    def is_failed(self) -> bool:
        """True if the execution failed (see ``error``)."""
        return self.status == "failed"

    @property
    def is_cancelled(self) -> bool:
        """True if the execution was cancelled (see ``cancel_reason``, ``cancelled_by``)."""
        return self.status == "cancelled"

    @classmethod
    def from_state(cls, state: ExecutionState, status: str | None = None) -> Result:
        """A snapshot of ``state``."""
        usage = ExecutionUsage.from_dict(state.usage.to_dict())
        return cls(
            execution_id=state.execution_id,
            agent=state.agent,
            status=status or state.status,
            output=state.output,
            suspend_reason=SuspendReason.from_dict(state.suspend_reason),
            error=state.error,
            usage=usage,
            steps=state.step,
            transcript=tuple(state.messages),
            delegated_usage=ExecutionUsage.from_dict(state.delegated.to_dict())
            if state.delegated is not None
            else ExecutionUsage(),
            cancel_reason=state.cancel_reason,
            cancelled_by=state.cancelled_by,
            deadline=_utc(state.deadline),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-friendly)."""
        return {
            "execution_id": self.execution_id,
            "agent": self.agent,
            "status": self.status,
            "output": self.output,
            "suspend_reason": self.suspend_reason.to_dict() if self.suspend_reason else None,
            "error": dict(self.error) if self.error else None,
            "usage": self.usage.to_dict(),
            "delegated_usage": self.delegated_usage.to_dict(),
            "steps": self.steps,
            "cancel_reason": self.cancel_reason,
            "cancelled_by": self.cancelled_by,
            "deadline": self.deadline.isoformat() if self.deadline else None,
        }


@dataclass(frozen=True, slots=True)
class ExecutionInfo:
    """One execution as the index sees it (cheap: no replay)."""

    execution_id: str
    agent: str
    status: str
    reason: str | None
    steps: int
    llm_calls: int
    tool_calls: int
    tokens: int
    dollars: float
    parent: str | None
    created_at: float
    updated_at: float
    confirmations: tuple[str, ...] = ()
    #: The child executions it waits for (suspended for ``child``).
    waiting_on: tuple[str, ...] = ()
    #: What its finished children cost, charged to it (``dollars`` is its own spend, so
    #: summing ``dollars`` over every execution counts each dollar once).
    delegated_dollars: float = 0.0
    #: When its earliest timer fires (seconds since the epoch), if it sleeps.
    wakes_at: float | None = None
    #: When its execution timeout cancels it (seconds since the epoch), if it has one.
    deadline: float | None = None

    @classmethod
    def from_index(
        cls, execution_id: str, meta: Mapping[str, Any], created_at: float, updated_at: float
    ) -> ExecutionInfo:
        """From a stream index entry."""
        return cls(
            execution_id=execution_id,
            agent=meta.get("agent", ""),
            status=meta.get("status", "unknown"),
            reason=meta.get("reason"),
            steps=meta.get("steps", 0),
            llm_calls=meta.get("llm_calls", 0),
            tool_calls=meta.get("tool_calls", 0),
            tokens=meta.get("tokens", 0),
            dollars=meta.get("dollars", 0.0),
            parent=meta.get("parent"),
            created_at=created_at,
            updated_at=updated_at,
            confirmations=tuple(meta.get("confirmations", ())),
            waiting_on=tuple(meta.get("waiting_on") or ()),
            delegated_dollars=(meta.get("delegated") or {}).get("dollars", 0.0),
            wakes_at=(meta.get("timer") or (None,))[0],
            deadline=meta.get("deadline"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-friendly)."""
        return {
            "execution_id": self.execution_id,
            "agent": self.agent,
            "status": self.status,
            "reason": self.reason,
            "steps": self.steps,
            "llm_calls": self.llm_calls,
            "tool_calls": self.tool_calls,
            "tokens": self.tokens,
            "dollars": self.dollars,
            "parent": self.parent,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "confirmations": list(self.confirmations),
            "waiting_on": list(self.waiting_on),
            "delegated_dollars": self.delegated_dollars,
            "wakes_at": self.wakes_at,
            "deadline": self.deadline,
        }


def _utc(when: float | None) -> datetime.datetime | None:
    return None if when is None else datetime.datetime.fromtimestamp(when, datetime.UTC)
