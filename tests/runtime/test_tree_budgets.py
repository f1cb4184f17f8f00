"""A parent's budget bounds its whole delegation tree.

A child is held to the tighter of its own budget and what its parent had left when it
delegated (recorded in the child's start); a finished child's usage is charged to its
parent with its result; a raise on the parent is handed down to a child suspended on
what it inherited, which then resumes by itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure import Agent, Budget, InvalidSignalError, tool
from perdure.events import execution_stream
from perdure.providers import LLMRequest, Price, Pricing, Scripted, Usage
from tests.cli.conftest import perdure

pytestmark = pytest.mark.anyio

#: $1 per input token, and every call reports one input token: each LLM call is $1.
PRICING = Pricing({"metered": Price(1_000_000.0, 0.0)})


def worker(name: str, calls: int = 3, budget: Budget | None = None) -> Agent:
    """Makes ``calls`` LLM calls ($1 each): ``calls - 1`` tool calls, then an answer."""

    @tool(name=f"work_{name}")
    def work(n: int) -> int:
        """One unit of work."""
        return n

    def script(request: LLMRequest) -> Any:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        return Scripted.call(f"work_{name}", n=turn) if turn < calls - 1 else f"{name} done"

    llm = Scripted(script, record=False, model="metered", usage=Usage(1, 0))
    return Agent(name, tools=[work], llm=llm, budget=budget)


def orchestrator(*children: Agent, budget: Budget | None = None, name: str = "boss") -> Agent:
    """Delegates to each child in turn, one per LLM call, then answers "all done"."""
    turns: list[Any] = [Scripted.call(f"delegate_to_{c.name}", task="go") for c in children]
    llm = Scripted([*turns, "all done"], model="metered", usage=Usage(1, 0))
    return Agent(name, llm=llm, agents=list(children), budget=budget)


class Settled:
    """Events set when an execution (one that may not exist yet) first suspends or ends."""

    def __init__(self, rt: Any) -> None:
        self._events: dict[str, anyio.Event] = {}
        rt.on_suspend(self._hit)
        rt.on_complete(self._hit)

    def _hit(self, result: Any, *_: Any) -> None:
        self._events.setdefault(result.execution_id, anyio.Event()).set()

    async def wait(self, rt: Any, eid: str) -> Any:
        """The execution's Result once it has settled."""
        await self._events.setdefault(eid, anyio.Event()).wait()
        return await rt.wait(eid)


async def tree_dollars(rt: Any) -> float:
    """What every execution used itself, summed: each dollar counted once."""
    return round(sum(info.dollars for info in await rt.executions()), 6)


async def assert_index_agrees_with_replay(rt: Any) -> None:
    """Every execution's index entry (defaults filled in for the fields it leaves out)
    is what a replay of its stream gives; and ``rt.executions()`` reads it so."""
    from perdure.journal import INDEX_DEFAULTS, index_meta, load_state

    def plain(meta: dict[str, Any]) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in meta.items()}

    infos = {i.execution_id: i for i in await rt.executions()}
    async for entry in rt.log.streams(prefix="exec/"):
        eid = entry.stream[len("exec/") :]
        state = await load_state(rt.log, eid)
        want = plain(index_meta(state))
        assert plain({**INDEX_DEFAULTS, **entry.meta}) == want, eid
        info = infos[eid]
        assert (info.status, info.reason, info.parent) == (
            want["status"],
            want["reason"],
            want["parent"],
        )
        assert (info.steps, info.llm_calls, info.tool_calls, info.tokens, info.dollars) == (
            want["steps"],
            want["llm_calls"],
            want["tool_calls"],
            want["tokens"],
            want["dollars"],
        )
        assert list(info.waiting_on) == want["waiting_on"]
        assert info.delegated_dollars == (want.get("delegated") or {}).get("dollars", 0.0)


async def test_children_together_cannot_spend_past_the_parents_dollars_and_a_raise_on_the_parent_resumes_the_child(  # noqa: E501
    open_runtime: Any,
) -> None:
    a, b = worker("a"), worker("b")
    boss = orchestrator(a, b, budget=Budget(max_dollars=5.0))
    async with open_runtime(pricing=PRICING) as rt:
        settled = Settled(rt)
        await rt.spawn(boss, "go", execution_id="tb-1")
        with anyio.fail_after(10):
            b_result = await settled.wait(rt, "tb-1/4")
            parent = await rt.wait("tb-1")
        # a had $4 left to it and spent $3; b was handed what was left: $0
        assert (await rt.state("tb-1/2")).inherited == Budget(max_dollars=4.0)
        assert (await rt.state("tb-1/4")).inherited == Budget(max_dollars=0.0)
        reason = b_result.suspend_reason
        assert reason is not None and reason.kind == "budget"
        assert (reason.limit, reason.limit_value, reason.used) == ("max_dollars", 0.0, 0.0)
        assert reason.parent == "tb-1" and reason.origin == "tb-1"
        assert "rt.resume('tb-1', budget=Budget(max_dollars=N))" in reason.message
        assert "'perdure resume tb-1 --max-dollars N'" in reason.message
        assert parent.suspend_reason.kind == "child"  # type: ignore[union-attr]
        assert await tree_dollars(rt) == 5.0  # the whole tree stopped at the limit
        # the parent's own $2 and its children's $3 are told apart
        assert parent.usage.dollars == 2.0 and parent.delegated_usage.dollars == 3.0

        # a raise is judged against what the tree used: $4.50 would stop it at once
        with pytest.raises(InvalidSignalError, match=r"it has used \$5, so the limit"):
            await rt.resume("tb-1", budget=Budget(max_dollars=4.5))
        await rt.resume("tb-1", budget=Budget(max_dollars=20.0))
        with anyio.fail_after(10):
            done = await rt.wait("tb-1", until="finished")
        b_state = await rt.state("tb-1/4")
        total = await tree_dollars(rt)
    assert done.output == "all done"
    assert b_state.inherited == Budget(max_dollars=15.0)  # $20 less the $5 spent then
    assert b_state.usage.dollars == 3.0
    assert (done.usage.dollars, done.delegated_usage.dollars) == (3.0, 6.0)
    assert done.total_usage.dollars == 9.0 == total


async def test_a_parents_llm_calls_bound_its_children_and_the_cli_raise_reaches_the_child(
    open_runtime: Any, data_dir: Path
) -> None:
    """The raise comes from another process (``perdure resume PARENT``): it is handed
    down to the child suspended on what it inherited, which resumes by itself."""
    a, b = worker("a"), worker("b")
    boss = orchestrator(a, b, budget=Budget(max_llm_calls=5))
    async with open_runtime() as rt:
        settled = Settled(rt)
        await rt.spawn(boss, "go", execution_id="tl-1")
        with anyio.fail_after(10):
            b_result = await settled.wait(rt, "tl-1/4")
        assert b_result.suspend_reason is not None
        assert b_result.suspend_reason.details["limit"] == "max_llm_calls"
        assert b_result.suspend_reason.parent == "tl-1"
        # a was handed 5 - 1 and used 3; b, 5 - (2 + 3): nothing
        assert (await rt.state("tl-1/2")).inherited == Budget(max_llm_calls=4)
        assert (await rt.state("tl-1/4")).inherited == Budget(max_llm_calls=0)
        shown = await anyio.to_thread.run_sync(perdure, data_dir, "inspect", "tl-1/4")
        assert "perdure resume tl-1 --max-llm-calls N" in shown.out, shown.out
        sent = await anyio.to_thread.run_sync(
            perdure, data_dir, "resume", "tl-1", "--max-llm-calls", "20"
        )
        assert sent.code == 0, sent.err
        with anyio.fail_after(10):
            done = await rt.wait("tl-1", until="finished")
        llm_calls = sum(info.llm_calls for info in await rt.executions())
        steps = await anyio.to_thread.run_sync(perdure, data_dir, "steps", "tl-1")
        child_steps = await anyio.to_thread.run_sync(perdure, data_dir, "steps", "tl-1/4")
        parent = await anyio.to_thread.run_sync(perdure, data_dir, "inspect", "tl-1")
        child = await anyio.to_thread.run_sync(perdure, data_dir, "inspect", "tl-1/4")
    assert done.output == "all done"
    assert done.total_usage.llm_calls == llm_calls == 9
    assert "tl-1/2 used 3 LLM calls, 2 tool calls" in steps.out, steps.out
    assert "tl-1/4 used 3 LLM calls" in steps.out
    # the raise, handed down to the child
    assert 'budget_inherited  {"max_llm_calls": 15} left by tl-1' in child_steps.out
    assert "usage      3 LLM calls, 2 tool calls" in parent.out, parent.out
    assert "delegated  6 LLM calls, 4 tool calls" in parent.out
    assert "inherited  max_llm_calls 15 (what tl-1 had left" in child.out, child.out


async def test_a_parent_budget_signal_sent_by_hand_is_refused_and_grants_nothing(
    open_runtime: Any, data_dir: Path
) -> None:
    """Only the runtime hands a parent's budget down: the same signal from the API or the
    CLI would grant a child limits no ancestor has, so both refuse it, naming the way out."""
    a, b = worker("a"), worker("b")
    boss = orchestrator(a, b, budget=Budget(max_llm_calls=5))
    async with open_runtime() as rt:
        settled = Settled(rt)
        await rt.spawn(boss, "go", execution_id="tf-1")
        with anyio.fail_after(10):
            b_result = await settled.wait(rt, "tf-1/4")
        assert b_result.suspend_reason is not None
        forged = {"budget": {"max_llm_calls": 1000}, "parent": "tf-1"}
        with pytest.raises(InvalidSignalError, match="'parent_budget' is reserved") as caught:
            await rt.signal("tf-1/4", "parent_budget", forged)
        assert "perdure resume tf-1/4" in str(caught.value)
        sent = await anyio.to_thread.run_sync(
            perdure, data_dir, "signal", "tf-1/4", "parent_budget", '{"budget": {}}'
        )
        assert sent.code != 0 and "reserved" in sent.err, (sent.code, sent.err)
        assert (await rt.wait("tf-1/4")).is_suspended
        assert (await rt.state("tf-1/4")).inherited == Budget(max_llm_calls=0)


async def test_raising_the_childs_own_budget_lets_it_spend_past_the_parent_which_then_stops(
    open_runtime: Any,
) -> None:
    """The other way out: the child's own raise lifts the limit it inherited (an
    operator's decision); the parent is charged, and its own next check stops it."""
    a = worker("a", calls=4)
    boss = orchestrator(a, budget=Budget(max_dollars=3.0))
    async with open_runtime(pricing=PRICING) as rt:
        stopped = anyio.Event()

        def on_suspend(r: Any, reason: Any) -> None:
            if r.execution_id == "to-1" and reason.kind == "budget":
                stopped.set()

        rt.on_suspend(on_suspend)
        settled = Settled(rt)
        await rt.spawn(boss, "go", execution_id="to-1")
        with anyio.fail_after(10):
            kid = await settled.wait(rt, "to-1/2")
        assert kid.suspend_reason.parent == "to-1"  # type: ignore[union-attr]
        assert kid.usage.dollars == 2.0  # $3 less the parent's first call
        await rt.resume("to-1/2", budget=Budget(max_dollars=10.0))
        with anyio.fail_after(10):
            kid = await rt.wait("to-1/2")
            await stopped.wait()
        parent = await rt.result("to-1")
        kid_state = await rt.state("to-1/2")
    assert kid.status == "completed" and kid.usage.dollars == 4.0
    assert kid_state.inherited == Budget() and kid_state.limits == Budget(max_dollars=10.0)
    reason = parent.suspend_reason
    assert reason is not None and reason.kind == "budget" and "parent" not in reason.details
    assert (reason.limit, reason.used) == ("max_dollars", 5.0)
    assert reason.delegated["dollars"] == 4.0


async def test_a_grandchild_names_the_root_whose_budget_it_spends_and_a_root_raise_reaches_it(
    open_runtime: Any,
) -> None:
    leaf = worker("leaf")
    middle = orchestrator(leaf, name="middle")
    root = orchestrator(middle, name="root", budget=Budget(max_llm_calls=3))
    async with open_runtime() as rt:
        settled = Settled(rt)
        await rt.spawn(root, "go", execution_id="tg-1")
        with anyio.fail_after(10):
            leaf_result = await settled.wait(rt, "tg-1/2/2")
        reason = leaf_result.suspend_reason
        assert reason is not None and reason.kind == "budget"
        assert reason.parent == "tg-1/2" and reason.origin == "tg-1"
        assert "the budget of 'tg-1' (which bounds its parent 'tg-1/2')" in reason.message
        assert "rt.resume('tg-1', budget=Budget(max_llm_calls=N))" in reason.message
        await rt.resume("tg-1", budget=Budget(max_llm_calls=50))
        with anyio.fail_after(10):
            done = await rt.wait("tg-1", until="finished")
        leaf_state = await rt.state("tg-1/2/2")
    assert done.output == "all done"
    # handed down at the raise: 50, less root's 1 call, less middle's 1 call
    assert leaf_state.inherited == Budget(max_llm_calls=48)
    assert done.total_usage.llm_calls == 2 + 2 + 3
    assert done.delegated_usage.llm_calls == 5


async def test_a_finished_childs_usage_is_charged_once_in_the_parents_log(
    open_runtime: Any,
) -> None:
    """Charged with the delegate call's outcome, in the same append: one record."""
    a = worker("a")
    boss = orchestrator(a)
    async with open_runtime(pricing=PRICING) as rt:
        done = await rt.run(boss, "go", execution_id="tc-1")
        with anyio.fail_after(10):
            done = await rt.wait("tc-1", until="finished")
        records = [r async for r in rt.log.read(execution_stream("tc-1"))]
    charged = [r for r in records if r.type == "delegation.charged"]
    assert len(charged) == 1 and charged[0].payload["child"] == "tc-1/2"
    assert charged[0].payload["usage"]["dollars"] == 3.0
    completed = next(r for r in records if r.type == "tool.completed")
    assert completed.seq == charged[0].seq + 1  # the same batch, charge first
    assert done.delegated_usage.dollars == 3.0 and done.usage.dollars == 2.0


# -- SIGKILL between a child finishing and its parent taking (and being charged) it --------


def records_of(base: Path) -> dict[str, list[Any]]:
    """Every execution's records in the worker's data dir, by execution id."""

    async def read() -> dict[str, list[Any]]:
        from perdure.events import record_types
        from perdure.log import LmdbLog

        log = await LmdbLog.open(base / "data", types=record_types(), client=True)
        try:
            out: dict[str, list[Any]] = {}
            async for info in log.streams(prefix="exec/"):
                out[info.stream[len("exec/") :]] = [r async for r in log.read(info.stream)]
            return out
        finally:
            await log.aclose()

    return anyio.run(read)


def check_charged_once(base: Path, results: dict[str, dict[str, Any]]) -> None:
    from perdure.state import ExecutionState, apply_record

    assert results["ch-1"]["output"] == "done: spent | spent"
    logs = records_of(base)
    states = {}
    for eid, records in logs.items():
        state = ExecutionState()
        for r in records:
            apply_record(state, r.type, r.payload)
        states[eid] = state
    charged = [r.payload for r in logs["ch-1"] if r.type == "delegation.charged"]
    # each child charged exactly once, with what it used
    assert [c["child"] for c in charged] == ["ch-1/2", "ch-1/4"]
    for c in charged:
        assert c["usage"]["llm_calls"] == states[c["child"]].usage.llm_calls == 2
    root = states["ch-1"]
    assert root.delegated is not None and root.delegated.llm_calls == 4
    # the children's 4 calls stopped the root at its 6 before its answer: one raise
    raised = [r.payload for r in logs["ch-1"] if r.type == "budget.raised"]
    assert [p["budget"] for p in raised] == [{"max_llm_calls": 10}]
    suspended = [r.payload["reason"] for r in logs["ch-1"] if r.type == "execution.suspended"]
    budget_stops = [s for s in suspended if s["kind"] == "budget"]
    assert budget_stops and all(s["used"] == 6 for s in budget_stops)
    assert root.usage.llm_calls == 3 and root.total_usage.llm_calls == 7


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize(
    "crashes",
    [["child-done:1"], ["child-done:2"], ["child-done:1", "child-done:1"]],
    ids=["first", "second", "each"],
)
def test_a_crash_between_a_child_finishing_and_its_parent_taking_it_charges_it_once(
    crashes: list[str], backend: str, tmp_path: Path
) -> None:
    """SIGKILL right after a child's completion is durable, before the parent has its
    outcome ("each": the first child's in the first run, the second's in the next)."""
    import signal

    from tests.runtime.test_adversarial_crashes import results_of, run_worker

    for run, crash in enumerate(crashes):
        killed = run_worker(tmp_path, "charge", crash, backend, PERDURE_RUN=str(run))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]  # it did crash
        # what the crash left: a child just completed, its parent not charged for it yet
        logs = records_of(tmp_path)
        finished = [e for e in logs if e != "ch-1" and logs[e][-1].type == "execution.completed"]
        charges = [r for r in logs["ch-1"] if r.type == "delegation.charged"]
        assert len(charges) == len(finished) - 1, (finished, charges)
    done = run_worker(tmp_path, "charge", "none", backend, PERDURE_RUN=str(len(crashes)))
    assert done.returncode == 0, done.stderr[-3000:]
    check_charged_once(tmp_path, results_of(done))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("at", [4, 6, 8, 9, 11, 13])
def test_the_charge_survives_sigkill_at_records_around_each_delegation(
    at: int, backend: str, tmp_path: Path
) -> None:
    from tests.runtime.test_adversarial_crashes import run_until_done

    results = run_until_done(tmp_path, "charge", [f"append:{at}"], backend)
    check_charged_once(tmp_path, results)


def test_the_fold_takes_the_tighter_limit_and_a_handed_down_raise_lifts_a_suspension() -> None:
    """Pure: what a child inherited bounds it with its own budget; budget.inherited
    replaces what it inherited and, if that lets it go on, it is running again; a
    start record without an inherited budget (logs from before) leaves it unbounded."""
    from perdure.events import (
        BudgetInherited,
        DelegationCharged,
        ExecutionStarted,
        ExecutionSuspended,
    )
    from perdure.state import ExecutionState, Suspend, apply, budget_grant, plan

    link = {"execution_id": "p", "step": 2, "budget": {"max_llm_calls": 0, "max_dollars": 4.0}}
    link["origins"] = {"max_llm_calls": "root", "max_dollars": "p"}
    started = ExecutionStarted("p/2", "kid", "go", "r1", {}, 10, {"max_llm_calls": 5}, link)
    state = apply(ExecutionState(), started)
    assert state.limits == Budget(max_dollars=4.0, max_llm_calls=0)
    action = plan(state)
    assert isinstance(action, Suspend) and action.reason["origin"] == "root"
    apply(state, ExecutionSuspended(action.reason))
    apply(state, BudgetInherited({"max_llm_calls": 7}, "p", "runtime", {}, 3))
    assert state.status == "running" and state.limits == Budget(max_llm_calls=5)
    assert state.last_signal_seq == 3
    usage = {"llm_calls": 2, "tool_calls": 1, "input_tokens": 2, "dollars": 1.5}
    apply(state, DelegationCharged(4, "p/2/4", usage))
    assert state.delegated is not None and state.delegated.dollars == 1.5
    assert budget_grant(state) == {
        "budget": {"max_llm_calls": 3},  # its own 5, less its child's 2
        "origins": {"max_llm_calls": "p/2"},
    }
    old = ExecutionStarted("q/2", "kid", "go", "r1", {}, 10, None, {"execution_id": "q"})
    assert apply(ExecutionState(), old).limits is None


async def test_a_raise_whose_hand_down_was_lost_reaches_the_child_at_the_next_open(
    open_runtime: Any,
) -> None:
    """The parent's raise is durable, but the process ends before the child has it
    (here the hand-down is switched off for the first runtime): the next open hands it
    down again, and the child resumes by itself."""
    a, b = worker("a"), worker("b")
    boss = orchestrator(a, b, budget=Budget(max_dollars=5.0))
    async with open_runtime(pricing=PRICING) as rt:
        settled = Settled(rt)
        rt._budget_changed = lambda eid, state: None  # type: ignore[method-assign]
        await rt.spawn(boss, "go", execution_id="tr-1")
        with anyio.fail_after(10):
            await settled.wait(rt, "tr-1/4")
        await rt.resume("tr-1", budget=Budget(max_dollars=20.0))
        assert (await rt.result("tr-1/4")).suspend_reason.kind == "budget"  # type: ignore[union-attr]
        assert (await rt.state("tr-1")).budget == Budget(max_dollars=20.0)
    async with open_runtime(pricing=PRICING, agents=[boss]) as rt:
        with anyio.fail_after(10):
            done = await rt.wait("tr-1", until="finished")
        b_state = await rt.state("tr-1/4")
    assert done.output == "all done" and done.total_usage.dollars == 9.0
    assert b_state.inherited == Budget(max_dollars=15.0)


async def test_a_root_raise_whose_hand_down_was_lost_reaches_a_grandchild_at_the_next_open(
    open_runtime: Any,
) -> None:
    """Three levels: the root's raise is durable, but the process ends before the middle
    execution has it, so the middle one has nothing more to hand its child. The next open
    goes up from the grandchild suspended on the root's limit to the first ancestor that
    can hand down more (here the middle one, from the root), and the raise comes down."""
    leaf = worker("leaf")
    middle = orchestrator(leaf, name="middle")
    root = orchestrator(middle, name="root", budget=Budget(max_llm_calls=3))
    async with open_runtime() as rt:
        settled = Settled(rt)
        rt._budget_changed = lambda eid, state: None  # type: ignore[method-assign]
        await rt.spawn(root, "go", execution_id="tq-1")
        with anyio.fail_after(10):
            leaf_result = await settled.wait(rt, "tq-1/2/2")
        assert leaf_result.suspend_reason.origin == "tq-1"  # type: ignore[union-attr]
        await rt.resume("tq-1", budget=Budget(max_llm_calls=50))
        assert (await rt.state("tq-1/2")).inherited == Budget(max_llm_calls=2)  # not handed
        await assert_index_agrees_with_replay(rt)
    async with open_runtime(agents=[root]) as rt:
        with anyio.fail_after(10):
            done = await rt.wait("tq-1", until="finished")
        middle_state = await rt.state("tq-1/2")
        leaf_state = await rt.state("tq-1/2/2")
        await assert_index_agrees_with_replay(rt)
    assert done.output == "all done"
    assert middle_state.inherited == Budget(max_llm_calls=49)
    assert leaf_state.inherited == Budget(max_llm_calls=48)
    assert done.total_usage.llm_calls == 2 + 2 + 3


def signing_worker(name: str) -> Agent:
    """Three LLM calls: a call that needs approval, one that does not, then an answer."""

    @tool(name=f"sign_{name}", requires_confirmation=True)
    def sign(doc: str) -> str:
        """Sign a document."""
        return f"signed {doc}"

    @tool(name=f"file_{name}")
    def file_it(doc: str) -> str:
        """File a document."""
        return f"filed {doc}"

    def script(request: LLMRequest) -> Any:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn == 0:
            return Scripted.call(f"sign_{name}", doc="d")
        return Scripted.call(f"file_{name}", doc="d") if turn == 1 else f"{name} done"

    llm = Scripted(script, record=False, model="metered", usage=Usage(1, 0))
    return Agent(name, tools=[sign, file_it], llm=llm)


async def test_a_lost_hand_down_reaches_a_child_that_was_waiting_for_an_approval_then(
    open_runtime: Any,
) -> None:
    """The child waited for an approval when the parent's raise was recorded, and the
    hand-down was lost: the open does not see a budget suspension, but once approved the
    child reaches what it inherited; the raise it is owed is handed down then."""
    kid = signing_worker("kid")
    boss = orchestrator(kid, budget=Budget(max_llm_calls=3))
    async with open_runtime() as rt:
        settled = Settled(rt)
        rt._budget_changed = lambda eid, state: None  # type: ignore[method-assign]
        await rt.spawn(boss, "go", execution_id="ta-1")
        with anyio.fail_after(10):
            waiting = await settled.wait(rt, "ta-1/2")
        assert waiting.suspend_reason.kind == "approval"  # type: ignore[union-attr]
        await assert_index_agrees_with_replay(rt)
        await rt.resume("ta-1", budget=Budget(max_llm_calls=20))
        assert (await rt.state("ta-1/2")).inherited == Budget(max_llm_calls=2)  # not handed
    async with open_runtime(agents=[boss]) as rt:
        await rt.approve("ta-1/2", waiting.suspend_reason.confirmation_id)  # type: ignore[union-attr]
        with anyio.fail_after(10):
            done = await rt.wait("ta-1", until="finished")
        kid_state = await rt.state("ta-1/2")
        await assert_index_agrees_with_replay(rt)
    assert done.output == "all done"
    assert kid_state.status == "completed" and kid_state.usage.llm_calls == 3
    assert kid_state.inherited == Budget(max_llm_calls=19)


def check_handed_down(base: Path, results: dict[str, dict[str, Any]]) -> None:
    """The root's one raise reached the leaf two levels down; every child charged once."""
    from perdure.state import ExecutionState, apply_record

    assert [results[e]["status"] for e in ("h-1", "h-1/2", "h-1/2/2")] == ["completed"] * 3
    logs = records_of(base)
    states = {}
    for eid, records in logs.items():
        state = states[eid] = ExecutionState()
        for r in records:
            apply_record(state, r.type, r.payload)
    raised = [r.payload["budget"] for r in logs["h-1"] if r.type == "budget.raised"]
    assert raised == [{"max_llm_calls": 20}]
    # 20 less the root's one call; less the middle's one call
    assert states["h-1/2"].inherited == Budget(max_llm_calls=19)
    assert states["h-1/2/2"].inherited == Budget(max_llm_calls=18)
    for parent, child in (("h-1", "h-1/2"), ("h-1/2", "h-1/2/2")):
        charged = [r.payload for r in logs[parent] if r.type == "delegation.charged"]
        assert [c["child"] for c in charged] == [child]
    assert states["h-1"].total_usage.llm_calls == 2 + 2 + 3


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("crash", ["raised:1", "inherited:1", "inherited:2"])
def test_a_root_raise_comes_down_two_levels_whatever_hand_down_a_sigkill_cuts_short(
    crash: str, backend: str, tmp_path: Path
) -> None:
    """SIGKILL right after the root's raise is durable (nothing handed down: the middle
    execution, waiting on its child, has nothing more to give), after the middle one
    has it (the leaf does not), and after the leaf has it."""
    import signal

    from tests.runtime.test_adversarial_crashes import results_of, run_worker

    killed = run_worker(tmp_path, "handdown", crash, backend, PERDURE_RUN="0")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]  # it did crash
    done = run_worker(tmp_path, "handdown", "none", backend, PERDURE_RUN="1")
    assert done.returncode == 0, done.stderr[-3000:]
    check_handed_down(tmp_path, results_of(done))


async def test_a_raise_and_a_cancel_reach_the_child_of_a_parent_whose_id_is_too_long_to_extend(
    open_runtime: Any,
) -> None:
    """A child's id is its parent's plus "/step", shortened (with a digest) when that would
    be too long: the parent's hand-downs and cancels must find that child too."""
    from perdure.runtime import _child_id

    long_id, long_id2 = "L" * 254, "L" * 253 + "M"
    kid, kid2 = _child_id(long_id, 2, 0), _child_id(long_id2, 2, 0)
    assert not kid.startswith(long_id) and not kid2.startswith(long_id2)  # shortened
    a, b = worker("a"), worker("b")
    boss = orchestrator(a, budget=Budget(max_llm_calls=2))
    other = orchestrator(b, budget=Budget(max_llm_calls=2), name="other")
    async with open_runtime() as rt:
        settled = Settled(rt)
        await rt.spawn(boss, "go", execution_id=long_id)
        await rt.spawn(other, "go", execution_id=long_id2)
        with anyio.fail_after(10):
            stopped = await settled.wait(rt, kid)
            await settled.wait(rt, kid2)
        assert stopped.suspend_reason.parent == long_id  # type: ignore[union-attr]
        await rt.resume(long_id, budget=Budget(max_llm_calls=20))
        with anyio.fail_after(10):
            done = await rt.wait(long_id, until="finished")
        assert done.output == "all done" and done.delegated_usage.llm_calls == 3
        await rt.cancel(long_id2, "not needed")
        with anyio.fail_after(10):
            cancelled = await rt.wait(kid2, until="finished")
    assert cancelled.status == "cancelled"


def test_a_limit_raised_on_the_child_itself_is_not_brought_back_by_a_later_hand_down() -> None:
    """Pure: the operator's raise on the child takes that limit out of what it inherits;
    the parent's next hand-down (its budget changed) bounds the other limits only."""
    from perdure.events import BudgetInherited, BudgetRaised, ExecutionStarted
    from perdure.state import ExecutionState, apply

    link = {"execution_id": "p", "step": 2, "budget": {"max_dollars": 2.0, "max_llm_calls": 4}}
    link["origins"] = {"max_dollars": "p", "max_llm_calls": "p"}
    state = apply(ExecutionState(), ExecutionStarted("p/2", "kid", "go", "r1", {}, 10, None, link))
    apply(state, BudgetRaised({"max_dollars": 10.0}, "op", 1, {"max_llm_calls": 4}))
    assert state.limits == Budget(max_dollars=10.0, max_llm_calls=4)
    handed = {"max_dollars": 3.0, "max_llm_calls": 6}
    apply(state, BudgetInherited(handed, "p", "runtime", {"max_dollars": "p"}, 2))
    assert state.inherited == Budget(max_llm_calls=6) and state.origins == {}
    assert state.limits == Budget(max_dollars=10.0, max_llm_calls=6)


async def test_the_parents_raise_after_the_childs_own_leaves_the_childs_limit_in_place(
    open_runtime: Any,
) -> None:
    """The child, stopped at what it inherited, gets its own dollars raised to $4 and
    stops there; then the parent's budget is raised a little and handed down ($2.5
    left): the child's dollar limit stays the operator's $4, the one it is stopped on."""
    a = worker("a", calls=8)
    boss = orchestrator(a, budget=Budget(max_dollars=3.0))
    async with open_runtime(pricing=PRICING) as rt:
        settled = Settled(rt)
        own_limit = anyio.Event()

        def on_suspend(r: Any, reason: Any) -> None:
            own = reason.kind == "budget" and "origin" not in reason.details
            if r.execution_id == "tp-1/2" and own:
                own_limit.set()

        rt.on_suspend(on_suspend)
        await rt.spawn(boss, "go", execution_id="tp-1")
        with anyio.fail_after(10):
            kid = await settled.wait(rt, "tp-1/2")
        assert kid.suspend_reason.origin == "tp-1"  # type: ignore[union-attr]
        await rt.resume("tp-1/2", budget=Budget(max_dollars=4.0))
        with anyio.fail_after(10):
            await own_limit.wait()
        stream = execution_stream("tp-1/2")
        start = seen = await rt.log.last_seq(stream)
        await rt.resume("tp-1", budget=Budget(max_dollars=3.5))
        with anyio.fail_after(10):
            while "budget.inherited" not in [r.type async for r in rt.log.read(stream, start)]:
                seen = await rt.log.wait_for_append(stream, after=seen)
        kid_state = await rt.state("tp-1/2")
        kid = await rt.result("tp-1/2")
    assert kid_state.inherited == Budget() and kid_state.limits == Budget(max_dollars=4.0)
    reason = kid.suspend_reason
    assert reason is not None and reason.limit == "max_dollars" and "origin" not in reason.details
    assert kid.usage.dollars == 4.0
