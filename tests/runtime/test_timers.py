"""Durable timers: ``perdure.sleep`` / ``sleep_until`` suspend an execution until a
wall-clock deadline; the owning runtime fires the timer (through the inbox) and the
execution carries on by itself, across restarts.

The wall clock is the runtime's ``_wall_clock`` (the tools' deadlines use it too), so a
test moves time on by replacing it and poking the timer service: nothing sleeps.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure import Agent, Runtime, SignalTimeout, sleep, sleep_until, tool, wait_for_signal
from perdure.events import INBOX_STREAM, execution_stream
from perdure.providers import Scripted
from perdure.status import describe
from tests.runtime.timer_worker import suspended_then_killed

pytestmark = pytest.mark.anyio

#: A fixed "now" for the tests' clocks (2026-12-01 12:00:00 UTC).
T0 = 1_796_126_400.0


class Clock:
    """A wall clock a test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def on_clock(rt: Runtime, clock: Clock) -> Clock:
    """Make ``rt`` read ``clock`` (tools' deadlines and the timer service alike)."""
    rt._wall_clock = clock
    return clock


def advance(rt: Runtime, clock: Clock, seconds: float) -> None:
    """Move ``clock`` on and make ``rt``'s timer service look at it now."""
    clock.now += seconds
    rt._timers.poke()


async def index_entry(rt: Runtime, eid: str) -> dict[str, Any]:
    info = await rt.log.stream_info(execution_stream(eid))
    assert info is not None
    return dict(info.meta)


async def hibernated(rt: Runtime, eid: str) -> bool:
    """Wait until ``eid`` has no actor (a suspended execution holds none), then True."""
    with anyio.fail_after(10):
        await rt.wait_recovered()
        while (actor := rt._live.get(eid)) is not None:
            await actor.stopped.wait()
    return eid not in rt._live


async def settled(rt: Runtime, eid: str, status: str) -> Any:
    """Wait until ``eid`` finishes (it resumes by itself, not by us), with ``status``."""
    with anyio.fail_after(10):
        r = await rt.wait(eid, until="finished")
    assert r.status == status
    return r


async def entry_when(
    rt: Runtime, eid: str, pred: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Wait until ``eid``'s index entry satisfies ``pred`` (each append may change it)."""
    with anyio.fail_after(10):
        while True:
            seen = await _last(rt, eid)  # before the check: no append is missed
            meta = await index_entry(rt, eid)
            if pred(meta):
                return meta
            await rt.log.wait_for_append(execution_stream(eid), after=seen)


async def timers_idle(rt: Runtime) -> None:
    """Wait until the timer service has fired (or dropped) everything due."""
    with anyio.fail_after(10):
        await rt.wait_recovered()
        await rt._timers.idle()


async def _last(rt: Runtime, eid: str) -> int:
    info = await rt.log.stream_info(execution_stream(eid))
    assert info is not None
    return info.last_seq


def sleeper(name: str, body: Callable[[], Any]) -> Agent:
    """An agent whose model calls tool ``nap`` (running ``body``) once, then says done."""

    @tool("nap", description="waits")
    def nap() -> Any:
        return body()

    return Agent(name, tools=[nap], llm=Scripted([Scripted.call("nap"), "done"], record=False))


def napping(ran: list[str], seconds: float = 3600.0) -> Agent:
    def body() -> str:
        ran.append("before")
        sleep(seconds)
        ran.append("after")
        return "rested"

    return sleeper("napper", body)


async def test_sleep_suspends_and_the_timer_resumes_it_by_itself(open_runtime: Any) -> None:
    ran: list[str] = []
    agent = napping(ran)
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="n-1")
        assert r.is_suspended and r.suspend_reason is not None
        assert r.suspend_reason.kind == "timer"
        assert r.suspend_reason.until == T0 + 3600.0
        assert r.suspend_reason.name == "timer:2:0"
        meta = await index_entry(rt, "n-1")
        assert meta["reason"] == "timer" and meta["timer"] == [T0 + 3600.0, "timer:2:0"]
        assert await hibernated(rt, "n-1")
        posted = await rt.log.last_seq(INBOX_STREAM)
        advance(rt, clock, 3599.0)  # not yet
        await timers_idle(rt)  # the service looked at the clock, and posted nothing
        assert await rt.log.last_seq(INBOX_STREAM) == posted
        assert (await rt.result("n-1")).is_suspended
        advance(rt, clock, 1.0)
        r = await settled(rt, "n-1", "completed")
        assert r.output == "done"
        assert (await index_entry(rt, "n-1")).get("timer") is None
    # The code before the sleep ran again on resume; the code after it once.
    assert ran == ["before", "before", "after"]


async def test_a_timer_survives_a_restart_and_fires_at_open_when_overdue(
    open_runtime: Any, data_dir: Path
) -> None:
    ran: list[str] = []
    agent = napping(ran, seconds=86400.0)
    async with open_runtime(agents=[agent]) as rt:
        on_clock(rt, Clock())
        assert (await rt.run(agent, "go", execution_id="n-2")).is_suspended
    # Reopened before the deadline: still asleep, and it holds no actor.
    rt = Runtime(data_dir, durability="process", shutdown_timeout=2.0, agents=[agent])
    on_clock(rt, Clock(T0 + 3600.0))
    async with rt:
        await timers_idle(rt)
        assert len(rt._timers) == 1  # known from the index alone
        assert await hibernated(rt, "n-2")
        assert (await rt.result("n-2")).is_suspended
    # Reopened after it (the process was down then): it fires at open.
    rt = Runtime(data_dir, durability="process", shutdown_timeout=2.0, agents=[agent])
    on_clock(rt, Clock(T0 + 2 * 86400.0))
    async with rt:
        r = await settled(rt, "n-2", "completed")
        assert r.output == "done"
    assert ran == ["before", "before", "after"]


async def test_a_deadline_already_past_does_not_suspend(open_runtime: Any) -> None:
    ran: list[str] = []

    def body() -> str:
        sleep(0)
        sleep_until(T0 - 1.0)
        sleep_until(datetime.datetime.fromtimestamp(T0, datetime.UTC))
        ran.append("through")
        return "ok"

    agent = sleeper("past", body)
    async with open_runtime(agents=[agent]) as rt:
        on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="p-1")
        assert r.status == "completed"
    assert ran == ["through"]


async def test_two_sleeps_in_one_tool_wait_in_turn(open_runtime: Any) -> None:
    ran: list[str] = []

    def body() -> str:
        ran.append("a")
        sleep(60)
        ran.append("b")
        sleep_until(T0 + 600.0)
        ran.append("c")
        return "ok"

    agent = sleeper("twice", body)
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="t-1")
        assert r.suspend_reason is not None and r.suspend_reason.name == "timer:2:0"
        advance(rt, clock, 60.0)
        meta = await entry_when(rt, "t-1", lambda m: (m.get("timer") or [0, ""])[1] == "timer:2:1")
        assert meta["status"] == "suspended" and meta["timer"] == [T0 + 600.0, "timer:2:1"]
        advance(rt, clock, 600.0)
        assert (await settled(rt, "t-1", "completed")).output == "done"
    assert ran == ["a", "a", "b", "a", "b", "c"]


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (lambda: sleep(-1), ValueError, "-1"),
        (lambda: sleep(math.nan), ValueError, "nan"),
        (lambda: sleep(math.inf), ValueError, "inf"),
        (lambda: sleep("10"), TypeError, "'10'"),
        (lambda: sleep(True), TypeError, "True"),
        (lambda: sleep_until(None), TypeError, "None"),
        (lambda: sleep_until(math.nan), ValueError, "nan"),
        (lambda: sleep_until(datetime.datetime(2026, 12, 3, 10)), ValueError, "naive"),
    ],
)
async def test_bad_durations_are_refused_inside_the_tool(
    open_runtime: Any, call: Callable[[], Any], error: type[Exception], text: str
) -> None:
    agent = sleeper("bad", call)
    async with open_runtime(agents=[agent]) as rt:
        r = await rt.run(agent, "go", execution_id="b-1")
        state = await rt.state("b-1")
    assert r.status == "completed"  # the error went back to the model, as any tool's
    tool_result = next(m for m in state.messages if m.role == "tool").content
    assert error.__name__ in tool_result and text in tool_result


async def test_bad_durations_are_refused_outside_a_runtime_too() -> None:
    with pytest.raises(ValueError, match="-5"):
        sleep(-5)
    with pytest.raises(TypeError, match="'soon'"):
        sleep_until("soon")  # type: ignore[arg-type]


async def test_cancel_while_sleeping_drops_the_timer(open_runtime: Any) -> None:
    ran: list[str] = []
    agent = napping(ran)
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        assert (await rt.run(agent, "go", execution_id="c-1")).is_suspended
        await rt.cancel("c-1", "not needed")
        assert (await rt.wait("c-1")).status == "cancelled"
        seq = await _last(rt, "c-1")
        advance(rt, clock, 7200.0)
        # The timer service took the due timer and dropped it: nothing was posted.
        await timers_idle(rt)
        assert len(rt._timers) == 0
        from perdure.status import pending_signals

        assert await pending_signals(rt.log) == {}
        assert await _last(rt, "c-1") == seq
        assert (await rt.result("c-1")).status == "cancelled"
    assert ran == ["before"]


async def test_a_timer_fired_early_by_hand_resumes_it_and_the_timer_is_dropped(
    open_runtime: Any,
) -> None:
    ran: list[str] = []
    agent = napping(ran)
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        assert (await rt.run(agent, "go", execution_id="e-1")).is_suspended
        assert await rt.signal("e-1", "timer:2:0", {"early": True}) == "delivered"
        assert (await settled(rt, "e-1", "completed")).output == "done"
        seq = await _last(rt, "e-1")
        advance(rt, clock, 7200.0)
        await timers_idle(rt)
        assert len(rt._timers) == 0
        assert await _last(rt, "e-1") == seq
    assert ran == ["before", "before", "after"]


# -- across a real SIGKILL ------------------------------------------------------------------


async def test_a_sleep_survives_sigkill_before_and_after_the_timer_fires(
    data_dir: Path, tmp_path: Path, anyio_backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(__file__).resolve().parents[2]
    side_file = tmp_path / "side.txt"
    env = {
        **os.environ,
        "PERDURE_TEST_BACKEND": anyio_backend_name,
        "PERDURE_SIDE_FILE": str(side_file),
    }

    procs: list[subprocess.Popen[str]] = []

    def worker(mode: str, **extra: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "tests.runtime.timer_worker", str(data_dir), mode]
        proc = subprocess.Popen(
            argv, cwd=root, stdout=subprocess.PIPE, text=True, env={**env, **extra}
        )
        procs.append(proc)
        return proc

    async def in_thread(fn: Callable[[], Any]) -> Any:
        with anyio.fail_after(60):
            return await anyio.to_thread.run_sync(fn, abandon_on_cancel=True)

    try:
        # 1. It sleeps; the process is SIGKILLed while it does.
        event = await suspended_then_killed(data_dir, "sleep", side_file, anyio_backend_name)
        assert event["kind"] == "timer"
        # 2. Two hours later (by its clock) the next process fires it at open; the tool
        # is re-run, passes its sleep, and the process dies before the call completes.
        proc = worker("wake", PERDURE_TEST_CLOCK_OFFSET="7200")
        assert await in_thread(proc.wait) == -signal.SIGKILL
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert side_file.read_text().splitlines() == ["before", "before", "after-sleep"]
    # 3. A runtime here finishes it: the timer's signal is in its log, so the sleep
    # returns at once (this clock is before the deadline: that does not matter).
    from tests.runtime.timer_worker import dozer

    monkeypatch.setenv("PERDURE_SIDE_FILE", str(side_file))
    agent = dozer
    async with Runtime(data_dir, durability="process", agents=[agent]) as rt:
        r = await settled(rt, "z-1", "completed")
        assert r.output == "awake"
        state = await rt.state("z-1")
        fired = [r async for r in rt.log.read(execution_stream("z-1"))]
    assert side_file.read_text().splitlines() == [
        "before",
        "before",
        "after-sleep",
        "before",
        "after",
    ]
    received = [r for r in fired if r.type == "signal.received"]
    assert [r.payload["name"] for r in received] == ["timer:2:0"]
    assert received[0].payload["by"] == "timer"
    assert state.calls == [] and state.status == "completed"


async def test_parallel_sleeps_and_an_approval_wake_in_deadline_order(open_runtime: Any) -> None:
    ran: list[str] = []

    @tool("short_nap", description="sleeps a minute")
    def short_nap() -> str:
        sleep(60)
        ran.append("short")
        return "short"

    @tool("long_nap", description="sleeps ten minutes")
    def long_nap() -> str:
        sleep(600)
        ran.append("long")
        return "long"

    @tool("move", description="needs an approval", requires_confirmation=True)
    def move() -> str:
        ran.append("moved")
        return "moved"

    turn = [Scripted.call("long_nap"), Scripted.call("short_nap"), Scripted.call("move")]
    agent = Agent("parallel", tools=[short_nap, long_nap, move], llm=Scripted([turn, "done"]))
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="par-1")
        assert r.suspend_reason is not None and len(r.suspend_reason.pending) == 3
        meta = await index_entry(rt, "par-1")
        # The earliest of its timers, whichever blocker the reason names first.
        assert meta["timer"] == [T0 + 60.0, "timer:3:0"]
        assert meta["reason"] == "timer"  # the first blocker, in call order
        assert describe(meta).startswith("suspended (timer until ")
        advance(rt, clock, 60.0)
        meta = await entry_when(rt, "par-1", lambda m: (m.get("timer") or [0])[0] == T0 + 600.0)
        assert ran == ["short"]
        assert await hibernated(rt, "par-1")
        meta = await index_entry(rt, "par-1")
        assert meta["status"] == "suspended" and meta["timer"] == [T0 + 600.0, "timer:2:0"]
        await rt.approve("par-1", meta["confirmations"][0])
        advance(rt, clock, 600.0)
        assert (await settled(rt, "par-1", "completed")).output == "done"
    assert sorted(ran) == ["long", "moved", "short"]


async def test_describe_names_the_timer_beside_another_reason() -> None:
    until = T0 + 3600.0
    local = datetime.datetime.fromtimestamp(until).strftime("%Y-%m-%d %H:%M:%S")
    sleeping = {"status": "suspended", "reason": "timer", "timer": [until, "timer:2:0"]}
    assert describe(sleeping) == f"suspended (timer until {local})"
    approval = {**sleeping, "reason": "approval", "confirmations": ["c-1"]}
    assert describe(approval) == f"suspended (approval c-1; timer until {local})"
    assert describe({"status": "suspended", "reason": "signal"}) == "suspended (signal)"
    # A sleep first in the turn, an approval after it: both are named.
    first = {**sleeping, "confirmations": ["c-2"]}
    assert describe(first) == f"suspended (timer until {local}; confirmation c-2)"


# -- wait_for_signal(name, timeout=...) -------------------------------------------------------


def timed_waiter(ran: list[Any], timeout: float = 300.0, catch: bool = True) -> Agent:
    def body() -> Any:
        ran.append("invoked")
        try:
            payload = wait_for_signal("paid", timeout=timeout)
        except SignalTimeout as exc:
            if not catch:
                raise
            ran.append(("timeout", exc.name, exc.timeout))
            return "gave up"
        ran.append(("paid", payload))
        return "paid"

    return sleeper("timed", body)


async def test_a_timed_wait_returns_the_signal_that_comes_first(open_runtime: Any) -> None:
    ran: list[Any] = []
    agent = timed_waiter(ran)
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="w-1")
        assert r.suspend_reason is not None and r.suspend_reason.kind == "signal"
        assert (r.suspend_reason.name, r.suspend_reason.timer) == ("paid", "timer:2:0")
        meta = await index_entry(rt, "w-1")
        assert meta["reason"] == "signal" and meta["timer"] == [T0 + 300.0, "timer:2:0"]
        assert describe(meta).startswith("suspended (signal; timer until ")
        await rt.signal("w-1", "paid", {"ref": 7})
        assert (await settled(rt, "w-1", "completed")).output == "done"
        seq = await _last(rt, "w-1")
        advance(rt, clock, 600.0)  # the timeout passes: nothing happens
        await timers_idle(rt)
        assert await _last(rt, "w-1") == seq
    assert ran == ["invoked", "invoked", ("paid", {"ref": 7})]


async def test_a_timed_wait_raises_signal_timeout_when_the_timer_fires_first(
    open_runtime: Any,
) -> None:
    ran: list[Any] = []
    agent = timed_waiter(ran)
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        assert (await rt.run(agent, "go", execution_id="w-2")).is_suspended
        advance(rt, clock, 300.0)
        assert (await settled(rt, "w-2", "completed")).output == "done"
        tool_result = next(m for m in (await rt.state("w-2")).messages if m.role == "tool")
    assert ran == ["invoked", "invoked", ("timeout", "paid", 300.0)]
    assert tool_result.content == "gave up"


async def test_an_uncaught_signal_timeout_reaches_the_model(open_runtime: Any) -> None:
    ran: list[Any] = []
    agent = timed_waiter(ran, timeout=0, catch=False)
    async with open_runtime(agents=[agent]) as rt:
        on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="w-3")  # timeout 0: at once
        tool_result = next(m for m in (await rt.state("w-3")).messages if m.role == "tool")
    assert r.status == "completed" and ran == ["invoked"]
    assert tool_result.content == (
        "ERROR (SignalTimeout): execution 'w-3' step 2 (tool 'nap'): no signal 'paid' within 0s"
    )


async def test_a_bad_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="-1"):
        wait_for_signal("x", timeout=-1)
    with pytest.raises(TypeError, match="'soon'"):
        wait_for_signal("x", timeout="soon")  # type: ignore[arg-type]
