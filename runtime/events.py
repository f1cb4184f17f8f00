"""The facts an execution's stream is made of, and the signals sent to executions.

Every event is a frozen dataclass with an explicit ``type`` string and schema
``version``. Events are facts in the past tense; their payloads are plain data (dicts,
lists, strings, numbers) so that the log stays readable by any CBOR tool and by
``perdure events``. Decoding a record whose type or version this program does not know
is a named error raised by the log, never a silent ``dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from perdure.log.protocol import NewRecord, Record, RecordTypes
from perdure.providers.fast_init import fast_init

__all__ = [
    "EVENT_TYPES",
    "INBOX_STREAM",
    "ApprovalGranted",
    "ApprovalRejected",
    "ApprovalRequested",
    "BudgetInherited",
    "BudgetRaised",
    "DelegationCharged",
    "DriftAccepted",
    "DriftDetected",
    "Event",
    "EventDecodeError",
    "ExecutionCancelled",
    "ExecutionCompleted",
    "ExecutionFailed",
    "ExecutionResumed",
    "ExecutionStarted",
    "ExecutionSuspended",
    "LLMCompleted",
    "SignalAwaited",
    "SignalIgnored",
    "SignalReceived",
    "SignalSent",
    "ToolCompleted",
    "ToolResolved",
    "ToolStarted",
    "decode",
    "encode",
    "event_fields",
    "execution_stream",
    "record_types",
]

#: Every signal (from this process or from the CLI) is first appended here; the owning
#: runtime delivers it to its execution.
INBOX_STREAM = "signals/inbox"

#: The owning runtime's index entry: its pid and the agents it has registered, so the
#: CLI can tell an execution that waits for its agent from one that is running.
RUNTIME_STREAM = "runtime/owner"

_EXECUTION_PREFIX = "exec/"


def execution_stream(execution_id: str) -> str:
    """The log stream holding one execution's events."""
    return _EXECUTION_PREFIX + execution_id


class EventDecodeError(Exception):
    """A record of a known type whose payload does not fit its event class."""

    def __init__(self, record: Record, detail: str) -> None:
        super().__init__(
            f"stream {record.stream!r} seq {record.seq}: record of type {record.type!r} v"
            f"{record.version} does not fit this program's event class ({detail})"
        )


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of all events."""

    type: ClassVar[str] = ""
    version: ClassVar[int] = 1


@dataclass(frozen=True, slots=True)
class ExecutionStarted(Event):
    """An execution was accepted: its prompt, agent and the agent's fingerprint.

    ``deadline`` (seconds since the epoch, by the runtime's wall clock) is when its
    execution timeout cancels it if it has not finished; None: no timeout.
    """

    type: ClassVar[str] = "execution.started"
    execution_id: str
    agent: str
    prompt: str
    run_id: str
    definition: dict[str, Any]
    max_steps: int
    budget: dict[str, Any] | None = None
    parent: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class LLMCompleted(Event):
    """The model answered step ``step``; only the answer is recorded, never the history."""

    type: ClassVar[str] = "llm.completed"
    step: int
    response: dict[str, Any]
    fingerprint: str
    cost: float | None
    latency_ms: float


@fast_init
@dataclass(frozen=True, slots=True)
class ToolStarted(Event):
    """A tool call is about to run (write-ahead: recorded before the call is made)."""

    type: ClassVar[str] = "tool.started"
    step: int
    turn: int
    index: int
    call_id: str
    tool: str
    arguments: Any
    key: str
    fingerprint: str
    idempotent: bool
    attempt: int


@fast_init
@dataclass(frozen=True, slots=True)
class ToolCompleted(Event):
    """A tool call has an outcome: ``ok``, ``error`` or ``rejected``.

    ``step`` may also name a call that never started (unknown tool, invalid arguments):
    the error is recorded and returned to the model all the same.
    """

    type: ClassVar[str] = "tool.completed"
    step: int
    status: str
    output: Any = None
    error: dict[str, Any] | None = None
    latency_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class ApprovalRequested(Event):
    """A tool call needs a person's decision before it may run.

    ``kind`` is ``approval`` (the tool requires confirmation) or ``contract`` (a
    contract blocked the call; approving it is an override). ``expires`` (seconds since
    the epoch, by the runtime's wall clock) is when the call is rejected if nobody
    decided by then (the tool's or the agent's ``approval_timeout``); None waits for ever.
    """

    type: ClassVar[str] = "approval.requested"
    step: int
    confirmation_id: str
    tool: str
    arguments: Any
    kind: str
    contract: str | None = None
    message: str = ""
    expires: float | None = None


@dataclass(frozen=True, slots=True)
class ApprovalGranted(Event):
    """A person approved a pending tool call (``override`` for a contract)."""

    type: ClassVar[str] = "approval.granted"
    confirmation_id: str
    by: str
    note: str | None = None
    override: bool = False
    signal_seq: int = 0


@dataclass(frozen=True, slots=True)
class ApprovalRejected(Event):
    """A person rejected a pending tool call; the model is told, as the call's result."""

    type: ClassVar[str] = "approval.rejected"
    confirmation_id: str
    by: str
    reason: str
    signal_seq: int = 0


@dataclass(frozen=True, slots=True)
class SignalAwaited(Event):
    """A tool call is waiting for a signal (or a child execution) before it can finish."""

    type: ClassVar[str] = "signal.awaited"
    step: int
    kind: str
    name: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SignalReceived(Event):
    """A named signal arrived with a payload."""

    type: ClassVar[str] = "signal.received"
    name: str
    payload: Any
    by: str
    signal_seq: int = 0


@dataclass(frozen=True, slots=True)
class SignalIgnored(Event):
    """A signal arrived that could not apply (e.g. an already decided confirmation)."""

    type: ClassVar[str] = "signal.ignored"
    name: str
    reason: str
    by: str
    signal_seq: int = 0


@dataclass(frozen=True, slots=True)
class BudgetRaised(Event):
    """The execution's budget was replaced by a larger one.

    ``inherited``, when set, is what is left of the limits its parent handed down: a
    limit this raise names is the operator's to set, so it no longer comes from the
    parent (None: the inherited limits are unchanged; logs from before tree budgets).
    """

    type: ClassVar[str] = "budget.raised"
    budget: dict[str, Any]
    by: str
    signal_seq: int = 0
    inherited: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class BudgetInherited(Event):
    """The parent's budget changed: ``budget`` is what it now has left for this child.

    ``origins`` names, per limit, the execution whose budget it comes from (the parent,
    or an ancestor further up whose budget bounds the parent's).
    """

    type: ClassVar[str] = "budget.inherited"
    budget: dict[str, Any]
    parent: str
    by: str
    origins: dict[str, str] = field(default_factory=dict)
    signal_seq: int = 0


@dataclass(frozen=True, slots=True)
class DelegationCharged(Event):
    """A delegated child finished: what it used (its own descendants' included) is
    charged to this execution. Appended with the delegate call's outcome, in one batch."""

    type: ClassVar[str] = "delegation.charged"
    step: int
    child: str
    usage: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DriftDetected(Event):
    """The agent definition changed since the log was written; ``action`` says what followed."""

    type: ClassVar[str] = "drift.detected"
    step: int
    changes: list[dict[str, Any]]
    action: str


@dataclass(frozen=True, slots=True)
class DriftAccepted(Event):
    """The current agent definition becomes the execution's baseline."""

    type: ClassVar[str] = "drift.accepted"
    definition: dict[str, Any]
    by: str
    signal_seq: int = 0


@dataclass(frozen=True, slots=True)
class ToolResolved(Event):
    """An operator decided an in-doubt tool call: ``retry``, ``complete`` or ``fail``."""

    type: ClassVar[str] = "tool.resolved"
    step: int
    action: str
    by: str
    output: Any = None
    error: dict[str, Any] | None = None
    signal_seq: int = 0


@dataclass(frozen=True, slots=True)
class ExecutionSuspended(Event):
    """The execution stopped to wait; ``reason['kind']`` says for what."""

    type: ClassVar[str] = "execution.suspended"
    reason: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ExecutionResumed(Event):
    """A failed execution was resumed by an operator (it retries from its log)."""

    type: ClassVar[str] = "execution.resumed"
    by: str
    signal_seq: int = 0


@dataclass(frozen=True, slots=True)
class ExecutionCompleted(Event):
    """The model gave its final answer."""

    type: ClassVar[str] = "execution.completed"
    output: str


@dataclass(frozen=True, slots=True)
class ExecutionFailed(Event):
    """The execution cannot go on; ``kind`` says why (llm, crash, max_steps, drift...)."""

    type: ClassVar[str] = "execution.failed"
    kind: str
    error: dict[str, Any]
    step: int = 0


@dataclass(frozen=True, slots=True)
class ExecutionCancelled(Event):
    """An operator cancelled the execution; it will never run again."""

    type: ClassVar[str] = "execution.cancelled"
    reason: str
    by: str
    signal_seq: int = 0


@dataclass(frozen=True, slots=True)
class SignalSent(Event):
    """(Inbox stream) a signal for execution ``target``, waiting to be delivered."""

    type: ClassVar[str] = "signal.sent"
    target: str
    name: str
    payload: Any
    by: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (
        ExecutionStarted,
        LLMCompleted,
        ToolStarted,
        ToolCompleted,
        ApprovalRequested,
        ApprovalGranted,
        ApprovalRejected,
        SignalAwaited,
        SignalReceived,
        SignalIgnored,
        BudgetRaised,
        BudgetInherited,
        DelegationCharged,
        DriftDetected,
        DriftAccepted,
        ToolResolved,
        ExecutionSuspended,
        ExecutionResumed,
        ExecutionCompleted,
        ExecutionFailed,
        ExecutionCancelled,
        SignalSent,
    )
}

_FIELD_NAMES: dict[type[Event], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in EVENT_TYPES.values()
}


def event_fields(cls: type[Event]) -> tuple[str, ...]:
    """The payload keys of ``cls``'s records (its fields, in order)."""
    return _FIELD_NAMES[cls]


def record_types() -> RecordTypes:
    """The record types (and newest versions) this program reads and writes."""
    return RecordTypes({t: cls.version for t, cls in EVENT_TYPES.items()})


def encode(event: Event) -> NewRecord:
    """The record to append for ``event``."""
    cls = type(event)
    payload = {name: getattr(event, name) for name in _FIELD_NAMES[cls]}
    return NewRecord(cls.type, payload, cls.version)


def decode(record: Record) -> Event:
    """The event a record holds (the log has already checked its type and version)."""
    cls = EVENT_TYPES[record.type]
    payload = record.payload
    if not isinstance(payload, Mapping):
        raise EventDecodeError(record, f"payload is {type(payload).__name__}, not a map")
    try:
        return cls(**payload)
    except TypeError as exc:
        raise EventDecodeError(record, str(exc)) from None
