"""Adversarial probes of budgets: raises at odd moments, per-spawn budgets, children,
and a provider that reports no token usage."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from perdure import Agent, Budget, InvalidSignalError, tool
from perdure.providers import LLMRequest, Scripted, Usage

pytestmark = pytest.mark.anyio


def stepper(name: str, steps: int, budget: Budget | None, gate: Any = None) -> Agent:
    """Calls ``step`` ``steps`` times, one per turn, then answers "done"; the first
    call waits for ``gate`` (an anyio.Event) if one is given."""
    entered = anyio.Event()

    @tool
    async def step(n: int) -> int:
        if gate is not None and n == 0:
            entered.set()
            await gate.wait()
        return n

    def script(request: LLMRequest) -> Any:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        return Scripted.call("step", n=turn) if turn < steps else "done"

    agent = Agent(name, tools=[step], llm=Scripted(script, record=False), budget=budget)
    agent.entered = entered  # type: ignore[attr-defined]
    return agent


async def test_a_budget_raised_while_the_execution_runs_applies_without_a_suspension(
    open_runtime: Any,
) -> None:
    gate = anyio.Event()
    agent = stepper("runner", 2, Budget(max_llm_calls=1), gate)
    suspended: list[str] = []
    async with open_runtime() as rt:
        rt.on_suspend(lambda r, reason: suspended.append(reason.kind))
        await rt.spawn(agent, "go", execution_id="rr-1")
        with anyio.fail_after(10):
            await agent.entered.wait()  # type: ignore[attr-defined]
            # still running (inside its first tool call), not suspended
            assert (await rt.result("rr-1")).status == "running"
            assert await rt.resume("rr-1", budget=Budget(max_llm_calls=5), wait=False) is None
            gate.set()
            r = await rt.wait("rr-1")
        state = await rt.state("rr-1")
    assert r.status == "completed" and r.usage.llm_calls == 3
    assert suspended == []  # the raise landed before the limit was reached
    assert state.budget == Budget(max_llm_calls=5)


async def test_a_raise_that_lifts_nothing_is_refused_and_unset_limits_are_kept(
    open_runtime: Any,
) -> None:
    """A limit left unset (None) in a raise keeps what the execution had: it never
    switches a limit off. A raise with no limit at all, or one at or below what is used,
    is refused at once instead of being recorded as a raise that changes nothing."""
    agent = stepper("capped", 3, Budget(max_llm_calls=1))
    async with open_runtime() as rt:
        r = await rt.run(agent, "go", execution_id="lr-1")
        assert r.suspend_reason is not None and r.suspend_reason.limit == "max_llm_calls"
        with pytest.raises(InvalidSignalError, match="sets no limit"):
            await rt.resume("lr-1", budget=Budget())
        with pytest.raises(InvalidSignalError, match="it has used 1 LLM call"):
            await rt.resume("lr-1", budget=Budget(max_llm_calls=1))
        r = await rt.resume("lr-1", budget=Budget(max_dollars=5.0))
        assert r is not None and r.is_suspended
        assert r.suspend_reason.limit == "max_llm_calls"  # type: ignore[union-attr]
        assert (await rt.state("lr-1")).budget == Budget(max_dollars=5.0, max_llm_calls=1)
        r = await rt.resume("lr-1", budget=Budget(max_llm_calls=10))
    assert r is not None and r.status == "completed" and r.usage.llm_calls == 4


async def test_a_spawns_budget_replaces_the_agents_and_a_childs_spend_is_charged_to_it(
    open_runtime: Any,
) -> None:
    """As the README says: a per-spawn Budget replaces the agent's as a whole, a child
    is held to its own agent's budget (as well as to what its parent has left), and
    once it finishes what it used is charged to the parent, apart from the parent's own
    usage."""
    child = stepper("kid", 2, Budget(max_llm_calls=1))
    parent = Agent(
        "boss",
        llm=Scripted([Scripted.call("delegate_to_kid", task="work"), "all done"]),
        agents=[child],
        budget=Budget(max_llm_calls=2),
    )
    async with open_runtime() as rt:
        r = await rt.run(parent, "go", execution_id="sb-1", budget=Budget(max_tool_calls=9))
        assert r.is_suspended and r.suspend_reason.kind == "child"  # type: ignore[union-attr]
        kid = await rt.wait("sb-1/2")
        # the child is stopped by its own agent's budget, and it shows from the parent
        assert kid.suspend_reason is not None and kid.suspend_reason.kind == "budget"
        assert "parent" not in kid.suspend_reason.details  # its own limit, not inherited
        seen = (await rt.result("sb-1")).suspend_reason.child  # type: ignore[union-attr]
        assert seen["status_text"] == "suspended (budget)"
        await rt.resume("sb-1/2", budget=Budget(max_llm_calls=3))
        with anyio.fail_after(10):
            r = await rt.wait("sb-1", until="finished")
        state = await rt.state("sb-1")
        kid_state = await rt.state("sb-1/2")
        kid = await rt.result("sb-1/2")
    assert r.output == "all done"
    assert state.budget == Budget(max_tool_calls=9)  # the agent's max_llm_calls is gone
    assert state.inherited is None and kid.usage.llm_calls == 3
    # the child inherited what the parent had left (9 tool calls less its delegate call)
    assert kid_state.inherited == Budget(max_tool_calls=8)
    assert kid_state.limits == Budget(max_llm_calls=3, max_tool_calls=8)
    assert r.usage.llm_calls == 2 and r.usage.tool_calls == 1  # the parent's own
    assert r.delegated_usage.llm_calls == 3 and r.delegated_usage.tool_calls == 2
    assert r.total_usage.tool_calls == 3


async def test_a_priced_model_that_reports_no_usage_is_named_once(
    open_runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Its calls cost $0, so a max_dollars budget can never stop them: said loudly,
    once per model, instead of silently."""
    llm = Scripted(["a", "b"], model="gpt-4o", usage=Usage(0, 0))
    agent = Agent("free", llm=llm, budget=Budget(max_dollars=0.01))
    with caplog.at_level(logging.WARNING, logger="perdure.runtime"):
        async with open_runtime() as rt:
            first = await rt.run(agent, "one", execution_id="nu-1")
            await rt.run(agent, "two", execution_id="nu-2")
    assert first.status == "completed" and first.usage.dollars == 0.0
    warned = [
        r.getMessage() for r in caplog.records if "without reporting token usage" in r.getMessage()
    ]
    assert len(warned) == 1 and "'gpt-4o'" in warned[0] and "max_dollars" in warned[0]


@pytest.mark.parametrize(
    ("limits", "error", "says"),
    [
        ({"max_dollars": float("nan")}, ValueError, "Budget.max_dollars must be >= 0"),
        ({"max_llm_calls": -1}, ValueError, "Budget.max_llm_calls must be >= 0"),
        ({"max_tokens": "1000"}, TypeError, "Budget.max_tokens must be a number"),
        ({"max_tool_calls": True}, TypeError, "Budget.max_tool_calls must be a number"),
    ],
)
def test_a_budget_that_could_never_be_reached_or_read_is_refused_when_made(
    limits: dict[str, Any], error: type[Exception], says: str
) -> None:
    # NaN compares false with everything: accepted, it would be an unlimited budget that
    # looks like a limit (a raise already refused it; a spawn did not).
    with pytest.raises(error, match=says):
        Budget(**limits)


def test_limits_that_are_numbers_are_kept_as_given() -> None:
    budget = Budget(max_dollars=0.5, max_llm_calls=3, max_tool_calls=0, max_tokens=10**9)
    assert Budget.from_dict(budget.to_dict()) == budget
