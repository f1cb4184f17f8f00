"""An execution's state, rebuilt from its events by a pure ``apply``; and ``plan``.

``apply(state, event)`` is the only code that runs during replay. It performs no I/O,
reads nothing but its arguments, and never calls a model, a tool or a callback: effects
happen on the live path (``engine.py``), after the event that allows them is durable.
For speed it updates the state object it is given in place and returns it; replaying
the same events into a fresh state always gives an equal state.

``plan(state)`` says what the execution must do next (call the model, run or re-run
tool calls, admit new calls, suspend, fail, or nothing). It too is pure, so the
suspension status written to the index, the CLI and the engine all agree.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from perdure.budget import Budget, ExecutionUsage, model_key
from perdure.events import (
    EVENT_TYPES,
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
    SignalSent,
    ToolCompleted,
    ToolResolved,
    ToolStarted,
    encode,
    event_fields,
)
from perdure.log.protocol import Record
from perdure.providers.fast_init import fast_init, fast_new
from perdure.providers.types import Message, ToolCall
from perdure.timers import approval_timer

__all__ = [
    "DELEGATE_PREFIX",
    "TERMINAL",
    "Call",
    "CallLLM",
    "ExecutionState",
    "Fail",
    "Idle",
    "Run",
    "Suspend",
    "apply",
    "apply_record",
    "apply_records",
    "budget_grant",
    "delegate_steps",
    "limit_origin",
    "plan",
    "tool_message",
]

# Replay builds a few of these per step: the builders skip the constructor's machinery.
_message = fast_new(Message)
_tool_call = fast_new(ToolCall)

#: Statuses an execution never leaves (a failed one can be resumed by an operator).
TERMINAL = frozenset({"completed", "cancelled"})


@dataclass(slots=True)
class Call:
    """One tool call of the current turn.

    ``status``: ``planned`` (requested, not yet admitted), ``approval`` (waiting for a
    decision), ``approved``, ``started`` (running, or in doubt after a crash), ``waiting``
    (for a signal), ``retry`` (an operator asked for a re-run), ``done``.
    """

    step: int
    turn: int
    index: int
    call_id: str
    tool: str
    arguments: Any
    status: str = "planned"
    key: str | None = None
    idempotent: bool = True
    attempts: int = 0
    fingerprint: str | None = None
    confirmation_id: str | None = None
    gate: dict[str, Any] | None = None
    override: bool = False
    waiting: dict[str, Any] | None = None
    outcome: str | None = None
    output: Any = None
    error: dict[str, Any] | None = None
    rejected_by: str | None = None


@dataclass(slots=True)
class ExecutionState:
    """Everything an execution's stream says about it, folded into one object."""

    execution_id: str = ""
    agent: str = ""
    prompt: str = ""
    run_id: str = ""
    definition: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 0
    #: The execution's own budget (its agent's, its spawn's, or raised since).
    budget: Budget | None = None
    #: What its parent had left when it delegated (or since, when the parent's budget
    #: changed); None for a top-level execution or a parent without limits.
    inherited: Budget | None = None
    #: Per inherited limit, the execution whose budget it comes from.
    origins: dict[str, str] = field(default_factory=dict)
    #: Limits an operator raised on this execution itself: they are no longer
    #: inherited, so a later hand-down from the parent does not bring them back.
    overridden: set[str] = field(default_factory=set)
    #: The limits checked: per limit the tighter of ``budget`` and ``inherited``.
    limits: Budget | None = None
    parent: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The conversation, without the system message (instructions come from the agent).
    messages: list[Message] = field(default_factory=list)
    #: The last step number handed out (an LLM call takes one, each of its tool calls one).
    step: int = 0
    calls: list[Call] = field(default_factory=list)
    #: What it used itself (LLM and tool calls, tokens, dollars).
    usage: ExecutionUsage = field(default_factory=ExecutionUsage)
    #: What its finished children used (theirs included), charged to it; None if none.
    delegated: ExecutionUsage | None = None
    status: str = "new"
    suspend_reason: dict[str, Any] | None = None
    output: str | None = None
    error: dict[str, Any] | None = None
    failure_kind: str | None = None
    last_signal_seq: int = 0
    signals: dict[str, Any] = field(default_factory=dict)
    drift: list[dict[str, Any]] = field(default_factory=list)
    cancel_reason: str | None = None
    #: Who cancelled it ("api", "cli", "deadline" for its execution timeout, ...).
    cancelled_by: str | None = None
    #: When its execution timeout cancels it (seconds since the epoch); None: never.
    deadline: float | None = None
    #: Seq of the last record applied (set by the reader, not by ``apply``).
    seq: int = 0

    def call_at(self, step: int) -> Call | None:
        """The current turn's call with this step number."""
        calls = self.calls
        if calls:
            i = step - calls[0].step
            if 0 <= i < len(calls) and calls[i].step == step:
                return calls[i]
        return None

    def call_for_confirmation(self, confirmation_id: str) -> Call | None:
        """The current turn's call awaiting (or given) this confirmation id."""
        for c in self.calls:
            if c.confirmation_id == confirmation_id:
                return c
        return None

    @property
    def total_usage(self) -> ExecutionUsage:
        """Its own usage plus its children's: what its budget is checked against."""
        return self.usage.plus(self.delegated)

    @property
    def pending_confirmations(self) -> list[Call]:
        """Calls waiting for a person's decision."""
        return [c for c in self.calls if c.status == "approval"]


# -- rendering tool results for the model ----------------------------------------------


def tool_message(call: Call) -> Message:
    """The tool message the model sees for a finished call (deterministic)."""
    if call.outcome == "ok":
        return _message("tool", _ok_content(call.output), (), call.call_id, call.tool)
    err = call.error or {}
    if call.outcome == "rejected":
        content = f"REJECTED by {call.rejected_by or 'an operator'}: {err.get('message', '')}"
    else:
        content = f"ERROR ({err.get('type', 'Error')}): {err.get('message', '')}"
    return _message("tool", content, (), call.call_id, call.tool, True)


def _ok_content(out: Any) -> str:
    """What the model reads for a tool's successful output."""
    if isinstance(out, str):
        return out
    if out is None or isinstance(out, bool):
        return "null" if out is None else ("true" if out else "false")
    if type(out) is int:
        return str(out)  # what json.dumps gives, without its machinery
    return json.dumps(out, ensure_ascii=False, default=repr)


# -- apply -------------------------------------------------------------------------------
#
# The handlers fold a record's PAYLOAD (the plain data that is stored), not an event
# object: the live path applies exactly what it appends, and replay folds exactly what
# it reads, through the same code, without building an event object per record.


def apply(state: ExecutionState, event: Event) -> ExecutionState:
    """Fold one event into ``state`` and return it. Pure: no I/O, no effects."""
    record = encode(event)
    return apply_record(state, record.type, record.payload)


def apply_record(state: ExecutionState, type: str, payload: Mapping[str, Any]) -> ExecutionState:
    """Fold one recorded event (its type and payload) into ``state``; see :func:`apply`."""
    handler = _HANDLERS.get(type)
    if handler is None:
        raise TypeError(f"no apply rule for record type {type!r}")
    handler(state, payload)
    return state


def apply_records(state: ExecutionState, records: Sequence[Record]) -> ExecutionState:
    """Fold ``records`` into ``state`` in order: the same as :func:`apply_record` on each.

    For replay. The usual tool step (a model answer with one tool call, its start, its
    successful outcome: three records in a row) is folded in one go, without the
    transient :class:`Call` the three would otherwise build, look up twice and drop;
    everything else, and a step cut in two by the end of ``records``, goes record by
    record.
    """
    handlers = _HANDLERS
    n = len(records)
    i = 0
    # The usage of a run of such steps is tallied here and added to ``usage`` when the
    # run ends (nothing in it reads usage): adding it call by call, into a dict entry
    # per model, cost more than the rest of the step. Every float is added in
    # the same order as call by call, so the sums are the same to the last bit.
    tally = False  # a tally is open, for provider/model
    provider = model = ""
    calls = first_starts = tokens_in = tokens_out = 0
    dollars = model_dollars = 0.0
    while i < n:
        record = records[i]
        rtype = record[2]  # indexing: cheaper than unpacking a tuple subclass
        payload = record[5]
        if rtype == "llm.completed" and i + 2 < n:
            # Everything is read before anything changes, with plain subscripts: the
            # keys are the ones the live path always writes. Records without one (or of
            # another shape) are left to the record-by-record handlers below.
            try:
                response = payload["response"]
                msg = response["message"]
                raw_calls = msg["tool_calls"]
                started = records[i + 1]
                completed = records[i + 2]
                start = started[5]
                done = completed[5]
                step = payload["step"] + 1
                tokens = response["usage"]
                step_in = tokens["input"]
                step_out = tokens["output"]
                fused = (
                    len(raw_calls) == 1
                    and started[2] == "tool.started"
                    and completed[2] == "tool.completed"
                    and start["step"] == step
                    and done["step"] == step
                    and done["status"] == "ok"
                    # ints: tallying float token counts could round differently
                    and type(step_in) is int
                    and type(step_out) is int
                )
                if fused:
                    step_provider = response["provider"]
                    step_model = response["model"]
                    cost = payload["cost"] or 0.0
                    c = raw_calls[0]
                    call_id = c["id"]
                    name = c["name"]
                    call = _tool_call(call_id, name, c["arguments"])
                    first_attempt = start["attempt"] == 1
                    out = done["output"]
                    content = str(out) if type(out) is int else _ok_content(out)
                    text = msg["content"] or ""
            except (KeyError, TypeError, ValueError):
                fused = False
            if fused:
                # What _llm_completed, _tool_started and _tool_completed do in turn,
                # less the Call, with the usage tallied.
                messages = state.messages
                messages.append(_message("assistant", text, (call,)))
                messages.append(_message("tool", content, (), call_id, name))
                if state.calls:  # usually already the empty list the last turn left
                    state.calls = []
                state.step = step
                if not tally or step_provider != provider or step_model != model:
                    if tally:
                        _add_llm_calls(
                            state.usage, provider, model, calls, first_starts, tokens_in,
                            tokens_out, dollars, model_dollars,
                        )  # fmt: skip
                    tally = True
                    provider = step_provider
                    model = step_model
                    calls = first_starts = tokens_in = tokens_out = 0
                    usage = state.usage
                    dollars = usage.dollars
                    entry = usage.by_model.get(model_key(provider, model))
                    model_dollars = 0.0 if entry is None else entry["dollars"]
                calls += 1
                if first_attempt:
                    first_starts += 1
                tokens_in += step_in
                tokens_out += step_out
                dollars += cost
                model_dollars += cost
                i += 3
                continue
        if tally:
            _add_llm_calls(
                state.usage, provider, model, calls, first_starts, tokens_in, tokens_out,
                dollars, model_dollars,
            )  # fmt: skip
            tally = False
        handler = handlers.get(rtype)
        if handler is None:
            raise TypeError(f"no apply rule for record type {rtype!r}")
        handler(state, payload)
        i += 1
    if tally:
        _add_llm_calls(
            state.usage, provider, model, calls, first_starts, tokens_in, tokens_out, dollars,
            model_dollars,
        )  # fmt: skip
    return state


def _add_llm_calls(
    usage: ExecutionUsage,
    provider: str,
    model: str,
    calls: int,
    first_starts: int,
    tokens_in: int,
    tokens_out: int,
    dollars: float,
    model_dollars: float,
) -> None:
    """Add a tally of tool steps to ``usage``: what ``add_llm_call`` on each LLM call,
    and counting each first start of a tool, would give.

    ``dollars`` and ``model_dollars`` are the new totals (summed in call order from the
    totals the tally started at), not increments.
    """
    usage.llm_calls += calls
    usage.tool_calls += first_starts
    usage.input_tokens += tokens_in
    usage.output_tokens += tokens_out
    usage.dollars = dollars
    key = model_key(provider, model)
    entry = usage.by_model.get(key)
    if entry is None:
        entry = usage.by_model[key] = {"calls": 0, "tokens": 0, "dollars": 0.0}
    entry["calls"] += calls
    entry["tokens"] += tokens_in + tokens_out
    entry["dollars"] = model_dollars


def _started(s: ExecutionState, p: Mapping[str, Any]) -> None:
    s.execution_id = p["execution_id"]
    s.agent = p["agent"]
    s.prompt = p["prompt"]
    s.run_id = p["run_id"]
    s.definition = p["definition"]
    s.max_steps = p["max_steps"]
    s.budget = Budget.from_dict(p.get("budget"))
    parent = s.parent = p.get("parent")
    if parent and parent.get("budget") is not None:
        s.inherited = Budget.from_dict(parent["budget"])
        s.origins = dict(parent.get("origins") or {})
    _set_limits(s)
    s.metadata = p.get("metadata") or {}
    s.deadline = p.get("deadline")
    s.messages.append(_message("user", p["prompt"]))
    s.status = "running"


def _llm_completed(s: ExecutionState, p: Mapping[str, Any]) -> None:
    step = p["step"]
    response = p["response"]
    msg = response["message"]
    raw_calls = msg.get("tool_calls")
    if raw_calls:
        if len(raw_calls) == 1:  # the common turn, without the generator machinery
            c = raw_calls[0]
            call = _tool_call(c["id"], c["name"], c["arguments"])
            calls: tuple[ToolCall, ...] = (call,)
            s.calls = [Call(step + 1, step, 0, call.id, call.name, call.arguments)]
        else:
            calls = tuple(_tool_call(c["id"], c["name"], c["arguments"]) for c in raw_calls)
            s.calls = [
                Call(step + 1 + i, step, i, c.id, c.name, c.arguments) for i, c in enumerate(calls)
            ]
        s.step = step + len(calls)
    else:
        calls = ()
        s.calls = []
        s.step = step
    s.messages.append(_message("assistant", msg.get("content") or "", calls))
    usage = response.get("usage") or {}
    s.usage.add_llm_call(
        response.get("provider", ""),
        response.get("model", ""),
        usage.get("input", 0),
        usage.get("output", 0),
        p.get("cost") or 0.0,
    )


def _tool_started(s: ExecutionState, p: Mapping[str, Any]) -> None:
    call = _call(s, p["step"])
    call.status = "started"
    call.key = p["key"]
    call.idempotent = p["idempotent"]
    call.fingerprint = p["fingerprint"]
    attempt = p["attempt"]
    if attempt == 1:
        s.usage.tool_calls += 1
    call.attempts = attempt


def _tool_completed(s: ExecutionState, p: Mapping[str, Any]) -> None:
    call = _call(s, p["step"])
    _finish(s, call, p["status"], p.get("output"), p.get("error"))


def _finish(
    s: ExecutionState, call: Call, outcome: str, output: Any, error: dict[str, Any] | None
) -> None:
    call.status = "done"
    call.outcome = outcome
    call.output = output
    call.error = error
    calls = s.calls
    if len(calls) == 1:
        s.messages.append(tool_message(call))
        s.calls = []
    elif all(c.status == "done" for c in calls):
        # Results join the conversation in call order once the whole turn is done, so
        # the transcript never depends on which concurrent call finished first.
        s.messages.extend(tool_message(c) for c in calls)
        s.calls = []


def _approval_requested(s: ExecutionState, p: Mapping[str, Any]) -> None:
    call = _call(s, p["step"])
    call.status = "approval"
    call.confirmation_id = p["confirmation_id"]
    call.gate = {
        "kind": p["kind"],
        "contract": p.get("contract"),
        "message": p.get("message", ""),
        "expires": p.get("expires"),
    }


def _approval_granted(s: ExecutionState, p: Mapping[str, Any]) -> None:
    call = s.call_for_confirmation(p["confirmation_id"])
    if call is not None and call.status == "approval":
        call.status = "approved"
        call.override = p.get("override", False)
    _recheck(s)


def _approval_rejected(s: ExecutionState, p: Mapping[str, Any]) -> None:
    call = s.call_for_confirmation(p["confirmation_id"])
    if call is not None and call.status == "approval":
        call.rejected_by = p["by"]
        _finish(s, call, "rejected", None, {"type": "Rejected", "message": p["reason"]})
    _recheck(s)


def _signal_awaited(s: ExecutionState, p: Mapping[str, Any]) -> None:
    call = _call(s, p["step"])
    call.status = "waiting"
    call.waiting = {"kind": p["kind"], "name": p["name"], **(p.get("detail") or {})}


def _signal_received(s: ExecutionState, p: Mapping[str, Any]) -> None:
    s.signals.setdefault(p["name"], p.get("payload"))
    _recheck(s)


def _signal_ignored(s: ExecutionState, p: Mapping[str, Any]) -> None:
    pass


def _budget_raised(s: ExecutionState, p: Mapping[str, Any]) -> None:
    s.budget = Budget.from_dict(p["budget"])
    inherited = p.get("inherited")
    if inherited is not None:
        # The limits the raise named are the ones it took out of what was inherited.
        before = s.inherited.to_dict() if s.inherited is not None else {}
        s.overridden.update(k for k in before if k not in inherited)
        s.inherited = Budget.from_dict(inherited)
    _set_limits(s)
    _recheck(s)


def _budget_inherited(s: ExecutionState, p: Mapping[str, Any]) -> None:
    # What the parent hands down never replaces a limit the operator set here.
    kept = s.overridden
    s.inherited = Budget.from_dict({k: v for k, v in p["budget"].items() if k not in kept})
    s.origins = {k: v for k, v in (p.get("origins") or {}).items() if k not in kept}
    _set_limits(s)
    _recheck(s)


def _delegation_charged(s: ExecutionState, p: Mapping[str, Any]) -> None:
    usage = ExecutionUsage.from_dict(p["usage"])
    if s.delegated is None:
        s.delegated = usage
    else:
        s.delegated.add(usage)


def _set_limits(s: ExecutionState) -> None:
    own, inherited = s.budget, s.inherited
    if inherited is None or inherited == _UNLIMITED:
        s.limits = own
    else:
        s.limits = inherited.tighter(own)


_UNLIMITED = Budget()


def _drift_detected(s: ExecutionState, p: Mapping[str, Any]) -> None:
    s.drift.append({"step": p["step"], "changes": p["changes"], "action": p["action"]})


def _drift_accepted(s: ExecutionState, p: Mapping[str, Any]) -> None:
    s.definition = p["definition"]
    _recheck(s, drift_settled=True)


def _tool_resolved(s: ExecutionState, p: Mapping[str, Any]) -> None:
    call = _call(s, p["step"])
    action = p["action"]
    if action == "retry":
        call.status = "retry"
    elif action == "complete":
        _finish(s, call, "ok", p.get("output"), None)
    else:
        error = p.get("error") or {"type": "Failed", "message": "by operator"}
        _finish(s, call, "error", None, error)
    _recheck(s)


def _suspended(s: ExecutionState, p: Mapping[str, Any]) -> None:
    s.status = "suspended"
    s.suspend_reason = p["reason"]


def _resumed(s: ExecutionState, p: Mapping[str, Any]) -> None:
    s.status = "running"
    s.error = None
    s.failure_kind = None
    s.suspend_reason = None


def _completed(s: ExecutionState, p: Mapping[str, Any]) -> None:
    s.status = "completed"
    s.output = p["output"]
    s.suspend_reason = None


def _failed(s: ExecutionState, p: Mapping[str, Any]) -> None:
    s.status = "failed"
    s.error = p["error"]
    s.failure_kind = p["kind"]
    s.suspend_reason = None


def _cancelled(s: ExecutionState, p: Mapping[str, Any]) -> None:
    s.status = "cancelled"
    s.cancel_reason = p["reason"]
    s.cancelled_by = p.get("by")
    s.suspend_reason = None


def _signal_sent(s: ExecutionState, p: Mapping[str, Any]) -> None:
    raise TypeError("signal.sent belongs to the inbox stream, not to an execution")


def _call(s: ExecutionState, step: int) -> Call:
    call = s.call_at(step)
    if call is None:
        raise ValueError(f"execution {s.execution_id!r}: no call at step {step} in this turn")
    return call


def _recheck(s: ExecutionState, drift_settled: bool = False) -> None:
    # A signal may unblock a suspended execution; the status must say so at once (it is
    # written to the index with the signal, so a restart knows to resume it). Drift is
    # not visible to ``plan`` (it needs the current code), so only accepting the drift
    # (or an explicit resume) lifts a drift suspension.
    if s.status != "suspended":
        return
    if not drift_settled and (s.suspend_reason or {}).get("kind") == "drift":
        return
    action = plan(s)
    if isinstance(action, Suspend):
        s.suspend_reason = action.reason
    else:
        s.status = "running"
        s.suspend_reason = None


_Handler = Callable[[ExecutionState, Mapping[str, Any]], None]


def _noting_signal_seq(handler: _Handler) -> _Handler:
    """``handler``, then ``last_signal_seq`` raised to the record's ``signal_seq``."""

    def apply_signalled(s: ExecutionState, p: Mapping[str, Any]) -> None:
        handler(s, p)
        seq = p.get("signal_seq", 0)
        if seq > s.last_signal_seq:
            s.last_signal_seq = seq

    return apply_signalled


_HANDLERS: dict[str, _Handler] = {
    ExecutionStarted.type: _started,
    LLMCompleted.type: _llm_completed,
    ToolStarted.type: _tool_started,
    ToolCompleted.type: _tool_completed,
    ApprovalRequested.type: _approval_requested,
    ApprovalGranted.type: _approval_granted,
    ApprovalRejected.type: _approval_rejected,
    SignalAwaited.type: _signal_awaited,
    SignalReceived.type: _signal_received,
    SignalIgnored.type: _signal_ignored,
    BudgetRaised.type: _budget_raised,
    BudgetInherited.type: _budget_inherited,
    DelegationCharged.type: _delegation_charged,
    DriftDetected.type: _drift_detected,
    DriftAccepted.type: _drift_accepted,
    ToolResolved.type: _tool_resolved,
    ExecutionSuspended.type: _suspended,
    ExecutionResumed.type: _resumed,
    ExecutionCompleted.type: _completed,
    ExecutionFailed.type: _failed,
    ExecutionCancelled.type: _cancelled,
    SignalSent.type: _signal_sent,
}
# Only events that have a signal_seq field carry one (a payload is exactly its event's
# fields), so only their records pay for looking it up.
for _type, _cls in EVENT_TYPES.items():
    if "signal_seq" in event_fields(_cls):
        _HANDLERS[_type] = _noting_signal_seq(_HANDLERS[_type])


# -- plan --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing to do: the execution is finished (or failed and not resumed)."""


@dataclass(frozen=True, slots=True)
class CallLLM:
    """Ask the model for the next step."""


# Field-less and frozen: one instance serves every plan (none is made per step).
_IDLE = Idle()
_CALL_LLM = CallLLM()


@fast_init
@dataclass(frozen=True, slots=True)
class Run:
    """Admit ``admit`` (never started: gates then start) and re-run ``rerun``."""

    admit: tuple[Call, ...]
    rerun: tuple[Call, ...]


@dataclass(frozen=True, slots=True)
class Suspend:
    """Wait: ``reason`` says for what (``kind`` plus details)."""

    reason: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Fail:
    """The execution cannot go on."""

    kind: str
    message: str


Action = Idle | CallLLM | Run | Suspend | Fail


def plan(state: ExecutionState) -> Action:
    """What ``state`` calls for next. Pure."""
    if state.status in TERMINAL or state.status == "failed" or state.status == "new":
        return _IDLE
    if state.calls:
        return _plan_calls(state)
    if state.usage.llm_calls >= state.max_steps:
        return Fail(
            "max_steps",
            f"the agent made {state.usage.llm_calls} LLM calls, its max_steps; raise "
            f"Agent(max_steps=...) if this is expected",
        )
    budget = state.limits
    if budget is not None:
        hit = budget.exhausted(state.total_usage)
        if hit is not None:
            return Suspend(_budget_reason(state, *hit))
    return _CALL_LLM


def _plan_calls(state: ExecutionState) -> Action:
    admit: list[Call] = []
    rerun: list[Call] = []
    blockers: list[dict[str, Any]] = []
    budget = state.limits
    left = float("inf")
    used_tools = state.usage.tool_calls
    if state.delegated is not None:
        used_tools += state.delegated.tool_calls
    if budget is not None and budget.max_tool_calls is not None:
        left = budget.max_tool_calls - used_tools
    for c in state.calls:
        status = c.status
        if status == "done":
            continue
        if status in ("planned", "approved"):
            # A first start consumes tool budget; re-runs of a started call do not.
            if left <= 0:
                limit = budget.max_tool_calls  # type: ignore[union-attr]
                blockers.append(_budget_reason(state, "max_tool_calls", limit, used_tools))
                continue
            left -= 1
            admit.append(c)
        elif status == "retry":
            rerun.append(c)
        elif status == "started":
            if c.idempotent:
                rerun.append(c)
            else:
                blockers.append(
                    {
                        "kind": "unknown_outcome",
                        "step": c.step,
                        "tool": c.tool,
                        "key": c.key,
                        "attempts": c.attempts,
                        "arguments": c.arguments,
                    }
                )
        elif status == "waiting":
            waiting = c.waiting or {}
            signals = state.signals
            # A timed wait_for_signal also wakes when its timer fires (it then raises
            # SignalTimeout in the tool); an untimed wait has no "timer".
            if waiting.get("name") in signals or waiting.get("timer") in signals:
                rerun.append(c)
            else:
                blockers.append({**waiting, "step": c.step, "tool": c.tool})
        elif status == "approval":
            gate = c.gate or {}
            blocker = {
                "kind": gate.get("kind", "approval"),
                "step": c.step,
                "tool": c.tool,
                "arguments": c.arguments,
                "confirmation_id": c.confirmation_id,
                "contract": gate.get("contract"),
                "message": gate.get("message", ""),
            }
            expires = gate.get("expires")
            if expires is not None:
                # As a timed wait's: the runtime keeps the timer, which rejects the call.
                blocker["until"] = expires
                blocker["timer"] = approval_timer(c.confirmation_id or "")
            blockers.append(blocker)
    if admit or rerun:
        return Run(tuple(admit), tuple(rerun))
    reason = dict(blockers[0])
    if len(blockers) > 1:
        reason["pending"] = blockers  # one blocker is the reason itself: not repeated
    return Suspend(reason)


def _budget_reason(state: ExecutionState, limit: str, value: Any, used: Any) -> dict[str, Any]:
    reason = {
        "kind": "budget",
        "limit": limit,
        "limit_value": value,
        "used": used,
        "usage": state.usage.to_dict(),
    }
    if state.delegated is not None:
        reason["delegated"] = state.delegated.to_dict()
    origin = limit_origin(state, limit)
    if origin != state.execution_id and state.parent:
        # The limit is what the parent had left: raising this execution's own budget
        # would not be what the person who set the parent's expects; say where it is.
        parent = state.parent["execution_id"]
        reason["parent"] = parent
        reason["origin"] = origin
        option = "--" + limit.replace("_", "-")
        whose = (
            f"its parent {parent!r}'s budget"
            if origin == parent
            else f"the budget of {origin!r} (which bounds its parent {parent!r})"
        )
        reason["message"] = (
            f"execution {state.execution_id!r} reached {limit} {value:g} (used {used:g}): "
            f"that is what was left of {whose} when it was delegated; raise "
            f"{origin!r}'s budget (rt.resume({origin!r}, budget=Budget({limit}=N)) or "
            f"'perdure resume {origin} {option} N'): the raise is handed down and this "
            f"execution resumes by itself; or raise this execution's own "
            f"('perdure resume {state.execution_id} {option} N'), which lets it spend "
            f"past what {origin!r} has left"
        )
    return reason


def limit_origin(state: ExecutionState, limit: str) -> str:
    """The execution whose budget sets ``limit`` for ``state``: its own, or an ancestor's."""
    inherited = getattr(state.inherited, limit) if state.inherited is not None else None
    own = getattr(state.budget, limit) if state.budget is not None else None
    if inherited is not None and (own is None or inherited < own):
        parent = state.parent["execution_id"] if state.parent else ""
        return state.origins.get(limit) or parent
    return state.execution_id


def budget_grant(state: ExecutionState, step: int | None = None) -> dict[str, Any] | None:
    """What ``state``'s execution has left to hand the child it delegates to at ``step``.

    ``{"budget": limits, "origins": {limit: execution id}}``, or None without limits.
    When several delegate calls of the current turn are unfinished (their children run
    at once), each child is handed its share of what is left, not all of it: together
    they can then not spend more than the parent has. Shares are equal; a count's
    remainder goes to the earliest calls, so a share of nothing falls only where there
    is less left than children. As siblings finish, what they did not use is handed to
    the ones still running (see ``Runtime._rebalance``). ``step`` None: all that is left.
    """
    limits = state.limits
    if limits is None:
        return None
    left = limits.left(state.total_usage).to_dict()
    if step is not None:
        sharers = delegate_steps(state)
        if len(sharers) > 1 and step in sharers:
            left = _share(left, len(sharers), sharers.index(step))
    return {"budget": left, "origins": {k: limit_origin(state, k) for k in left}}


#: The name prefix of the tools that delegate to a sub-agent (``agent.DelegateTool``).
DELEGATE_PREFIX = "delegate_to_"


def delegate_steps(state: ExecutionState) -> list[int]:
    """The steps of the current turn's unfinished delegate calls, in call order."""
    return sorted(
        c.step for c in state.calls if c.status != "done" and c.tool.startswith(DELEGATE_PREFIX)
    )


def _share(left: Mapping[str, Any], n: int, i: int) -> dict[str, Any]:
    """The ``i``-th of ``n`` shares of each limit in ``left``."""
    out: dict[str, Any] = {}
    for name, value in left.items():
        if name == "max_dollars":
            out[name] = value / n
        else:
            out[name] = value // n + (1 if i < value % n else 0)
    return out
