"""The inbox pump trims delivered signals from the inbox, and never one not yet through.

Every test runs a real Runtime on a real LMDB data dir, on asyncio and on trio. The log
is an ``LmdbLog`` that notes each trim (and can fail them, or the reads of one
execution's stream, on purpose); tests wait on its events, never on the clock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure import Agent, Runtime, tool, wait_for_signal
from perdure import inbox as inbox_module
from perdure.events import INBOX_STREAM, SignalSent, decode, encode, execution_stream, record_types
from perdure.log import ANY, LmdbLog, LogError, TrimmedError
from perdure.providers import Scripted

pytestmark = pytest.mark.anyio


class TrimWatchingLog(LmdbLog):
    """An LmdbLog that notes every trim and what the inbox's stored cursor was then.

    ``fail_trims`` makes trims raise; ``fail_reads_of`` makes reads of that stream raise
    (a delivery to its execution then fails, and the pump holds its lane).
    """

    trims: list[tuple[int, int]]  # (through, the stored cursor when asked), once done
    moved: anyio.Event  # set (and replaced) when a trim is done (or has failed)
    fail_trims: bool
    fail_reads_of: str | None
    read_failures: int

    def watch(self) -> TrimWatchingLog:
        self.trims, self.moved = [], anyio.Event()
        self.fail_trims, self.fail_reads_of, self.read_failures = False, None, 0
        return self

    async def trim(self, stream: str, through: int) -> int:
        info = await self.stream_info(stream)
        cursor = int(info.meta.get("cursor", 0) or 0) if info is not None else 0
        try:
            if self.fail_trims:
                raise LogError(f"injected trim failure of {stream!r}")
            return await super().trim(stream, through)
        finally:
            self.trims.append((through, cursor))
            moved, self.moved = self.moved, anyio.Event()
            moved.set()

    def read_chunks(self, stream: str, after: int = 0) -> Any:
        if stream == self.fail_reads_of:
            self.read_failures += 1
            raise LogError(f"injected read failure of {stream!r}")
        return super().read_chunks(stream, after)

    async def trimmed_through(self, through: int) -> None:
        """Wait until a trim through at least ``through`` is done (or has failed)."""
        with anyio.fail_after(20):
            while not any(t >= through for t, _ in self.trims):
                await self.moved.wait()


async def open_log(path: Path) -> TrimWatchingLog:
    log = await TrimWatchingLog.open(path, types=record_types(), durability="process")
    return log.watch()


def waiter() -> Agent:
    """Suspends waiting for a "go" signal; other signals are recorded as received."""

    @tool
    def await_go() -> Any:
        return wait_for_signal("go")

    return Agent("waiter", tools=[await_go], llm=Scripted([Scripted.call("await_go"), "went"]))


def notes(targets: Iterable[str], start: int, count: int) -> list[Any]:
    """``count`` "note" signals numbered from ``start``, spread over ``targets``."""
    targets = list(targets)
    return [
        encode(SignalSent(targets[n % len(targets)], "note", {"n": n}, "test"))
        for n in range(start, start + count)
    ]


async def send(log: LmdbLog, records: list[Any], batch: int = 100) -> int:
    """Append signals to the inbox as the CLI does; the inbox's last seq."""
    last = 0
    for at in range(0, len(records), batch):
        last = await log.append(INBOX_STREAM, records[at : at + batch], expect=ANY)
    return last


async def until_cursor(rt: Runtime, seq: int) -> None:
    """Wait until the pump's stored cursor reaches ``seq``."""
    with anyio.fail_after(20):
        while True:
            booked = rt._inbox_booked  # set at the pump's next write of its books
            info = await rt.log.stream_info(INBOX_STREAM)
            if info is not None and int(info.meta.get("cursor", 0) or 0) >= seq:
                return
            await booked.wait()


async def until_received(rt: Runtime, want: dict[str, list[int]]) -> None:
    """Wait until each execution has recorded exactly these "note" signals."""
    with anyio.fail_after(20):
        while True:
            booked = rt._inbox_booked  # the pump writes its books after deliveries
            if {eid: await received(rt.log, eid) for eid in want} == want:  # type: ignore[arg-type]
                return
            await booked.wait()


async def received(log: LmdbLog, eid: str) -> list[int]:
    """The numbers of the "note" signals the execution recorded, in order."""
    out = []
    async for record in log.read(execution_stream(eid)):
        event = decode(record)
        if event.type == "signal.received" and event.name == "note":
            out.append(event.payload["n"])
    return out


async def suspend_waiters(rt: Runtime, eids: Iterable[str]) -> None:
    for eid in eids:
        assert (await rt.run(waiter(), "wait", execution_id=eid)).is_suspended


EIDS = ("w-1", "w-2", "w-3")


async def test_a_busy_inbox_is_trimmed_every_trim_every_signals(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no quiet spell at all, the inbox is still trimmed as signals get through,
    never past the stored cursor, and each signal is delivered exactly once."""
    monkeypatch.setattr(inbox_module, "TRIM_IDLE", 3600.0)  # only the TRIM_EVERY rule
    count = 3 * inbox_module.TRIM_EVERY + 50
    log = await open_log(data_dir)
    try:
        async with Runtime(None, log=log, agents=[waiter()], shutdown_timeout=2.0) as rt:
            await suspend_waiters(rt, EIDS)
            last = await send(log, notes(EIDS, 0, count))
            await until_cursor(rt, last)
            await log.trimmed_through(3 * inbox_module.TRIM_EVERY)
            info = await log.stream_info(INBOX_STREAM)
            assert info is not None and info.last_seq == last
            assert last - info.first_seq + 1 < inbox_module.TRIM_EVERY  # the tail only
            with pytest.raises(TrimmedError):
                [r async for r in log.read(INBOX_STREAM)]
        # Stopping trims the tail too.
        info = await log.stream_info(INBOX_STREAM)
        assert info is not None and info.first_seq == last + 1
        assert [r async for r in log.read(INBOX_STREAM, info.first_seq - 1)] == []
        assert all(through <= cursor for through, cursor in log.trims), log.trims
        assert (await log.stats())["records_trimmed"] == last
        got = sorted([n for eid in EIDS for n in await received(log, eid)])
        assert got == list(range(count))  # every one, once
        for k, eid in enumerate(EIDS):
            assert await received(log, eid) == list(range(k, count, len(EIDS)))  # in order
        assert await log.check() == []
    finally:
        await log.aclose()


async def test_a_quiet_inbox_is_trimmed_when_idle(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbox_module, "TRIM_IDLE", 0.05)
    log = await open_log(data_dir)
    try:
        async with Runtime(None, log=log, agents=[waiter()], shutdown_timeout=2.0) as rt:
            await suspend_waiters(rt, EIDS[:1])
            assert await rt.signal("w-1", "note", {"n": 0}) == "delivered"
            assert await rt.signal("w-1", "note", {"n": 1}) == "delivered"
            await log.trimmed_through(2)
            info = await log.stream_info(INBOX_STREAM)
            assert info is not None and (info.first_seq, info.last_seq) == (3, 2)
            # Signals keep flowing into the trimmed inbox.
            assert await rt.signal("w-1", "note", {"n": 2}) == "delivered"
            assert await rt.signal("w-1", "go", {}) == "delivered"
            assert (await rt.wait("w-1")).status == "completed"
            await log.trimmed_through(4)
        assert await received(log, "w-1") == [0, 1, 2]
        assert all(through <= cursor for through, cursor in log.trims), log.trims
    finally:
        await log.aclose()


async def test_a_held_signal_is_never_trimmed(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lane whose delivery keeps failing keeps its signals (and every later one) in
    the inbox: trims stop short of the oldest held, whatever else got through."""
    monkeypatch.setattr(inbox_module, "TRIM_IDLE", 0.05)
    log = await open_log(data_dir)
    try:
        async with Runtime(None, log=log, agents=[waiter()], shutdown_timeout=2.0) as rt:
            await suspend_waiters(rt, EIDS)
            from tests.runtime.test_suspension import hibernated

            assert await hibernated(rt, "w-1")
            first = await send(log, notes(["w-2", "w-3"], 0, 20))
            await until_cursor(rt, first)
            await log.trimmed_through(first)
            log.fail_reads_of = execution_stream("w-1")
            assert await rt.signal("w-1", "note", {"n": 100}) == "held"
            held_seq = first + 1
            later = await send(log, notes(["w-2", "w-3"], 20, 300))
            # Everything after the held one is delivered (more than TRIM_EVERY of them)
            # and booked as through ...
            await until_received(rt, {"w-2": list(range(0, 320, 2)), "w-3": list(range(1, 320, 2))})
            with anyio.fail_after(20):
                while True:
                    booked = rt._inbox_booked
                    info = await log.stream_info(INBOX_STREAM)
                    assert info is not None
                    if info.meta.get("through") == later:
                        break
                    await booked.wait()
            # ... but the stored cursor stops at the held one, and so does every trim.
            assert info.meta["cursor"] == held_seq - 1
            assert info.meta["held"]["w-1"]["seq"] == held_seq
            assert info.first_seq == held_seq
            assert all(through < held_seq for through, _ in log.trims), log.trims
            kept = [r.seq async for r in log.read(INBOX_STREAM, held_seq - 1)]
            assert kept == list(range(held_seq, later + 1))
            from perdure.status import pending_signals

            [pending] = (await pending_signals(log))["w-1"]
            assert (pending.seq, pending.state, pending.payload) == (held_seq, "held", {"n": 100})
            # The store recovers: the held signal is delivered, then trimmed with the rest.
            log.fail_reads_of = None
            await until_cursor(rt, later)
            await log.trimmed_through(later)
        assert await received(log, "w-1") == [100]
        assert all(through <= cursor for through, cursor in log.trims), log.trims
        info = await log.stream_info(INBOX_STREAM)
        assert info is not None and info.first_seq == later + 1
    finally:
        await log.aclose()


async def test_a_restart_after_trims_delivers_the_backlog_once(data_dir: Path) -> None:
    log = await open_log(data_dir)
    try:
        async with Runtime(None, log=log, agents=[waiter()], shutdown_timeout=2.0) as rt:
            await suspend_waiters(rt, EIDS)
            first = await send(log, notes(EIDS, 0, 300))
            await until_cursor(rt, first)
        info = await log.stream_info(INBOX_STREAM)
        assert info is not None and info.first_seq == first + 1  # trimmed at the stop
        # Sent while no runtime runs (as the CLI would): the backlog of the next start.
        later = await send(log, notes(EIDS, 300, 400))
        log.trims.clear()
        async with Runtime(None, log=log, agents=[waiter()], shutdown_timeout=2.0) as rt:
            with anyio.fail_after(20):
                await rt.wait_recovered()  # the backlog is delivered first
            await until_cursor(rt, later)
        assert log.trims and all(first <= t <= later for t, _ in log.trims)
        info = await log.stream_info(INBOX_STREAM)
        assert info is not None and info.first_seq == later + 1
        for k, eid in enumerate(EIDS):
            assert await received(log, eid) == list(range(k, 700, len(EIDS)))
        assert await log.check() == []
    finally:
        await log.aclose()


class BooksHeldOpen(TrimWatchingLog):
    """Once ``hold`` is set, the inbox's books commit but their write never returns to
    the pump: a stop then cancels it between the commit and its return."""

    hold = False
    committed: anyio.Event

    async def set_meta(self, stream: str, meta: Any) -> None:
        await super().set_meta(stream, meta)
        if self.hold and stream == INBOX_STREAM:
            self.committed.set()
            await anyio.sleep_forever()


async def test_a_stop_during_the_books_write_still_trims_what_they_stored(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbox_module, "TRIM_IDLE", 3600.0)  # only the trim at the stop
    log = await BooksHeldOpen.open(data_dir, types=record_types(), durability="process")
    log.watch()
    log.committed = anyio.Event()
    try:
        async with Runtime(None, log=log, agents=[waiter()], shutdown_timeout=2.0) as rt:
            await suspend_waiters(rt, EIDS)
            log.hold = True
            await send(log, notes(EIDS, 0, 30))
            with anyio.fail_after(20):
                await log.committed.wait()
            info = await log.stream_info(INBOX_STREAM)
            assert info is not None
            stored = info.meta["cursor"]
            assert stored > 0 and info.first_seq == 1
        # The pump never heard back from that write, but its cursor is stored: the
        # trim at the stop takes it from the store.
        info = await log.stream_info(INBOX_STREAM)
        assert info is not None and info.first_seq == stored + 1
    finally:
        await log.aclose()


async def test_a_stored_cursor_behind_the_trim_does_not_stop_the_runtime(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The pump never trims past its stored cursor, but a data dir may come with one
    (trimmed by hand, say). The runtime must open, say what was lost, and deliver what
    the inbox still holds: reading from the stale cursor would fail at every start, and
    the backlog (which recovery waits for) would never be delivered."""
    caplog.set_level(logging.ERROR, logger="perdure.runtime")
    log = await open_log(data_dir)
    try:
        async with Runtime(None, log=log, agents=[waiter()], shutdown_timeout=2.0) as rt:
            await suspend_waiters(rt, EIDS[:1])
            await rt.signal("w-1", "note", {"n": 0})
            await until_cursor(rt, 1)
        last = await send(log, notes(EIDS[:1], 1, 9))
        assert await log.trim(INBOX_STREAM, last - 4) > 0  # 5 undelivered ones gone
        info = await log.stream_info(INBOX_STREAM)
        assert info is not None and info.meta["cursor"] == 1 < info.first_seq - 1
        async with Runtime(None, log=log, agents=[waiter()], shutdown_timeout=2.0) as rt:
            with anyio.fail_after(20):
                await rt.wait_recovered()
                assert await rt.signal("w-1", "go", {}) == "delivered"
                assert (await rt.wait("w-1")).status == "completed"
        assert await received(log, "w-1") == [0, 6, 7, 8, 9]
        [message] = [r.getMessage() for r in caplog.records if "lags behind" in r.getMessage()]
        assert "seq 1" in message and f"through seq {last - 4}" in message
        assert f"signals 2..{last - 4} are gone" in message
    finally:
        await log.aclose()


async def test_a_failing_trim_is_logged_and_delivery_goes_on(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(inbox_module, "TRIM_IDLE", 0.05)
    caplog.set_level(logging.WARNING, logger="perdure.runtime")
    log = await open_log(data_dir)
    log.fail_trims = True
    try:
        async with Runtime(None, log=log, agents=[waiter()], shutdown_timeout=2.0) as rt:
            await suspend_waiters(rt, EIDS[:1])
            assert await rt.signal("w-1", "note", {"n": 0}) == "delivered"
            await log.trimmed_through(1)
            assert len(log.trims) == 1  # backing off: not again at once
            assert await rt.signal("w-1", "note", {"n": 1}) == "delivered"
            assert await rt.signal("w-1", "go", {}) == "delivered"
            assert (await rt.wait("w-1")).status == "completed"
            info = await log.stream_info(INBOX_STREAM)
            assert info is not None and info.first_seq == 1  # nothing trimmed
            log.fail_trims = False
        info = await log.stream_info(INBOX_STREAM)
        assert info is not None and info.first_seq == 4  # the stop trimmed it all
        assert await received(log, "w-1") == [0, 1]
    finally:
        await log.aclose()
    warned = [r.getMessage() for r in caplog.records if "trimming the delivered" in r.getMessage()]
    assert len(warned) == 1  # once per streak of failures
    assert "injected trim failure" in warned[0] and "signals are still delivered" in warned[0]
    assert "perdure health" in warned[0]


async def test_a_client_log_never_trims(data_dir: Path) -> None:
    """Only the owner trims: the pump of a runtime over a client log leaves the inbox."""
    log = await open_log(data_dir)
    try:
        async with Runtime(None, log=log, agents=[waiter()], shutdown_timeout=2.0) as rt:
            await suspend_waiters(rt, EIDS[:1])
    finally:
        await log.aclose()

    class ClientOnly:
        is_owner = False

        async def trim(self, stream: str, through: int) -> int:
            raise AssertionError("a client trimmed")

    class Holder:
        log = ClientOnly()

    pump = inbox_module.InboxPump(Holder())  # type: ignore[arg-type]
    pump._stored_cursor, pump._trimmed = 5, 0
    await pump._trim()
    assert pump._trimmed == 0
