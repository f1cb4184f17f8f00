"""Replay holds off the cyclic GC while it folds a stream, and always gives it back."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence

import pytest

import perdure.journal
from perdure.events import encode, execution_stream, record_types
from perdure.journal import load_state
from perdure.log import MemoryLog, NewRecord
from perdure.log.protocol import Record
from perdure.state import ExecutionState, apply_records
from tests.runtime.test_state import llm, started

pytestmark = pytest.mark.anyio


@pytest.fixture
def gc_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


@pytest.fixture
def gc_seen_by_fold(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether GC was on at each record the replay folded."""
    seen: list[bool] = []

    def spying(state: ExecutionState, records: Sequence[Record]) -> ExecutionState:
        seen.extend(gc.isenabled() for _ in records)
        return apply_records(state, records)

    monkeypatch.setattr(perdure.journal, "apply_records", spying)
    return seen


def new(event: object) -> NewRecord:
    record = encode(event)  # type: ignore[arg-type]
    return NewRecord(record.type, record.payload)


async def long_log(steps: int) -> MemoryLog:
    log = MemoryLog(record_types())
    records = [new(started()), *(new(llm(i, text=f"t{i}")) for i in range(1, steps + 1))]
    await log.append(execution_stream("x1"), records, expect=0)
    return log


async def test_replay_folds_with_gc_off_and_turns_it_back_on(
    gc_restored: None, gc_seen_by_fold: list[bool]
) -> None:
    log = await long_log(600)  # several read chunks, so the pause spans the awaits too
    gc.enable()
    state = await load_state(log, "x1")
    assert state.step == 600
    assert len(gc_seen_by_fold) == 601 and not any(gc_seen_by_fold)
    assert gc.isenabled()


async def test_replay_leaves_gc_off_when_it_was_off(
    gc_restored: None, gc_seen_by_fold: list[bool]
) -> None:
    log = await long_log(3)
    gc.disable()
    await load_state(log, "x1")
    assert not gc.isenabled()


async def test_a_failing_replay_still_turns_gc_back_on(gc_restored: None) -> None:
    log = MemoryLog(record_types())
    # A record the fold cannot take (no call at that step): replay raises, GC comes back.
    await log.append(
        execution_stream("x1"), [NewRecord("tool.completed", {"step": 9, "status": "ok"})], 0
    )
    gc.enable()
    with pytest.raises(Exception):  # noqa: B017 - whichever error the fold raises
        await load_state(log, "x1")
    assert gc.isenabled()
