"""rt.purge: deleting finished executions (whole delegation trees) older than a cutoff.

Cutoffs are chosen against the timestamps the store recorded (``older_than=0`` takes
everything finished up to now, a day takes nothing just made; the selection itself is
tested with explicit ``now`` values), never by sleeping.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure import Agent, ExecutionNotFoundError, Runtime, record_types, retention, tool
from perdure.events import INBOX_STREAM, SignalSent, encode
from perdure.log import ANY, LmdbLog, MemoryLog, NewRecord, StorageFullError
from perdure.providers import Scripted, TerminalProviderError
from perdure.retention import Tree, batches, check_statuses, cutoff, eligible_trees
from perdure.status import pending_signals

pytestmark = pytest.mark.anyio

DAY = 86400.0


@tool(requires_confirmation=True)
def act() -> str:
    """Needs a person's approval."""
    return "acted"


def answering(name: str = "answers", text: str = "hi") -> Agent:
    return Agent(name, llm=Scripted([text] * 4))


def failing() -> Agent:
    return Agent("fails", llm=Scripted([TerminalProviderError("model down")] * 4))


def waiting() -> Agent:
    return Agent("waits", tools=[act], llm=Scripted([Scripted.call("act"), "never"]))


def boss_of(child: Agent, name: str) -> Agent:
    """An agent that delegates once to ``child``, then answers "ok"."""
    return Agent(
        name,
        llm=Scripted([Scripted.call(f"delegate_to_{child.name}", task="t"), "ok"]),
        agents=[child],
    )


async def ids(rt: Runtime) -> list[str]:
    return sorted(e.execution_id for e in await rt.executions())


async def test_purge_takes_finished_trees_and_leaves_live_work(open_runtime: Any) -> None:
    inside = anyio.Event()

    @tool
    async def slow() -> str:
        inside.set()
        await anyio.sleep_forever()
        return "unreachable"

    runner = Agent("runner", tools=[slow], llm=Scripted([Scripted.call("slow"), "x"]))
    async with open_runtime() as rt:
        assert (await rt.run(answering(), "a", execution_id="done-1")).status == "completed"
        assert (await rt.run(failing(), "b", execution_id="fail-1")).status == "failed"
        assert (await rt.run(waiting(), "c", execution_id="susp-1")).status == "suspended"
        await rt.spawn(runner, "d", execution_id="run-1")
        await rt.spawn(boss_of(answering("kid"), "boss"), "e", execution_id="tree-ok")
        await rt.spawn(boss_of(waiting(), "boss2"), "f", execution_id="tree-held")
        with anyio.fail_after(10):
            assert (await rt.wait("tree-ok", until="finished")).status == "completed"
            await inside.wait()
            assert (await rt.wait("tree-held/2")).status == "suspended"
        before = await ids(rt)
        assert "tree-ok/2" in before and "tree-held/2" in before

        # Nothing is a day old yet.
        assert await rt.purge(DAY) == []
        # A dry run names what would go and deletes nothing.
        expected = ["done-1", "fail-1", "tree-ok", "tree-ok/2"]
        assert sorted(await rt.purge(0, dry_run=True)) == expected
        assert await ids(rt) == before
        # Only some statuses, selected by the root's.
        assert await rt.purge(datetime.timedelta(0), statuses=["failed"], dry_run=True) == [
            "fail-1"
        ]

        purged = await rt.purge(0)
        assert sorted(purged) == expected
        assert purged.index("tree-ok") < purged.index("tree-ok/2")  # root first
        assert await ids(rt) == sorted(set(before) - set(expected))
        for eid in expected:
            assert await rt.log.stream_info(f"exec/{eid}") is None
            with pytest.raises(ExecutionNotFoundError, match=repr(eid)):
                await rt.result(eid)
        assert await rt.log.check() == []
        # The running, suspended and held ones are untouched, and a second purge finds
        # nothing more.
        assert (await rt.result("susp-1")).status == "suspended"
        assert (await rt.result("tree-held")).status == "suspended"
        assert (await rt.result("run-1")).status == "running"
        assert await rt.purge(0) == []
        await rt.cancel("run-1")  # so the close need not wait for its tool


async def test_purged_id_is_unknown_and_can_be_spawned_afresh(open_runtime: Any) -> None:
    async with open_runtime() as rt:
        first = await rt.run(answering(text="first"), "old prompt", execution_id="job-1")
        assert first.output == "first"
        assert await rt.purge(0) == ["job-1"]
        with pytest.raises(ExecutionNotFoundError, match="'job-1'"):
            await rt.signal("job-1", "poke", {})
        with pytest.raises(ExecutionNotFoundError, match="'job-1'"):
            await rt.state("job-1")
        assert await rt.log.stream_info("exec/job-1") is None
        # Same id, another prompt: a new execution, not a PromptMismatchError.
        again = await rt.run(answering(text="second"), "new prompt", execution_id="job-1")
        assert again.status == "completed" and again.output == "second"
        state = await rt.state("job-1")
        assert state.prompt == "new prompt"
        assert [e.execution_id for e in await rt.executions()] == ["job-1"]


class GatedLog(LmdbLog):
    """An LmdbLog whose deletes wait at a gate, so a test can act in the middle of one."""

    reached: anyio.Event
    gate: anyio.Event

    async def delete_streams(self, streams: Any) -> int:
        self.reached.set()
        await self.gate.wait()
        return await super().delete_streams(streams)


async def test_a_signal_during_a_purge_is_refused_and_recreates_nothing(
    data_dir: Path,
) -> None:
    log = await GatedLog.open(data_dir, types=record_types(), durability="process")
    log.reached, log.gate = anyio.Event(), anyio.Event()
    try:
        calls: list[int] = []

        def model_down(request: Any) -> Any:
            calls.append(1)
            raise TerminalProviderError("model down")

        fails = Agent("fails", llm=Scripted(model_down, record=False))
        async with Runtime(None, log=log) as rt:
            assert (await rt.run(fails, "b", execution_id="fail-1")).status == "failed"
            refused: list[BaseException] = []
            purged: list[str] = []

            async def purge() -> None:
                purged.extend(await rt.purge(0))

            async def signal() -> None:
                try:
                    await rt.signal("fail-1", "resume", {})
                except ExecutionNotFoundError as exc:
                    refused.append(exc)

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(purge)
                    await log.reached.wait()
                    # A failed execution takes a resume: one through rt.signal, one
                    # appended to the inbox as another process (the CLI) would.
                    tg.start_soon(signal)
                    raw = SignalSent("fail-1", "resume", {}, "cli")
                    await log.append(INBOX_STREAM, [encode(raw)], expect=ANY)
                    await anyio.wait_all_tasks_blocked()
                    log.gate.set()
                # The pump refuses the inbox signal once the stream is gone.
                while "fail-1" in await pending_signals(log):
                    await anyio.wait_all_tasks_blocked()
            assert purged == ["fail-1"]
            # Neither resume ran it again while (or after) it was deleted.
            assert len(calls) == 1
            assert len(refused) == 1 and "'fail-1'" in str(refused[0])
            assert await log.stream_info("exec/fail-1") is None
            assert [i.stream async for i in log.streams(prefix="exec/")] == []
    finally:
        await log.aclose()


class SecondDeleteFails(LmdbLog):
    """An LmdbLog whose second delete fails as a full disk would."""

    deletes = 0

    async def delete_streams(self, streams: Any) -> int:
        self.deletes += 1
        if self.deletes == 2:
            raise StorageFullError("the test's disk")
        return await super().delete_streams(streams)


async def test_a_purge_that_fails_part_way_says_what_it_deleted(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(retention, "BATCH", 1)  # one tree per delete
    log = await SecondDeleteFails.open(data_dir, types=record_types(), durability="process")
    async with Runtime(None, log=log) as rt:
        for i in range(3):
            await rt.run(answering(), "p", execution_id=f"job-{i}")
        with pytest.raises(StorageFullError) as raised:
            await rt.purge(0)
        notes = "\n".join(getattr(raised.value, "__notes__", []))
        assert "deleted 1 of the executions it chose before this failure ('job-0')" in notes
        assert "run the purge again" in notes
        assert "deleted 1 of the executions" in caplog.text  # the log says so too
        assert await ids(rt) == ["job-1", "job-2"]  # job-0 is gone; the failed one intact
        assert await rt.purge(0) == ["job-1", "job-2"]  # deletes work again
        assert await ids(rt) == []


def test_sync_facade_purges(data_dir: Path) -> None:
    with Runtime(data_dir, durability="process") as rt:
        rt.run(answering(), "a", execution_id="s-1")
        assert rt.purge(DAY) == []
        assert rt.purge(datetime.timedelta(seconds=0), dry_run=True) == ["s-1"]
        assert rt.purge(0) == ["s-1"]
        assert rt.executions() == []


async def test_purge_arguments_are_checked(open_runtime: Any) -> None:
    async with open_runtime() as rt:
        with pytest.raises(ValueError, match="at least 0"):
            await rt.purge(-1)
        with pytest.raises(ValueError, match="finite"):
            await rt.purge(float("nan"))
        with pytest.raises(TypeError, match="timedelta"):
            await rt.purge("30d")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="only a finished execution"):
            await rt.purge(0, statuses=["suspended"])
    assert check_statuses("failed") == frozenset({"failed"})
    assert cutoff(datetime.timedelta(hours=1), 10_000.0) == 6400.0


# -- the selection, on index entries written directly -----------------------------------


async def entry(log: MemoryLog, eid: str, status: str, parent: str | None = None) -> float:
    """Write an execution's index entry as the runtime would; return its updated_at."""
    meta: dict[str, Any] = {"kind": "execution", "status": status}
    if parent is not None:
        meta["parent"] = parent
    await log.append(f"exec/{eid}", [NewRecord("note", {})], expect=ANY, meta=meta)
    info = await log.stream_info(f"exec/{eid}")
    assert info is not None
    return info.updated_at


async def test_a_tree_goes_only_when_every_member_is_finished_and_old() -> None:
    from perdure.log import RecordTypes

    log = MemoryLog(RecordTypes({"note": 1}))
    finished = frozenset({"completed", "failed", "cancelled"})
    t_root = await entry(log, "p", "cancelled")
    await entry(log, "p/2", "completed", parent="p")
    await entry(log, "p/2/1", "suspended", parent="p/2")  # a grandchild still waits
    await entry(log, "q", "completed")
    t_child = await entry(log, "q/1", "failed", parent="q")
    while t_child <= t_root:  # the clock's resolution: make the child strictly newer
        t_child = await entry(log, "q/1", "failed", parent="q")
    await entry(log, "orphan", "completed", parent="gone")  # its parent has no entry
    await entry(log, "user/named", "completed")  # under a root's prefix, but its own root
    future = t_child + DAY
    trees = await eligible_trees(log, future, finished)
    assert trees == [
        Tree("orphan", ("orphan",)),
        Tree("q", ("q", "q/1")),
        Tree("user/named", ("user/named",)),
    ]
    # A cutoff between the root's update and its child's: the child is too new, so
    # the tree stays whole.
    between = await eligible_trees(log, t_root, finished)
    assert Tree("q", ("q", "q/1")) not in between
    assert await eligible_trees(log, t_root - DAY, finished) == []
    # Selected by the root's status only.
    assert await eligible_trees(log, future, frozenset({"failed"})) == []
    await entry(log, "p/2/1", "cancelled", parent="p/2")
    assert Tree("p", ("p", "p/2", "p/2/1")) in await eligible_trees(log, future, finished)
    await log.aclose()


def test_batches_never_split_a_tree() -> None:
    trees = [Tree("a", ("a",)), Tree("b", ("b", "b/1", "b/2")), Tree("c", ("c",))]
    assert list(batches(trees, size=2)) == [["a"], ["b", "b/1", "b/2"], ["c"]]
    assert list(batches(trees, size=5)) == [["a", "b", "b/1", "b/2", "c"]]
    assert list(batches([], size=5)) == []
