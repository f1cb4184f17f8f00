"""perdure.testing: the crash/replay check users run on their own agents."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings

from perdure import Agent, Budget, Tool, current_idempotency_key, tool
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


def make_delegating(*, forgetful: bool = False) -> Agent:
    """A boss that delegates a lookup to a helper agent, then books a table.

    ``forgetful``: the helper's model counts its own calls in memory, which a restart
    loses (a real bug this check must catch in a child as well).
    """
    calls = iter(range(1000))

    @tool
    def lookup(q: str) -> str:
        return f"found {q}"

    def helper_script(request: LLMRequest) -> Any:
        turn = next(calls) if forgetful else sum(m.role == "assistant" for m in request.messages)
        if turn == 0:
            return Scripted.call("lookup", q="tables")
        return "helper: " + "; ".join(m.content for m in request.messages if m.role == "tool")

    @tool
    def book(table: int) -> str:
        return f"table {table} booked"

    def boss_script(request: LLMRequest) -> Any:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn == 0:
            return Scripted.call("delegate_to_helper", task="find a table")
        if turn == 1:
            return Scripted.call("book", table=1)
        return "; ".join(m.content for m in request.messages if m.role == "tool")

    helper = Agent("helper", tools=[lookup], llm=Scripted(helper_script, record=False))
    return Agent("boss", tools=[book], llm=Scripted(boss_script, record=False), agents=[helper])


#: The delegating run's durable steps: the boss's 3 answers and 2 tool outcomes, the
#: helper's 2 answers and 1 tool outcome.
DELEGATING_STEPS = 8


@pytest.mark.anyio
async def test_a_delegating_agent_passes_with_a_crash_at_every_step_boundary() -> None:
    # The delegate call is invoked again each time its child's outcome wakes the boss
    # (a new tool.started attempt): that is not a re-run, and must not be reported.
    for point in range(1, DELEGATING_STEPS + 2):
        check = await check_crash_replay(make_delegating, "book", [point])
        check.assert_ok()
        assert check.crashed.status == "completed"
        assert check.crashes_happened == (1 if point <= DELEGATING_STEPS else 0)
        # the helper's lookup ran, and its attempts are read from the child's own log
        (child_key,) = [k for k in check.invocations if k.startswith("replay-check/2:")]
        assert check.attempts[child_key] == check.invocations[child_key]
    check = await check_crash_replay(make_delegating, "book", [2, 2, 2])
    check.assert_ok()
    assert check.crashes_happened == 3
    check.attempts[child_key] = 1
    check.invocations[child_key] = 2  # as if the runtime had re-run the child's call
    assert any(f"{child_key} ran 2x though it was never interrupted" in p for p in check.problems)


@pytest.mark.anyio
async def test_a_broken_child_of_a_delegating_agent_still_fails() -> None:
    # A crash after the helper's first answer (step 2): its restarted model starts
    # counting from 0 again and asks for the lookup a second time.
    check = await check_crash_replay(lambda: make_delegating(forgetful=True), "book", [2])
    assert check.crashes_happened == 1 and not check.same_transcript
    with pytest.raises(AssertionError, match="so a restart changed something"):
        check.assert_ok()


@pytest.mark.anyio
async def test_approve_mode_decides_a_grandchilds_confirmation_across_crashes() -> None:
    moved: list[str] = []

    def make() -> Agent:
        @tool(requires_confirmation=True)
        def move(amount: float) -> str:
            moved.append(current_idempotency_key())
            return "moved"

        banker = Agent(
            "banker", tools=[move], llm=Scripted([Scripted.call("move", amount=5.0), "ok"])
        )
        boss = Agent(
            "boss",
            llm=Scripted([Scripted.call("delegate_to_banker", task="move"), "boss ok"]),
            agents=[banker],
        )
        return Agent(
            "ceo",
            llm=Scripted([Scripted.call("delegate_to_boss", task="move"), "ceo ok"]),
            agents=[boss],
        )

    for points in ([1], [3], [4, 1], [5]):
        moved.clear()
        check = await check_crash_replay(make, "move", points, approve=True)
        check.assert_ok()
        assert check.crashed.status == "completed" and check.crashed.output == "ceo ok"
        assert check.crashes_happened == len(points)
        # once in the reference, once in the crashed run: in the grandchild, approved
        assert len(moved) == 2 and all(k.startswith("replay-check/2/2:2:") for k in moved)
        assert check.invocations == {moved[1]: 1} and check.attempts[moved[1]] == 1


def make_fanning_out() -> Agent:
    """A boss that delegates to two helpers in one turn (both waited for at once)."""

    def helper(name: str) -> Agent:
        @tool(name=f"look_{name}")
        def look(q: str) -> str:
            return f"{name} found {q}"

        def script(request: LLMRequest) -> Any:
            if sum(m.role == "assistant" for m in request.messages) == 0:
                return Scripted.call(f"look_{name}", q="x")
            return f"{name}: " + "; ".join(m.content for m in request.messages if m.role == "tool")

        return Agent(name, tools=[look], llm=Scripted(script, record=False))

    def boss_script(request: LLMRequest) -> Any:
        if sum(m.role == "assistant" for m in request.messages) == 0:
            return [
                Scripted.call("delegate_to_ha", task="a"),
                Scripted.call("delegate_to_hb", task="b"),
            ]
        return "; ".join(m.content for m in request.messages if m.role == "tool")

    return Agent(
        "boss", llm=Scripted(boss_script, record=False), agents=[helper("ha"), helper("hb")]
    )


#: The fanning-out run's durable steps: the boss's 2 answers and 2 delegate outcomes,
#: each helper's 2 answers and 1 tool outcome.
FANNING_STEPS = 10


async def _cut_at(point: int) -> tuple[Any, ...]:
    """The records a crash after ``point`` steps leaves, per stream (one lifetime).

    Less the child outcomes delivered to the waiting parent (``signal.received``): the
    first child's outcome is delivered while the second child runs, so whether it is in
    the log at a crash in the second child is a race the helper does not remove (and
    need not: every open posts a finished child's outcome to its parent again)."""
    from perdure.events import record_types
    from perdure.testing.replay import _KillableLog, _prepared, _run

    log = _KillableLog(record_types())
    await _run(_prepared(make_fanning_out()), "go", "replay-check", point, False, log)
    out = []
    async for info in log.streams(prefix="exec/"):
        types = [r.type async for r in log.read(info.stream) if r.type != "signal.received"]
        out.append((info.stream, tuple(types)))
    return tuple(sorted(out))


@pytest.mark.anyio
async def test_a_crash_point_lands_in_the_same_place_when_two_children_are_waited_at_once() -> None:
    """Both children used to run at once: which of their steps (and the parent's) came
    first differed from run to run (and more under trio, whose scheduler shuffles), so a
    crash point cut the log at a different place each time and hypothesis called a
    failing example flaky. The helper now runs them one at a time, in call order.

    Crashes [2, 5] also hung for ever: the second child finished in the second lifetime
    and its outcome's post died with it, while its parent was running (so the next open
    did not re-post it, that being only for suspended parents); the parent then
    suspended waiting for a child that had long finished. A parent that suspends now
    gets the outcome of any child it waits for that finished before the runtime opened."""
    for point in range(1, FANNING_STEPS + 1):
        cuts = {await _cut_at(point) for _ in range(6)}
        assert len(cuts) == 1, f"crash point {point} cut the log {len(cuts)} ways: {cuts}"
    for points in ([3], [6], [9], [2, 5], [7, 1, 1]):
        for _ in range(2):
            check = await check_crash_replay(make_fanning_out, "go", points)
            check.assert_ok()
            assert check.crashed.output == "ha: ha found x; hb: hb found x"
            assert check.crashes_happened == len(points)
            assert len(check.attempts) == 4  # two delegate calls, two lookups


def test_the_helpers_copy_of_an_agent_keeps_every_setting_of_it_and_its_tools() -> None:
    """check_crash_replay runs a copy of the agent whose tools count their runs: a
    setting the copy dropped (a timeout, say) would make the helper test another agent."""
    import inspect as _inspect

    from perdure.testing.replay import _Counting

    @tool(
        "pay",
        description="pay",
        requires_confirmation=True,
        idempotent=False,
        timeout=5,
        approval_timeout=60,
    )
    def pay(amount: float) -> str:
        return "paid"

    original = Agent(
        "payer",
        "be careful",
        tools=[pay],
        llm=Scripted(["done"]),
        max_steps=7,
        budget=Budget(max_llm_calls=3),
        drift="warn",
        params={"temperature": 0},
        description="pays",
        execution_timeout=3600,
        approval_timeout=120,
    )
    copy = _Counting().agent(original)
    skip = {"self", "tools", "agents", "llm", "model"}
    for name in _inspect.signature(Agent.__init__).parameters:
        if name not in skip:
            assert getattr(copy, name) == getattr(original, name), name
    copied = copy.tools["pay"]
    for name in _inspect.signature(Tool.__init__).parameters:
        if name not in ("self", "fn"):
            assert getattr(copied, name) == getattr(pay, name), name


def make_sharing() -> Agent:
    """A boss (7 model calls in all) that delegates to two workers in one turn: of the 6
    calls left, each is handed 3; ``long`` needs 4, so it runs into its share and is
    handed what ``short`` left (5 of them) once the boss takes ``short``'s outcome."""

    def worker(name: str, calls: int) -> Agent:
        @tool(name=f"step_{name}")
        def step(n: int) -> int:
            return n

        def script(request: LLMRequest) -> Any:
            turn = sum(m.role == "assistant" for m in request.messages)
            return Scripted.call(f"step_{name}", n=turn) if turn < calls - 1 else f"{name} done"

        return Agent(name, tools=[step], llm=Scripted(script, record=False))

    turn = [
        Scripted.call("delegate_to_short", task="a"),
        Scripted.call("delegate_to_long", task="b"),
    ]
    return Agent(
        "boss",
        llm=Scripted([turn, "both done"], record=False),
        agents=[worker("short", 1), worker("long", 4)],
        budget=Budget(max_llm_calls=7),
    )


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(points=crash_points(max_step=13))
def test_children_sharing_a_budget_are_driven_through_a_share_handed_down(
    points: list[int],
) -> None:
    """A child suspended on its share of the parent's budget is not where the run ends:
    the helper waits for the share its sibling left to be handed down."""
    check = anyio.run(check_crash_replay, make_sharing, "go", points)
    check.assert_ok()
    assert check.reference.status == "completed" and check.crashed.output == "both done"
    assert check.crashed.total_usage.llm_calls == 7
