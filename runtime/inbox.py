"""The inbox pump: delivers every signal appended to the inbox stream to its execution.

Signals from this process and from other processes (the CLI, as a client of the data
dir) land in one inbox stream. The pump tails it: ``wait_for_append`` wakes at once for
in-process appends and within tens of milliseconds for another process's. It delivers
each batch, concurrently across executions and in order within one, then advances its
cursor. Delivery is idempotent (an execution records the inbox seq of the last signal it
took), so a cursor that lags after a crash only costs a few no-op deliveries.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING

import anyio

from perdure.actors import Actor
from perdure.events import INBOX_STREAM, SignalSent, decode
from perdure.log.protocol import Record

if TYPE_CHECKING:
    from perdure.runtime import Runtime

__all__ = ["InboxPump"]

log = logging.getLogger("perdure.runtime")

_BATCH = 1024
_PARALLEL = 64


class InboxPump(Actor):
    """Tails the inbox stream and hands each signal to the runtime for delivery."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_start(self) -> None:
        self.ctx.start_soon(self._run, name="perdure-inbox")

    async def _run(self) -> None:
        runtime = self.runtime
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def stop_when_asked() -> None:
                    await self.ctx.wait_stopping()
                    scope.cancel()

                tg.start_soon(stop_when_asked)
                info = await runtime.log.stream_info(INBOX_STREAM)
                cursor = int(info.meta.get("cursor", 0)) if info else 0
                runtime._inbox_delivered(cursor)
                while True:
                    await runtime.log.wait_for_append(INBOX_STREAM, cursor)
                    batch: list[Record] = []
                    async for record in runtime.log.read(INBOX_STREAM, after=cursor):
                        batch.append(record)
                        if len(batch) >= _BATCH:
                            break
                    if not batch:
                        continue
                    await self._deliver(batch)
                    cursor = batch[-1].seq
                    await runtime.log.set_meta(INBOX_STREAM, {"cursor": cursor})
                    runtime._inbox_delivered(cursor)

    async def _deliver(self, batch: list[Record]) -> None:
        by_target: dict[str, list[tuple[int, SignalSent]]] = defaultdict(list)
        for record in batch:
            event = decode(record)
            if isinstance(event, SignalSent):
                by_target[event.target].append((record.seq, event))
        limiter = anyio.CapacityLimiter(_PARALLEL)

        async def deliver_all(target: str, signals: list[tuple[int, SignalSent]]) -> None:
            async with limiter:
                for seq, signal in signals:
                    try:
                        await self.runtime._deliver(target, seq, signal)
                    except anyio.get_cancelled_exc_class():
                        raise
                    except Exception:
                        # One execution's trouble must not hold up everyone else's
                        # signals; it is logged with the execution id and the seq.
                        log.exception(
                            "execution %s: delivering signal %r (inbox seq %d) failed",
                            target,
                            signal.name,
                            seq,
                        )

        async with anyio.create_task_group() as tg:
            for target, signals in by_target.items():
                tg.start_soon(deliver_all, target, signals)
