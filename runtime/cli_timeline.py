"""The step timeline of one execution (``perdure steps``), built from its events.

A pure fold over ``(record, event)`` pairs into a list of plain-data entries, each with
the ``seq`` and ``time`` of the record that opened it and a ``kind``:

``started``, ``llm`` (model, provider, tokens, cost, latency, what it answered),
``tool`` (one per tool call: arguments, idempotency key, attempts, wakeups (how many
of those attempts began because what the call waited for arrived), outcome, result or
error, latency; updated in place by later records about the same call),
``approval`` (a call waits for a decision), ``approved`` / ``rejected``, ``waiting``
(a call waits for a signal or a child), ``signal``, ``signal_ignored``,
``budget_raised``, ``budget_inherited`` (a parent's budget handed down), ``charged`` (a
finished child's usage charged to this execution), ``resolved``, ``drift``,
``drift_accepted``, ``suspended``, ``resumed``, ``completed``, ``failed``, ``cancelled``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from perdure.events import (
    ApprovalGranted,
    ApprovalRejected,
    ApprovalRequested,
    BudgetInherited,
    BudgetRaised,
    DelegationCharged,
    DriftAccepted,
    DriftDetected,
    Event,
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionResumed,
    ExecutionStarted,
    ExecutionSuspended,
    LLMCompleted,
    SignalAwaited,
    SignalIgnored,
    SignalReceived,
    ToolCompleted,
    ToolResolved,
    ToolStarted,
)
from perdure.log.protocol import Record

__all__ = ["timeline"]


def timeline(items: Iterable[tuple[Record, Event]]) -> list[dict[str, Any]]:
    """The execution's timeline, oldest first (see the module doc for the entries)."""
    return _Builder().build(items)


class _Builder:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        # Step numbers are never reused within an execution, so they key tool calls.
        self.calls: dict[int, dict[str, Any]] = {}
        self.requested: dict[int, dict[str, Any]] = {}
        self.approvals: dict[str, dict[str, Any]] = {}

    def build(self, items: Iterable[tuple[Record, Event]]) -> list[dict[str, Any]]:
        for record, event in items:
            self.add(record, event)
        return self.entries

    def entry(self, record: Record, kind: str, **fields: Any) -> dict[str, Any]:
        item = {"seq": record.seq, "time": record.timestamp, "kind": kind, **fields}
        self.entries.append(item)
        return item

    def call(self, record: Record, step: int) -> dict[str, Any]:
        """The tool entry for ``step``, opened at ``record`` if it is the first news of it."""
        item = self.calls.get(step)
        if item is None:
            asked = self.requested.get(step, {})
            item = self.calls[step] = self.entry(
                record,
                "tool",
                step=step,
                tool=asked.get("name", "?"),
                call_id=asked.get("id"),
                arguments=asked.get("arguments"),
                key=None,
                idempotent=None,
                attempts=0,
                wakeups=0,
                status="planned",
                output=None,
                error=None,
                latency_ms=None,
            )
        return item

    def add(self, record: Record, e: Event) -> None:
        if isinstance(e, ExecutionStarted):
            self.entry(
                record,
                "started",
                agent=e.agent,
                prompt=e.prompt,
                run_id=e.run_id,
                budget=e.budget,
                parent=e.parent,
            )
        elif isinstance(e, LLMCompleted):
            response = e.response
            message = response.get("message") or {}
            usage = response.get("usage") or {}
            tool_calls = list(message.get("tool_calls") or ())
            for i, c in enumerate(tool_calls):
                self.requested[e.step + 1 + i] = c
            self.entry(
                record,
                "llm",
                step=e.step,
                model=response.get("model"),
                provider=response.get("provider"),
                input_tokens=usage.get("input", 0),
                output_tokens=usage.get("output", 0),
                cost=e.cost,
                latency_ms=e.latency_ms,
                finish=response.get("finish_reason"),
                text=message.get("content") or "",
                tool_calls=[
                    {"step": e.step + 1 + i, "name": c.get("name"), "arguments": c.get("arguments")}
                    for i, c in enumerate(tool_calls)
                ],
                fingerprint=e.fingerprint,
            )
        elif isinstance(e, ToolStarted):
            item = self.call(record, e.step)
            if item["status"] == "waiting":
                # Invoked again from the top because what it waited for (a signal, its
                # child's outcome) arrived: a new attempt on the record, not a re-run.
                item["wakeups"] += 1
            item.update(
                tool=e.tool,
                call_id=e.call_id,
                arguments=e.arguments,
                key=e.key,
                idempotent=e.idempotent,
                attempts=e.attempt,
                status="started",
                fingerprint=e.fingerprint,
            )
        elif isinstance(e, ToolCompleted):
            item = self.call(record, e.step)
            item.update(status=e.status, output=e.output, error=e.error, latency_ms=e.latency_ms)
        elif isinstance(e, ApprovalRequested):
            self.approvals[e.confirmation_id] = self.entry(
                record,
                "approval",
                step=e.step,
                confirmation_id=e.confirmation_id,
                tool=e.tool,
                arguments=e.arguments,
                gate=e.kind,
                contract=e.contract,
                message=e.message,
                expires=e.expires,
                decision=None,
            )
        elif isinstance(e, ApprovalGranted | ApprovalRejected):
            asked = self.approvals.get(e.confirmation_id)
            step = asked["step"] if asked else None
            if isinstance(e, ApprovalGranted):
                decision = "overridden" if e.override else "approved"
                self.entry(
                    record,
                    "approved",
                    step=step,
                    confirmation_id=e.confirmation_id,
                    by=e.by,
                    note=e.note,
                    override=e.override,
                )
            else:
                decision = "rejected"
                self.entry(
                    record,
                    "rejected",
                    step=step,
                    confirmation_id=e.confirmation_id,
                    by=e.by,
                    reason=e.reason,
                )
                if asked is not None:
                    item = self.call(record, asked["step"])
                    item.update(
                        tool=asked["tool"],
                        arguments=asked["arguments"],
                        status="rejected",
                        error={"type": "Rejected", "message": e.reason},
                    )
            if asked is not None and asked["decision"] is None:
                asked["decision"] = decision
        elif isinstance(e, SignalAwaited):
            self.entry(record, "waiting", step=e.step, wait=e.kind, name=e.name, detail=e.detail)
            if e.step in self.calls:
                self.calls[e.step]["status"] = "waiting"
        elif isinstance(e, SignalReceived):
            self.entry(record, "signal", name=e.name, payload=e.payload, by=e.by)
        elif isinstance(e, SignalIgnored):
            self.entry(record, "signal_ignored", name=e.name, reason=e.reason, by=e.by)
        elif isinstance(e, BudgetRaised):
            self.entry(record, "budget_raised", budget=e.budget, by=e.by)
        elif isinstance(e, BudgetInherited):
            self.entry(record, "budget_inherited", budget=e.budget, parent=e.parent, by=e.by)
        elif isinstance(e, DelegationCharged):
            self.entry(record, "charged", step=e.step, child=e.child, usage=e.usage)
        elif isinstance(e, ToolResolved):
            self.entry(
                record,
                "resolved",
                step=e.step,
                action=e.action,
                by=e.by,
                output=e.output,
                error=e.error,
            )
            item = self.call(record, e.step)
            if e.action == "retry":
                item["status"] = "retry"
            elif e.action == "complete":
                item.update(status="ok", output=e.output, error=None)
            else:
                item.update(status="error", error=e.error)
        elif isinstance(e, DriftDetected):
            self.entry(record, "drift", step=e.step, changes=e.changes, action=e.action)
        elif isinstance(e, DriftAccepted):
            self.entry(record, "drift_accepted", by=e.by)
        elif isinstance(e, ExecutionSuspended):
            self.entry(record, "suspended", reason=e.reason)
        elif isinstance(e, ExecutionResumed):
            self.entry(record, "resumed", by=e.by)
        elif isinstance(e, ExecutionCompleted):
            self.entry(record, "completed", output=e.output)
        elif isinstance(e, ExecutionFailed):
            self.entry(record, "failed", step=e.step, failure=e.kind, error=e.error)
        elif isinstance(e, ExecutionCancelled):
            self.entry(record, "cancelled", reason=e.reason, by=e.by)
        else:  # a new event type: still shown, never dropped
            self.entry(record, record.type, payload=record.payload)
