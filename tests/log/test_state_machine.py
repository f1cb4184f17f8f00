"""A hypothesis state machine drives each store against a model: a dict of lists.

Rules: append, stale append (must conflict and write nothing), concurrent appends at
one expected seq (exactly one wins), concurrent ANY appends, delete streams, trim a
stream's front, reopen, read from a random seq (a trimmed one must raise TrimmedError).
Async calls go through a blocking portal, one event loop per machine run, on asyncio
and on trio.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio
from anyio.from_thread import start_blocking_portal
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from perdure.log import (
    ANY,
    ConflictError,
    EventLog,
    LmdbLog,
    LogError,
    MemoryLog,
    NewRecord,
    TrimmedError,
)

from .conformance import TYPES, collect

STREAMS = ["exec/a", "exec/b", "signals/c"]
streams = st.sampled_from(STREAMS)


class LogMachine(RuleBasedStateMachine):
    """The model: each stream's payloads in seq order, and how far each was trimmed."""

    backend = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = start_blocking_portal(self.backend)
        self.portal = self._portal_cm.__enter__()
        self.dir = Path(tempfile.mkdtemp(prefix="perdure-machine-"))
        self.log: EventLog = self.portal.call(self.open)
        self.model: dict[str, list[Any]] = {s: [] for s in STREAMS}
        self.trimmed: dict[str, int] = {s: 0 for s in STREAMS}
        self.counter = 0

    async def open(self) -> EventLog:
        raise NotImplementedError

    async def reopen_log(self) -> EventLog:
        raise NotImplementedError

    def teardown(self) -> None:
        try:
            self.portal.call(self.log.aclose)
        finally:
            self._portal_cm.__exit__(None, None, None)
            shutil.rmtree(self.dir, ignore_errors=True)

    def fresh(self) -> dict[str, int]:
        self.counter += 1
        return {"n": self.counter}

    @rule(stream=streams, size=st.integers(min_value=1, max_value=4))
    def append(self, stream: str, size: int) -> None:
        payloads = [self.fresh() for _ in range(size)]
        expect = len(self.model[stream])
        records = [NewRecord("note", p) for p in payloads]
        seq = self.portal.call(self.log.append, stream, records, expect)
        assert seq == expect + size
        self.model[stream].extend(payloads)

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data())
    def stale_append_conflicts(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from([s for s in STREAMS if self.model[s]]))
        current = len(self.model[stream])
        stale = data.draw(st.integers(min_value=0, max_value=current - 1))
        records = [NewRecord("note", self.fresh())]
        try:
            self.portal.call(self.log.append, stream, records, stale)
        except ConflictError as exc:
            assert (exc.stream, exc.expected, exc.actual) == (stream, stale, current)
        else:
            raise AssertionError(f"stale append at {stale} to {stream} (at {current}) accepted")
        assert self.portal.call(self.log.last_seq, stream) == current

    @rule(stream=streams, racers=st.integers(min_value=2, max_value=6))
    def concurrent_appends_at_one_seq(self, stream: str, racers: int) -> None:
        expect = len(self.model[stream])
        payloads = [self.fresh() for _ in range(racers)]

        async def race() -> list[Any]:
            results: list[Any] = [None] * racers

            async def one(i: int) -> None:
                try:
                    results[i] = await self.log.append(
                        stream, [NewRecord("note", payloads[i])], expect
                    )
                except ConflictError as exc:
                    results[i] = exc

            async with anyio.create_task_group() as tg:
                for i in range(racers):
                    tg.start_soon(one, i)
            return results

        results = self.portal.call(race)
        winners = [i for i, result in enumerate(results) if result == expect + 1]
        assert len(winners) == 1, results
        losers = [r for r in results if isinstance(r, ConflictError)]
        assert len(losers) == racers - 1 and all(r.actual == expect + 1 for r in losers)
        self.model[stream].append(payloads[winners[0]])

    @rule(per_stream=st.lists(st.integers(min_value=0, max_value=3), min_size=3, max_size=3))
    def concurrent_any_appends(self, per_stream: list[int]) -> None:
        jobs = [
            (s, self.fresh())
            for s, count in zip(STREAMS, per_stream, strict=True)
            for _ in range(count)
        ]

        async def run() -> list[int]:
            seqs = [0] * len(jobs)

            async def one(i: int) -> None:
                stream, payload = jobs[i]
                seqs[i] = await self.log.append(stream, [NewRecord("note", payload)], ANY)

            async with anyio.create_task_group() as tg:
                for i in range(len(jobs)):
                    tg.start_soon(one, i)
            return seqs

        seqs = self.portal.call(run)
        for stream in STREAMS:
            landed = sorted(
                (seq, p["n"]) for (s, p), seq in zip(jobs, seqs, strict=True) if s == stream
            )
            start = len(self.model[stream])
            assert [seq for seq, _ in landed] == list(range(start + 1, start + 1 + len(landed)))
            self.model[stream].extend({"n": n} for _, n in landed)

    @rule(chosen=st.lists(streams, max_size=3))
    def delete_streams(self, chosen: list[str]) -> None:
        existing = {s for s in chosen if self.model[s]}
        assert self.portal.call(self.log.delete_streams, chosen) == len(existing)
        for stream in chosen:
            self.model[stream] = []
            self.trimmed[stream] = 0

        async def names() -> list[str]:
            return [info.stream async for info in self.log.streams()]

        assert self.portal.call(names) == sorted(s for s in STREAMS if self.model[s])

    @rule(stream=streams, data=st.data())
    def trim(self, stream: str, data: st.DataObject) -> None:
        last = len(self.model[stream])
        through = data.draw(st.integers(min_value=0, max_value=last + 1))
        if through > last:
            try:
                self.portal.call(self.log.trim, stream, through)
            except LogError as exc:
                assert f"last seq is {last}" in str(exc)
            else:
                raise AssertionError(f"trim of {stream} through {through} (at {last}) accepted")
            return
        removed = self.portal.call(self.log.trim, stream, through)
        assert removed == max(0, through - self.trimmed[stream])
        self.trimmed[stream] = max(self.trimmed[stream], through)

    @rule()
    def reopen(self) -> None:
        self.log = self.portal.call(self.reopen_log)

    @rule(stream=streams, data=st.data())
    def read_from_a_random_seq(self, stream: str, data: st.DataObject) -> None:
        expected = self.model[stream]
        after = data.draw(st.integers(min_value=0, max_value=len(expected) + 2))
        trimmed = self.trimmed[stream]
        if after < trimmed:
            try:
                self.portal.call(collect, self.log, stream, after)
            except TrimmedError as exc:
                assert (exc.stream, exc.after, exc.first_seq) == (stream, after, trimmed + 1)
            else:
                raise AssertionError(f"read of {stream} after {after} (trimmed {trimmed}) read")
            return
        records = self.portal.call(collect, self.log, stream, after)
        assert [r.payload for r in records] == expected[after:]
        assert [r.seq for r in records] == list(range(after + 1, len(expected) + 1))

    @invariant()
    def last_seqs_match_the_model(self) -> None:
        for stream in STREAMS:
            assert self.portal.call(self.log.last_seq, stream) == len(self.model[stream])
            info = self.portal.call(self.log.stream_info, stream)
            if info is not None:
                assert info.first_seq == self.trimmed[stream] + 1


class LmdbMachine(LogMachine):
    async def open(self) -> EventLog:
        return await LmdbLog.open(self.dir, types=TYPES, durability="fsync")

    async def reopen_log(self) -> EventLog:
        await self.log.aclose()
        log = await self.open()
        assert await log.check() == []
        return log


class MemoryMachine(LogMachine):
    async def open(self) -> EventLog:
        return MemoryLog(TYPES)

    async def reopen_log(self) -> EventLog:
        # Memory has no disk to reopen: hand the same storage to a fresh log.
        old = self.log
        assert isinstance(old, MemoryLog)
        await old.aclose()
        fresh = MemoryLog(TYPES)
        fresh._streams, fresh._names, fresh._index = old._streams, old._names, old._index
        return fresh


class LmdbTrioMachine(LmdbMachine):
    backend = "trio"


class MemoryTrioMachine(MemoryMachine):
    backend = "trio"


_settings = settings(max_examples=15, stateful_step_count=15, deadline=None)


class TestLmdbAsyncio(LmdbMachine.TestCase):
    settings = _settings


class TestLmdbTrio(LmdbTrioMachine.TestCase):
    settings = _settings


class TestMemoryAsyncio(MemoryMachine.TestCase):
    settings = _settings


class TestMemoryTrio(MemoryTrioMachine.TestCase):
    settings = _settings
