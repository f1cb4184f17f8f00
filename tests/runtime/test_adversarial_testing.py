"""perdure.testing against agents built to fool it.

A model that counts its own calls (its answers change when a restart resets the count),
a tool that returns the time, a tool that is not idempotent, crash points past the end
of the run; on both event loops, and under hypothesis shrinking.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, find, settings

from perdure import Agent, tool
from perdure.providers import LLMRequest, Scripted
from perdure.testing import ReplayCheck, check_crash_replay, crash_points

BACKENDS = ["asyncio", "trio"]


@tool
def book(table: int) -> str:
    """Book a table."""
    return f"table {table} booked"


def counting_model() -> Agent:
    """Answers by how many times this agent's model was called, not by the conversation."""
    calls = itertools.count()

    def script(request: LLMRequest) -> Any:
        n = next(calls)
        return Scripted.call("book", table=n) if n < 3 else "done"

    return Agent("counter", tools=[book], llm=Scripted(script, record=False))


def conversation_model() -> Agent:
    """The same run, answered from the conversation: deterministic."""

    def script(request: LLMRequest) -> Any:
        n = sum(1 for m in request.messages if m.role == "assistant")
        return Scripted.call("book", table=n) if n < 3 else "done"

    return Agent("counter", tools=[book], llm=Scripted(script, record=False))


def check(make: Any, points: list[int], backend: str) -> ReplayCheck:
    """check_crash_replay on ``backend``."""
    return anyio.run(check_crash_replay, make, "book", points, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_that_counts_its_calls_is_caught_once_a_crash_resets_it(backend: str) -> None:
    """The crashed run reused one agent object across its lifetimes, so the count went on
    past each 'crash' as if nothing happened: no restart resets it, and nothing was
    caught. A real restart builds the agent anew."""
    assert check(counting_model, [], backend).problems == []  # uncrashed: looks fine
    caught = check(counting_model, [2], backend)
    [problem] = caught.problems
    assert problem.startswith("final state differs") and "first difference at message 3" in (
        problem
    )
    assert "Runs without a crash agree, so a restart changed something" in problem
    assert check(conversation_model, [2], backend).problems == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tool_returning_the_time_is_named_as_non_determinism_not_as_a_crash_bug(
    backend: str,
) -> None:
    def clock() -> Agent:
        @tool
        def now() -> float:
            """The time."""
            return time.time()

        return Agent("clock", tools=[now], llm=Scripted([Scripted.call("now"), "done"]))

    for points in ([], [1]):
        result = check(clock, points, backend)
        [problem] = result.problems
        assert problem.startswith("the agent is not deterministic: two runs with no crash")
        assert "first difference at message 2" in problem and "name='now'" in problem
        assert result.control is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tool_that_is_not_idempotent_is_caught_in_doubt(backend: str) -> None:
    """The crash after the model's answer used to land a few scheduling rounds late,
    after the tool had finished: the in-doubt case was never produced."""
    ran: list[str] = []

    def charger() -> Agent:
        @tool(idempotent=False)
        def charge(amount: float) -> str:
            """Charge a card."""
            ran.append("charge")
            return "charged"

        llm = Scripted([Scripted.call("charge", amount=5.0), "done"])
        return Agent("charger", tools=[charge], llm=llm)

    in_doubt = check(charger, [1], backend)  # after the answer that starts the call
    assert in_doubt.crashed.status == "suspended"
    [problem] = in_doubt.problems
    assert "unknown_outcome: step 2, tool 'charge' (idempotent=False)" in problem
    assert "rt.resolve" in problem
    ran.clear()
    after = check(charger, [2], backend)  # after its outcome: nothing is in doubt
    assert after.problems == [] and after.crashes_happened == 1
    assert ran == ["charge", "charge"]  # once in the reference, once in the crashed run


@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_points_past_the_end_crash_nothing_and_say_so(backend: str) -> None:
    # the run has 7 durable steps (4 answers, 3 tool outcomes): 7 would crash right after
    # the last one; 8 and beyond let that lifetime finish, and the later points find it
    # finished
    result = check(conversation_model, [8, 100, 3], backend)
    assert result.problems == [] and result.crashed.status == "completed"
    assert result.crashes_happened == 0  # the first lifetime finished it


def test_a_crash_point_lands_at_the_same_step_on_both_loops_every_time() -> None:
    """Where a crash lands used to vary with scheduling (a step or two late), so the
    same example could pass and fail: hypothesis reports that as a flaky test."""
    for points in ([1], [2], [3], [1, 1]):
        seen = {
            # attempts per tool call, by step (a key's last part differs per log)
            tuple(
                sorted(
                    (key.split(":")[1], n)
                    for key, n in check(conversation_model, points, backend).attempts.items()
                )
            )
            for backend in BACKENDS
            for _ in range(3)
        }
        assert len(seen) == 1, (points, seen)


def test_hypothesis_shrinks_a_failure_to_the_smallest_crash_point() -> None:
    found = find(
        crash_points(max_step=7),
        lambda points: bool(check(counting_model, points, "asyncio").problems),
        settings=settings(
            max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        ),
    )
    assert found == [1]
