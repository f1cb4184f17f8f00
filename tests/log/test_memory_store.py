"""MemoryLog against the conformance suite, plus what only a memory store can show."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import pytest

from perdure.log import EventLog, LogError, MemoryLog, NewRecord, RecordTypes

from .conformance import TYPES, EventLogConformance, note


class TestMemoryLog(EventLogConformance):
    async def open_log(self, tmp_path: Path, types: RecordTypes) -> EventLog:
        return MemoryLog(types)

    async def reopen(self, log: EventLog, tmp_path: Path, types: RecordTypes) -> EventLog:
        # A memory log's data lives only in the object: hand the same storage to a new
        # log reading with other record types (what a restarted, older program would do).
        assert isinstance(log, MemoryLog)
        await log.aclose()
        fresh = MemoryLog(types)
        fresh._streams = log._streams
        fresh._names = log._names
        fresh._index = log._index
        return fresh

    async def corrupt(self, log: EventLog, tmp_path: Path, stream: str, seq: int) -> EventLog:
        assert isinstance(log, MemoryLog)
        values = log._streams[stream].values
        damaged = bytearray(values[seq - 1])
        damaged[len(damaged) // 2] ^= 0x01
        values[seq - 1] = bytes(damaged)
        return log


def test_waker_crosses_event_loops() -> None:
    """A task waiting on a trio loop is woken by an append made on an asyncio loop."""
    log = MemoryLog(TYPES)
    woken: list[int] = []
    waiting = threading.Event()

    async def wait_on_trio() -> None:
        async def waiter() -> None:
            with anyio.fail_after(10):
                woken.append(await log.wait_for_append("s", 0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()  # the waiter is registered and parked
            waiting.set()

    async def append_on_asyncio() -> None:
        await anyio.to_thread.run_sync(waiting.wait)
        await log.append("s", [note(1)], expect=0)

    thread = threading.Thread(target=anyio.run, args=(wait_on_trio,), kwargs={"backend": "trio"})
    thread.start()
    anyio.run(append_on_asyncio, backend="asyncio")
    thread.join(10)
    assert woken == [1]


@pytest.mark.anyio
async def test_types_can_be_registered_after_creation() -> None:
    types = RecordTypes({"note": 1})
    log = MemoryLog(types)
    types.register("late")  # the log keeps its own copy: this does not reach it
    with pytest.raises(LogError, match="'late'"):
        await log.append("s", [NewRecord("late", {})], expect=0)
    log.types.register("late")
    assert await log.append("s", [NewRecord("late", {})], expect=0) == 1
