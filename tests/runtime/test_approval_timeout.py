"""Approval timeouts: ``@tool(approval_timeout=...)`` (or the agent's default) fixes an
expiry in each call's ``approval.requested`` record; a call still undecided then is
rejected (``by="timeout"``), the model is told, and the execution carries on by itself,
in this process or after a restart. A decision that comes first drops the timer.

Time is the runtime's ``_wall_clock``, moved by hand (see test_timers): nothing sleeps.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from perdure import Agent, AgentDefinitionError, InvalidSignalError, Runtime, tool
from perdure.events import INBOX_STREAM, execution_stream
from perdure.providers import Scripted
from perdure.providers.types import LLMRequest
from tests.runtime.test_timers import T0, Clock, advance, entry_when, index_entry, on_clock, settled
from tests.runtime.timer_worker import suspended_then_killed

pytestmark = pytest.mark.anyio


def payer(ran: list[str], seen: list[str], *, timeout: Any = 3600, **agent_kw: Any) -> Agent:
    """Asks to call ``pay`` (which needs a confirmation), then reports what it was told."""

    @tool("pay", description="Pay it", requires_confirmation=True, approval_timeout=timeout)
    def pay() -> str:
        ran.append("paid")
        return "paid"

    def script(request: LLMRequest) -> Any:
        if not any(m.role == "assistant" for m in request.messages):
            return Scripted.call("pay")
        seen.append(str(request.messages[-1].content))
        return "done"

    return Agent("payer", tools=[pay], llm=Scripted(script), **agent_kw)


async def test_an_undecided_approval_is_rejected_when_it_expires_and_the_model_is_told(
    open_runtime: Any,
) -> None:
    ran: list[str] = []
    seen: list[str] = []
    agent = payer(ran, seen)
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="ax-1")
        reason = r.suspend_reason
        assert reason is not None and reason.kind == "approval"
        assert reason.until == T0 + 3600
        assert reason.timer == f"approval:{reason.confirmation_id}"
        assert (await index_entry(rt, "ax-1"))["timer"] == [T0 + 3600, reason.timer]
        advance(rt, clock, 3599)
        await rt._timers.idle()
        assert (await rt.result("ax-1")).is_suspended  # not yet
        advance(rt, clock, 1)
        r = await settled(rt, "ax-1", "completed")
        assert len(rt._timers) == 0
        events = [e async for e in rt.log.read(execution_stream("ax-1"))]
        with pytest.raises(InvalidSignalError) as late:  # a person, too late
            await rt.approve("ax-1", reason.confirmation_id)
    assert "already rejected by its approval timeout (nobody decided in time) (seq" in str(
        late.value
    )
    assert ran == []
    assert seen == [
        "REJECTED by timeout: no decision came before its approval timeout; the call was not made"
    ]
    rejected = [e for e in events if e.type == "approval.rejected"]
    assert [(e.payload["by"], e.payload["confirmation_id"]) for e in rejected] == [
        ("timeout", reason.confirmation_id)
    ]
    tool_msg = next(m for m in r.transcript if m.role == "tool")
    assert tool_msg.is_error


async def test_a_decision_in_time_drops_the_timer_and_nothing_is_rejected(
    open_runtime: Any,
) -> None:
    ran: list[str] = []
    seen: list[str] = []
    agent = payer(ran, seen, timeout=datetime.timedelta(minutes=5))
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="ax-2")
        assert len(rt._timers) == 1
        await rt.approve("ax-2", r.suspend_reason.confirmation_id)  # type: ignore[union-attr]
        await settled(rt, "ax-2", "completed")
        assert len(rt._timers) == 0
        posted = await rt.log.last_seq(INBOX_STREAM)
        advance(rt, clock, 3600)
        await rt._timers.idle()
        assert await rt.log.last_seq(INBOX_STREAM) == posted  # nothing was sent
    assert ran == ["paid"] and seen == ["paid"]


async def test_an_expiry_that_passed_while_no_runtime_ran_rejects_at_the_next_open(
    open_runtime: Any,
) -> None:
    ran: list[str] = []
    seen: list[str] = []
    agent = payer(ran, seen, timeout=600)
    async with open_runtime(agents=[agent]) as rt:
        on_clock(rt, Clock())
        await rt.run(agent, "go", execution_id="ax-3")
    # Restarted later with a longer timeout: the expiry recorded with the call stands.
    agent = payer(ran, seen, timeout=6000)
    rt = Runtime(rt.path, durability="process", agents=[agent])
    on_clock(rt, Clock(T0 + 601))
    async with rt:
        r = await settled(rt, "ax-3", "completed")
    assert ran == [] and len(seen) == 1 and seen[0].startswith("REJECTED by timeout")
    assert r.output == "done"


async def test_a_late_timer_after_a_decision_is_recorded_as_ignored(open_runtime: Any) -> None:
    """The index may lag a decision; the rejection the timer then sends must not apply."""
    ran: list[str] = []
    seen: list[str] = []
    agent = payer(ran, seen)
    async with open_runtime(agents=[agent]) as rt:
        on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="ax-4")
        cid = r.suspend_reason.confirmation_id  # type: ignore[union-attr]
        await rt.approve("ax-4", cid)
        await settled(rt, "ax-4", "completed")
        # What the timer service sends when its check raced the approval.
        await rt._fire_timers([(T0 + 3600, "ax-4", f"approval:{cid}")])
        events = [e async for e in rt.log.read(execution_stream("ax-4"))]
    assert ran == ["paid"]
    assert not any(e.type == "approval.rejected" for e in events)


async def test_the_agents_default_bounds_a_contract_override_too(open_runtime: Any) -> None:
    charged: list[float] = []

    @tool("charge", description="Charge a card")
    def charge(amount: float) -> str:
        charged.append(amount)
        return "charged"

    agent = Agent(
        "shop",
        tools=[charge],
        llm=Scripted([Scripted.call("charge", amount=1e6), "ok"]),
        approval_timeout=120,
    )
    agent.contract("limit")(lambda name, args: args["amount"] < 1000)
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(agent, "charge", execution_id="ax-5")
        assert r.suspend_reason is not None and r.suspend_reason.kind == "contract"
        assert r.suspend_reason.until == T0 + 120
        advance(rt, clock, 121)
        r = await settled(rt, "ax-5", "completed")
    assert charged == []
    assert next(m.content for m in r.transcript if m.role == "tool").startswith(
        "REJECTED by timeout"
    )


async def test_two_calls_of_one_turn_expire_each_at_its_own_time(open_runtime: Any) -> None:
    ran: list[str] = []

    @tool("quick", description="q", requires_confirmation=True, approval_timeout=60)
    def quick() -> str:
        ran.append("quick")
        return "quick"

    @tool("slow", description="s", requires_confirmation=True, approval_timeout=600)
    def slow() -> str:
        ran.append("slow")
        return "slow"

    llm = Scripted([[Scripted.call("quick"), Scripted.call("slow")], "done"])
    agent = Agent("pair", tools=[quick, slow], llm=llm)
    async with open_runtime(agents=[agent]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(agent, "go", execution_id="ax-6")
        assert [p["until"] for p in r.suspend_reason.pending] == [T0 + 60, T0 + 600]  # type: ignore[union-attr]
        advance(rt, clock, 61)
        meta = await entry_when(rt, "ax-6", lambda m: len(m["confirmations"]) == 1)
        assert meta["status"] == "suspended"
        assert meta["timer"][0] == T0 + 600  # the slow one's is next
        slow_cid = meta["confirmations"][0]
        await rt.approve("ax-6", slow_cid)
        r = await settled(rt, "ax-6", "completed")
    assert ran == ["slow"]
    assert next(m.content for m in r.transcript if m.role == "tool").startswith(
        "REJECTED by timeout"
    )


@pytest.mark.parametrize("bad", [0, -5, float("inf"), "soon"])
def test_a_bad_approval_timeout_is_refused_with_the_tools_name(bad: Any) -> None:
    with pytest.raises(AgentDefinitionError, match=r"tool 'pay'.*approval_timeout"):
        tool("pay", approval_timeout=bad)(lambda: None)
    with pytest.raises(AgentDefinitionError, match=r"agent 'a'.*approval_timeout"):
        Agent("a", approval_timeout=bad)


async def test_an_approval_timeout_survives_sigkill_and_rejects_at_the_next_open(
    data_dir: Path, tmp_path: Path, anyio_backend_name: str
) -> None:
    """The expiry is in the approval record: an owner SIGKILLed while the call waits
    loses nothing, and a runtime opened after the expiry (by its clock) rejects the
    call at once; the tool never runs and the model hears why."""
    side_file = tmp_path / "side.txt"
    event = await suspended_then_killed(data_dir, "approval", side_file, anyio_backend_name)
    assert event["kind"] == "approval"
    from tests.runtime.timer_worker import expiring

    rt = Runtime(data_dir, durability="process", agents=[expiring])
    on_clock(rt, Clock(event["until"] + 1))
    async with rt:
        r = await settled(rt, "a-1", "completed")
    assert not side_file.exists()
    assert next(m.content for m in r.transcript if m.role == "tool").startswith(
        "REJECTED by timeout"
    )


async def test_a_childs_approval_expires_while_its_parent_hibernates(open_runtime: Any) -> None:
    """The child is rejected by its timer, answers, and the parent resumes with it."""
    ran: list[str] = []
    seen: list[str] = []
    child = payer(ran, seen, timeout=900)
    boss = Agent(
        "boss",
        llm=Scripted([Scripted.call("delegate_to_payer", task="pay"), "boss done"]),
        agents=[child],
    )
    async with open_runtime(agents=[boss]) as rt:
        clock = on_clock(rt, Clock())
        r = await rt.run(boss, "go", execution_id="ax-7")
        assert r.is_suspended and r.suspend_reason.kind == "child"  # type: ignore[union-attr]
        kid = await rt.result("ax-7/2")
        assert kid.suspend_reason is not None and kid.suspend_reason.until == T0 + 900
        advance(rt, clock, 901)
        r = await settled(rt, "ax-7", "completed")
        kid = await rt.result("ax-7/2")
    assert ran == [] and r.output == "boss done"
    assert kid.status == "completed" and kid.output == "done"
    assert seen[0].startswith("REJECTED by timeout")
