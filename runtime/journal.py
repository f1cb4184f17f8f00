"""One execution's view of the log: its state, and the only door to its stream.

``stage(event)`` folds an event into the in-memory state at once (synchronously, so no
other task can interleave); ``flush()`` appends everything staged, in staging order, as
one atomic batch at the expected seq, with the index entry (status, usage, ...) computed
from the new state in the same transaction. Effects happen only after ``flush``
returns, so the log is always ahead of the world (write-ahead).

If an append fails the in-memory state is ahead of the log; the journal is then broken
and every later call raises, so the actor crashes and its restart rebuilds the state
from the log. Concurrent flushes (sibling tool calls finishing together) coalesce: one
append carries everyone's events, and the log's group commit does the rest.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import anyio

from perdure.events import Event, encode, execution_stream
from perdure.log.protocol import EventLog, NewRecord
from perdure.state import ExecutionState, apply_record, apply_records

__all__ = ["INDEX_DEFAULTS", "Journal", "earliest_timer", "index_meta", "load_state"]


#: The index fields an entry may lack, and the value every reader then takes (readers use
#: ``meta.get(key, default)``). The journal leaves a field out of the stored entry while it
#: holds its default, so a fleet of fresh or suspended executions stores ~70 B less each
#: (index pages are mapped, so this is memory too). An entry written when every field was
#: stored reads the same.
INDEX_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "reason": None,
        "confirmations": (),
        # Absent with reason "child" (an entry older than this field) makes recovery
        # ask the state, which is right for any entry, only slower.
        "waiting_on": (),
        "steps": 0,
        "llm_calls": 0,
        "tool_calls": 0,
        "tokens": 0,
        "dollars": 0.0,
        "parent": None,
        "signal_seq": 0,
        # The earliest timer a suspended execution waits for, (until, signal name):
        # the runtime finds its timers from the index alone, without replay.
        "timer": None,
    }
)


#: The blockers other than a sleep that may carry a timer ("until" and "timer").
_TIMED = frozenset({"signal", "approval", "contract"})


def earliest_timer(reason: Mapping[str, Any] | None) -> tuple[float, str] | None:
    """The earliest timer among a suspension's blockers, as (until, signal name)."""
    if not reason:
        return None
    found: tuple[float, str] | None = None
    for p in reason.get("pending") or (reason,):
        until = p.get("until")
        # A number only (not a bool): what perdure.sleep records; anything else is no
        # deadline the runtime could keep.
        if type(until) not in (int, float):
            continue
        # A sleep's timer is the blocker itself; a timed wait_for_signal names its own,
        # as does an approval (or contract override) with a timeout.
        kind = p.get("kind")
        name = p.get("name") if kind == "timer" else p.get("timer") if kind in _TIMED else None
        if name is not None:
            timer = (float(until), str(name))
            if found is None or timer < found:
                found = timer
    return found


def index_meta(state: ExecutionState) -> dict[str, Any]:
    """The small summary of an execution kept in the stream index.

    Status is computed here and only here (from ``state``), so the CLI's list and its
    detail views never disagree.
    """
    reason = state.suspend_reason
    usage = state.usage
    blockers = (reason.get("pending") or (reason,)) if reason else ()
    # Tuples, not lists: with nothing waiting they are the empty tuple, which the cyclic
    # GC never tracks, and so neither is this dict, which the journal keeps for a whole
    # step (a fleet has one per running execution). The log stores them as lists.
    meta = {
        "kind": "execution",
        "agent": state.agent,
        "status": state.status,
        "reason": reason["kind"] if reason else None,
        # Every call waiting for a decision, not only those the suspension names: while
        # a sibling of the same turn runs (an approved one, say) the execution is
        # "running", and approving the others then must not be refused as unknown.
        "confirmations": tuple(c.confirmation_id for c in state.calls if c.status == "approval"),
        # The children it waits for: a restart re-posts a finished one's outcome (the
        # post after the child settled may have been lost in a crash).
        "waiting_on": tuple(p["child_id"] for p in blockers if p.get("kind") == "child"),
        "steps": state.step,
        "llm_calls": usage.llm_calls,
        "tool_calls": usage.tool_calls,
        "tokens": usage.total_tokens,
        "dollars": round(usage.dollars, 6),
        "parent": state.parent["execution_id"] if state.parent else None,
        "signal_seq": state.last_signal_seq,
        "timer": earliest_timer(reason),
    }
    if state.deadline is not None:
        # Read at open to schedule the execution timeout, from the index alone.
        meta["deadline"] = state.deadline
    delegated = state.delegated
    if delegated is not None:
        # Apart from its own usage above: summing "dollars" over every execution then
        # counts each dollar once, while its budget is checked against both.
        meta["delegated"] = {
            "llm_calls": delegated.llm_calls,
            "tool_calls": delegated.tool_calls,
            "tokens": delegated.total_tokens,
            "dollars": round(delegated.dollars, 6),
        }
    return meta


async def load_state(log: EventLog, execution_id: str) -> ExecutionState:
    """Replay an execution's stream into a fresh state (calls nothing, writes nothing)."""
    state = ExecutionState()
    seq = 0
    # Replay builds a large tree of plain, acyclic objects (payload dicts and lists the
    # state keeps). CPython's cyclic GC would scan the whole heap again and again while
    # it grows; in a process with a large heap that doubles a replay's time (measured
    # in bench/runtime_bench.py). Nothing here makes cycles, so collection waits until
    # the replay ends. Reference counting still frees everything as usual, and GC is
    # only turned back on if it was on (concurrent replays and users who disabled it
    # themselves are left as they were).
    collecting = gc.isenabled()
    gc.disable()
    try:
        async for chunk in log.read_chunks(execution_stream(execution_id)):
            apply_records(state, chunk)
            seq = chunk[-1].seq
    finally:
        if collecting:
            gc.enable()
    state.seq = seq
    return state


class Journal:
    """Stages and appends one execution's events; owns its expected seq."""

    __slots__ = (
        "_broken",
        "_flushed",
        "_flushing",
        "_last_meta",
        "_log",
        "_meta_extra",
        "_staged",
        "state",
        "stream",
    )

    def __init__(self, log: EventLog, state: ExecutionState, execution_id: str) -> None:
        self._log = log
        self.state = state
        self.stream = execution_stream(execution_id)
        self._staged: list[NewRecord] = []
        self._flushing = False
        self._flushed: anyio.Event | None = None
        self._broken: BaseException | None = None
        self._meta_extra: dict[str, Any] | None = None
        # What the index entry holds, as far as this journal knows: only changed fields
        # are sent with an append (the index merges them), which keeps each append's
        # index update small. A field the entry lacks reads as its default, so it is
        # sent only once it differs; one going back to its default is sent explicitly
        # (the index merges, it never removes). A new stream's entry lacks them all;
        # an existing one's is learnt by ``open``, and until then every field is sent.
        self._last_meta: dict[str, Any] = dict(INDEX_DEFAULTS) if state.seq == 0 else {}

    @classmethod
    async def open(cls, log: EventLog, execution_id: str) -> Journal:
        """Replay the stream and return a journal positioned at its end."""
        state = await load_state(log, execution_id)
        journal = cls(log, state, execution_id)
        if state.seq:
            info = await log.stream_info(journal.stream)
            if info is not None:
                # Only which fields are absent is taken from the entry, not the values
                # present: those are sent again with the first append, as ever, so a
                # status written beside this journal (``queued``) is put right.
                journal._last_meta = {k: v for k, v in INDEX_DEFAULTS.items() if k not in info.meta}
        return journal

    @property
    def broken(self) -> bool:
        """True once an append failed or was cancelled: the state may differ from the log."""
        return self._broken is not None

    @property
    def pending(self) -> bool:
        """True if events are staged but not yet appended."""
        return bool(self._staged)

    def stage(self, event: Event) -> None:
        """Apply ``event`` to the state now; it is appended by the next ``flush``."""
        if self._broken is not None:
            raise RuntimeError(f"journal of {self.stream!r} is broken") from self._broken
        record = encode(event)
        self._staged.append(record)
        apply_record(self.state, record.type, record.payload)

    def override_meta(self, **meta: Any) -> None:
        """Extra index fields for the next append only (e.g. status ``queued``)."""
        self._meta_extra = {**(self._meta_extra or {}), **meta}

    async def settle(self) -> None:
        """Return once everything staged before or during the call is durable.

        After it returns (and before the caller's next await) the state holds nothing
        that is not in the log.
        """
        while self._staged or self._flushing:
            await self.flush()

    async def flush(self) -> None:
        """Append everything staged so far; returns once it is durable."""
        while True:
            if self._broken is not None:
                raise RuntimeError(f"journal of {self.stream!r} is broken") from self._broken
            if not self._staged and not self._flushing:
                return
            if not self._flushing:
                break
            # Someone else's append is in flight: ours (if any) goes in the next one,
            # which the current flusher makes before it returns.
            if self._flushed is None:
                self._flushed = anyio.Event()
            await self._flushed.wait()
        self._flushing = True
        try:
            while self._staged and self._broken is None:
                batch, self._staged = self._staged, []
                full = index_meta(self.state)
                if self._meta_extra:
                    full.update(self._meta_extra)
                    self._meta_extra = None
                last = self._last_meta
                meta = {k: v for k, v in full.items() if k not in last or last[k] != v}
                try:
                    # Not shielded (a cancel scope per append costs a fleet dearly): if
                    # this is cancelled the batch may or may not be written, so the
                    # journal is broken and whoever goes on re-reads the log (see
                    # ``broken``); the actor's next incarnation does exactly that.
                    self.state.seq = await self._log.append(
                        self.stream, batch, expect=self.state.seq, meta=meta or None
                    )
                    self._last_meta = full
                except BaseException as exc:
                    self._broken = exc
                    raise
        finally:
            self._flushing = False
            waiters, self._flushed = self._flushed, None
            if waiters is not None:
                waiters.set()
