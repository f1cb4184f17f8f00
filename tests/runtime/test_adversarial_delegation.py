"""Adversarial probes of delegation between agents (parent and child executions).

What earlier tests did not drive: a child cancelled on its own (its parent's model must
hear why), a parent cancelled while its child is inside a tool or queued for a slot, a
grandchild's approval seen from the root (``rt.result`` and ``perdure inspect``), a
child whose agent is not registered at reopen, delegations two levels deep and two at a
time under ``max_concurrency=1``, a suspended execution's slot, and SIGKILL at every
record of such a tree (the worker is ``adversarial_worker.py``, scenario ``tree``).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from perdure import Agent, InvalidSignalError, tool
from perdure.providers import Scripted, TerminalProviderError
from tests.cli.conftest import perdure
from tests.runtime.test_adversarial_crashes import (
    BACKEND,
    EXAMPLES,
    crash_points,
    run_until_done,
    side_lines,
    starts_by_key,
)


def tool_texts(r: Any) -> list[tuple[str, bool]]:
    return [(m.content, m.is_error) for m in r.transcript if m.role == "tool"]


@tool(requires_confirmation=True)
def act() -> str:
    """Needs a person's approval."""
    return "acted"


def boss_of(child: Agent, name: str = "boss") -> Agent:
    """An agent that delegates once to ``child``, then answers "ok"."""
    return Agent(
        name,
        llm=Scripted([Scripted.call(f"delegate_to_{child.name}", task="t"), "ok"]),
        agents=[child],
    )


@pytest.mark.anyio
async def test_a_failed_or_cancelled_child_tells_its_parents_model_why(
    open_runtime: Any,
) -> None:
    """A cancelled child used to reach the parent as "cancelled: no detail": the
    reason given to rt.cancel was lost on the way."""
    failing = Agent("failing", llm=Scripted([TerminalProviderError("model down")]))
    waiting = Agent("waiting", tools=[act], llm=Scripted([Scripted.call("act"), "never"]))
    async with open_runtime() as rt:
        await rt.run(boss_of(failing, "boss1"), "go", execution_id="f-1")
        await rt.run(boss_of(waiting, "boss2"), "go", execution_id="c-1")
        assert (await rt.wait("c-1/2")).status == "suspended"
        await rt.cancel("c-1/2", "the customer withdrew", by="dana")
        with anyio.fail_after(10):
            failed = await rt.wait("f-1", until="finished")
            cancelled = await rt.wait("c-1", until="finished")
    assert failed.status == "completed" and cancelled.status == "completed"
    [(text, is_error)] = tool_texts(failed)
    assert is_error and text.startswith("ERROR (ToolError): delegated execution 'f-1/2' failed:")
    assert "model down" in text
    assert tool_texts(cancelled) == [
        ("ERROR (ToolError): delegated execution 'c-1/2' cancelled: the customer withdrew", True)
    ]


@pytest.mark.anyio
async def test_cancelling_a_parent_while_its_child_runs_a_tool_cancels_that_tool(
    open_runtime: Any,
) -> None:
    inside = anyio.Event()
    stopped: list[str] = []

    @tool
    async def slow() -> str:
        inside.set()
        try:
            await anyio.sleep_forever()
        finally:
            stopped.append("slow")
        return "unreachable"

    kid = Agent("kid", tools=[slow], llm=Scripted([Scripted.call("slow"), "kid done"]))
    async with open_runtime() as rt:
        await rt.spawn(boss_of(kid), "go", execution_id="pc-1")
        with anyio.fail_after(10):
            await inside.wait()
            await rt.cancel("pc-1", "stop everything")
            child = await rt.wait("pc-1/2", until="finished")
        child_state = await rt.state("pc-1/2")
        parent = await rt.result("pc-1")
    assert parent.status == "cancelled" and child.status == "cancelled"
    assert stopped == ["slow"]  # the running tool was cancelled, not left to run
    assert child_state.cancel_reason == "its parent 'pc-1' was cancelled: stop everything"
    assert not any(m.role == "tool" for m in child.transcript)


@pytest.mark.anyio
async def test_a_grandchilds_approval_shows_from_the_root_and_approving_it_finishes_all(
    open_runtime: Any, data_dir: Path
) -> None:
    """The root's reason used to say only "child b/2: suspended (child)": which
    execution, two levels down, waits for whom was not said."""
    ran: list[str] = []

    @tool(requires_confirmation=True)
    def sign() -> str:
        ran.append("sign")
        return "signed"

    grandchild = Agent("gkid", tools=[sign], llm=Scripted([Scripted.call("sign"), "g done"]))
    child = Agent(
        "kid",
        llm=Scripted([Scripted.call("delegate_to_gkid", task="sign it"), "kid done"]),
        agents=[grandchild],
    )
    async with open_runtime() as rt:
        await rt.run(boss_of(child), "go", execution_id="g-1")
        g = await rt.wait("g-1/2/2")
        cid = g.suspend_reason.confirmation_id  # type: ignore[union-attr]
        root = await rt.result("g-1")
        seen = root.suspend_reason.child  # type: ignore[union-attr]
        assert seen["execution_id"] == "g-1/2" and seen["reason"] == "child"
        assert (
            seen["status_text"]
            == f"suspended (child); waits for g-1/2/2: suspended (approval {cid})"
        )
        assert seen["blocked_at"]["execution_id"] == "g-1/2/2"
        assert seen["blocked_at"]["confirmations"] == [cid]
        # the CLI, from another process, says the same and points at the grandchild
        shown = await anyio.to_thread.run_sync(perdure, data_dir, "inspect", "g-1")
        assert shown.code == 0, shown.err
        assert f"waits for g-1/2/2: suspended (approval {cid})" in shown.out
        assert "see 'perdure inspect g-1/2/2'" in shown.out
        detail = await anyio.to_thread.run_sync(perdure, data_dir, "inspect", "g-1", "--json")
        [waited] = json.loads(detail.out)["waiting_on"]
        assert waited["blocked_at"]["confirmations"] == [cid]
        await rt.approve("g-1/2/2", cid)
        with anyio.fail_after(10):
            root = await rt.wait("g-1", until="finished")
    assert root.output == "ok" and tool_texts(root) == [("kid done", False)]
    assert ran == ["sign"]


@pytest.mark.anyio
async def test_delegations_two_at_a_time_and_two_deep_finish_under_max_concurrency_one(
    open_runtime: Any,
) -> None:
    """A parent holds the only slot while it delegates: its children must queue, the
    parent must give the slot up when it hibernates, and nobody may deadlock."""
    grandchild = Agent("gkid", llm=Scripted(["g done"]))
    first = Agent(
        "first",
        llm=Scripted([Scripted.call("delegate_to_gkid", task="deep"), "first done"]),
        agents=[grandchild],
    )
    second = Agent("second", llm=Scripted(["second done"]))
    both = Scripted(
        [
            [
                Scripted.call("delegate_to_first", task="a"),
                Scripted.call("delegate_to_second", task="b"),
            ],
            "all done",
        ]
    )
    boss = Agent("boss", llm=both, agents=[first, second])
    running: list[int] = []
    async with open_runtime(max_concurrency=1) as rt:
        rt.on_step(lambda eid, step: running.append(len(rt._slots)))
        await rt.spawn(boss, "go", execution_id="mc-1")
        with anyio.fail_after(20):
            r = await rt.wait("mc-1", until="finished")
    assert r.output == "all done"
    assert tool_texts(r) == [("first done", False), ("second done", False)]  # call order
    assert running and max(running) == 1


@pytest.mark.anyio
async def test_a_child_queued_for_a_slot_never_runs_once_its_parent_is_cancelled(
    open_runtime: Any,
) -> None:
    """max_concurrency=1: the parent holds the slot (a sibling call runs) while its child
    waits in the queue. Cancelling the parent gave the slot back and the queue started
    the child at once, before the cancel cascade reached it: the child ran its tool
    for a parent that no longer wanted it."""
    inside = anyio.Event()
    kid_ran: list[str] = []

    @tool
    async def hold() -> str:
        inside.set()
        await anyio.sleep_forever()
        return "unreachable"

    @tool
    def effect() -> str:
        kid_ran.append("effect")
        return "done"

    kid = Agent("kid", tools=[effect], llm=Scripted([Scripted.call("effect"), "kid done"]))
    turn = [Scripted.call("delegate_to_kid", task="t"), Scripted.call("hold")]
    boss = Agent("boss", tools=[hold], llm=Scripted([turn, "ok"]), agents=[kid])
    async with open_runtime(max_concurrency=1) as rt:
        queued = anyio.Event()
        push = rt._push_queue

        def pushed(eid: str) -> None:
            push(eid)
            if eid == "q-1/2":
                queued.set()

        rt._push_queue = pushed  # type: ignore[method-assign]
        await rt.spawn(boss, "go", execution_id="q-1")
        with anyio.fail_after(10):
            await inside.wait()
            await queued.wait()
        assert (await rt.result("q-1/2")).status == "queued"
        await rt.cancel("q-1", "changed my mind")
        with anyio.fail_after(10):
            child = await rt.wait("q-1/2", until="finished")
        state = await rt.state("q-1/2")
        slots, queue = set(rt._slots), list(rt._queue)
    assert child.status == "cancelled" and kid_ran == []
    assert state.usage.llm_calls == 0  # it never started
    assert state.cancel_reason == "its parent 'q-1' was cancelled: changed my mind"
    assert slots == set() and queue == []


@pytest.mark.anyio
async def test_a_child_whose_agent_is_not_registered_at_reopen_says_so_from_its_parent(
    open_runtime: Any,
) -> None:
    """A deploy dropped the sub-agent: its running child waits, and the parent says
    why; registering the sub-agent finishes the child, and the parent (whose delegate
    tool is gone) suspends for drift naming that tool, not silently."""
    inside = anyio.Event()
    gate = anyio.Event()

    @tool
    async def hold() -> str:
        inside.set()
        await gate.wait()
        return "held"

    kid = Agent("kid", tools=[hold], llm=Scripted([Scripted.call("hold"), "kid done"]))
    async with open_runtime() as rt:
        await rt.spawn(boss_of(kid), "go", execution_id="u-1")
        with anyio.fail_after(10):
            await inside.wait()
    without_kid = Agent("boss", llm=Scripted([Scripted.call("delegate_to_kid", task="t"), "ok"]))
    async with open_runtime(agents=[without_kid]) as rt:
        parent_settled = anyio.Event()
        seen: list[Any] = []

        def settled(r: Any, *_: Any) -> None:
            if r.execution_id == "u-1":
                seen.append(r.suspend_reason)
                parent_settled.set()

        rt.on_suspend(settled)
        rt.on_complete(settled)
        waiting = (await rt.result("u-1")).suspend_reason.child  # type: ignore[union-attr]
        assert waiting["status_text"] == (
            "running (the owner has no agent 'kid' registered: waits until it does)"
        )
        gate.set()
        rt.register(kid)
        with anyio.fail_after(10):
            child = await rt.wait("u-1/2", until="finished")
            await parent_settled.wait()
    assert child.output == "kid done"
    [reason] = seen
    assert reason.kind == "drift" and reason.tool == "delegate_to_kid"


@pytest.mark.anyio
async def test_a_suspended_execution_frees_its_slot_and_once_approved_queues_for_one(
    open_runtime: Any,
) -> None:
    """max_concurrency=1: an execution waiting for a person holds no slot; approved
    while another runs, it waits in the queue (durably: status "queued") and then
    finishes."""
    inside = anyio.Event()
    gate = anyio.Event()

    @tool
    async def hold() -> str:
        inside.set()
        await gate.wait()
        return "held"

    waiter = Agent("waiter", tools=[act], llm=Scripted([Scripted.call("act"), "w done"]))
    holder = Agent("holder", tools=[hold], llm=Scripted([Scripted.call("hold"), "h done"]))
    async with open_runtime(max_concurrency=1) as rt:
        r = await rt.run(waiter, "go", execution_id="s-1")
        assert r.is_suspended
        await rt.spawn(holder, "go", execution_id="s-2")
        with anyio.fail_after(10):
            await inside.wait()  # the suspended one gave its slot to this one
        await rt.approve("s-1", r.suspend_reason.confirmation_id)  # type: ignore[union-attr]
        [queued] = await rt.executions(status="queued")
        assert queued.execution_id == "s-1"
        gate.set()
        with anyio.fail_after(10):
            first, second = await rt.wait("s-1"), await rt.wait("s-2")
    assert (first.output, second.output) == ("w done", "h done")


# -- SIGKILL at every record of a delegation tree ------------------------------------------------

TREE = ["t-1", "t-1/2", "t-1/3", "t-1/2/2"]


def check_tree(base: Path, results: dict[str, dict[str, Any]], crashes: int) -> None:
    root = results["t-1"]
    assert root["status"] == "completed"
    assert root["output"] == "done: done: done: note(x) ok | done: file_it(y) ok"
    # the parent got each child's result exactly once, in call order
    assert [m[1:3] for m in root["transcript"] if m[0] == "tool"] == [
        ["done: done: note(x) ok", "delegate_to_lead"],
        ["done: file_it(y) ok", "delegate_to_clerk"],
    ]
    assert all(results[eid]["status"] == "completed" for eid in TREE)
    lines = side_lines(base)
    asked: dict[tuple[str, str], list[str]] = {}
    for _, agent, turn, run in (x for x in lines if x[0] == "llm"):
        asked.setdefault((agent, turn), []).append(run)
    assert set(asked) == {(a, t) for a in ("root", "lead", "clerk", "scribe") for t in "01"}
    for turn, runs in asked.items():
        assert len(runs) == len(set(runs)) <= 1 + crashes, f"model turn {turn}: runs {runs}"
    # each real tool ran once, or again only after a crash inside it, under one key;
    # the delegate calls themselves are re-entered on every wake-up (they run nothing)
    effects = Counter(x[0] for x in lines if x[0] != "llm")
    starts = starts_by_key(base)
    names = {x[0]: x[1] for x in lines if x[0] != "llm"}
    assert sorted(set(names.values())) == ["file_it", "note"]
    assert len(names) == 2, f"a tool ran under more than one key: {names}"
    for key, ran in effects.items():
        assert ran == 1 or ran <= starts[key] <= 1 + crashes, (key, ran, starts[key])


def overrides(base: Path) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        from perdure.events import execution_stream, record_types
        from perdure.log import LmdbLog

        log = await LmdbLog.open(base / "data", types=record_types(), client=True)
        try:
            return [
                dict(r.payload)
                async for r in log.read(execution_stream("t-1/3"))
                if r.type == "approval.granted"
            ]
        finally:
            await log.aclose()

    return anyio.run(read)


@EXAMPLES
@given(crashes=st.lists(crash_points(36, 2), min_size=1, max_size=3), backend=BACKEND)
def test_a_delegation_tree_survives_sigkill_at_any_record(
    crashes: list[str], backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Root delegates twice in one turn (max_concurrency=2, so children queue); one
    child delegates again to a grandchild waiting for an approval; the other child's
    tool is blocked by a contract and overridden. After any crashes: every execution
    completes, the root has each child's answer once and in call order, each tool ran
    once (again only after a crash inside it, same key), and the override is recorded
    once."""
    base = tmp_path_factory.mktemp("tree")
    try:
        results = run_until_done(base, "tree", crashes, backend)
        check_tree(base, results, len(crashes))
        [grant] = overrides(base)
        assert grant["override"] is True and grant["by"] == "worker"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.anyio
async def test_a_failed_child_whose_parent_took_the_failure_is_not_resumed(
    open_runtime: Any, data_dir: Path
) -> None:
    """Resumed, such a child ran to an outcome no parent waited for, and spent outside
    its parent's budget (the parent was charged once, with the failure)."""
    calls: dict[str, int] = {}

    def fails_once(request: Any) -> Any:
        task = request.messages[-1].content
        calls[task] = calls.get(task, 0) + 1
        if calls[task] == 1:
            raise TerminalProviderError("model down")
        return "recovered"

    child = Agent("flaky", llm=Scripted(fails_once))
    async with open_runtime() as rt:
        await rt.run(boss_of(child), "go", execution_id="rp-1")
        with anyio.fail_after(10):
            parent = await rt.wait("rp-1", until="finished")
        assert parent.status == "completed"
        assert (await rt.result("rp-1/2")).status == "failed"
        with pytest.raises(InvalidSignalError, match="which has already taken its failure"):
            await rt.resume("rp-1/2", wait=False)
        # A failed execution nobody waits for is resumed as before.
        alone = await rt.run(child, "alone", execution_id="alone")
        assert alone.status == "failed"
        assert (await rt.resume("alone")).output == "recovered"  # type: ignore[union-attr]
    assert calls == {"t": 1, "alone": 2}
    ran = perdure(data_dir, "resume", "rp-1/2")
    assert ran.code == 1
    assert "'rp-1/2' is a child of 'rp-1', which has already taken its failure" in ran.err
    async with open_runtime(agents=[boss_of(child)]) as rt:
        assert (await rt.result("rp-1/2")).status == "failed"
    assert calls == {"t": 1, "alone": 2}
