"""The one conformance suite every ``EventLog`` store must pass.

Subclass :class:`EventLogConformance` (the name does not start with ``Test``, so it is
not collected itself) and implement :meth:`open_log`, :meth:`reopen` and
:meth:`corrupt`. Every test runs on asyncio and on trio.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure.log import (
    ANY,
    ConflictError,
    CorruptRecordError,
    EventLog,
    Fault,
    LogClosedError,
    LogError,
    NewRecord,
    Record,
    RecordTypes,
    StreamInfo,
    TrimmedError,
    UnknownRecordTypeError,
    UnknownRecordVersionError,
)

pytestmark = pytest.mark.anyio

TYPES = RecordTypes({"note": 1, "step": 2, "signal": 1})


def note(i: int, **extra: Any) -> NewRecord:
    """A small record whose payload names its position."""
    return NewRecord("note", {"i": i, **extra})


async def collect(log: EventLog, stream: str, after: int = 0) -> list[Record]:
    """Every record of ``stream`` after ``after``."""
    return [record async for record in log.read(stream, after)]


async def listing(log: EventLog, prefix: str = "", where: Any = None) -> list[str]:
    """Names of the streams ``streams(prefix, where)`` yields, in order."""
    return [info.stream async for info in log.streams(prefix, where)]


async def ticks_during(items: AsyncIterator[Any]) -> tuple[list[Any], int, int]:
    """Consume ``items`` beside a task that counts its turns on the event loop.

    Returns the items and the count when the first and the last item arrived: if the
    iterator never yields to the loop, the two counts are equal.
    """
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    got: list[Any] = []
    first = -1
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        async for item in items:
            if not got:
                first = ticks
            got.append(item)
        last = ticks
        done = True
    return got, first, last


class EventLogConformance:
    """Behaviour every store shares; subclasses say how to open, reopen and corrupt."""

    async def open_log(self, tmp_path: Path, types: RecordTypes) -> EventLog:
        """A fresh, empty log."""
        raise NotImplementedError

    async def reopen(self, log: EventLog, tmp_path: Path, types: RecordTypes) -> EventLog:
        """Close ``log`` and open its data again, reading with ``types``."""
        raise NotImplementedError

    async def corrupt(self, log: EventLog, tmp_path: Path, stream: str, seq: int) -> EventLog:
        """Flip a byte inside the stored value of (stream, seq); return the log to read."""
        raise NotImplementedError

    @pytest.fixture
    async def log(self, tmp_path: Path, anyio_backend: Any) -> AsyncIterator[EventLog]:
        log = await self.open_log(tmp_path, TYPES)
        try:
            yield log
        finally:
            await log.aclose()

    # -- append, read, last_seq --------------------------------------------------------

    async def test_append_read_last_seq(self, log: EventLog) -> None:
        assert isinstance(log, EventLog)
        assert log.is_owner
        assert await log.last_seq("s") == 0
        assert await collect(log, "s") == []
        assert await log.stream_info("s") is None

        assert await log.append("s", [note(1), note(2), note(3)], expect=0) == 3
        assert await log.append("s", [NewRecord("step", {"n": 1}, version=2)], expect=3) == 4
        assert await log.last_seq("s") == 4

        records = await collect(log, "s")
        assert [r.seq for r in records] == [1, 2, 3, 4]
        assert [r.payload for r in records[:3]] == [{"i": 1}, {"i": 2}, {"i": 3}]
        assert all(r.stream == "s" for r in records)
        assert (records[3].type, records[3].version) == ("step", 2)
        assert records[0].timestamp <= records[3].timestamp
        assert [r.seq for r in await collect(log, "s", after=2)] == [3, 4]
        assert await collect(log, "s", after=4) == []
        assert await collect(log, "s", after=100) == []

        info = await log.stream_info("s")
        assert isinstance(info, StreamInfo)
        assert (info.stream, info.last_seq) == ("s", 4)
        assert info.created_at == records[0].timestamp
        assert info.updated_at == records[3].timestamp

    async def test_payloads_round_trip(self, log: EventLog) -> None:
        payloads: list[Any] = [
            None,
            True,
            0,
            -(2**63),
            2**64 - 1,
            1.5,
            "héllo ☃",
            b"\x00\xff",
            [1, [2, [3]]],
            {"nested": {"a": [1, 2.5, None]}, "": b""},
        ]
        await log.append("p", [NewRecord("note", p) for p in payloads], expect=0)
        assert [r.payload for r in await collect(log, "p")] == payloads

    async def test_streams_are_independent(self, log: EventLog) -> None:
        await log.append("a", [note(1)], expect=0)
        await log.append("b", [note(1), note(2)], expect=0)
        await log.append("a", [note(2)], expect=1)
        assert [r.payload["i"] for r in await collect(log, "a")] == [1, 2]
        assert [r.seq for r in await collect(log, "b")] == [1, 2]

    # -- expected-seq conflicts --------------------------------------------------------

    async def test_stale_append_conflicts_and_writes_nothing(self, log: EventLog) -> None:
        await log.append("s", [note(1)], expect=0)
        with pytest.raises(ConflictError) as caught:
            await log.append("s", [note(2), note(3)], expect=0, meta={"status": "x"})
        err = caught.value
        assert (err.stream, err.expected, err.actual) == ("s", 0, 1)
        assert "'s'" in str(err) and "expected last seq 0" in str(err) and "at 1" in str(err)
        assert await log.last_seq("s") == 1
        assert [r.payload for r in await collect(log, "s")] == [{"i": 1}]
        info = await log.stream_info("s")
        assert info is not None and "status" not in info.meta

    async def test_expect_ahead_of_stream_conflicts(self, log: EventLog) -> None:
        with pytest.raises(ConflictError) as caught:
            await log.append("new", [note(1)], expect=5)
        assert (caught.value.expected, caught.value.actual) == (5, 0)
        assert await log.stream_info("new") is None
        assert await listing(log) == []

    async def test_any_appends_at_the_end(self, log: EventLog) -> None:
        assert await log.append("signals/x", [note(1)], expect=ANY) == 1
        assert await log.append("signals/x", [note(2), note(3)], expect=ANY) == 3
        assert [r.seq for r in await collect(log, "signals/x")] == [1, 2, 3]

    async def test_bad_expect_is_refused(self, log: EventLog) -> None:
        for bad in (-1, 1.0, "0", True):
            with pytest.raises(LogError):
                await log.append("s", [note(1)], expect=bad)  # type: ignore[arg-type]
        assert await log.last_seq("s") == 0

    # -- batches -----------------------------------------------------------------------

    async def test_batch_with_unregistered_type_is_refused_whole(self, log: EventLog) -> None:
        with pytest.raises(LogError, match="'mystery'") as caught:
            await log.append("s", [note(1), NewRecord("mystery", {})], expect=0)
        assert not isinstance(caught.value, ConflictError)
        with pytest.raises(LogError, match="version 3"):
            await log.append("s", [note(1), NewRecord("step", {}, version=3)], expect=0)
        with pytest.raises(LogError, match="CBOR"):
            await log.append("s", [note(1), NewRecord("note", {"f": object()})], expect=0)
        with pytest.raises(LogError, match="NewRecord"):
            await log.append("s", [note(1), {"type": "note"}], expect=0)  # type: ignore[list-item]
        assert await log.last_seq("s") == 0
        assert await log.stream_info("s") is None

    async def test_a_payload_too_deep_to_read_back_is_refused_whole(self, log: EventLog) -> None:
        def nested(depth: int) -> Any:
            value: Any = "x" * 500  # long enough that the record is checked, not waved through
            for _ in range(depth):
                value = [value]
            return value

        # The decoder's limit is 400 containers; the envelope and the dict are two.
        fine, deep = nested(398), nested(399)
        with pytest.raises(LogError, match=r"record 1 \(type 'note'\).*read back.*400") as caught:
            await log.append("s", [note(1), NewRecord("note", {"v": deep})], expect=0)
        assert "'s'" in str(caught.value) and "nothing was written" in str(caught.value)
        assert await log.last_seq("s") == 0
        assert await log.append("s", [NewRecord("note", {"v": fine})], expect=0) == 1
        (record,) = [r async for r in log.read("s")]
        assert record.payload == {"v": fine}

    async def test_empty_batch_checks_expect_and_merges_meta(self, log: EventLog) -> None:
        assert await log.append("s", [], expect=0, meta={"status": "new"}) == 0
        info = await log.stream_info("s")
        assert info is not None and info.last_seq == 0 and info.meta == {"status": "new"}
        with pytest.raises(ConflictError):
            await log.append("s", [], expect=1)
        assert await log.append("s", [note(1)], expect=0) == 1

    async def test_large_batch_is_contiguous(self, log: EventLog) -> None:
        assert await log.append("big", [note(i) for i in range(3000)], expect=0) == 3000
        records = await collect(log, "big")
        assert [r.seq for r in records] == list(range(1, 3001))
        assert [r.payload["i"] for r in records] == list(range(3000))

    async def test_read_chunks_equals_read(self, log: EventLog) -> None:
        await log.append("big", [note(i) for i in range(3000)], expect=0)
        for after in (0, 1, 255, 256, 2999, 3000):
            chunks = [chunk async for chunk in log.read_chunks("big", after=after)]
            assert all(chunks), "chunks are never empty"
            flat = [r for chunk in chunks for r in chunk]
            assert flat == await collect(log, "big", after=after)
        assert len(chunks) == 0
        assert [c async for c in log.read_chunks("missing")] == []

    # -- meta --------------------------------------------------------------------------

    async def test_meta_merges_atomically_with_append(self, log: EventLog) -> None:
        await log.append("s", [note(1)], expect=0, meta={"status": "running", "kind": "a"})
        first = await log.stream_info("s")
        assert first is not None and first.meta == {"status": "running", "kind": "a"}
        await log.append("s", [note(2)], expect=1, meta={"status": "done", "extra": (1, 2)})
        info = await log.stream_info("s")
        assert info is not None
        # Shallow merge; values come back as CBOR hands them back (tuples as lists).
        assert info.meta == {"status": "done", "kind": "a", "extra": [1, 2]}
        assert info.last_seq == 2
        assert info.created_at == first.created_at
        assert info.updated_at >= first.updated_at
        # The returned mapping is a copy: changing it changes nothing stored.
        info.meta["status"] = "tampered"  # type: ignore[index]
        again = await log.stream_info("s")
        assert again is not None and again.meta["status"] == "done"

    async def test_set_meta(self, log: EventLog) -> None:
        await log.append("s", [note(1)], expect=0, meta={"status": "running"})
        await log.set_meta("s", {"status": "suspended", "reason": "approval"})
        info = await log.stream_info("s")
        assert info is not None
        assert info.meta == {"status": "suspended", "reason": "approval"}
        assert info.last_seq == 1
        with pytest.raises(LogError, match="'missing'"):
            await log.set_meta("missing", {"status": "x"})
        with pytest.raises(LogError):
            await log.set_meta("s", {1: "non-str key"})  # type: ignore[dict-item]

    # -- listing -----------------------------------------------------------------------

    async def test_streams_by_prefix_in_name_order(self, log: EventLog) -> None:
        for name in ["exec/b", "exec/a", "exec", "exec/a/child", "other", "exec0", "é/x"]:
            await log.append(name, [note(1)], expect=0)
        assert await listing(log, "exec/") == ["exec/a", "exec/a/child", "exec/b"]
        assert await listing(log, "exec") == ["exec", "exec/a", "exec/a/child", "exec/b", "exec0"]
        assert await listing(log) == sorted(
            ["exec/b", "exec/a", "exec", "exec/a/child", "other", "exec0", "é/x"]
        )
        assert await listing(log, "nothing") == []
        infos = [i async for i in log.streams("exec/a")]
        assert [(i.stream, i.last_seq) for i in infos] == [("exec/a", 1), ("exec/a/child", 1)]

    async def test_streams_where_indexed_and_not(self, log: EventLog) -> None:
        # "status" and "kind" are indexed by default; "owner" is not.
        rows = {
            "e/1": {"status": "running", "kind": "agent", "owner": "ann"},
            "e/2": {"status": "done", "kind": "agent", "owner": "bob"},
            "e/3": {"status": "running", "kind": "tool", "owner": "ann"},
            "f/1": {"status": "running", "kind": "agent", "owner": "bob"},
            "e/4": {"kind": "agent"},
        }
        for name, meta in rows.items():
            await log.append(name, [note(1)], expect=0, meta=meta)
        assert await listing(log, where={"status": "running"}) == ["e/1", "e/3", "f/1"]
        assert await listing(log, "e/", where={"status": "running"}) == ["e/1", "e/3"]
        assert await listing(log, where={"status": "running", "kind": "agent"}) == ["e/1", "f/1"]
        assert await listing(log, where={"owner": "ann"}) == ["e/1", "e/3"]
        assert await listing(log, where={"owner": "bob", "status": "running"}) == ["f/1"]
        assert await listing(log, where={"status": "nope"}) == []
        assert await listing(log, where={"kind": "agent"}) == ["e/1", "e/2", "e/4", "f/1"]

        # A changed value moves the stream between index entries.
        await log.append("e/1", [note(2)], expect=1, meta={"status": "done"})
        await log.set_meta("e/3", {"status": "done"})
        assert await listing(log, where={"status": "running"}) == ["f/1"]
        assert await listing(log, where={"status": "done"}) == ["e/1", "e/2", "e/3"]
        infos = [i async for i in log.streams(where={"status": "done", "owner": "ann"})]
        assert [(i.stream, i.last_seq, i.meta["kind"]) for i in infos] == [
            ("e/1", 2, "agent"),
            ("e/3", 1, "tool"),
        ]

    async def test_where_compares_cbor_values(self, log: EventLog) -> None:
        long_a = "x" * 200 + "a"
        long_b = "x" * 200 + "b"
        await log.append("a", [note(1)], expect=0, meta={"status": 1, "kind": long_a, "n": 1})
        await log.append("b", [note(1)], expect=0, meta={"status": True, "kind": long_b, "n": 1.0})
        await log.append("c", [note(1)], expect=0, meta={"status": None, "kind": [1, {"k": 2}]})
        assert await listing(log, where={"status": 1}) == ["a"]
        assert await listing(log, where={"status": True}) == ["b"]
        assert await listing(log, where={"status": None}) == ["c"]
        assert await listing(log, where={"kind": long_a}) == ["a"]
        assert await listing(log, where={"kind": long_b}) == ["b"]
        assert await listing(log, where={"kind": [1, {"k": 2}]}) == ["c"]
        assert await listing(log, where={"n": 1}) == ["a"]
        assert await listing(log, where={"n": 1.0}) == ["b"]

    async def test_many_streams_listing(self, log: EventLog) -> None:
        names = [f"exec/{i:05d}" for i in range(700)]
        for i, name in enumerate(names):
            await log.append(name, [], expect=0, meta={"status": "even" if i % 2 == 0 else "odd"})
        assert await listing(log, "exec/") == names
        assert await listing(log, where={"status": "odd"}) == names[1::2]

    # -- wait_for_append ---------------------------------------------------------------

    async def test_wait_for_append_wakes_in_process(self, log: EventLog) -> None:
        results: dict[str, int] = {}

        async def waiter(name: str, stream: str, after: int) -> None:
            results[name] = await log.wait_for_append(stream, after)

        await log.append("s", [note(1)], expect=0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, "w1", "s", 1)
            tg.start_soon(waiter, "w2", "s", 1)
            tg.start_soon(waiter, "w3", "s", 2)
            tg.start_soon(waiter, "other", "t", 0)
            await anyio.wait_all_tasks_blocked()
            assert results == {}
            await log.append("s", [note(2)], expect=1)
            with anyio.fail_after(10):
                while len(results) < 2:
                    await anyio.wait_all_tasks_blocked()
            assert results == {"w1": 2, "w2": 2}
            await log.append("s", [note(3), note(4)], expect=2)
            await log.append("t", [note(1)], expect=0)
        assert results == {"w1": 2, "w2": 2, "w3": 4, "other": 1}

    async def test_wait_for_append_returns_at_once_when_already_past(self, log: EventLog) -> None:
        await log.append("s", [note(1), note(2)], expect=0)
        with anyio.fail_after(5):
            assert await log.wait_for_append("s", 0) == 2
            assert await log.wait_for_append("s", 1) == 2

    async def test_wait_for_append_timeout_returns_unchanged(self, log: EventLog) -> None:
        await log.append("s", [note(1)], expect=0)
        assert await log.wait_for_append("s", 1, timeout=0.02) == 1
        assert await log.wait_for_append("nothing", 0, timeout=0.02) == 0
        assert (await log.stats())["waiters"] == 0
        # A timed-out waiter leaves nothing behind: a later append still works and a
        # later wait is woken.
        async with anyio.create_task_group() as tg:
            got: list[int] = []

            async def wait() -> None:
                got.append(await log.wait_for_append("s", 1))

            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            await log.append("s", [note(2)], expect=1)
        assert got == [2]

    async def test_wait_for_append_cancelled_leaves_no_waiter(self, log: EventLog) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(log.wait_for_append, "s", 0)
            tg.start_soon(log.wait_for_append, "t", 0)
            await anyio.wait_all_tasks_blocked()
            assert (await log.stats())["waiters"] == 2
            tg.cancel_scope.cancel()
        assert (await log.stats())["waiters"] == 0
        # A deadline cancels the same way.
        with anyio.move_on_after(0.01) as scope:
            await log.wait_for_append("s", 0)
        assert scope.cancelled_caught
        assert (await log.stats())["waiters"] == 0
        assert await log.append("s", [note(1)], expect=0) == 1

    # -- reading yields to the loop ----------------------------------------------------

    async def test_long_read_yields_to_other_tasks(self, log: EventLog) -> None:
        total = 3000
        for start in range(0, total, 1000):
            await log.append("long", [note(i) for i in range(start, start + 1000)], expect=start)
        items, first, last = await ticks_during(log.read("long"))
        assert [r.seq for r in items] == list(range(1, total + 1))
        # Another task ran while the reader was between its first and last record.
        assert last > first

    async def test_long_listing_yields_to_other_tasks(self, log: EventLog) -> None:
        for i in range(1200):
            await log.append(f"x/{i:05d}", [], expect=0, meta={"status": "s"})
        for where in (None, {"status": "s"}):
            items, first, last = await ticks_during(log.streams("x/", where))
            assert len(items) == 1200
            assert last > first

    # -- decoding errors ---------------------------------------------------------------

    async def test_unknown_type_and_version_on_read(self, log: EventLog, tmp_path: Path) -> None:
        await log.append("s", [note(1), NewRecord("step", {"v": 2}, version=2)], expect=0)
        await log.append("s", [NewRecord("signal", {})], expect=2)
        older = RecordTypes({"note": 1, "step": 1})
        log2 = await self.reopen(log, tmp_path, older)
        try:
            records = []
            with pytest.raises(UnknownRecordVersionError) as caught:
                async for record in log2.read("s"):
                    records.append(record)
            assert [r.seq for r in records] == [1]
            err = caught.value
            assert (err.stream, err.seq, err.type, err.version, err.known) == ("s", 2, "step", 2, 1)
            assert "'s' seq 2" in str(err)
            with pytest.raises(UnknownRecordTypeError) as caught_type:
                await collect(log2, "s", after=2)
            assert (caught_type.value.stream, caught_type.value.seq) == ("s", 3)
            assert caught_type.value.type == "signal"
            faults = await log2.check()
            assert {(f.stream, f.seq, f.kind) for f in faults} == {
                ("s", 2, "unknown_version"),
                ("s", 3, "unknown_type"),
            }
            # Appending a type the reader does not know is refused up front.
            with pytest.raises(LogError, match="'signal'"):
                await log2.append("s", [NewRecord("signal", {})], expect=3)
        finally:
            await log2.aclose()

    async def test_reopen_keeps_everything(self, log: EventLog, tmp_path: Path) -> None:
        await log.append("s", [note(1), note(2)], expect=0, meta={"status": "running"})
        await log.append("t", [note(1)], expect=0)
        log2 = await self.reopen(log, tmp_path, TYPES)
        try:
            assert [r.payload["i"] for r in await collect(log2, "s")] == [1, 2]
            assert await log2.last_seq("t") == 1
            assert await listing(log2, where={"status": "running"}) == ["s"]
            assert await log2.append("s", [note(3)], expect=2) == 3
            assert await log2.append("new", [note(1)], expect=0) == 1
            assert await log2.check() == []
        finally:
            await log2.aclose()

    async def test_corrupt_record_is_named_never_skipped(
        self, log: EventLog, tmp_path: Path
    ) -> None:
        await log.append("s", [note(i, pad="p" * 40) for i in range(1, 6)], expect=0)
        await log.append("t", [note(1)], expect=0)
        log2 = await self.corrupt(log, tmp_path, "s", 3)
        try:
            records: list[Record] = []
            with pytest.raises(CorruptRecordError) as caught:
                async for record in log2.read("s"):
                    records.append(record)
            assert [r.seq for r in records] == [1, 2]
            assert (caught.value.stream, caught.value.seq) == ("s", 3)
            assert "'s' seq 3" in str(caught.value)
            # Chunked reading hands out the good records, then names the bad one.
            chunked: list[Record] = []
            with pytest.raises(CorruptRecordError) as caught:
                async for chunk in log2.read_chunks("s"):
                    chunked.extend(chunk)
            assert [r.seq for r in chunked] == [1, 2] and caught.value.seq == 3
            # Reading past it works; the other stream is untouched.
            assert [r.seq for r in await collect(log2, "s", after=3)] == [4, 5]
            assert [r.seq for r in await collect(log2, "t")] == [1]
            faults = await log2.check()
            assert [(f.stream, f.seq, f.kind) for f in faults] == [("s", 3, "checksum")]
            assert all(isinstance(f, Fault) for f in faults)
            assert "stream 's' seq 3: checksum" in str(faults[0])
        finally:
            await log2.aclose()

    # -- concurrency -------------------------------------------------------------------

    async def test_concurrent_appends_to_one_stream(self, log: EventLog) -> None:
        writers, per_writer = 40, 5
        conflicts = 0

        async def writer(w: int) -> None:
            nonlocal conflicts
            for k in range(per_writer):
                while True:
                    seen = await log.last_seq("shared")
                    try:
                        await log.append("shared", [note(k, w=w), note(k, w=w)], expect=seen)
                        break
                    except ConflictError as exc:
                        assert exc.actual > seen
                        conflicts += 1

        async with anyio.create_task_group() as tg:
            for w in range(writers):
                tg.start_soon(writer, w)
        records = await collect(log, "shared")
        assert [r.seq for r in records] == list(range(1, writers * per_writer * 2 + 1))
        # Each accepted batch is contiguous and each (writer, k) landed exactly once.
        pairs = [(r.payload["w"], r.payload["i"]) for r in records]
        assert pairs[0::2] == pairs[1::2]
        assert sorted(pairs[0::2]) == [(w, k) for w in range(writers) for k in range(per_writer)]
        assert conflicts > 0

    async def test_concurrent_any_appends(self, log: EventLog) -> None:
        async def writer(w: int) -> None:
            for k in range(5):
                await log.append("signals/inbox", [note(k, w=w)], expect=ANY)

        async with anyio.create_task_group() as tg:
            for w in range(50):
                tg.start_soon(writer, w)
        records = await collect(log, "signals/inbox")
        assert [r.seq for r in records] == list(range(1, 251))
        assert sorted((r.payload["w"], r.payload["i"]) for r in records) == [
            (w, k) for w in range(50) for k in range(5)
        ]
        # Each writer's own records keep their order.
        for w in range(50):
            assert [r.payload["i"] for r in records if r.payload["w"] == w] == list(range(5))

    async def test_concurrent_appends_to_many_streams(self, log: EventLog) -> None:
        async def writer(w: int) -> None:
            last = 0
            for k in range(6):
                last = await log.append(
                    f"exec/{w}", [note(k)] * (k % 3 + 1), expect=last, meta={"status": f"k{k}"}
                )

        async with anyio.create_task_group() as tg:
            for w in range(100):
                tg.start_soon(writer, w)
        expected = [k for k in range(6) for _ in range(k % 3 + 1)]
        for w in range(100):
            assert [r.payload["i"] for r in await collect(log, f"exec/{w}")] == expected
        assert len(await listing(log, "exec/", where={"status": "k5"})) == 100
        assert await listing(log, where={"status": "k4"}) == []
        stats = await log.stats()
        assert stats["streams"] == 100
        assert stats["records"] == 100 * len(expected)
        assert await log.check() == []

    async def test_append_in_cancelled_scope_writes_nothing(self, log: EventLog) -> None:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await log.append("s", [note(1)], expect=0)
        assert scope.cancelled_caught
        assert await log.last_seq("s") == 0

    # -- validation and lifecycle ------------------------------------------------------

    async def test_stream_names_are_validated(self, log: EventLog) -> None:
        ok = "é" * 200  # 400 UTF-8 bytes
        assert await log.append(ok, [note(1)], expect=0) == 1
        assert await log.last_seq(ok) == 1
        for bad in ["", "é" * 200 + "x", "\udcff", 7, None, b"bytes"]:
            with pytest.raises(LogError, match="stream name"):
                await log.append(bad, [note(1)], expect=0)  # type: ignore[arg-type]
        with pytest.raises(LogError, match="stream name"):
            await log.last_seq("")
        with pytest.raises(LogError, match="stream name"):
            await collect(log, "x" * 401)

    async def test_closed_log_refuses_use(self, log: EventLog) -> None:
        await log.append("s", [note(1)], expect=0)
        await log.aclose()
        await log.aclose()  # idempotent
        with pytest.raises(LogClosedError):
            await log.append("s", [note(2)], expect=1)
        with pytest.raises(LogClosedError):
            await collect(log, "s")
        with pytest.raises(LogClosedError):
            await log.last_seq("s")

    async def test_aclose_in_a_cancelled_scope_closes_and_reraises(self, log: EventLog) -> None:
        await log.append("s", [note(1)], expect=0)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await log.aclose()
        assert scope.cancelled_caught
        with pytest.raises(LogClosedError):
            await log.last_seq("s")

    async def test_close_under_a_suspended_reader_and_listing(self, log: EventLog) -> None:
        """A replay or a listing suspended between chunks when the log closes: the next
        chunk is LogClosedError (never a crash, a hang or a silently short read)."""
        await log.append("long", [note(i) for i in range(600)], expect=0)
        for i in range(600):
            await log.append(f"x/{i:04d}", [], expect=0, meta={"status": "s"})
        chunks = log.read_chunks("long")
        first = await chunks.__anext__()
        assert [r.seq for r in first] == list(range(1, len(first) + 1)) and len(first) < 600
        records = log.read("long", after=10)
        assert (await records.__anext__()).seq == 11
        listings = [log.streams("x/"), log.streams(where={"status": "s"})]
        for listing_ in listings:
            assert (await listing_.__anext__()).stream == "x/0000"
        with anyio.fail_after(10):
            await log.aclose()
        for suspended in [chunks, records, *listings]:
            with pytest.raises(LogClosedError):
                with anyio.fail_after(10):
                    async for _ in suspended:
                        pass

    async def test_close_wakes_waiters_with_log_closed(self, log: EventLog) -> None:
        errors: list[BaseException] = []

        async def wait() -> None:
            try:
                await log.wait_for_append("s", 0)
            except LogClosedError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            await log.aclose()
        assert len(errors) == 1

    async def test_check_is_clean_and_stats_count(self, log: EventLog) -> None:
        assert await log.check() == []
        await log.append("a", [note(1), note(2)], expect=0, meta={"status": "x"})
        await log.append("b", [note(1)], expect=0)
        assert await log.check() == []
        stats = await log.stats()
        assert (stats["streams"], stats["records"]) == (2, 3)

    # -- delete_streams ------------------------------------------------------------------

    async def test_delete_streams_leaves_no_trace(self, log: EventLog) -> None:
        await log.append("exec/a", [note(i) for i in range(300)], 0, {"status": "done"})
        await log.append("exec/b", [note(1)], expect=0, meta={"status": "done", "kind": "k"})
        await log.append("exec/c", [note(1), note(2)], expect=0, meta={"status": "done"})
        assert await log.delete_streams(["exec/a", "exec/b", "exec/missing", "exec/a"]) == 2
        for gone in ("exec/a", "exec/b"):
            assert await log.last_seq(gone) == 0
            assert await log.stream_info(gone) is None
            assert await collect(log, gone) == []
        assert await listing(log) == ["exec/c"]
        assert await listing(log, "exec/", where={"status": "done"}) == ["exec/c"]
        assert await listing(log, where={"kind": "k"}) == []
        assert await log.check() == []
        stats = await log.stats()
        assert (stats["streams"], stats["records"]) == (1, 2)
        # Nothing left to delete: unknown names are skipped, an empty list is fine.
        assert await log.delete_streams(["exec/a", "never"]) == 0
        assert await log.delete_streams([]) == 0
        assert [r.seq for r in await collect(log, "exec/c")] == [1, 2]

    async def test_deleted_stream_starts_afresh(self, log: EventLog) -> None:
        # "hot" was written in the last commit; "cold" many commits ago (a store that
        # caches index entries by age holds the two in different places).
        await log.append("cold", [note(1), note(2), note(3)], expect=0, meta={"status": "x"})
        for i in range(3 * 8):
            await log.append("other", [note(i)], expect=i)
        await log.append("hot", [note(1), note(2)], expect=0, meta={"status": "x"})
        assert await log.delete_streams(["cold", "hot"]) == 2
        for stream, old_last in (("cold", 3), ("hot", 2)):
            with pytest.raises(ConflictError) as caught:
                await log.append(stream, [note(99)], expect=old_last)
            assert (caught.value.expected, caught.value.actual) == (old_last, 0)
            assert await log.append(stream, [note(7)], expect=0) == 1
            assert [r.payload["i"] for r in await collect(log, stream)] == [7]
            info = await log.stream_info(stream)
            assert info is not None and info.last_seq == 1 and dict(info.meta) == {}
        assert await listing(log, where={"status": "x"}) == []
        assert await log.check() == []

    async def test_delete_is_all_or_nothing_for_readers(self, log: EventLog) -> None:
        names = [f"d/{i:03}" for i in range(40)]
        for name in names:
            await log.append(name, [note(1)], expect=0, meta={"status": "s"})
        seen: list[int] = []
        done = anyio.Event()

        async def reader() -> None:
            while not done.is_set():
                seen.append(len(await listing(log, "d/", where={"status": "s"})))
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            await anyio.lowlevel.checkpoint()
            assert await log.delete_streams(names) == 40
            done.set()
        assert set(seen) <= {0, 40}
        assert await listing(log) == []

    async def test_delete_wakes_waiters_with_zero(self, log: EventLog) -> None:
        await log.append("s", [note(1)], expect=0)
        got: dict[str, int] = {}

        async def wait(name: str, stream: str) -> None:
            got[name] = await log.wait_for_append(stream, 1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "deleted", "s")
            tg.start_soon(wait, "kept", "t")
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(10):
                # "t" does not exist yet: naming it deletes nothing, wakes nobody.
                assert await log.delete_streams(["s", "t"]) == 1
                while "deleted" not in got:
                    await anyio.wait_all_tasks_blocked()
            assert got == {"deleted": 0}
            await log.append("t", [note(1), note(2)], expect=0)
        assert got == {"deleted": 0, "kept": 2}
        assert (await log.stats())["waiters"] == 0

    async def test_delete_after_close_is_refused(self, log: EventLog) -> None:
        await log.append("s", [note(1)], expect=0)
        await log.aclose()
        with pytest.raises(LogClosedError):
            await log.delete_streams(["s"])

    async def test_delete_refuses_a_bare_name_and_bad_names(self, log: EventLog) -> None:
        await log.append("s", [note(1)], expect=0)
        with pytest.raises(LogError, match="sequence of stream names"):
            await log.delete_streams("s")  # type: ignore[arg-type]
        with pytest.raises(LogError, match="stream names are str"):
            await log.delete_streams(["s", 5])  # type: ignore[list-item]
        assert await log.last_seq("s") == 1

    async def test_delete_survives_reopen(self, log: EventLog, tmp_path: Path) -> None:
        await log.append("a", [note(1), note(2)], expect=0, meta={"status": "x"})
        await log.append("b", [note(1)], expect=0, meta={"status": "x"})
        assert await log.delete_streams(["a"]) == 1
        log = await self.reopen(log, tmp_path, TYPES)
        try:
            assert await log.stream_info("a") is None
            assert await listing(log, where={"status": "x"}) == ["b"]
            assert await log.append("a", [note(5)], expect=0) == 1
            assert [r.payload["i"] for r in await collect(log, "a")] == [5]
            assert await log.check() == []
        finally:
            await log.aclose()

    # -- trim ----------------------------------------------------------------------------

    async def test_trim_then_read(self, log: EventLog) -> None:
        await log.append("s", [note(i) for i in range(1, 601)], expect=0, meta={"status": "x"})
        await log.append("other", [note(1)], expect=0)
        assert await log.trim("s", 300) == 300
        info = await log.stream_info("s")
        assert info is not None
        assert (info.first_seq, info.last_seq, dict(info.meta)) == (301, 600, {"status": "x"})
        assert await log.last_seq("s") == 600
        kept = await collect(log, "s", 300)
        assert [r.seq for r in kept] == list(range(301, 601))
        assert [r.payload["i"] for r in kept] == list(range(301, 601))
        assert [r.seq for r in await collect(log, "s", 550)] == list(range(551, 601))
        chunks = [c async for c in log.read_chunks("s", 300)]
        assert [r.seq for c in chunks for r in c] == list(range(301, 601))
        # Other streams and the listing are untouched; the listing shows first_seq too.
        assert [r.seq for r in await collect(log, "other")] == [1]
        firsts = {i.stream: i.first_seq async for i in log.streams()}
        assert firsts == {"other": 1, "s": 301}
        assert [i.first_seq async for i in log.streams(where={"status": "x"})] == [301]
        stats = await log.stats()
        assert stats["records"] == 301

    async def test_untrimmed_first_seq_is_one(self, log: EventLog) -> None:
        await log.append("s", [note(1)], expect=0)
        info = await log.stream_info("s")
        assert info is not None and info.first_seq == 1
        # Built without it (as callers did before trim existed), it still means "all kept".
        assert StreamInfo("s", 3, 0.0, 0.0).first_seq == 1

    async def test_reading_a_trimmed_range_is_named(self, log: EventLog) -> None:
        await log.append("inbox", [note(i) for i in range(1, 11)], expect=0)
        await log.trim("inbox", 4)
        for after in (0, 3):
            with pytest.raises(TrimmedError) as caught:
                await collect(log, "inbox", after)
            error = caught.value
            assert isinstance(error, LogError)
            assert (error.stream, error.after, error.first_seq) == ("inbox", after, 5)
            assert "'inbox'" in str(error) and f"seq {after + 1}" in str(error)
            assert "after=4" in str(error)
            with pytest.raises(TrimmedError):
                [c async for c in log.read_chunks("inbox", after)]
        assert [r.seq for r in await collect(log, "inbox", 4)] == list(range(5, 11))

    async def test_a_trim_between_two_chunks_is_named(self, log: EventLog) -> None:
        await log.append("s", [note(i) for i in range(1, 1001)], expect=0)
        seen: list[int] = []
        with pytest.raises(TrimmedError) as caught:
            async for chunk in log.read_chunks("s"):
                if not seen:
                    await log.trim("s", 900)
                seen += [r.seq for r in chunk]
        assert seen and seen == list(range(1, len(seen) + 1))
        assert caught.value.first_seq == 901 and caught.value.after == len(seen)

    async def test_trim_then_append(self, log: EventLog) -> None:
        await log.append("s", [note(i) for i in range(1, 6)], expect=0)
        await log.trim("s", 3)
        with pytest.raises(ConflictError) as caught:
            await log.append("s", [note(0)], expect=2)
        assert (caught.value.expected, caught.value.actual) == (2, 5)
        assert await log.append("s", [note(6)], expect=5) == 6
        assert await log.append("s", [note(7)], expect=ANY) == 7
        assert [r.payload["i"] for r in await collect(log, "s", 3)] == [4, 5, 6, 7]
        info = await log.stream_info("s")
        assert info is not None and (info.first_seq, info.last_seq) == (4, 7)
        assert await log.check() == []

    async def test_trim_all(self, log: EventLog) -> None:
        await log.append("s", [note(i) for i in range(1, 4)], expect=0, meta={"status": "x"})
        assert await log.trim("s", 3) == 3
        info = await log.stream_info("s")
        assert info is not None and (info.first_seq, info.last_seq) == (4, 3)
        assert await collect(log, "s", 3) == []
        assert await log.last_seq("s") == 3
        assert await listing(log, where={"status": "x"}) == ["s"]
        assert (await log.stats())["records"] == 0
        assert await log.check() == []
        assert await log.append("s", [note(4)], expect=3) == 4
        assert [r.seq for r in await collect(log, "s", 3)] == [4]
        # wait_for_append is unchanged: it reports the last seq, trimmed or not.
        assert await log.wait_for_append("s", 3) == 4

    async def test_trim_twice_and_below_is_a_no_op(self, log: EventLog) -> None:
        await log.append("s", [note(i) for i in range(1, 11)], expect=0)
        assert await log.trim("s", 6) == 6
        assert await log.trim("s", 6) == 0
        assert await log.trim("s", 2) == 0
        assert await log.trim("s", 0) == 0
        assert await log.trim("s", 8) == 2
        info = await log.stream_info("s")
        assert info is not None and info.first_seq == 9
        assert [r.seq for r in await collect(log, "s", 8)] == [9, 10]
        assert await log.check() == []

    async def test_trim_beyond_the_last_seq_is_refused(self, log: EventLog) -> None:
        await log.append("s", [note(1), note(2)], expect=0)
        with pytest.raises(LogError) as caught:
            await log.trim("s", 3)
        message = str(caught.value)
        assert "'s'" in message and "3" in message and "last seq is 2" in message
        assert not isinstance(caught.value, TrimmedError)
        assert [r.seq for r in await collect(log, "s")] == [1, 2]
        with pytest.raises(LogError, match=r"'never'.*last seq is 0"):
            await log.trim("never", 1)
        assert await log.trim("never", 0) == 0
        assert await log.stream_info("never") is None
        for bad in (-1, 1.0, True, None):
            with pytest.raises(LogError, match="'through' must be a seq"):
                await log.trim("s", bad)  # type: ignore[arg-type]

    async def test_trim_does_not_wake_waiters(self, log: EventLog) -> None:
        await log.append("s", [note(1), note(2)], expect=0)
        got: list[int] = []

        async def wait() -> None:
            got.append(await log.wait_for_append("s", 2))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(10):
                await log.trim("s", 2)
                await anyio.wait_all_tasks_blocked()
                assert got == []
                await log.append("s", [note(3)], expect=2)
        assert got == [3]

    async def test_delete_after_trim_starts_afresh(self, log: EventLog) -> None:
        await log.append("s", [note(i) for i in range(1, 6)], expect=0)
        await log.trim("s", 4)
        assert await log.delete_streams(["s"]) == 1
        assert await log.append("s", [note(1)], expect=0) == 1
        info = await log.stream_info("s")
        assert info is not None and (info.first_seq, info.last_seq) == (1, 1)
        assert [r.seq for r in await collect(log, "s")] == [1]
        assert await log.check() == []

    async def test_trim_after_close_is_refused(self, log: EventLog) -> None:
        await log.append("s", [note(1)], expect=0)
        await log.aclose()
        with pytest.raises(LogClosedError):
            await log.trim("s", 1)

    async def test_trim_survives_reopen(self, log: EventLog, tmp_path: Path) -> None:
        await log.append("s", [note(i) for i in range(1, 8)], expect=0, meta={"status": "x"})
        await log.trim("s", 5)
        log = await self.reopen(log, tmp_path, TYPES)
        try:
            info = await log.stream_info("s")
            assert info is not None and (info.first_seq, info.last_seq) == (6, 7)
            with pytest.raises(TrimmedError):
                await collect(log, "s")
            assert [r.seq for r in await collect(log, "s", 5)] == [6, 7]
            assert await log.append("s", [note(8)], expect=7) == 8
            assert await log.check() == []
        finally:
            await log.aclose()
