"""Children delegated in the same turn share what their parent has left.

Each of the turn's unfinished delegate calls hands its child an equal share (a count's
remainder to the earliest calls), so siblings running at once cannot together spend
more than the parent has; as one finishes, what it left unused goes to those still
running (a child suspended on its share resumes by itself); a raise on the parent is
shared out the same way.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from perdure import Agent, Budget, tool
from perdure.providers import Scripted, Usage
from perdure.state import Call, ExecutionState, budget_grant, delegate_steps
from tests.runtime.test_tree_budgets import (
    PRICING,
    Settled,
    assert_index_agrees_with_replay,
    tree_dollars,
    worker,
)

pytestmark = pytest.mark.anyio


def fan_out(*children: Agent, budget: Budget) -> Agent:
    """Delegates to every child in one turn (their children run at once), then answers."""
    turn = [Scripted.call(f"delegate_to_{c.name}", task="go") for c in children]
    llm = Scripted([turn, "all done"], model="metered", usage=Usage(1, 0))
    return Agent("fan", llm=llm, agents=list(children), budget=budget)


async def test_siblings_together_stay_within_the_parents_budget(open_runtime: Any) -> None:
    a, b = worker("a", calls=3), worker("b", calls=3)
    # $1 for the fan-out call leaves $4: $2 each, where each would spend $3
    boss = fan_out(a, b, budget=Budget(max_dollars=5.0))
    async with open_runtime(pricing=PRICING) as rt:
        settled = Settled(rt)
        await rt.spawn(boss, "go", execution_id="sb-1")
        with anyio.fail_after(10):
            ra = await settled.wait(rt, "sb-1/2")
            rb = await settled.wait(rt, "sb-1/3")
        assert (await rt.state("sb-1/2")).inherited == Budget(max_dollars=2.0)
        assert (await rt.state("sb-1/3")).inherited == Budget(max_dollars=2.0)
        for r in (ra, rb):
            reason = r.suspend_reason
            assert reason is not None and reason.kind == "budget"
            assert (reason.limit, reason.used, reason.origin) == ("max_dollars", 2.0, "sb-1")
        assert await tree_dollars(rt) == 5.0  # not $7: the siblings stopped at the limit

        # a raise is shared out the same way: $20 less the parent's own $1 is $19, $9.50
        # each (a child's limit bounds all it spends, the $2 it has spent included)
        await rt.resume("sb-1", budget=Budget(max_dollars=20.0))
        with anyio.fail_after(10):
            done = await rt.wait("sb-1", until="finished")
        shares = [(await rt.state(eid)).inherited for eid in ("sb-1/2", "sb-1/3")]
        total = await tree_dollars(rt)
        await assert_index_agrees_with_replay(rt)
    assert done.output == "all done"
    assert shares == [Budget(max_dollars=9.5), Budget(max_dollars=9.5)]
    assert total == 8.0 == done.total_usage.dollars


async def test_what_a_finished_sibling_left_goes_to_the_one_still_running(
    open_runtime: Any,
) -> None:
    """The parent has 5 calls left for its children: a gets 3 and needs 1, b gets 2 and
    needs 3; once a is done, b is handed the 4 then left and finishes, no one asked."""
    a, b = worker("a", calls=1), worker("b", calls=3)
    boss = fan_out(a, b, budget=Budget(max_llm_calls=6))
    async with open_runtime(pricing=PRICING) as rt:
        suspended: list[str] = []
        rt.on_suspend(lambda r, *_: suspended.append(r.execution_id))
        with anyio.fail_after(10):
            await rt.spawn(boss, "go", execution_id="sb-2")
            done = await rt.wait("sb-2", until="finished")
        a_state, b_state = await rt.state("sb-2/2"), await rt.state("sb-2/3")
        await assert_index_agrees_with_replay(rt)
    assert done.status == "completed" and done.output == "all done"
    assert a_state.usage.llm_calls == 1 and b_state.usage.llm_calls == 3
    assert done.total_usage.llm_calls == 6  # all of its 6, none past
    # b ran into its share of 2 (once) and was handed what a left: 6 - 1 - a's 1
    assert suspended.count("sb-2/3") == 1
    assert b_state.inherited == Budget(max_llm_calls=4)


def test_shares_split_what_is_left_and_give_the_remainder_to_the_first_calls() -> None:
    limits = Budget(max_dollars=5.0, max_llm_calls=5, max_tokens=2)
    state = ExecutionState(execution_id="p", budget=limits, limits=limits)
    state.usage.llm_calls = 1  # the fan-out call itself: 4 calls left, 2 tokens, $5
    tools = ["delegate_to_x", "lookup", "delegate_to_y", "delegate_to_z", "delegate_to_w"]
    state.calls = [
        Call(step=10 + i, turn=1, index=i, call_id=f"c{i}", tool=name, arguments={})
        for i, name in enumerate(tools)
    ]
    state.calls[-1].status = "done"  # w's child finished: it shares no more
    assert delegate_steps(state) == [10, 12, 13]
    shares = [budget_grant(state, step)["budget"] for step in (10, 12, 13)]  # type: ignore[index]
    assert [s["max_llm_calls"] for s in shares] == [2, 1, 1]
    assert [s["max_tokens"] for s in shares] == [1, 1, 0]
    assert [s["max_dollars"] for s in shares] == pytest.approx([5 / 3] * 3)
    # no step, or a call that is not a delegate's: all that is left
    assert budget_grant(state)["budget"]["max_llm_calls"] == 4  # type: ignore[index]
    assert budget_grant(state, 11)["budget"]["max_llm_calls"] == 4  # type: ignore[index]
    state.calls[0].status = state.calls[2].status = "done"
    assert budget_grant(state, 13)["budget"]["max_llm_calls"] == 4  # type: ignore[index]


async def test_a_sibling_suspended_on_its_share_resumes_when_the_other_finishes(
    open_runtime: Any,
) -> None:
    """As above, but a's work waits until b has suspended on its share of 3: b is woken
    by a's finishing (the parent settling on b), not by running into its limit later."""
    gate = anyio.Event()

    @tool("slow_work")
    async def slow_work() -> str:
        """Finish once b waits."""
        await gate.wait()
        return "ok"

    a = Agent(
        "a",
        tools=[slow_work],
        llm=Scripted([Scripted.call("slow_work"), "a done"], model="metered", usage=Usage(1, 0)),
    )
    b = worker("b", calls=4)
    boss = fan_out(a, b, budget=Budget(max_llm_calls=8))  # 7 left: a 4, b 3
    async with open_runtime(pricing=PRICING) as rt:
        suspended: list[str] = []

        def note(r: Any, *_: Any) -> None:
            suspended.append(r.execution_id)
            if r.execution_id == "sb-3/3":
                gate.set()

        rt.on_suspend(note)
        with anyio.fail_after(10):
            await rt.spawn(boss, "go", execution_id="sb-3")
            done = await rt.wait("sb-3", until="finished")
        b_state = await rt.state("sb-3/3")
    assert done.status == "completed" and suspended.count("sb-3/3") == 1
    assert b_state.usage.llm_calls == 4
    assert b_state.inherited == Budget(max_llm_calls=5)  # 8 - 1 - a's 2
    assert done.total_usage.llm_calls == 8
