"""perdure.testing: the crash/replay check users run on their own agents."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings

from perdure import Agent, current_idempotency_key, tool
from perdure.providers import LLMRequest, Scripted
from perdure.testing import check_crash_replay, crash_points


def make_agent() -> Agent:
    @tool
    def book(table: int) -> str:
        return f"table {table} booked"

    @tool
    async def pay(amount: float) -> str:
        return f"paid {amount}"

    def script(request: LLMRequest) -> Any:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn < 3:
            return [Scripted.call("book", table=turn), Scripted.call("pay", amount=10.0 * turn)]
        return "; ".join(m.content for m in request.messages if m.role == "tool")

    return Agent("booker", tools=[book, pay], llm=Scripted(script, record=False))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(points=crash_points(max_step=12))
def test_a_deterministic_agent_passes_at_any_crash_points(points: list[int]) -> None:
    check = anyio.run(check_crash_replay, make_agent, "book three tables", points)
    check.assert_ok()
    assert check.same_transcript and check.crashed.status == "completed"
    assert len(check.attempts) == 6  # six tool calls, whatever the crashes
    # the run has 10 durable steps (4 model answers, 6 tool outcomes): a first crash
    # point below that really crashed the runtime
    if points[0] < 10:
        assert check.crashes_happened >= 1


def test_it_catches_an_agent_that_is_not_deterministic() -> None:
    flips = iter(range(1000))

    def make_flaky() -> Agent:
        agent = make_agent()

        def script(request: LLMRequest) -> Any:
            turn = sum(1 for m in request.messages if m.role == "assistant")
            # answers depend on a counter outside the conversation: not replayable
            return Scripted.call("book", table=next(flips)) if turn < 2 else "done"

        agent.llm = Scripted(script, record=False)
        return agent

    check = anyio.run(check_crash_replay, make_flaky, "book", [2])
    assert not check.same_transcript
    with pytest.raises(AssertionError, match="not deterministic: two runs with no crash"):
        check.assert_ok()


def test_it_catches_a_tool_that_ran_twice_without_being_interrupted() -> None:
    check = anyio.run(check_crash_replay, make_agent, "book", [3])
    key = next(iter(check.invocations))
    check.invocations[key] += 1  # as if the runtime had re-run a completed call
    assert any("never interrupted" in p for p in check.problems)


def test_approve_mode_drives_confirmations_to_the_end() -> None:
    lock = threading.Lock()
    moved: list[str] = []

    def make() -> Agent:
        @tool(requires_confirmation=True)
        def move(amount: float) -> str:
            with lock:
                moved.append(current_idempotency_key())
            return "moved"

        return Agent("mover", tools=[move], llm=Scripted([Scripted.call("move", amount=5.0), "ok"]))

    check = anyio.run(lambda: check_crash_replay(make, "move", [1, 1], approve=True))
    check.assert_ok()
    assert check.crashed.status == "completed"
