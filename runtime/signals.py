"""Signals: what they are called, how they are checked, and what they become.

Every signal travels the same way, whether ``rt.approve`` sent it in this process or
``perdure approve`` sent it from an operator's terminal: it is appended to the inbox
stream (durable at once), then the owning runtime delivers it to its execution, where
``translate`` turns it into events (an approval, a raised budget, a named signal...).
A signal that cannot apply is recorded as ``signal.ignored`` with the reason, so the
timeline shows every signal that ever arrived.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from perdure.budget import Budget
from perdure.events import (
    ApprovalGranted,
    ApprovalRejected,
    BudgetInherited,
    BudgetRaised,
    DriftAccepted,
    Event,
    ExecutionCancelled,
    ExecutionResumed,
    SignalIgnored,
    SignalReceived,
    ToolResolved,
)
from perdure.journal import INDEX_DEFAULTS, load_state
from perdure.log.protocol import EventLog
from perdure.state import TERMINAL, ExecutionState

__all__ = [
    "BUILTIN",
    "NO_NOTE",
    "SignalStatus",
    "canonical_name",
    "in_doubt_problem",
    "precheck",
    "translate",
]

#: What ``rt.signal`` reports of a signal it sent (durable in the inbox in every case):
#: ``"delivered"`` (the execution took it, or turned it down on the record), ``"held"``
#: (its delivery failed, or an earlier signal's for the same execution did: it is
#: retried, in order) or ``"pending"`` (the runtime closed before delivering it).
SignalStatus = Literal["delivered", "held", "pending"]

#: The note recorded with a contract override approved without one.
NO_NOTE = "no note given"

#: Built-in signal names (and the aliases users may send them under).
BUILTIN: dict[str, str] = {
    "approve": "approve",
    "approval": "approve",
    "reject": "reject",
    "rejection": "reject",
    "budget": "budget",
    "cancel": "cancel",
    "resolve": "resolve",
    "resume": "resume",
    "accept_drift": "accept_drift",
    # Sent by the runtime, not by people: a parent's budget changed (see translate).
    "parent_budget": "parent_budget",
}


def canonical_name(name: str) -> str:
    """The built-in a signal name stands for, or the name itself (a user signal)."""
    return BUILTIN.get(name, name)


def precheck(
    execution_id: str,
    status: str,
    confirmations: list[str],
    name: str,
    payload: Mapping[str, Any],
    *,
    usage: Mapping[str, Any] | None = None,
) -> str | None:
    """Why the signal cannot apply, judged from the index entry; None if it may.

    This is the fast check made before a signal is sent (by the runtime and the CLI),
    so an operator hears at once that a confirmation id is wrong. Delivery checks again
    against the full state, since things may change in between. ``usage`` is the
    index entry (its ``llm_calls``, ``tool_calls``, ``tokens`` and ``dollars``): given,
    a budget raise that would leave a limit at or below what is already used is
    refused too.
    """
    kind = canonical_name(name)
    if kind == "parent_budget":
        # Only the runtime hands a parent's budget down (with what the parent has left);
        # one sent by hand would grant a child limits no ancestor has.
        return (
            f"signal name {name!r} is reserved: the runtime hands a parent's budget down "
            f"under it; raise the budget where it comes from ('perdure inspect "
            f"{execution_id}' names it) with 'perdure resume ID --max-dollars N ...', or "
            f"this execution's own with 'perdure resume {execution_id} ...'"
        )
    if status in TERMINAL:
        return f"execution {execution_id!r} is {status}; it takes no more signals"
    if kind in ("approve", "reject"):
        cid = payload.get("confirmation_id")
        if not cid:
            return (
                f"{name!r} needs a confirmation_id in its payload; see 'perdure inspect "
                f"{execution_id}' for the pending ones"
            )
        if cid not in confirmations:
            pending = ", ".join(confirmations) or "none"
            return (
                f"execution {execution_id!r} has no pending confirmation {cid!r} "
                f"(pending: {pending}); see 'perdure inspect {execution_id}'"
            )
    if kind == "resolve" and payload.get("action") not in ("retry", "complete", "fail"):
        return "resolve needs action 'retry', 'complete' (with output) or 'fail'"
    if kind == "budget":
        raw = payload.get("budget")
        if not isinstance(raw, Mapping):
            return "a budget signal needs a budget (max_dollars, max_llm_calls, ...)"
        if not any(raw.get(limit) is not None for limit in _USED):
            # A limit left unset keeps what the execution has; with none set, the
            # "raise" would be recorded and change nothing.
            return (
                f"execution {execution_id!r}: the budget raise sets no limit; name at least "
                f"one (rt.resume({execution_id!r}, budget=Budget(max_llm_calls=N)) or "
                f"'perdure resume {execution_id} --max-llm-calls N')"
            )
        # The raise's own checks first: they name the limit and say what to send instead.
        problem = _budget_raise_problem(execution_id, raw, usage)
        if problem is not None:
            return problem
        try:
            Budget.from_dict(raw)
        except (TypeError, ValueError) as exc:
            return f"the budget {dict(raw)!r} is not valid: {exc}"
    return None


async def resume_problem(log: EventLog, execution_id: str, meta: Mapping[str, Any]) -> str | None:
    """Why resuming the failed execution ``execution_id`` would be work for nobody: its
    parent has already taken the failure as its delegate call's result. None if not.

    Resumed then, the child would run to an outcome no parent waits for, and spend what
    its parent's budget never counts (the parent was charged once, with the failure).
    ``meta`` is the child's index entry. Reads the parent's log, on this path only.
    """
    parent = meta.get("parent")
    if meta.get("status") != "failed" or not isinstance(parent, str) or not parent:
        return None
    state = await load_state(log, parent)
    if f"child:{execution_id}" not in state.signals:
        return None  # the parent has not taken it yet: a retry still reaches it
    return (
        f"execution {execution_id!r} is a child of {parent!r}, which has already taken its "
        f"failure as the result of its delegate call: resumed, it would run for nobody, "
        f"outside {parent!r}'s budget; retry the work through the parent instead (resume "
        f"{parent!r} if it failed too, or run its agent again)"
    )


def in_doubt_problem(execution_id: str, state: ExecutionState) -> str | None:
    """Why a ``resolve`` cannot apply to the execution in ``state``, or None if it may.

    The index entry cannot tell (a call is in doubt in a ``running`` execution whose
    process died, before a runtime suspends it), so this needs the folded state; a
    resolve with nothing in doubt would only be recorded as ignored.
    """
    if state.status in TERMINAL or _in_doubt_step(state, None) is not None:
        return None  # a terminal status is precheck's to name
    return (
        f"execution {execution_id!r} has no tool call in doubt (status {state.status}); "
        f"resolve decides a non-idempotent tool call that started but never finished"
    )


#: Budget limit -> (its key in the index entry, what it counts, the CLI option).
_USED: dict[str, tuple[str, str, str]] = {
    "max_llm_calls": ("llm_calls", "LLM call", "--max-llm-calls"),
    "max_tool_calls": ("tool_calls", "tool call", "--max-tool-calls"),
    "max_tokens": ("tokens", "token", "--max-tokens"),
    "max_dollars": ("dollars", "$", "--max-dollars"),
}


def _budget_raise_problem(
    execution_id: str, raw: Mapping[str, Any], usage: Mapping[str, Any] | None
) -> str | None:
    """Why a budget raise would not let the execution spend anything more, or None.

    A raise is checked before the next LLM or tool call as ``used >= limit``, so a limit
    at or below what is used (or zero) would suspend the execution again at once, and
    be recorded as a "raise" all the same; NaN compares false with everything and
    would switch the limit off silently.
    """
    for limit, (key, what, option) in _USED.items():
        value = raw.get(limit)
        if value is None:
            continue
        # An entry leaves a count out while it is zero (INDEX_DEFAULTS).
        used = usage.get(key, INDEX_DEFAULTS[key]) if usage is not None else None
        delegated = usage.get("delegated") if usage is not None else None
        if used is not None and isinstance(delegated, Mapping):
            used += delegated.get(key, 0)  # its children's usage counts toward its budget
        used_text = f"it has used {_amount(used, what)}" if used is not None else ""
        fix = (
            f"pass a limit above {_amount(used or 0)} ('perdure resume {execution_id} "
            f"{option} N' or rt.resume({execution_id!r}, budget=Budget({limit}=N)))"
        )
        if isinstance(value, bool) or not isinstance(value, int | float):
            return (
                f"execution {execution_id!r}: budget {limit} must be a number, got {value!r}; {fix}"
            )
        if not math.isfinite(value) or value <= 0:
            return (
                f"execution {execution_id!r}: cannot raise {limit} to {value!r}: a raised "
                f"limit must be a positive, finite number"
                + (f" ({used_text})" if used_text else "")
                + f"; {fix}"
            )
        if used is not None and value <= used:
            return (
                f"execution {execution_id!r}: cannot raise {limit} to {_amount(value)}: "
                f"{used_text}, so the limit would be reached at once; {fix}"
            )
    return None


def _amount(value: Any, what: str = "") -> str:
    """``value`` for a message: ``$0.25``, ``1 LLM call``, ``15 tokens``, or bare."""
    if what == "$":
        return f"${value:g}"
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{text} {what}{'' if value == 1 else 's'}" if what else text


def translate(
    state: ExecutionState,
    name: str,
    payload: Any,
    by: str,
    seq: int,
    definition: Mapping[str, Any] | None = None,
) -> list[Event]:
    """The events one delivered signal becomes, judged against the full state.

    ``definition`` is the current agent definition (needed to accept drift).
    Cancellation is not handled here: a live execution must stop first (the actor does
    that), then record ``ExecutionCancelled``.
    """
    kind = canonical_name(name)
    data: Mapping[str, Any] = payload if isinstance(payload, Mapping) else {}

    def ignored(reason: str) -> list[Event]:
        return [SignalIgnored(name, reason, by, seq)]

    if state.status in TERMINAL:
        return ignored(f"execution is {state.status}")
    if kind in ("approve", "reject"):
        cid = data.get("confirmation_id")
        call = state.call_for_confirmation(cid) if cid else None
        if call is None or call.status != "approval":
            return ignored(f"no pending confirmation {cid!r}")
        if kind == "approve":
            override = bool(call.gate and call.gate.get("kind") == "contract")
            note = data.get("note")
            if override and not (isinstance(note, str) and note.strip()):
                # An override is recorded with who and why; when nobody said why, the
                # record says so in as many words rather than leaving a blank.
                note = NO_NOTE
            return [ApprovalGranted(cid, by, note, override, seq)]
        return [ApprovalRejected(cid, by, str(data.get("reason") or "rejected"), seq)]
    if kind == "budget":
        raw = data.get("budget")
        if not isinstance(raw, Mapping):
            return ignored("budget signal without a budget")
        new = Budget.from_dict(raw) or Budget()
        merged = state.budget.raised(new) if state.budget else new
        inherited = None
        if state.inherited is not None:
            # A limit raised on this execution itself is the operator's word: it no
            # longer comes from the parent (who set it spends past the parent's limit).
            named = new.to_dict()
            inherited = {k: v for k, v in state.inherited.to_dict().items() if k not in named}
        return [BudgetRaised(merged.to_dict(), by, seq, inherited)]
    if kind == "parent_budget":
        raw = data.get("budget")
        if not isinstance(raw, Mapping) or not state.parent:
            return ignored("parent_budget signal without a budget, or not a child execution")
        Budget.from_dict(raw)  # a bad limit raises: turned down on the record
        parent = str(data.get("parent") or state.parent["execution_id"])
        origins = {str(k): str(v) for k, v in (data.get("origins") or {}).items()}
        return [BudgetInherited(dict(raw), parent, by, origins, seq)]
    if kind == "resolve":
        action = data.get("action")
        target = _in_doubt_step(state, data.get("step"))
        if target is None:
            return ignored("no tool call is in doubt")
        if action == "retry":
            return [ToolResolved(target, "retry", by, signal_seq=seq)]
        if action == "complete":
            return [ToolResolved(target, "complete", by, output=data.get("output"), signal_seq=seq)]
        if action == "fail":
            message = str(data.get("reason") or f"marked failed by {by}")
            return [
                ToolResolved(
                    target, "fail", by, error={"type": "Failed", "message": message}, signal_seq=seq
                )
            ]
        return ignored(f"unknown resolve action {action!r}")
    if kind == "accept_drift":
        if definition is None:
            return ignored("the execution's agent is not registered; cannot accept drift")
        return [DriftAccepted(dict(definition), by, seq)]
    if kind == "resume":
        reason = state.suspend_reason or {}
        if state.status == "failed" or reason.get("kind") == "drift":
            return [ExecutionResumed(by, seq)]
        if state.status == "suspended":
            return ignored(f"still waiting ({reason.get('kind')}); resolve that first")
        return ignored(f"execution is {state.status}; nothing to resume")
    if kind == "cancel":
        return [ExecutionCancelled(str(data.get("reason") or ""), by, seq)]
    return [SignalReceived(name, payload, by, seq)]


def _in_doubt_step(state: ExecutionState, step: Any) -> int | None:
    for call in state.calls:
        if call.status == "started" and not call.idempotent and (step is None or call.step == step):
            return call.step
    return None
