"""A long-lived Runtime keeps nothing per execution once it has settled.

Services embed one Runtime for months: every table, set, queue, task and heap entry
it holds for an execution must go once that execution is completed, failed,
cancelled, suspended or purged. These tests push a few hundred executions through
every path (complete, tool failure, provider failure, cancel while running, queued
and suspended, approval, rejection, contract override, budget raise, unknown
outcome, delegation, durable timers, signals with and without a timeout, streaming,
waiting, purging), then check every per-execution container of the runtime, its
inbox pump, timer service, supervisors and log against its idle size.

Timers run on the runtime's injectable wall clock (as in test_timers.py): nothing
sleeps.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure import (
    Agent,
    Budget,
    ContractViolation,
    Result,
    Runtime,
    SignalTimeout,
    sleep,
    tool,
    wait_for_signal,
)
from perdure.engine import Engine
from perdure.events import INBOX_STREAM
from perdure.execution_actor import ExecutionActor
from perdure.inbox import InboxPump
from perdure.journal import Journal
from perdure.log.lmdb_store import _CACHE_GENERATION, _MAX_CACHED_ENTRIES
from perdure.providers import LLMRequest, Scripted, TerminalProviderError
from perdure.timers import _SLACK, TimerService

pytestmark = pytest.mark.anyio

#: How many executions each path gets in the async soak (x 14 paths, x 2 rounds).
PER_PATH = 8
#: A fixed "now" for the runtime's wall clock (2026-12-01 12:00:00 UTC).
T0 = 1_796_126_400.0
#: The signal timeout the waiting executions ask for: far longer than the test runs,
#: so a timer left behind for an execution that got its signal would still be there.
WAIT_TIMEOUT = 7 * 86_400.0


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def turn(request: LLMRequest) -> int:
    """How many times the model has answered in this conversation so far."""
    return sum(1 for m in request.messages if m.role == "assistant")


def scripted(*replies: Any) -> Scripted:
    """A scripted model that keeps no request (a soak would otherwise grow it)."""
    return Scripted(list(replies), record=False)


@dataclass
class Agents:
    """Every agent the soak drives, one per path, and what their tools saw."""

    hold: anyio.Event
    holding: list[str] = field(default_factory=list)
    wired: list[str] = field(default_factory=list)
    by_name: dict[str, Agent] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Agent:
        return self.by_name[name]

    def all(self) -> list[Agent]:
        return list(self.by_name.values())


def provider_down(request: LLMRequest) -> Any:
    return TerminalProviderError("the model is down")


def make_agents(*, block_wire: bool = False) -> Agents:
    """The soak's agents. ``block_wire`` makes the non-idempotent tool hang (the setup
    that leaves its calls in doubt)."""
    agents = Agents(anyio.Event())

    @tool
    def work(n: int) -> int:
        return n

    @tool
    def explode() -> str:
        raise RuntimeError("the tool broke")

    @tool
    async def hang() -> str:
        agents.holding.append("in")
        await agents.hold.wait()
        return "let go"

    @tool("transfer", requires_confirmation=True)
    def transfer(amount: float) -> str:
        return f"moved {amount}"

    @tool
    def charge(amount: float) -> str:
        return f"charged {amount}"

    @tool(idempotent=False)
    async def wire(amount: float) -> str:
        agents.wired.append("in")
        if block_wire:
            await anyio.sleep_forever()
        return "wired"

    @tool
    def nap() -> str:
        sleep(3600.0)
        return "rested"

    @tool
    def await_go() -> Any:
        return wait_for_signal("go")

    @tool
    def await_go_or_timeout() -> Any:
        try:
            return wait_for_signal("go", timeout=WAIT_TIMEOUT)
        except SignalTimeout:
            return "timed out"

    def stepping(request: LLMRequest) -> Any:
        return Scripted.call("work", n=turn(request)) if turn(request) < 3 else "done"

    researcher = Agent("soak-researcher", llm=scripted("Paris has 2.1 million people."))
    shop = Agent(
        "soak-contract", tools=[charge], llm=scripted(Scripted.call("charge", amount=900.0), "done")
    )

    @shop.contract("max-charge")
    def max_charge(tool_name: str, args: dict[str, Any]) -> None:
        if args["amount"] > 500:
            raise ContractViolation("above 500")

    made = [
        Agent("soak-plain", tools=[work], llm=scripted(Scripted.call("work", n=1), "done")),
        Agent("soak-tool-fails", tools=[explode], llm=scripted(Scripted.call("explode"), "noted")),
        # a fresh error per call, as a real provider raises (see the scripted test below)
        Agent("soak-llm-fails", llm=Scripted(provider_down, record=False)),
        Agent("soak-hang", tools=[hang], llm=scripted(Scripted.call("hang"), "done")),
        Agent(
            "soak-approval",
            tools=[transfer],
            llm=scripted(Scripted.call("transfer", amount=5.0), "done"),
        ),
        shop,
        Agent(
            "soak-budget",
            tools=[work],
            llm=Scripted(stepping, record=False),
            budget=Budget(max_llm_calls=2),
        ),
        Agent("soak-wire", tools=[wire], llm=scripted(Scripted.call("wire", amount=1.0), "done")),
        Agent(
            "soak-manager",
            llm=scripted(
                Scripted.call("delegate_to_soak-researcher", task="population?"), "summed up"
            ),
            agents=[researcher],
        ),
        Agent("soak-nap", tools=[nap], llm=scripted(Scripted.call("nap"), "done")),
        Agent("soak-signal", tools=[await_go], llm=scripted(Scripted.call("await_go"), "done")),
        Agent(
            "soak-signal-timeout",
            tools=[await_go_or_timeout],
            llm=scripted(Scripted.call("await_go_or_timeout"), "done"),
        ),
    ]
    agents.by_name = {a.name: a for a in made}
    agents.by_name[researcher.name] = researcher
    return agents


def footprint(rt: Runtime) -> dict[str, int]:
    """The size of every container the runtime keeps per execution (or per signal,
    timer, stream or task), read from the objects themselves."""
    assert rt._root is not None and rt._executions is not None
    inbox = next(
        ctx._actor for ctx in rt._root._children.values() if isinstance(ctx._actor, InboxPump)
    )
    log_ = rt.log
    return {
        "live actors": len(rt._live),
        "purging": len(rt._purging),
        "starting": len(rt._starting),
        "slots": len(rt._slots),
        "queue": len(rt._queue),
        "queued": len(rt._queued),
        "waiters": len(rt._waiters),
        "stream sinks": len(rt._sinks),
        "inbox done": len(rt._inbox_done),
        "inbox held": len(rt._inbox_held),
        "inbox held seqs": len(rt._inbox_held_seqs),
        "inbox waiters": len(rt._inbox_waiters),
        "inbox lanes": len(inbox._lanes),
        "inbox queued": inbox._queued,
        "inbox ready": inbox._ready.statistics().current_buffer_used,
        "timer heap": len(rt._timers._heap),
        "timers": len(rt._timers._known),
        "timers by execution": len(rt._timers._by_execution),
        "execution children": len(rt._executions._children),
        "execution graces": len(rt._executions._graces),
        "root children": len(rt._root._children),
        "tool thread queue": len(rt._tool_threads._queue),
        "log append waiters": len(log_._waiters),  # type: ignore[attr-defined]
        "tasks": len(anyio.get_running_tasks()),
        **alive(rt),
    }


def alive(rt: Runtime) -> dict[str, int]:
    """How many of ``rt``'s execution actors, engines and journals are still reachable:
    each belongs to one execution alone, so none may outlive it (kept by a traceback,
    a closure, a callback), whatever holds it. (Counted by owner: earlier tests of the
    session may have left theirs, in the tracebacks pytest keeps.)"""
    gc.collect()
    owned: dict[type, Callable[[Any], bool]] = {
        ExecutionActor: lambda o: o.runtime is rt,
        Engine: lambda o: o.services is rt._services,
        Journal: lambda o: o._log is rt.log,
    }
    counts = dict.fromkeys(owned, 0)
    for obj in gc.get_objects():
        mine = owned.get(type(obj))
        if mine is not None and mine(obj):
            counts[type(obj)] += 1
    return {f"{kind.__name__} objects": n for kind, n in counts.items()}


#: What each container holds when the runtime is idle: nothing per execution.
IDLE = {
    "live actors": 0,
    "purging": 0,
    "starting": 0,
    "slots": 0,
    "queue": 0,
    "queued": 0,
    "waiters": 0,
    "stream sinks": 0,
    "inbox done": 0,
    "inbox held": 0,
    "inbox held seqs": 0,
    "inbox waiters": 0,
    "inbox lanes": 0,
    "inbox queued": 0,
    "inbox ready": 0,
    "timer heap": 0,
    "timers": 0,
    "timers by execution": 0,
    "execution children": 0,
    "execution graces": 0,
    "root children": 2,  # the inbox pump and the executions' supervisor
    "tool thread queue": 0,
    # the inbox pump's tail waits for the inbox stream to grow
    "log append waiters": 1,
    "ExecutionActor objects": 0,
    "Engine objects": 0,
    "Journal objects": 0,
}


async def left_behind(rt: Runtime, tasks_at_rest: int) -> dict[str, tuple[int, int]]:
    """What is still above its idle size once the runtime has nothing in flight, as
    {container: (size, idle size)}; empty when every container is back to idle.

    The runtime's own work after a settle (an actor stopping, a child's outcome posted
    to its parent, the inbox writing its books) finishes a moment later, on the log's
    writer thread too: this looks again after each quiet spell, for up to 30 s, and
    reports what is still there then. Tasks may be fewer than at rest, never more.
    """
    expected = {**IDLE, "tasks": tasks_at_rest}
    grown: dict[str, tuple[int, int]] = {}
    with anyio.move_on_after(30):
        while True:
            await quiesce(rt)
            sizes = footprint(rt)
            grown = {
                k: (v, expected[k])
                for k, v in sizes.items()
                if (v > expected[k] if k == "tasks" else v != expected[k])
            }
            if not grown:
                break
    return grown


async def tasks_at_rest(rt: Runtime) -> int:
    """How many tasks the open runtime runs with nothing to do (pump, timers, ...)."""
    seen = -1
    while True:
        await quiesce(rt)
        now = len(anyio.get_running_tasks())
        if now == seen:
            return now
        seen = now


def assert_bounded_caches(rt: Runtime, models: int) -> None:
    """The caches allowed to hold something after the executions are gone stay within
    their stated bounds, whatever the number of executions."""
    # once-per-model warnings: one entry per model, never per execution
    assert len(rt._services._unpriced) <= models
    assert len(rt._services._unmetered) <= models
    # dropped timers wait in the heap for a compaction, within this bound
    timers = rt._timers
    assert len(timers._heap) <= 2 * len(timers) + _SLACK
    entries = getattr(rt.log, "_entries", None)
    if entries is not None:  # the LMDB writer's two generations of index entries
        assert len(entries) <= _MAX_CACHED_ENTRIES
        assert len(rt.log._entries_old) <= _MAX_CACHED_ENTRIES  # type: ignore[attr-defined]
        assert _CACHE_GENERATION > 0


async def quiesce(rt: Runtime) -> None:
    """Wait until the runtime has nothing in flight: every actor stopped, every inbox
    signal through, the timer service idle, the post-settle tasks done.

    Awaits the objects' own events; each pass is bounded and the loop ends once a pass
    found nothing to wait for.
    """
    with anyio.fail_after(30):
        await rt.wait_recovered()
        while True:
            busy = False
            for actor in list(rt._live.values()):
                busy = True
                await actor.stopped.wait()
            last = await rt.log.last_seq(INBOX_STREAM)
            while rt._inbox_cursor < last:
                busy = True
                await rt._inbox_booked.wait()
            await rt._timers.idle()
            # Tasks started when an execution settled (a child's outcome posted to
            # its parent, a cancel cascade): they may post more signals.
            await anyio.wait_all_tasks_blocked()
            if not busy and not rt._live and rt._inbox_cursor >= last:
                return


async def drive_round(rt: Runtime, agents: Agents, clock: Clock, tag: str, n: int) -> None:
    """Push ``n`` executions through each path, to the end of each."""

    def ids(path: str) -> list[str]:
        return [f"{tag}-{path}-{i}" for i in range(n)]

    def reason(r: Result) -> Any:
        assert r.suspend_reason is not None, r
        return r.suspend_reason

    async def run_all(path: str, agent: str) -> list[Result]:
        return [await rt.run(agents[agent], "go", execution_id=eid) for eid in ids(path)]

    for r in await run_all("plain", "soak-plain"):
        assert r.status == "completed" and r.output == "done"
    for r in await run_all("toolfail", "soak-tool-fails"):
        assert r.status == "completed"
        assert any(m.is_error for m in r.transcript if m.role == "tool")
    for r in await run_all("llmfail", "soak-llm-fails"):
        assert r.status == "failed" and "the model is down" in str(r.error)

    # Cancelled while running (a slot each: max_concurrency queues the rest, and those
    # are cancelled while queued); the hold is let go once no tool waits on it.
    agents.hold = anyio.Event()
    agents.holding.clear()
    for eid in ids("hang"):
        await rt.spawn(agents["soak-hang"], "go", execution_id=eid)
    for eid in ids("hang"):
        await rt.cancel(eid, "soak")
        assert (await rt.wait(eid)).status == "cancelled"
    agents.hold.set()

    # Approved, rejected, and cancelled while suspended.
    for i, r in enumerate(await run_all("approval", "soak-approval")):
        cid = reason(r).confirmation_id
        if i % 3 == 0:
            await rt.approve(r.execution_id, cid)
        elif i % 3 == 1:
            await rt.reject(r.execution_id, cid, "no")
        else:
            await rt.cancel(r.execution_id)
        expected = "cancelled" if i % 3 == 2 else "completed"
        assert (await rt.wait(r.execution_id)).status == expected
    for r in await run_all("contract", "soak-contract"):
        assert reason(r).kind == "contract"
        await rt.approve(r.execution_id, reason(r).confirmation_id, note="override")
        assert (await rt.wait(r.execution_id)).status == "completed"
    for r in await run_all("budget", "soak-budget"):
        assert reason(r).kind == "budget"
        done = await rt.resume(r.execution_id, budget=Budget(max_llm_calls=10))
        assert done is not None and done.status == "completed"

    for r in await run_all("delegate", "soak-manager"):
        done = r if r.status == "completed" else await rt.wait(r.execution_id, until="finished")
        assert done.status == "completed" and done.output == "summed up"

    # Durable timers: each sleeps an hour of the runtime's clock, then wakes by itself.
    for r in await run_all("nap", "soak-nap"):
        assert reason(r).kind == "timer"
    clock.now += 3601.0
    rt._timers.poke()
    for eid in ids("nap"):
        assert (await rt.wait(eid, until="finished")).status == "completed"

    # Signals: without a timeout, and with one (a week) that the signal beats; a few
    # of the timed ones get no signal and time out instead.
    for r in await run_all("signal", "soak-signal"):
        assert reason(r).kind == "signal"
        await rt.signal(r.execution_id, "go", {"ok": True})
        assert (await rt.wait(r.execution_id)).status == "completed"
    timed = await run_all("signal-timeout", "soak-signal-timeout")
    for i, r in enumerate(timed):
        assert reason(r).kind == "signal" and reason(r).until is not None
        if i % 4:
            await rt.signal(r.execution_id, "go", {"ok": True})
            assert (await rt.wait(r.execution_id)).output == "done"
    # only the timers of those still waiting are kept, not a week's worth of the rest
    assert len(rt._timers) == len(range(0, n, 4))
    clock.now += WAIT_TIMEOUT + 1.0
    rt._timers.poke()
    for i, r in enumerate(timed):
        if i % 4 == 0:
            assert (await rt.wait(r.execution_id, until="finished")).status == "completed"
    clock.now += 1.0  # the next round's deadlines come after this one's

    # Execution timeouts: half finish in time (their deadline timer must go with them),
    # half are cancelled by it while they wait for an approval.
    for i, eid in enumerate(ids("deadline")):
        r = await rt.run(agents["soak-approval"], "go", execution_id=eid, execution_timeout=60.0)
        if i % 2:
            await rt.approve(eid, reason(r).confirmation_id)
            assert (await rt.wait(eid)).status == "completed"
    assert len(rt._timers) == len(range(0, n, 2))
    clock.now += 61.0
    rt._timers.poke()
    for i, eid in enumerate(ids("deadline")):
        if i % 2 == 0:
            r = await rt.wait(eid, until="finished")
            assert r.status == "cancelled" and r.cancelled_by == "deadline"
    clock.now += 1.0

    # rt.stream, to the end, twice over one execution: a live one and a replayed one.
    for eid in ids("stream"):
        seen = [item async for item in rt.stream(agents["soak-plain"], "go", execution_id=eid)]
        assert isinstance(seen[-1], Result) and seen[-1].status == "completed"
        again = [item async for item in rt.stream(agents["soak-plain"], "go", execution_id=eid)]
        assert [type(x) for x in again] == [Result]
    # A stream left early: its sink must go with it.
    for eid in ids("stream-early"):
        stream = rt.stream(agents["soak-plain"], "go", execution_id=eid)
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        assert (await rt.wait(eid)).status == "completed"


async def leave_calls_in_doubt(data_dir: Path, eids: list[str]) -> None:
    """A runtime closed while each of ``eids`` is inside a non-idempotent tool: the next
    runtime finds their calls started and never finished (unknown outcome)."""
    agents = make_agents(block_wire=True)
    async with Runtime(data_dir, durability="process", shutdown_timeout=0.05) as rt:
        for eid in eids:
            await rt.spawn(agents["soak-wire"], "go", execution_id=eid)
        with anyio.fail_after(10):
            while len(agents.wired) < len(eids):
                await anyio.wait_all_tasks_blocked()


async def resolve_in_doubt(rt: Runtime, eids: list[str]) -> None:
    for i, eid in enumerate(eids):
        r = await rt.wait(eid)
        assert r.suspend_reason is not None and r.suspend_reason.kind == "unknown_outcome"
        if i % 2:
            await rt.resolve(eid, retry=True)
        else:
            await rt.resolve(eid, complete="wired by hand")
        assert (await rt.wait(eid)).status == "completed"


@pytest.fixture(autouse=True)
def no_warnings_kept(caplog: pytest.LogCaptureFixture) -> None:
    """pytest keeps every log record of a test, and a record keeps its arguments: the
    provider error of a failed execution, whose traceback holds that execution's
    engine. The runtime's warnings are not what these tests look at."""
    caplog.set_level(logging.ERROR, logger="perdure")


async def test_nothing_is_kept_per_execution_once_it_settles(data_dir: Path) -> None:
    doubt = [f"doubt-{i}" for i in range(PER_PATH * 2)]
    await leave_calls_in_doubt(data_dir, doubt)
    agents = make_agents()
    async with Runtime(
        data_dir,
        durability="process",
        shutdown_timeout=2.0,
        agents=agents.all(),
        max_concurrency=PER_PATH // 2,
    ) as rt:
        clock = Clock()
        rt._wall_clock = clock
        await quiesce(rt)
        # warm: the first of each path loads code and fills the bounded caches
        await drive_round(rt, agents, clock, "warm", 1)
        await quiesce(rt)
        at_rest = await tasks_at_rest(rt)
        assert await left_behind(rt, at_rest) == {}

        await resolve_in_doubt(rt, doubt)
        for tag in ("a", "b"):
            await drive_round(rt, agents, clock, tag, PER_PATH)
        assert await left_behind(rt, at_rest) == {}
        assert_bounded_caches(rt, models=1)

        finished = await rt.executions()
        assert len(finished) >= 14 * 2 * PER_PATH
        assert all(e.status in ("completed", "failed", "cancelled") for e in finished)
        purged = await rt.purge(0)
        assert sorted(purged) == sorted(e.execution_id for e in finished)
        assert await left_behind(rt, at_rest) == {}
        assert await rt.executions() == []


async def test_a_timer_is_dropped_when_its_execution_stops_waiting_for_it(
    data_dir: Path,
) -> None:
    """An execution that got its signal (or was cancelled) before its timeout leaves no
    deadline behind in the timer heap: a service whose executions wait with week-long
    timeouts would otherwise hold a week's worth of finished executions' timers."""
    agents = make_agents()
    async with Runtime(
        data_dir, durability="process", shutdown_timeout=2.0, agents=agents.all()
    ) as rt:
        rt._wall_clock = Clock()
        for i in range(20):
            r = await rt.run(agents["soak-signal-timeout"], "go", execution_id=f"t-{i}")
            assert r.suspend_reason is not None and r.suspend_reason.until is not None
        assert len(rt._timers) == 20
        for i in range(20):
            if i % 2:
                await rt.signal(f"t-{i}", "go", {"ok": True})
            else:
                await rt.cancel(f"t-{i}")
        await quiesce(rt)
        assert len(rt._timers) == 0 and rt._timers._heap == []
        # a timer that still applies is kept: suspended on it again, it is there
        r = await rt.run(agents["soak-nap"], "go", execution_id="napper")
        assert r.suspend_reason is not None and r.suspend_reason.kind == "timer"
        await quiesce(rt)
        assert len(rt._timers) == 1


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_sync_runtime_keeps_nothing_per_execution(data_dir: Path, backend: Any) -> None:
    """The same through the blocking facade (its portal thread, its stream pumps), on
    either event loop it runs."""
    agents = make_agents()
    clock = Clock()
    with Runtime(
        data_dir, durability="process", shutdown_timeout=2.0, agents=agents.all(), backend=backend
    ) as sync:
        rt = sync.runtime
        portal = sync._open_portal()
        portal.call(setattr, rt, "_wall_clock", clock)

        def drive(tag: str, n: int) -> None:
            for i in range(n):
                eid = f"{tag}-{i}"
                assert (
                    sync.run(agents["soak-plain"], "go", execution_id=f"{eid}-p").output == "done"
                )
                r = sync.run(agents["soak-approval"], "go", execution_id=f"{eid}-a")
                assert r.suspend_reason is not None
                sync.approve(r.execution_id, r.suspend_reason.confirmation_id)
                assert sync.wait(r.execution_id).status == "completed"
                r = sync.run(agents["soak-signal-timeout"], "go", execution_id=f"{eid}-s")
                sync.signal(r.execution_id, "go", {"ok": True})
                assert sync.wait(r.execution_id).status == "completed"
                items = list(sync.stream(agents["soak-plain"], "go", execution_id=f"{eid}-st"))
                assert isinstance(items[-1], Result)
                for _ in sync.stream(agents["soak-plain"], "go", execution_id=f"{eid}-se"):
                    break  # left early: its pump goes
                assert sync.wait(f"{eid}-se").status == "completed"

        drive("warm", 1)
        tasks = portal.call(tasks_at_rest, rt)
        drive("s", 40)
        assert portal.call(left_behind, rt, tasks) == {}
        assert sync._pumps == set()
        assert len(sync.purge(0)) == 41 * 5
        assert portal.call(left_behind, rt, tasks) == {}
        assert portal.call(_check_bounded, rt) is None


def _check_bounded(rt: Runtime) -> None:
    assert_bounded_caches(rt, models=1)


async def test_the_timer_heap_stays_within_twice_the_timers_that_apply() -> None:
    """Dropped timers are compacted away: a thousand executions that stopped waiting
    leave the heap at most twice the size of the timers still live, plus the slack,
    and only the live ones fire, in deadline order."""

    async def never(_: Any) -> list[Any]:
        raise AssertionError("not run")

    now = [T0]
    timers = TimerService(lambda: now[0], never)
    for i in range(1000):
        timers.schedule(f"e-{i}", T0 + 1000 - i, "timer:1:0")
    for i in range(1000):
        if i % 100:
            timers.forget(f"e-{i}")
        else:  # kept: it still waits for this very timer
            timers.forget(f"e-{i}", keep=[(T0 + 1000 - i, f"e-{i}", "timer:1:0")])
        assert len(timers._heap) <= 2 * len(timers) + _SLACK
    assert len(timers) == 10
    now[0] = T0 + 2000
    assert timers.due() == [(T0 + 1000 - i, f"e-{i}", "timer:1:0") for i in range(900, -1, -100)]
    assert timers._heap == [] and timers._by_execution == {}
    timers.forget("e-0")  # nothing left of it: a no-op
    assert len(timers) == 0


async def test_a_scripted_error_raised_for_many_executions_keeps_none_of_them(
    data_dir: Path,
) -> None:
    """A script of one exception instance raises that instance at every call; each
    raise used to add its frames to the traceback the instance keeps, and with them
    every failed execution's engine, journal and state."""
    agent = Agent("down", llm=scripted(TerminalProviderError("the model is down")))
    async with Runtime(data_dir, durability="process", agents=[agent]) as rt:
        for i in range(30):
            assert (await rt.run(agent, "go", execution_id=f"d-{i}")).status == "failed"
        await quiesce(rt)
        # the last raise's traceback stays on the instance until the next one
        assert all(n <= 1 for n in alive(rt).values())


async def test_signals_delivered_behind_a_held_one_are_not_kept(data_dir: Path) -> None:
    """One execution whose deliveries keep failing holds the inbox cursor (its signal
    must be retried, at the next start too); the signals other executions took
    meanwhile must not pile up in memory while it is held."""
    from perdure.events import execution_stream, record_types
    from perdure.log import LmdbLog
    from tests.runtime.test_suspension import FlakyLog

    agents = make_agents()
    flaky = FlakyLog(await LmdbLog.open(data_dir, types=record_types(), durability="process"))
    try:
        async with Runtime(log=flaky, agents=agents.all(), shutdown_timeout=2.0) as rt:  # type: ignore[arg-type]
            waiter = agents["soak-signal"]
            assert (await rt.run(waiter, "go", execution_id="held")).is_suspended
            await quiesce(rt)
            flaky.stream, flaky.failures = execution_stream("held"), float("inf")
            assert await rt.signal("held", "go", {}) == "held"
            count = 100
            for i in range(count):
                assert (await rt.run(waiter, "go", execution_id=f"w-{i}")).is_suspended
                assert await rt.signal(f"w-{i}", "go", {}) == "delivered"
                assert (await rt.wait(f"w-{i}")).status == "completed"
            last = await rt.log.last_seq(INBOX_STREAM)
            with anyio.fail_after(10):
                while True:  # until the pump's books show everything after it through
                    booked = rt._inbox_booked
                    info = await rt.log.stream_info(INBOX_STREAM)
                    assert info is not None
                    if info.meta.get("through", 0) >= last:
                        break
                    await booked.wait()
            assert rt._inbox_cursor < last  # still held: the cursor waits for it
            assert rt._inbox_held == {"held"} and len(rt._inbox_held_seqs) == 1
            assert rt._inbox_done == set()  # through, all of them, and known to be
            flaky.failures = 0  # the store recovers: it is delivered, nothing was lost
            with anyio.fail_after(10):
                assert (await rt.wait("held", until="finished")).status == "completed"
            assert await left_behind(rt, len(anyio.get_running_tasks())) == {}
    finally:
        await flaky.aclose()


async def test_a_logging_handler_that_keeps_records_keeps_no_failed_execution(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning logged for a failed LLM call is kept by a handler that keeps records
    (pytest's capture here, a MemoryHandler in a service): it must carry the error's
    text, not the exception, whose traceback would keep the execution's engine."""
    caplog.set_level(logging.WARNING, logger="perdure")
    agent = Agent("down-logged", llm=Scripted(provider_down, record=False))
    async with Runtime(data_dir, durability="process", agents=[agent]) as rt:
        for i in range(10):
            assert (await rt.run(agent, "go", execution_id=f"l-{i}")).status == "failed"
        await quiesce(rt)
        kept = [r for r in caplog.records if "LLM call failed" in r.getMessage()]
        assert len(kept) == 10
        assert alive(rt)["Engine objects"] == 0
