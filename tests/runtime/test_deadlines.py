"""Execution timeouts: ``spawn(..., execution_timeout=...)`` (or the agent's default)
fixes a deadline in the start record; if the execution has not finished by then it is
cancelled (``cancelled_by == "deadline"``), whether it runs, waits in the queue or is
suspended, in this process or after a restart, its children with it.

Time is the runtime's ``_wall_clock``, moved by hand (see test_timers): nothing sleeps.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure import Agent, AgentDefinitionError, Runtime, tool
from perdure.events import INBOX_STREAM
from perdure.providers import Scripted
from tests.runtime.test_timers import T0, Clock, advance, index_entry, on_clock, settled
from tests.runtime.timer_worker import suspended_then_killed

pytestmark = pytest.mark.anyio


def signer(ran: list[str], **agent_kw: Any) -> Agent:
    """Asks to call ``sign``, which needs an approval, then says done."""

    @tool("sign", description="Sign it", requires_confirmation=True)
    def sign() -> str:
        ran.append("signed")
        return "signed"

    llm = Scripted([Scripted.call("sign"), "done"], record=False)
    return Agent("signer", tools=[sign], llm=llm, **agent_kw)


async def test_a_suspended_execution_is_cancelled_when_its_deadline_passes(
    open_runtime: Any,
) -> None:
    ran: list[str] = []
    agent = signer(ran)
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="dl-1", execution_timeout=3600)
        assert r.is_suspended and r.suspend_reason.kind == "approval"  # type: ignore[union-attr]
        assert r.deadline == datetime.datetime.fromtimestamp(T0 + 3600, datetime.UTC)
        assert (await index_entry(rt, "dl-1"))["deadline"] == T0 + 3600
        assert [i.deadline for i in await rt.executions()] == [T0 + 3600]
        advance(rt, clock, 3599)
        await rt._timers.idle()
        assert (await rt.result("dl-1")).is_suspended  # not yet
        advance(rt, clock, 1)
        r = await settled(rt, "dl-1", "cancelled")
        assert r.is_cancelled and r.cancelled_by == "deadline"
        assert r.cancel_reason is not None and "execution timeout passed" in r.cancel_reason
        assert "2026-12-01T13:00:00+00:00" in r.cancel_reason
        assert len(rt._timers) == 0
        with pytest.raises(Exception, match="cancelled"):
            await rt.approve("dl-1", "c-x")  # too late: it takes no more signals
    assert ran == []


async def test_finishing_in_time_drops_the_deadline(open_runtime: Any) -> None:
    ran: list[str] = []
    agent = signer(ran, execution_timeout=datetime.timedelta(hours=1))
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="dl-2")
        assert r.deadline is not None and r.deadline.timestamp() == T0 + 3600
        assert len(rt._timers) == 1
        await rt.approve("dl-2", r.suspend_reason.confirmation_id)  # type: ignore[union-attr]
        r = await settled(rt, "dl-2", "completed")
        assert len(rt._timers) == 0
        posted = await rt.log.last_seq(INBOX_STREAM)
        advance(rt, clock, 7200)
        await rt._timers.idle()
        assert await rt.log.last_seq(INBOX_STREAM) == posted  # nothing was sent
        assert (await rt.result("dl-2")).status == "completed"
    assert ran == ["signed"]


async def test_a_running_tool_is_cancelled_at_the_deadline(open_runtime: Any) -> None:
    entered = anyio.Event()
    outcome: list[str] = []

    @tool("crunch", description="works for a long time")
    async def crunch() -> str:
        entered.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        return "never"

    llm = Scripted([Scripted.call("crunch"), "done"], record=False)
    agent = Agent("cruncher", tools=[crunch], llm=llm, execution_timeout=60)
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        await rt.spawn(agent, "go", execution_id="dl-3")
        with anyio.fail_after(10):
            await entered.wait()
        advance(rt, clock, 61)
        r = await settled(rt, "dl-3", "cancelled")
        assert r.cancelled_by == "deadline"
    assert outcome == ["cancelled"]


async def test_a_deadline_that_passed_while_no_runtime_ran_cancels_at_the_next_open(
    open_runtime: Any,
) -> None:
    ran: list[str] = []
    agent = signer(ran)
    async with open_runtime(agents=[agent]) as rt:
        on_clock(rt, Clock())
        await rt.run(agent, "go", execution_id="dl-4", execution_timeout=600)
        await rt.run(agent, "go", execution_id="dl-5", execution_timeout=6000)
    rt = Runtime(rt.path, durability="process", agents=[agent])
    on_clock(rt, Clock(T0 + 601))
    async with rt:
        r = await settled(rt, "dl-4", "cancelled")
        assert r.cancelled_by == "deadline"
        assert (await rt.result("dl-5")).is_suspended  # its deadline is still ahead
        assert len(rt._timers) == 1
    assert ran == []


async def test_a_parents_deadline_cancels_the_child_it_waits_for(open_runtime: Any) -> None:
    ran: list[str] = []
    child = signer(ran)
    boss = Agent(
        "boss",
        llm=Scripted([Scripted.call("delegate_to_signer", task="sign"), "all done"]),
        agents=[child],
    )
    async with open_runtime(agents=[boss]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(boss, "go", execution_id="dl-6", execution_timeout=300)
        assert r.is_suspended and r.suspend_reason.kind == "child"  # type: ignore[union-attr]
        kid = (await rt.result("dl-6/2")).deadline
        assert kid is None  # the child has no timeout of its own: the parent's bounds it
        advance(rt, clock, 301)
        assert (await settled(rt, "dl-6", "cancelled")).cancelled_by == "deadline"
        assert (await settled(rt, "dl-6/2", "cancelled")).status == "cancelled"
    assert ran == []


async def test_a_queued_execution_past_its_deadline_is_cancelled_and_never_starts(
    open_runtime: Any,
) -> None:
    release = anyio.Event()
    started: list[str] = []

    @tool("hold", description="holds the only slot")
    async def hold() -> str:
        started.append("hold")
        await release.wait()
        return "held"

    llm = Scripted([Scripted.call("hold"), "done"], record=False)
    agent = Agent("holder", tools=[hold], llm=llm)
    async with open_runtime(agents=[agent], max_concurrency=1) as rt:
        clock = on_clock(rt, Clock())
        await rt.spawn(agent, "first", execution_id="dl-7")
        await rt.spawn(agent, "second", execution_id="dl-8", execution_timeout=30)
        assert (await rt.result("dl-8")).status == "queued"
        advance(rt, clock, 31)
        r = await settled(rt, "dl-8", "cancelled")
        assert r.cancelled_by == "deadline" and r.steps == 0
        release.set()
        assert (await settled(rt, "dl-7", "completed")).output == "done"
    assert started == ["hold"]


async def test_a_failed_execution_resumed_after_its_deadline_is_cancelled(
    open_runtime: Any,
) -> None:
    calls = 0

    def script(request: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("provider down")
        return "done"

    agent = Agent("flaky", llm=Scripted(script, record=False))
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="dl-9", execution_timeout=60)
        assert r.is_failed
        assert len(rt._timers) == 0  # failed is finished: the timer is dropped
        advance(rt, clock, 120)
        await rt._timers.idle()
        assert (await rt.result("dl-9")).is_failed  # not cancelled: failed stays failed
        await rt.resume("dl-9")
        r = await settled(rt, "dl-9", "cancelled")
        assert r.cancelled_by == "deadline"


def test_execution_timeouts_must_be_positive_seconds(data_dir: Path) -> None:
    ran: list[str] = []
    for bad in (0, -1, float("nan"), float("inf"), datetime.timedelta(0)):
        with pytest.raises(AgentDefinitionError, match="execution_timeout"):
            signer(ran, execution_timeout=bad)
    with pytest.raises(AgentDefinitionError, match="seconds or a timedelta"):
        signer(ran, execution_timeout="1h")
    agent = signer(ran)
    with Runtime(data_dir, durability="process") as rt:
        with pytest.raises(ValueError, match="execution_timeout must be a positive"):
            rt.spawn(agent, "go", execution_timeout=-5)
        with pytest.raises(TypeError, match="execution_timeout must be seconds"):
            rt.spawn(agent, "go", execution_timeout=True)
        r = rt.run(agent, "go", execution_id="dl-10", execution_timeout=90)  # the sync facade
        assert r.deadline is not None and r.is_suspended
        assert rt.executions() and ran == []


async def test_a_deadline_survives_sigkill_and_cancels_at_the_next_open(
    data_dir: Path, tmp_path: Path, anyio_backend_name: str
) -> None:
    """The deadline is in the start record: a process SIGKILLed while the execution
    waits for its approval loses nothing, and a runtime opened after the deadline (by
    its clock) cancels it, the approval never given."""
    side_file = tmp_path / "side.txt"
    event = await suspended_then_killed(data_dir, "deadline", side_file, anyio_backend_name)
    assert event["kind"] == "approval"
    from tests.runtime.timer_worker import signer as worker_signer

    rt = Runtime(data_dir, durability="process", agents=[worker_signer])
    on_clock(rt, Clock(event["deadline"] + 1))
    async with rt:
        r = await settled(rt, "d-1", "cancelled")
    assert r.cancelled_by == "deadline"
    assert not side_file.exists()
