"""The inbox pump: delivers every signal appended to the inbox stream to its execution.

Signals from this process and from other processes (the CLI, as a client of the data
dir) land in one inbox stream. The pump tails it: ``wait_for_append`` wakes at once for
in-process appends and within tens of milliseconds for another process's. It delivers
each batch, concurrently across executions and in order within one, then advances its
cursor. Delivery is idempotent (an execution records the inbox seq of the last signal it
took), so a cursor that lags after a crash only costs a few no-op deliveries.

No signal is dropped:

- a signal that can never apply (its execution does not exist, or the record is not a
  signal at all) is *refused*: logged with the reason, then passed. One an execution
  turns down (a confirmation already decided, a payload it cannot use) is recorded in
  the execution's own stream as ``signal.ignored`` with the reason;
- a delivery that *fails* (the log or the execution's actor raised) is kept: it and
  every later signal for the same execution wait and are tried again with backoff
  (0.05 s, doubling, at most 30 s), logged each time. Other executions' signals carry
  on. The stored cursor never passes the oldest signal kept, so a restart tries it
  again too.

At open the pump first delivers the *backlog* (everything in the inbox when it starts)
and only then lets the runtime resume interrupted executions: a cancel sent while no
runtime ran stops its execution before it can call a model or a tool again.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from perdure.actors import Actor
from perdure.events import INBOX_STREAM, SignalSent, decode
from perdure.log.protocol import Record

if TYPE_CHECKING:
    from perdure.runtime import Runtime

__all__ = ["RETRY_FIRST", "RETRY_MAX", "InboxPump"]

log = logging.getLogger("perdure.runtime")

_BATCH = 1024
_PARALLEL = 64

#: Seconds before the first retry of a failed delivery; each failure doubles it.
RETRY_FIRST = 0.05
#: The longest wait between two tries of a failed delivery, in seconds.
RETRY_MAX = 30.0


@dataclass(slots=True)
class _Held:
    """One execution's signals that wait because the oldest of them failed to deliver."""

    signals: deque[tuple[int, SignalSent]] = field(default_factory=deque)
    attempts: int = 0
    due: float = 0.0


class InboxPump(Actor):
    """Tails the inbox stream and hands each signal to the runtime for delivery."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._held: dict[str, _Held] = {}

    async def on_start(self) -> None:
        self.ctx.start_soon(self._run, name="perdure-inbox")

    async def _run(self) -> None:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def stop_when_asked() -> None:
                    await self.ctx.wait_stopping()
                    scope.cancel()

                tg.start_soon(stop_when_asked)
                await self._pump()

    async def _pump(self) -> None:
        runtime = self.runtime
        info = await runtime.log.stream_info(INBOX_STREAM)
        cursor = int(info.meta.get("cursor", 0)) if info else 0
        backlog_end = info.last_seq if info else 0
        runtime._inbox_delivered(cursor, ())
        read = cursor  # every record up to here was delivered, refused or is held
        held = self._held
        while True:
            if read >= backlog_end:
                runtime._backlog_delivered()
            timeout = None
            if held:
                next_due = min(h.due for h in held.values())
                timeout = max(0.0, next_due - anyio.current_time())
            last = await runtime.log.wait_for_append(INBOX_STREAM, read, timeout=timeout)
            batch: list[Record] = []
            if last > read:
                async for record in runtime.log.read(INBOX_STREAM, after=read):
                    batch.append(record)
                    if len(batch) >= _BATCH:
                        break
            done: list[int] = []
            work: dict[str, list[tuple[int, SignalSent]]] = defaultdict(list)
            now = anyio.current_time()
            for target, h in list(held.items()):
                if h.due <= now:
                    work[target].extend(h.signals)  # the oldest first, as they came
            for record in batch:
                signal = _signal(record)
                if signal is None:
                    done.append(record.seq)
                elif signal.target in held and signal.target not in work:
                    held[signal.target].signals.append((record.seq, signal))
                else:
                    work[signal.target].append((record.seq, signal))
            if batch:
                read = batch[-1].seq
            if work:
                done += await self._deliver(work)
            runtime._inbox_held = set(held)
            new_cursor = min(h.signals[0][0] for h in held.values()) - 1 if held else read
            if new_cursor != cursor:
                cursor = new_cursor
                await runtime.log.set_meta(INBOX_STREAM, {"cursor": cursor})
            runtime._inbox_delivered(cursor, done)

    async def _deliver(self, work: dict[str, list[tuple[int, SignalSent]]]) -> list[int]:
        """Deliver each execution's signals in order; the seqs taken (or refused)."""
        limiter = anyio.CapacityLimiter(_PARALLEL)
        done: list[int] = []
        held = self._held

        async def deliver_all(target: str, signals: list[tuple[int, SignalSent]]) -> None:
            async with limiter:
                for i, (seq, signal) in enumerate(signals):
                    try:
                        await self.runtime._deliver(target, seq, signal)
                    except anyio.get_cancelled_exc_class():
                        raise
                    except Exception as exc:
                        # One execution's trouble must not hold up everyone else's
                        # signals, nor lose its own: this one and those behind it wait.
                        self._hold(target, signals[i:], exc)
                        return
                    done.append(seq)
                held.pop(target, None)

        async with anyio.create_task_group() as tg:
            for target, signals in work.items():
                tg.start_soon(deliver_all, target, signals)
        return done

    def _hold(self, target: str, signals: list[tuple[int, SignalSent]], exc: Exception) -> None:
        h = self._held.get(target)
        if h is None:
            h = self._held[target] = _Held()
        h.signals = deque(signals)
        h.attempts += 1
        delay = min(RETRY_FIRST * 2 ** (h.attempts - 1), RETRY_MAX)
        h.due = anyio.current_time() + delay
        seq, signal = signals[0]
        log.warning(
            "execution %s: delivering signal %r (inbox seq %d) failed (attempt %d: %s: %s); "
            "it stays in the inbox and is tried again in %.2fs, with %d later signal(s) "
            "for this execution behind it",
            target,
            signal.name,
            seq,
            h.attempts,
            type(exc).__name__,
            exc,
            delay,
            len(signals) - 1,
            exc_info=exc if h.attempts == 1 else None,
        )


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
