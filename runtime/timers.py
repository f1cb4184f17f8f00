"""Durable timers: the one task that wakes suspended executions when their time comes.

A tool's ``perdure.sleep`` suspends its execution with a ``timer`` blocker (a signal
name and a wall-clock deadline); the execution's index entry carries its earliest one
(``journal.earliest_timer``). The owning runtime keeps every deadline it knows of in
one heap, served by one task, however many executions sleep (a fleet may hold
thousands): at open it reads them from the index (no replay), and adds each execution
that settles suspended on a timer. When a deadline comes it posts the timer's signal
to the inbox, which is durable and resumes the execution by the ordinary signal path;
a timer whose execution finished, or no longer waits for it, is dropped.

The task never sleeps longer than :data:`MAX_NAP` at a stretch before reading the wall
clock again, so a clock that jumps (NTP, a suspended laptop) delays a timer by at most
that much; :meth:`TimerService.poke` wakes it at once (a new earlier deadline, or a test
that moved the clock).
"""

from __future__ import annotations

import datetime
import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Sequence

import anyio

__all__ = [
    "APPROVAL_EXPIRED",
    "APPROVAL_TIMEOUT_BY",
    "APPROVAL_TIMER",
    "DEADLINE",
    "MAX_NAP",
    "RETRY_AFTER",
    "TimerService",
    "approval_timer",
    "deadline_reason",
    "decider",
    "fmt_utc",
    "timeout_seconds",
]

log = logging.getLogger("perdure.runtime")

#: The longest the service sleeps before reading the wall clock again (seconds).
MAX_NAP = 60.0
#: How long a timer whose signal could not be posted waits before it is tried again.
RETRY_AFTER = 5.0

#: How many dropped entries the heap may hold beyond as many as it has live ones.
_SLACK = 64

#: One timer: (until, execution id, signal name); heap-ordered by deadline.
Timer = tuple[float, str, str]

#: The name of an execution timeout's timer: when it fires, the execution is cancelled.
#: (A tool's timers are named "timer:<step>:<n>": the two cannot meet.)
DEADLINE = "deadline"

#: The prefix of an approval timeout's timer, "approval:<confirmation id>": when it
#: fires, the call is rejected (by "timeout") unless someone decided first.
APPROVAL_TIMER = "approval:"

#: Who an approval timeout's rejection is recorded as coming from.
APPROVAL_TIMEOUT_BY = "timeout"


def approval_timer(confirmation_id: str) -> str:
    """The timer name of the approval timeout of ``confirmation_id``."""
    return APPROVAL_TIMER + confirmation_id


#: The rejection reason recorded (and shown to the model) when an approval expires. No
#: time in it: what the model is told is the same whenever the call expired (the expiry
#: is in the approval.requested record, which the CLI shows).
APPROVAL_EXPIRED = "no decision came before its approval timeout; the call was not made"


def decider(by: object, show: Callable[[object], str] = repr) -> str:
    """Who decided a confirmation, for a message: ``show(by)``, or the approval
    timeout itself when nobody decided in time."""
    if by == APPROVAL_TIMEOUT_BY:
        return "its approval timeout (nobody decided in time)"
    return show(by)


def fmt_utc(when: float) -> str:
    """``when`` (seconds since the epoch) as an ISO 8601 UTC time, to the second."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="seconds")


def deadline_reason(until: float) -> str:
    """The cancel reason recorded when an execution timeout passes."""
    return f"its execution timeout passed (deadline {fmt_utc(until)})"


def timeout_seconds(value: float | datetime.timedelta | None, what: str) -> float | None:
    """``value`` (seconds or a ``timedelta``) as positive seconds; None stays None."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{what} must be seconds or a timedelta, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what} must be a positive, finite number of seconds, got {value!r}")
    return seconds


class TimerService:
    """A heap of deadlines and the loop that fires them through ``fire``.

    ``clock()`` is the wall clock (seconds since the epoch). ``fire(timers)`` is given
    every timer that is due, in deadline order, and posts those that still apply; it
    returns the ones it could not post (tried again after :data:`RETRY_AFTER`).
    """

    def __init__(
        self,
        clock: Callable[[], float],
        fire: Callable[[Sequence[Timer]], Awaitable[Sequence[Timer]]],
    ) -> None:
        self._clock = clock
        self._fire = fire
        # (when to fire, *timer): a retry fires later than its deadline.
        self._heap: list[tuple[float, float, str, str]] = []
        # The timers that still apply, each with when its heap entry fires: an
        # execution that settles on the same timer twice (woken by something else,
        # suspended again) holds one entry, not two. A heap entry whose timer is not
        # here was dropped (see forget): it is skipped, and compacted away in bulk.
        self._known: dict[Timer, float] = {}
        # Each execution's timers in _known, so that forget need not scan the heap.
        self._by_execution: dict[str, set[Timer]] = {}
        self._poked = anyio.Event()
        # Set while the loop naps with nothing due (see idle).
        self._idle = anyio.Event()

    def __len__(self) -> int:
        """How many timers still apply (dropped ones awaiting compaction aside)."""
        return len(self._known)

    def schedule(
        self, execution_id: str, until: float, name: str, *, at: float | None = None
    ) -> None:
        """Fire ``name`` to ``execution_id`` at or after ``until`` (or at ``at``, a retry)."""
        timer = (float(until), execution_id, name)
        if timer in self._known:
            return
        when = timer[0] if at is None else at
        earliest = self._heap[0][0] if self._heap else None
        self._known[timer] = when
        self._by_execution.setdefault(execution_id, set()).add(timer)
        heapq.heappush(self._heap, (when, *timer))
        if earliest is None or when < earliest:
            self.poke()

    def forget(self, execution_id: str, keep: Collection[Timer] = ()) -> None:
        """Drop ``execution_id``'s timers but those in ``keep``: it no longer waits for them.

        An execution that got its signal before its timeout, or finished, or was
        cancelled, would otherwise hold its entry until the deadline (a week on, for a
        week-long timeout): a service pushing many executions through would keep
        every one of those. Dropped entries are skipped when they come up, and the heap
        is rebuilt once they outnumber the live ones (emptied once none is live), so
        it holds at most twice the timers that apply, plus :data:`_SLACK`.
        """
        timers = self._by_execution.pop(execution_id, None)
        if not timers:
            return
        kept = {timer for timer in timers if timer in keep}
        for timer in timers - kept:
            del self._known[timer]
        if kept:
            self._by_execution[execution_id] = kept
        heap = self._heap
        if not self._known:
            heap.clear()
        elif len(heap) > 2 * len(self._known) + _SLACK:
            self._heap = [e for e in heap if self._applies(e)]
            heapq.heapify(self._heap)

    def _applies(self, entry: tuple[float, float, str, str]) -> bool:
        """The heap entry is its timer's current one (not dropped, not superseded)."""
        return self._known.get(entry[1:]) == entry[0]

    def poke(self) -> None:
        """Wake the loop now: it reads the clock and fires what is due."""
        self._poked.set()
        if self._idle.is_set():
            self._idle = anyio.Event()

    async def idle(self) -> None:
        """Return once the loop has fired what was due when it was last poked (tests)."""
        await self._idle.wait()

    def due(self) -> list[Timer]:
        """Take every timer whose deadline has come out of the heap, earliest first."""
        now = self._clock()
        heap = self._heap
        out: list[Timer] = []
        while heap:
            if not self._applies(heap[0]):
                heapq.heappop(heap)  # dropped: taken off as soon as it is on top
                continue
            if heap[0][0] > now:
                break
            timer = heapq.heappop(heap)[1:]
            del self._known[timer]
            same = self._by_execution[timer[1]]
            same.discard(timer)
            if not same:
                del self._by_execution[timer[1]]
            out.append(timer)
        return out

    async def run(self) -> None:
        """Fire timers as they come due, until cancelled."""
        while True:
            # Replaced before the timers are looked at: a schedule() during the fire
            # below pokes the new event, and the wait after it returns at once.
            self._poked = anyio.Event()
            due = self.due()
            if due:
                failed = await self._fire(due)
                if failed:
                    retry = self._clock() + RETRY_AFTER
                    for until, eid, name in failed:
                        self.schedule(eid, until, name, at=retry)
                continue
            nap = MAX_NAP
            if self._heap:
                nap = min(nap, max(0.0, self._heap[0][0] - self._clock()))
            if not self._poked.is_set():
                self._idle.set()
            with anyio.move_on_after(nap):
                await self._poked.wait()
            if self._idle.is_set():
                self._idle = anyio.Event()
