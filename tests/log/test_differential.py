"""MemoryLog and LmdbLog driven by the same random operations must answer alike.

The state machine checks records against a model; this checks everything else the
protocol promises (meta merging, ``where`` matching by canonical CBOR, index-driven
and scanned listings, empty appends, ``set_meta`` on missing streams, conflicts,
deleting streams and appending to them again, trimming and ``first_seq``) by
comparing the two stores with each other, operation by operation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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

from .conformance import TYPES

STREAMS = ["a", "a/b", "ab", "b", "é", "signals/x"]
KEYS = ["status", "kind", "owner"]  # status and kind are indexed, owner is not

meta_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([0.0, -0.0, 1.0, 1.5, float("nan"), float("inf")]),
    st.sampled_from(["", "run", "done", "x" * 40, "x" * 41]),
    st.lists(st.integers(min_value=0, max_value=2), max_size=2),
    st.dictionaries(st.sampled_from(["k"]), st.integers(0, 1), max_size=1),
)
metas = st.dictionaries(st.sampled_from(KEYS), meta_values, max_size=3)

ops = st.one_of(
    st.tuples(
        st.just("append"),
        st.sampled_from(STREAMS),
        st.integers(min_value=0, max_value=3),
        st.sampled_from(["current", "any", "stale", "ahead"]),
        st.none() | metas,
    ),
    st.tuples(st.just("set_meta"), st.sampled_from(STREAMS), metas),
    st.tuples(
        st.just("list"),
        st.sampled_from(["", "a", "a/", "é", "z"]),
        st.none() | st.dictionaries(st.sampled_from(KEYS), meta_values, max_size=2),
    ),
    st.tuples(st.just("info"), st.sampled_from(STREAMS)),
    st.tuples(st.just("delete"), st.lists(st.sampled_from(STREAMS), max_size=3)),
    st.tuples(st.just("trim"), st.sampled_from(STREAMS), st.integers(min_value=-1, max_value=2)),
    st.tuples(st.just("read"), st.sampled_from(STREAMS), st.integers(min_value=0, max_value=4)),
)


def _same(value: Any) -> Any:
    """A comparable form: NaN is not equal to itself, so compare its repr instead."""
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, dict):
        return {k: _same(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_same(v) for v in value]
    return value


async def _run(log: EventLog, op: tuple[Any, ...]) -> Any:
    try:
        if op[0] == "append":
            _, stream, count, how, meta = op
            current = await log.last_seq(stream)
            expect = {"current": current, "any": ANY, "stale": current - 1, "ahead": current + 1}
            if expect[how] is not None and expect[how] < 0:
                return "skipped"
            records = [NewRecord("note", {"i": i}) for i in range(count)]
            return await log.append(stream, records, expect=expect[how], meta=meta)
        if op[0] == "set_meta":
            return await log.set_meta(op[1], op[2])
        if op[0] == "delete":
            return await log.delete_streams(op[1])
        if op[0] == "trim":
            # Relative to the last seq: -1 trims all but one, 1 asks for one too many.
            through = await log.last_seq(op[1]) + op[2]
            return await log.trim(op[1], through) if through >= 0 else "skipped"
        if op[0] == "read":
            return [(r.seq, r.payload) async for r in log.read(op[1], op[2])]
        if op[0] == "list":
            return [
                (i.stream, i.first_seq, i.last_seq, _same(dict(i.meta)))
                async for i in log.streams(op[1], op[2])
            ]
        info = await log.stream_info(op[1])
        return None if info is None else (info.first_seq, info.last_seq, _same(dict(info.meta)))
    except ConflictError as exc:
        return ("conflict", exc.expected, exc.actual)
    except TrimmedError as exc:
        return ("trimmed", exc.after, exc.first_seq)
    except LogError as exc:
        return ("error", type(exc).__name__)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(ops, min_size=1, max_size=25), st.sampled_from(["asyncio", "trio"]))
def test_memory_and_lmdb_answer_alike(program: list[tuple[Any, ...]], backend: str) -> None:
    async def both() -> None:
        with tempfile.TemporaryDirectory(prefix="perdure-diff-") as tmp:
            memory = MemoryLog(TYPES)
            lmdb_log = await LmdbLog.open(Path(tmp), types=TYPES, durability="process")
            try:
                for step, op in enumerate(program):
                    got_memory = await _run(memory, op)
                    got_lmdb = await _run(lmdb_log, op)
                    assert got_memory == got_lmdb, (step, op)
                for stream in STREAMS:
                    assert await _run(memory, ("info", stream)) == await _run(
                        lmdb_log, ("info", stream)
                    )
                assert await memory.check() == await lmdb_log.check() == []
            finally:
                await lmdb_log.aclose()
                await memory.aclose()

    anyio.run(both, backend=backend)
