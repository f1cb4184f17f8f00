"""The inbox pump: delivers every signal appended to the inbox stream to its execution.

Signals from this process and from other processes (the CLI, as a client of the data
dir) land in one inbox stream. The pump tails it: ``wait_for_append`` wakes at once for
in-process appends and within tens of milliseconds for another process's. Each signal
joins its execution's *lane*, a queue of that execution's signals not yet taken; a few
workers deliver the lanes, concurrently across executions and in order within one. No
lane waits for another: a signal is handed over as soon as a worker is free and the
signals before it for the same execution are through. Delivery is idempotent (an
execution records the inbox seq of the last signal it took), so a cursor that lags
after a crash only costs a few no-op deliveries.

No signal is dropped:

- a signal that can never apply (its execution does not exist, the record cannot be read
  or decoded, or it is not a signal at all) is *refused*: logged with the reason, then
  passed. One an execution turns down (a confirmation already decided, a payload it
  cannot use) is recorded in the execution's own stream as ``signal.ignored`` with the
  reason;
- a delivery that *fails* (the log or the execution's actor raised) *holds* its lane: it
  and every later signal for the same execution wait and are tried again with backoff
  (0.05 s, doubling, at most 30 s), logged each time. Other executions' signals carry
  on, and so do the callers of ``rt.signal``: a held signal is durable in the inbox.
  The stored cursor never passes the oldest signal held, so a restart tries it again.

What the pump has got through is written to the inbox's index entry, for other
processes (``perdure inspect``) to tell which signals are still pending:

- ``cursor``: every signal up to it is through (taken or refused);
- ``through``: every signal up to it is through, except those of ``held`` executions;
- ``held``: {execution id: {``seq`` of its oldest signal, ``attempts``, last ``error``}}.

At open the pump first delivers the *backlog* (everything in the inbox when it starts)
and only then lets the runtime resume interrupted executions: a cancel sent while no
runtime ran stops its execution before it can call a model or a tool again.

Delivered signals do not stay in the inbox for ever: the pump *trims* the inbox (see
``EventLog.trim``) through its stored ``cursor``, never further, and only once that
cursor is durable in the index entry, so a held signal, and anything not yet through,
stays; and a restarted pump always finds its cursor at or past what was trimmed. It
trims every :data:`TRIM_EVERY` signals through, when the inbox has been quiet for
:data:`TRIM_IDLE` seconds, and when it stops. A trim that fails is logged and tried
again later; delivery never waits for it.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from perdure.actors import Actor
from perdure.events import INBOX_STREAM, SignalSent, decode
from perdure.log.errors import CorruptRecordError, LogClosedError
from perdure.log.protocol import Record

if TYPE_CHECKING:
    from perdure.runtime import Runtime

__all__ = ["RETRY_FIRST", "RETRY_MAX", "TRIM_EVERY", "TRIM_IDLE", "InboxPump"]

log = logging.getLogger("perdure.runtime")

#: How many signals read from the inbox may wait for delivery (held ones aside) before
#: the pump stops reading: a backlog of a million signals is not read into memory.
_QUEUED_MAX = 4096
#: How many deliveries run at once.
_WORKERS = 64

#: Seconds before the first retry of a failed delivery; each failure doubles it.
RETRY_FIRST = 0.05
#: The longest wait between two tries of a failed delivery, in seconds.
RETRY_MAX = 30.0

#: The pump trims the inbox once this many signals past the last trim are through.
TRIM_EVERY = 256
#: Seconds without progress after which the pump trims what is through anyway, so a
#: quiet service does not keep its last few signals for ever.
TRIM_IDLE = 1.0
#: The longest wait before a failed trim is tried again when idle, in seconds.
_TRIM_RETRY_MAX = 60.0


@dataclass(slots=True)
class _Lane:
    """One execution's signals read but not yet through, oldest first."""

    signals: deque[tuple[int, SignalSent]] = field(default_factory=deque)
    attempts: int = 0  # failed tries of the oldest: > 0 means the lane is held
    error: str = ""


class InboxPump(Actor):
    """Tails the inbox stream and hands each signal to the runtime for delivery."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._lanes: dict[str, _Lane] = {}
        self._read = 0  # every record up to here is through or in a lane
        self._queued = 0  # signals in lanes that are not held
        self._changed = anyio.Event()  # progress the index entry does not show yet
        self._room = anyio.Event()  # set when _queued drops below _QUEUED_MAX
        self._tg: anyio.abc.TaskGroup | None = None
        # Lanes with signals to deliver now; each lane is in here at most once, and is
        # otherwise being delivered or waiting for its retry.
        self._ready_send, self._ready = anyio.create_memory_object_stream[str](math.inf)
        # The cursor as stored (durable) in the inbox's index entry: the most a trim may
        # remove. And the last seq trimmed (the inbox's first_seq - 1).
        self._stored_cursor = 0
        self._trimmed = 0
        self._trim_wait = TRIM_IDLE  # doubles while trims fail
        self._trim_failures = 0
        self._trim_due = TRIM_EVERY  # the stored cursor at which to trim, busy or not

    async def on_start(self) -> None:
        self.ctx.start_soon(self._run, name="perdure-inbox")

    async def _run(self) -> None:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def stop_when_asked() -> None:
                    await self.ctx.wait_stopping()
                    scope.cancel()

                tg.start_soon(stop_when_asked)
                await self._pump(tg)
        # Stopping: trim what the stored cursor has got through, so a service stopped
        # after a quiet spell leaves no delivered tail. Shielded, and bounded: a trim
        # is one short write, and a stop must not hang on a store that does not answer.
        with anyio.CancelScope(shield=True) as final:
            final.deadline = anyio.current_time() + 0.5
            await self._catch_up_stored_cursor()
            await self._trim()

    async def _catch_up_stored_cursor(self) -> None:
        """Take the stored cursor from the store: a stop that cancelled the pump while
        its books were being written left ``_stored_cursor`` behind a write that
        committed (only the pump writes the cursor, so the store's is never ahead of
        what is through)."""
        try:
            info = await self.runtime.log.stream_info(INBOX_STREAM)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            return  # trimming less is safe: the next start trims the rest
        if info is not None:
            stored = int(info.meta.get("cursor", 0) or 0)
            self._stored_cursor = max(self._stored_cursor, stored)

    async def _pump(self, tg: anyio.abc.TaskGroup) -> None:
        runtime = self.runtime
        info = await runtime.log.stream_info(INBOX_STREAM)
        meta: Mapping[str, Any] = info.meta if info else {}
        stored = int(meta.get("cursor", 0) or 0)
        self._stored_cursor = stored
        self._trimmed = info.first_seq - 1 if info else 0
        self._read = max(stored, self._trimmed)
        self._trim_due = self._trimmed + TRIM_EVERY
        if stored < self._trimmed:
            # The pump trims only through a cursor already stored, so this takes a trim
            # made by something else. Reading from the cursor would fail (those records
            # are gone) on every start: the signals trimmed cannot be delivered anyway.
            log.error(
                "inbox: the stored cursor (seq %d) lags behind what was trimmed (through "
                "seq %d): signals %d..%d are gone and cannot be delivered; delivery goes on "
                "from seq %d. Check with 'perdure inspect' whether an execution waits for "
                "one of them and send it again",
                stored,
                self._trimmed,
                stored + 1,
                self._trimmed,
                self._trimmed + 1,
            )
        backlog_end = info.last_seq if info else 0
        runtime._inbox_reset(self._read)
        self._tg = tg
        for i in range(_WORKERS):
            tg.start_soon(self._work, name=f"perdure-inbox-{i}")
        tg.start_soon(self._tail)
        # As stored (an inbox that does not exist yet reads as one with nothing through):
        # nothing is written before there is progress to write.
        written: dict[str, Any] = {
            "cursor": stored,
            "through": max(stored, int(meta.get("through", 0) or 0)),
            "held": dict(meta.get("held") or {}),
        }
        self._changed.set()
        while True:
            if self._trimmed < self._stored_cursor:
                # Something is through but not trimmed: trim it if nothing moves for a
                # while (under load the TRIM_EVERY rule below does it).
                with anyio.move_on_after(self._trim_wait):
                    await self._changed.wait()
                if not self._changed.is_set():
                    await self._trim()
                    continue
            else:
                await self._changed.wait()
            self._changed = anyio.Event()
            through, cursor, held = self._progress()
            if through >= backlog_end:
                runtime._backlog_delivered()
            books = {"cursor": cursor, "through": through, "held": held}
            if books != written:
                # One write for whatever got through meanwhile: under load, many
                # deliveries share it.
                await runtime.log.set_meta(INBOX_STREAM, books)
                written = books
                self._stored_cursor = cursor
                booked, runtime._inbox_booked = runtime._inbox_booked, anyio.Event()
                booked.set()
            runtime._inbox_moved(cursor, through)
            if self._stored_cursor >= self._trim_due:
                # After set_meta returned: the cursor trimmed through is durable, so no
                # restart can find its stored cursor behind what was trimmed. (The log
                # commits in order: a crash that lost that set_meta lost the trim too.)
                await self._trim()

    async def _trim(self) -> None:
        """Trim the inbox through the stored cursor; log (never raise) a failure."""
        through = self._stored_cursor
        log_ = self.runtime.log
        if through <= self._trimmed or not log_.is_owner:
            return
        try:
            await log_.trim(INBOX_STREAM, through)
        except anyio.get_cancelled_exc_class():
            raise
        except LogClosedError:
            return  # the runtime is closing; the next start trims
        except Exception as exc:
            self._trim_failures += 1
            self._trim_wait = min(self._trim_wait * 2, _TRIM_RETRY_MAX)
            self._trim_due = through + TRIM_EVERY
            # Once per streak of failures: retries come every idle spell.
            if self._trim_failures == 1:
                log.warning(
                    "inbox: trimming the delivered signals through seq %d failed (%s: %s); "
                    "signals are still delivered, and the trim is tried again after %d more "
                    "signals or when the inbox is quiet. If this keeps failing, the inbox "
                    "only grows: run 'perdure health' and check the disk holding the data "
                    "dir",
                    through,
                    type(exc).__name__,
                    exc,
                    TRIM_EVERY,
                    exc_info=exc,
                )
            return
        if self._trim_failures:
            log.info(
                "inbox: trimmed through seq %d again after %d failures",
                through,
                self._trim_failures,
            )
        self._trimmed = through
        self._trim_failures = 0
        self._trim_wait = TRIM_IDLE
        self._trim_due = through + TRIM_EVERY

    def _progress(self) -> tuple[int, int, dict[str, dict[str, Any]]]:
        """(through, cursor, held) as of now (see the module docstring)."""
        through = cursor = self._read
        held: dict[str, dict[str, Any]] = {}
        for target, lane in self._lanes.items():
            first = lane.signals[0][0]
            cursor = min(cursor, first - 1)
            if lane.attempts:
                held[target] = {"seq": first, "attempts": lane.attempts, "error": lane.error}
            else:
                through = min(through, first - 1)
        return through, cursor, held

    async def _tail(self) -> None:
        runtime = self.runtime
        while True:
            while self._queued >= _QUEUED_MAX:
                self._room = anyio.Event()
                await self._room.wait()
            await runtime.log.wait_for_append(INBOX_STREAM, self._read)
            taken = 0
            try:
                async for record in runtime.log.read(INBOX_STREAM, after=self._read):
                    signal = _signal(record)
                    if signal is None:
                        runtime._inbox_through(record.seq)
                    else:
                        self._queue(record.seq, signal)
                    self._read = record.seq
                    taken += 1
                    if self._queued >= _QUEUED_MAX:
                        break
            except CorruptRecordError as exc:
                if exc.seq is None or exc.seq <= self._read:
                    raise
                # A record that cannot be read at all is refused like one that cannot
                # be decoded: raising here would restart the pump onto the same record
                # until the supervisor gave up, and one bad signal would stop the
                # runtime (and every start after it).
                log.error(
                    "inbox seq %d: refused, the record cannot be read (%s); it is passed "
                    "over. Run 'perdure health' to check the store",
                    exc.seq,
                    exc.detail,
                )
                runtime._inbox_through(exc.seq)
                self._read = exc.seq
                taken += 1
            if taken:
                self._changed.set()

    def _queue(self, seq: int, signal: SignalSent) -> None:
        lane = self._lanes.get(signal.target)
        if lane is None:
            lane = self._lanes[signal.target] = _Lane()
            self._ready_send.send_nowait(signal.target)
        lane.signals.append((seq, signal))
        if lane.attempts:
            self.runtime._inbox_holding([seq])
        else:
            self._queued += 1

    async def _work(self) -> None:
        """Deliver lanes as they become ready, one lane (in order) at a time."""
        async for target in self._ready:
            lane = self._lanes[target]
            failed = await self._deliver_lane(target, lane)
            if failed is not None:
                delay = self._hold(target, lane, failed)
                # Not kept while this worker waits for its next lane: its traceback
                # holds the frames, and the actor, of the delivery that failed.
                failed = None
                assert self._tg is not None
                self._tg.start_soon(self._retry_later, target, delay)
            elif lane.signals:
                self._ready_send.send_nowait(target)  # more came in: back of the line
            else:
                del self._lanes[target]
            self._changed.set()

    async def _deliver_lane(self, target: str, lane: _Lane) -> Exception | None:
        """Deliver the signals in the lane now, in order; the error that stopped it, if any."""
        runtime = self.runtime
        for _ in range(len(lane.signals)):
            seq, signal = lane.signals[0]
            try:
                await runtime._deliver(target, seq, signal)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                # One execution's trouble must not hold up everyone else's signals,
                # nor lose its own: this one and those behind it wait.
                return exc
            lane.signals.popleft()
            if lane.attempts:
                lane.attempts, lane.error = 0, ""
                runtime._inbox_held.discard(target)
                self._queued += len(lane.signals)
            else:
                self._queued -= 1
            if self._queued < _QUEUED_MAX:
                self._room.set()
            runtime._inbox_through(seq)
            self._changed.set()
        return None

    def _hold(self, target: str, lane: _Lane, exc: Exception) -> float:
        """Hold the lane after a failed delivery; seconds until it is tried again."""
        if not lane.attempts:
            self._queued -= len(lane.signals)
            if self._queued < _QUEUED_MAX:
                self._room.set()
            self.runtime._inbox_held.add(target)
            self.runtime._inbox_holding([seq for seq, _ in lane.signals])
        lane.attempts += 1
        lane.error = f"{type(exc).__name__}: {exc}"
        delay = min(RETRY_FIRST * 2 ** (lane.attempts - 1), RETRY_MAX)
        seq, signal = lane.signals[0]
        log.warning(
            "execution %s: delivering signal %r (inbox seq %d) failed (attempt %d: %s); it "
            "stays in the inbox and is tried again in %.2fs, with %d later signal(s) for "
            "this execution behind it",
            target,
            signal.name,
            seq,
            lane.attempts,
            lane.error,
            delay,
            len(lane.signals) - 1,
            exc_info=exc if lane.attempts == 1 else None,
        )
        return delay

    async def _retry_later(self, target: str, delay: float) -> None:
        await anyio.sleep(delay)
        self._ready_send.send_nowait(target)


def _signal(record: Record) -> SignalSent | None:
    """The record's signal, or None (logged as refused) if it is not one."""
    try:
        event = decode(record)
    except Exception as exc:
        log.error(
            "inbox seq %d: refused, the record cannot be decoded (%s: %s); it is passed "
            "over. Run 'perdure health' to check the store",
            record.seq,
            type(exc).__name__,
            exc,
        )
        return None
    if not isinstance(event, SignalSent):
        log.error(
            "inbox seq %d: refused, a %r record is not a signal; it is passed over",
            record.seq,
            record.type,
        )
        return None
    return event
