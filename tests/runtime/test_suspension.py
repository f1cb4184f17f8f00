"""Suspension and signals in one process: approvals, contracts, budgets, signals,
callbacks, cancellation, delegation, fleets, and in-doubt tool calls.

Where a restart matters the runtime is closed and reopened on the same data dir (the
process-boundary versions, with SIGKILL, live in test_process_boundaries.py).
"""

from __future__ import annotations

import gc
import logging
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
import pytest

from perdure import (
    Agent,
    Budget,
    ContractViolation,
    InvalidSignalError,
    Result,
    Runtime,
    current_idempotency_key,
    tool,
    wait_for_signal,
)
from perdure.events import decode, execution_stream
from perdure.journal import load_state
from perdure.providers import LLMRequest, Price, Pricing, Scripted, Usage
from tests.runtime.conftest import calling_once

pytestmark = pytest.mark.anyio


def transfer_agent(ran: list[tuple[str, float]], *, final: str = "moved") -> Agent:
    @tool("transfer_funds", requires_confirmation=True)
    def transfer_funds(dst: str, amount: float) -> dict:
        ran.append((dst, amount))
        return {"ok": True, "key": current_idempotency_key()}

    llm = Scripted([Scripted.call("transfer_funds", dst="savings", amount=5000.0), final])
    return Agent("banker", tools=[transfer_funds], llm=llm)


async def hibernated(rt: Any, eid: str) -> bool:
    """Wait until ``eid`` has no actor (a suspended execution hibernates), then True.

    Waits for the recovery at open first, so an execution that recovery woke by mistake
    is seen. Waits on the actor's own stop event: the log writer is a thread, so
    ``wait_all_tasks_blocked`` cannot tell when the actor is done.
    """
    with anyio.fail_after(10):
        await rt.wait_recovered()
        while (actor := rt._live.get(eid)) is not None:
            await actor.stopped.wait()
    return eid not in rt._live


def stepping_agent(name: str, steps: int, budget: Budget) -> Agent:
    """An agent whose model calls ``step`` ``steps`` times (one call per turn), then answers."""

    @tool
    def step(n: int) -> int:
        return n

    def script(request: LLMRequest) -> Any:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        return Scripted.call("step", n=turn) if turn < steps else "done"

    return Agent(name, tools=[step], llm=Scripted(script), budget=budget)


def actor_starts(rt: Any) -> list[str]:
    """Execution ids whose actor starts from now on (call it first thing after opening:
    recovery runs in the background once the caller has the runtime)."""
    started: list[str] = []

    def seen(event: Any) -> None:
        if event.kind in ("started", "restarted"):
            started.append(unquote(event.child))

    rt._executions.observe(seen)
    return started


async def types_of(rt: Any, eid: str) -> list[str]:
    return [rec.type async for rec in rt.log.read(execution_stream(eid))]


async def test_approval_suspends_before_the_tool_and_runs_it_once_approved(
    open_runtime: Any,
) -> None:
    ran: list[tuple[str, float]] = []
    agent = transfer_agent(ran)
    async with open_runtime() as rt:
        r = await rt.run(agent, "Move $5000 to savings", execution_id="t-1")
        assert r.is_suspended and r.suspend_reason is not None
        reason = r.suspend_reason
        assert reason.kind == "approval" and reason.tool == "transfer_funds"
        assert reason.arguments == {"dst": "savings", "amount": 5000.0}
        assert ran == []  # suspended BEFORE the tool ran
        assert await hibernated(rt, "t-1")  # hibernated: no actor, no task
        with pytest.raises(InvalidSignalError, match="no pending confirmation"):
            await rt.approve("t-1", "c-wrong")
        await rt.approve("t-1", reason.confirmation_id, note="fine", by="alice")
        r = await rt.wait("t-1")
        assert r.status == "completed" and r.output == "moved"
        assert ran == [("savings", 5000.0)]
        with pytest.raises(InvalidSignalError, match="completed"):
            await rt.approve("t-1", reason.confirmation_id)
        state = await load_state(rt.log, "t-1")
    assert ran == [("savings", 5000.0)]
    granted = [e for e in state.messages if e.role == "tool"]
    assert len(granted) == 1 and not granted[0].is_error


async def test_approve_after_a_restart(open_runtime: Any) -> None:
    ran: list[tuple[str, float]] = []
    async with open_runtime() as rt:
        r = await rt.run(transfer_agent(ran), "Move it", execution_id="t-2")
        cid = r.suspend_reason.confirmation_id  # type: ignore[union-attr]
    async with open_runtime(agents=[transfer_agent(ran)]) as rt:
        starts = actor_starts(rt)
        assert await hibernated(rt, "t-2")  # stays hibernated across the restart
        assert starts == []  # recovery did not even wake it to look
        await rt.approve("t-2", cid)
        r = await rt.wait("t-2")
    assert r.status == "completed" and ran == [("savings", 5000.0)]


async def test_rejection_reaches_the_model_which_carries_on(open_runtime: Any) -> None:
    ran: list[tuple[str, float]] = []
    seen: list[str] = []

    def script(request: LLMRequest) -> Any:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn == 0:
            return Scripted.call("transfer_funds", dst="savings", amount=5000.0)
        seen.append(request.messages[-1].content)
        return "Understood, I did not move the money."

    agent = transfer_agent(ran)
    agent.llm = Scripted(script)
    async with open_runtime() as rt:
        r = await rt.run(agent, "Move it", execution_id="t-3")
        await rt.reject("t-3", r.suspend_reason.confirmation_id, "too much", by="bob")  # type: ignore[union-attr]
        r = await rt.wait("t-3")
    assert r.status == "completed" and ran == []
    assert seen == ["REJECTED by bob: too much"]
    tool_msg = next(m for m in r.transcript if m.role == "tool")
    assert tool_msg.is_error


async def test_contract_blocks_and_an_override_is_recorded_with_who_and_why(
    open_runtime: Any,
) -> None:
    charged: list[float] = []

    @tool
    def charge(amount: float) -> str:
        charged.append(amount)
        return "charged"

    llm = Scripted([Scripted.call("charge", amount=900.0), "done"])
    agent = Agent("shop", tools=[charge], llm=llm)

    @agent.contract("max-charge")
    def max_charge(tool_name: str, args: dict[str, Any]) -> None:
        if tool_name == "charge" and args["amount"] > 500:
            raise ContractViolation(f"charge of {args['amount']} exceeds 500")

    async with open_runtime() as rt:
        r = await rt.run(agent, "charge", execution_id="k-1")
        reason = r.suspend_reason
        assert r.is_suspended and reason is not None and reason.kind == "contract"
        assert reason.contract == "max-charge" and "exceeds 500" in reason.message
        assert charged == []
        await rt.approve("k-1", reason.confirmation_id, note="VIP customer", by="carol")
        r = await rt.wait("k-1")
        assert r.status == "completed" and charged == [900.0]
        events = [decode(rec) async for rec in rt.log.read(execution_stream("k-1"))]
    grant = next(e for e in events if e.type == "approval.granted")
    assert grant.override is True and grant.by == "carol" and grant.note == "VIP customer"


async def test_contract_rejection_goes_back_to_the_model(open_runtime: Any) -> None:
    @tool
    def charge(amount: float) -> str:
        raise AssertionError("must not run")

    agent = Agent(
        "shop2", tools=[charge], llm=Scripted([Scripted.call("charge", amount=1e6), "ok"])
    )
    agent.contract("never")(lambda name, args: False)
    async with open_runtime() as rt:
        r = await rt.run(agent, "charge")
        await rt.reject(r.execution_id, r.suspend_reason.confirmation_id, "no")  # type: ignore[union-attr]
        r = await rt.wait(r.execution_id)
    assert r.status == "completed"
    assert [m.content for m in r.transcript if m.role == "tool"] == ["REJECTED by api: no"]


async def test_budget_exhaustion_survives_a_restart_and_a_raise_resumes(
    open_runtime: Any,
) -> None:
    def make() -> Agent:
        return stepping_agent("budgeted", steps=4, budget=Budget(max_llm_calls=2))

    async with open_runtime() as rt:
        r = await rt.run(make(), "go", execution_id="b-1")
        assert r.is_suspended and r.suspend_reason.kind == "budget"  # type: ignore[union-attr]
        assert r.suspend_reason.limit == "max_llm_calls" and r.suspend_reason.used == 2  # type: ignore[union-attr]
        assert r.usage.llm_calls == 2
        # A budget given to spawn replaces the agent's: 15 tokens a call (Scripted's
        # usage), so the third call reaches 40 tokens, past the agent's 2 calls.
        r = await rt.run(make(), "go", execution_id="b-2", budget=Budget(max_tokens=40))
        assert r.suspend_reason is not None and r.suspend_reason.limit == "max_tokens"
        assert r.suspend_reason.limit_value == 40 and r.suspend_reason.used == 45
        assert r.usage.llm_calls == 3
    async with open_runtime(agents=[make()]) as rt:
        r = await rt.result("b-1")
        assert r.usage.llm_calls == 2  # usage survives the restart (it is the log)
        assert (await rt.result("b-2")).usage.total_tokens == 45
        # A "raise" that leaves the limit at what is already used raises nothing: refused
        # up front, naming the limit and the usage, and nothing is sent.
        with pytest.raises(InvalidSignalError, match="max_llm_calls") as refused:
            await rt.resume("b-1", budget=Budget(max_llm_calls=2))
        assert "2" in str(refused.value) and "b-1" in str(refused.value)
        assert (await rt.result("b-1")).is_suspended
        r = await rt.resume("b-1", budget=Budget(max_llm_calls=10))
        r2 = await rt.resume("b-2", budget=Budget(max_tokens=1000))
    assert r is not None and r.status == "completed" and r.usage.llm_calls == 5
    assert r2 is not None and r2.status == "completed" and r2.usage.total_tokens == 75


async def test_dollar_budget_uses_reported_tokens_and_the_pricing_table(open_runtime: Any) -> None:
    pricing = Pricing({"pricey": Price(1_000_000.0, 0.0)})  # $1 per input token
    llm = Scripted(
        [Scripted.call("t"), Scripted.call("t"), "done"], model="pricey", usage=Usage(3, 1)
    )

    @tool
    def t() -> str:
        return "ok"

    agent = Agent("dollars", tools=[t], llm=llm, budget=Budget(max_dollars=5.0))
    async with open_runtime(pricing=pricing) as rt:
        r = await rt.run(agent, "go")
    assert r.is_suspended and r.suspend_reason.limit == "max_dollars"  # type: ignore[union-attr]
    assert r.usage.dollars == pytest.approx(6.0)
    assert r.usage.by_model == {"scripted/pricey": {"calls": 2, "tokens": 8, "dollars": 6.0}}


async def test_a_tool_waits_for_a_named_signal_and_auto_resumes(open_runtime: Any) -> None:
    invocations: list[Any] = []

    @tool
    def await_payment(order: str) -> str:
        payment = wait_for_signal(f"paid:{order}")
        invocations.append(payment)
        return f"payment {payment['ref']} received"

    llm = Scripted([Scripted.call("await_payment", order="o-9"), "all set"])
    agent = Agent("waiter", tools=[await_payment], llm=llm)
    async with open_runtime() as rt:
        r = await rt.run(agent, "wait for payment", execution_id="s-1")
        assert r.is_suspended and r.suspend_reason.kind == "signal"  # type: ignore[union-attr]
        assert r.suspend_reason.name == "paid:o-9"  # type: ignore[union-attr]
        await rt.signal("s-1", "unrelated", {"x": 1})
        assert (await rt.result("s-1")).is_suspended
        await rt.signal("s-1", "paid:o-9", {"ref": "tx-7"})
        r = await rt.wait("s-1")
    assert r.status == "completed" and invocations == [{"ref": "tx-7"}]


async def test_callbacks_fire_and_a_raising_callback_harms_nothing(
    open_runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[tuple[str, Any]] = []
    ran: list[tuple[str, float]] = []
    caplog.set_level(logging.ERROR, logger="perdure.runtime")
    async with open_runtime() as rt:

        @rt.on_suspend
        def suspended(result: Result, reason: Any) -> None:
            events.append(("suspend", reason.kind))
            raise RuntimeError("callback bug")

        completed_seen = anyio.Event()

        @rt.on_complete
        async def completed(result: Result) -> None:
            events.append(("complete", result.output))
            completed_seen.set()

        @rt.on_step
        def stepped(execution_id: str, step: dict[str, Any]) -> None:
            events.append(("step", step["kind"]))
            raise ValueError("another callback bug")

        @rt.on_fail
        def failed(result: Result, error: Any) -> None:
            events.append(("fail", error["type"]))

        r = await rt.run(transfer_agent(ran), "go", execution_id="cb-1")
        await rt.approve("cb-1", r.suspend_reason.confirmation_id)  # type: ignore[union-attr]
        r = await rt.wait("cb-1")
        with anyio.fail_after(10):
            await completed_seen.wait()  # async callbacks run in their own task
        await rt.run(Agent("failing", llm=Scripted([RuntimeError("provider down")])), "x")
    assert r.status == "completed"
    assert events == [
        ("step", "llm"),
        ("suspend", "approval"),
        ("step", "tool"),
        ("step", "llm"),
        ("complete", "moved"),
        ("fail", "RuntimeError"),
    ]
    logged = " ".join(rec.getMessage() for rec in caplog.records)
    assert "cb-1" in logged and "on_suspend" in logged and "on_step" in logged


async def test_cancel_stops_a_running_execution_and_it_never_resumes(open_runtime: Any) -> None:
    started = anyio.Event()
    cancelled = anyio.Event()

    @tool
    async def long_job() -> str:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        return "unreachable"

    def make() -> Agent:
        return Agent("longrunner", tools=[long_job], llm=Scripted([Scripted.call("long_job"), "x"]))

    async with open_runtime() as rt:
        await rt.spawn(make(), "go", execution_id="c-1")
        await started.wait()
        await rt.cancel("c-1", "changed my mind", by="dave")
        assert cancelled.is_set()  # the running tool was cancelled
        r = await rt.wait("c-1")
        assert r.status == "cancelled"
        with pytest.raises(InvalidSignalError, match="cancelled"):
            await rt.signal("c-1", "anything")
    async with open_runtime(agents=[make()]) as rt:
        starts = actor_starts(rt)
        assert await hibernated(rt, "c-1")
        assert starts == []  # a cancelled execution is never resumed
        assert (await rt.result("c-1")).status == "cancelled"
        assert (await types_of(rt, "c-1"))[-1] == "execution.cancelled"


async def test_cancel_a_suspended_execution(open_runtime: Any) -> None:
    ran: list[tuple[str, float]] = []
    async with open_runtime() as rt:
        r = await rt.run(transfer_agent(ran), "go")
        await rt.cancel(r.execution_id)
        assert (await rt.wait(r.execution_id)).status == "cancelled" and ran == []


async def test_delegation_parent_hibernates_and_resumes_with_the_childs_answer(
    open_runtime: Any,
) -> None:
    ran: list[tuple[str, float]] = []

    def make() -> Agent:
        researcher = Agent(
            "researcher",
            tools=[],
            llm=Scripted(["Paris has 2.1 million people."]),
            description="Finds facts.",
        )
        banker = transfer_agent(ran, final="child done")
        manager_llm = Scripted(
            [
                [
                    Scripted.call("delegate_to_researcher", task="population of Paris?"),
                    Scripted.call("delegate_to_banker", task="move the money"),
                ],
                "Summary: found it and moved it.",
            ]
        )
        return Agent("manager", llm=manager_llm, agents=[researcher, banker])

    async with open_runtime() as rt:
        r = await rt.run(make(), "research and pay", execution_id="p-1")
        assert r.is_suspended and r.suspend_reason.kind == "child"  # type: ignore[union-attr]
        # the banker child waits for an approval, visible from the parent's side
        children = {e.execution_id: e for e in await rt.executions()}
        assert children["p-1/2"].status == "completed"
        assert children["p-1/3"].status == "suspended" and children["p-1/3"].reason == "approval"
        assert children["p-1/3"].parent == "p-1"
        assert await hibernated(rt, "p-1")
        child = await rt.result("p-1/3")
        await rt.approve("p-1/3", child.suspend_reason.confirmation_id)  # type: ignore[union-attr]
        r = await rt.wait("p-1/3")
        assert r.status == "completed"
        with anyio.fail_after(10):
            r = await rt.wait("p-1", until="finished")
    assert r.output == "Summary: found it and moved it."
    tool_results = [m.content for m in r.transcript if m.role == "tool"]
    assert tool_results == ["Paris has 2.1 million people.", "child done"]
    assert ran == [("savings", 5000.0)]


async def test_fleet_listing_and_max_concurrency(open_runtime: Any) -> None:
    running = 0
    peak = 0
    gate = anyio.Event()
    three_running = anyio.Event()

    @tool
    async def work(n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 3:
            three_running.set()
        await gate.wait()
        running -= 1
        return n

    def script(request: LLMRequest) -> Any:
        if any(m.role == "tool" for m in request.messages):
            return "done"
        return Scripted.call("work", n=int(request.messages[-1].content))

    agent = Agent("worker", tools=[work], llm=Scripted(script, record=False))
    other = Agent("other", llm=Scripted(["hi"]))
    async with open_runtime(max_concurrency=3) as rt:
        for n in range(20):
            await rt.spawn(agent, str(n), execution_id=f"f-{n:02d}")
        await rt.spawn(other, "x", execution_id="o-1")
        with anyio.fail_after(10):
            await three_running.wait()
        assert peak == 3
        queued = await rt.executions(status="queued")
        assert len(queued) == 18  # 17 workers and "other" wait, durably, for a slot
        assert [e.execution_id for e in await rt.executions(agent="other")] == ["o-1"]
        gate.set()
        assert (await rt.wait("o-1")).status == "completed"
        for n in range(20):
            assert (await rt.wait(f"f-{n:02d}")).status == "completed"
        done = await rt.executions(status="completed", agent="worker")
    assert len(done) == 20 and peak == 3


async def test_suspended_executions_leave_nothing_behind_on_the_heap(open_runtime: Any) -> None:
    """Suspension costs nothing (invariant 6): once an execution hibernates, neither the
    runtime nor the log's writer keeps anything of it in memory. The writer's cache of
    index entries used to keep every suspended execution's entry (~1.2 KB each)."""

    @tool(requires_confirmation=True)
    def approve_me(n: int) -> str:
        return f"approved {n}"

    agent = Agent(
        "fleet",
        tools=[approve_me],
        llm=Scripted([Scripted.call("approve_me", n=1), "done"], record=False),
    )
    count = 300
    async with open_runtime(agents=[agent]) as rt:
        warm = await rt.run(agent, "go", execution_id="warm")  # code paths, caches
        assert warm.suspend_reason is not None
        await rt.approve("warm", warm.suspend_reason.confirmation_id)
        assert (await rt.wait("warm")).status == "completed"
        del warm
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n in range(count):
                assert (await rt.run(agent, "go", execution_id=f"s-{n:04d}")).is_suspended
            assert await hibernated(rt, f"s-{count - 1:04d}")
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(await rt.executions(status="suspended")) == count
    # What is left is the last few executions' cache entries (the writer keeps the
    # streams of its last commits) and the backends' lazily pruned tables.
    assert grown / count < 300, grown / count


async def test_queued_executions_start_in_the_order_they_were_spawned(
    open_runtime: Any,
) -> None:
    order: list[int] = []

    @tool
    def work(n: int) -> int:
        order.append(n)
        return n

    def script(request: LLMRequest) -> Any:
        if any(m.role == "tool" for m in request.messages):
            return "done"
        return Scripted.call("work", n=int(request.messages[-1].content))

    agent = Agent("serial", tools=[work], llm=Scripted(script, record=False))
    async with open_runtime(max_concurrency=1) as rt:
        for n in range(15):
            await rt.spawn(agent, str(n), execution_id=f"q-{n:02d}")
        for n in range(15):
            await rt.wait(f"q-{n:02d}")
    assert order == list(range(15))


async def test_in_doubt_non_idempotent_tool_suspends_and_an_operator_resolves(
    open_runtime: Any,
) -> None:
    attempts: list[str] = []
    started = anyio.Event()

    def make(block: bool) -> Agent:
        @tool(idempotent=False)
        async def wire_money(amount: float) -> str:
            attempts.append(current_idempotency_key())
            if block:
                started.set()
                await anyio.sleep_forever()
            return "wired"

        llm = Scripted([Scripted.call("wire_money", amount=10.0), "finished"])
        return Agent("wirer", tools=[wire_money], llm=llm)

    for action in ("retry", "complete", "fail"):
        eid = f"w-{action}"
        async with open_runtime(shutdown_timeout=0.05) as rt:
            await rt.spawn(make(True), "wire", execution_id=eid)
            await started.wait()
        started = anyio.Event()
        async with open_runtime(agents=[make(False)]) as rt:
            r = await rt.wait(eid)
            assert r.is_suspended and r.suspend_reason.kind == "unknown_outcome"  # type: ignore[union-attr]
            assert r.suspend_reason.tool == "wire_money" and r.suspend_reason.step == 2  # type: ignore[union-attr]
            if action == "retry":
                await rt.resolve(eid, retry=True, by="ops")
            elif action == "complete":
                await rt.resolve(eid, complete={"wired": "by hand"})
            else:
                await rt.resolve(eid, fail="bank says no")
            r = await rt.wait(eid)
            assert r.status == "completed"
            tool_msg = next(m for m in r.transcript if m.role == "tool")
        if action == "retry":
            assert tool_msg.content == "wired" and attempts[-1] == attempts[-2]  # same key
        elif action == "complete":
            assert tool_msg.content == '{"wired": "by hand"}'
        else:
            assert tool_msg.is_error and "bank says no" in tool_msg.content


async def test_cancelling_a_queued_execution_fires_its_callback_once_and_never_starts_it(
    open_runtime: Any,
) -> None:
    gate = anyio.Event()
    ran: list[str] = []

    @tool
    async def work(name: str) -> str:
        ran.append(name)
        await gate.wait()
        return name

    agent = calling_once("slow", work)
    cancelled: list[str] = []
    async with open_runtime(max_concurrency=1) as rt:
        rt.on_cancel(lambda result: cancelled.append(result.execution_id))
        with anyio.fail_after(20):
            await rt.spawn(agent, "a", execution_id="qc-a")
            await rt.spawn(agent, "b", execution_id="qc-b")  # waits for the slot
            assert (await rt.result("qc-b")).status == "queued"
            await rt.cancel("qc-b", "not needed")
            assert cancelled == ["qc-b"]
            gate.set()
            assert (await rt.wait("qc-a")).status == "completed"
            # the slot qc-a frees goes past qc-b's old queue entry to the next one
            await rt.spawn(agent, "c", execution_id="qc-c")
            assert (await rt.wait("qc-c")).status == "completed"
            assert (await rt.result("qc-b")).status == "cancelled"
    assert cancelled == ["qc-b"]
    assert ran == ["a", "c"]


async def test_concurrent_spawns_of_one_id_keep_max_concurrency(open_runtime: Any) -> None:
    gate = anyio.Event()
    running: set[str] = set()
    peak = 0

    @tool
    async def work(name: str) -> str:
        nonlocal peak
        running.add(name)
        peak = max(peak, len(running))
        await gate.wait()
        running.discard(name)
        return name

    agent = calling_once("dup", work)
    async with open_runtime(max_concurrency=1) as rt:
        async with anyio.create_task_group() as tg:
            for _ in range(3):  # the same new execution, spawned three times at once
                tg.start_soon(lambda: rt.spawn(agent, "one", execution_id="d-1"))
        await rt.spawn(agent, "two", execution_id="d-2")
        # d-1 holds the only slot: the losing spawns gave back nothing of it
        assert rt._slots == {"d-1"}
        assert (await rt.result("d-2")).status == "queued"
        gate.set()
        assert (await rt.wait("d-1")).status == "completed"
        assert (await rt.wait("d-2")).status == "completed"
    assert peak == 1


class FlakyLog:
    """A real log whose reads of one stream fail while ``failures`` lasts (an injected
    fault, the way a disk or a network store fails; everything else is the real log)."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self.stream: str | None = None
        self.failures = 0.0
        self.failed = 0
        self.failed_twice = anyio.Event()
        # Set: a failing read first waits for it (a store that takes its time to fail).
        self.stall: anyio.Event | None = None
        self.stalled = anyio.Event()  # set once a read waits on ``stall``

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)

    def read_chunks(self, stream: str, *args: Any, **kwargs: Any) -> Any:
        if stream == self.stream and self.failures > 0:
            self.failures -= 1
            self.failed += 1
            if self.failed >= 2:
                self.failed_twice.set()
            if self.stall is not None:
                return self._fail_slowly(stream, self.stall)
            from perdure.log import LogError

            raise LogError(f"injected read failure of {stream!r}")
        return self._log.read_chunks(stream, *args, **kwargs)

    async def _fail_slowly(self, stream: str, stall: anyio.Event) -> Any:
        from perdure.log import LogError

        self.stalled.set()
        await stall.wait()
        raise LogError(f"injected read failure of {stream!r}")
        yield  # an async generator, as read_chunks is


async def test_a_failed_delivery_is_retried_with_backoff_not_dropped(
    data_dir: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from perdure import Runtime
    from perdure.events import record_types
    from perdure.log import LmdbLog

    ran: list[tuple[str, float]] = []
    caplog.set_level(logging.WARNING, logger="perdure.runtime")
    flaky = FlakyLog(await LmdbLog.open(data_dir, types=record_types(), durability="process"))
    try:
        async with Runtime(log=flaky, shutdown_timeout=2.0) as rt:  # type: ignore[arg-type]
            r = await rt.run(transfer_agent(ran), "go", execution_id="fl-1")
            assert await hibernated(rt, "fl-1")
            flaky.stream, flaky.failures = execution_stream("fl-1"), 3
            completed = anyio.Event()
            rt.on_complete(lambda execution: completed.set())
            with anyio.fail_after(10):
                cid = r.suspend_reason.confirmation_id  # type: ignore[union-attr]
                assert await rt.approve("fl-1", cid) == "held"  # durable: no waiting
                await completed.wait()
            assert flaky.failed == 3  # three failed tries, then delivered
            assert (await rt.wait("fl-1")).status == "completed"
    finally:
        await flaky.aclose()
    assert ran == [("savings", 5000.0)]
    tries = [rec.getMessage() for rec in caplog.records if "stays in the inbox" in rec.getMessage()]
    assert len(tries) == 3 and all("execution fl-1" in m for m in tries)
    assert "attempt 3" in tries[-1] and "tried again in 0.20s" in tries[-1]  # backing off


async def test_a_failing_delivery_holds_the_cursor_across_a_restart(open_runtime: Any) -> None:
    from perdure import Runtime
    from perdure.events import INBOX_STREAM, SignalSent, encode, record_types
    from perdure.log import ANY, LmdbLog

    ran: list[tuple[str, float]] = []

    @tool
    def await_go() -> Any:
        return wait_for_signal("go")

    waiter = Agent("goer", tools=[await_go], llm=Scripted([Scripted.call("await_go"), "went"]))
    path = None
    async with open_runtime() as rt:
        path = rt.path
        r = await rt.run(transfer_agent(ran), "go", execution_id="h-1")
        cid = r.suspend_reason.confirmation_id  # type: ignore[union-attr]
        assert (await rt.run(waiter, "wait", execution_id="h-2")).is_suspended
    flaky = FlakyLog(await LmdbLog.open(path, types=record_types(), durability="process"))
    flaky.stream, flaky.failures = execution_stream("h-1"), float("inf")
    try:
        async with Runtime(log=flaky, agents=[waiter], shutdown_timeout=2.0) as rt:  # type: ignore[arg-type]
            approve = encode(SignalSent("h-1", "approve", {"confirmation_id": cid}, "ops"))
            seq = await rt.log.append(INBOX_STREAM, [approve], expect=ANY)
            await rt.signal("h-2", "go", {"ok": 1})  # delivered past the one that fails
            assert (await rt.wait("h-2")).status == "completed"
            with anyio.fail_after(10):
                await flaky.failed_twice.wait()
            info = await rt.log.stream_info(INBOX_STREAM)
            assert info is not None and info.meta.get("cursor", 0) == seq - 1
            [held] = await rt.executions(agent="banker")  # the index (its records fail)
            assert held.status == "suspended"
    finally:
        await flaky.aclose()
    async with open_runtime(agents=[transfer_agent(ran)]) as rt:
        with anyio.fail_after(10):
            await rt.wait_recovered()  # the inbox backlog is delivered first
            r = await rt.wait("h-1")  # taken from the inbox at the next start
        assert r.status == "completed" and ran == [("savings", 5000.0)]
        received = [t for t in await types_of(rt, "h-2") if t == "signal.received"]
    assert received == ["signal.received"]  # the one after it was not delivered twice


def two_waits_agent() -> Agent:
    """Waits for signal "first", then for signal "second", then finishes."""

    @tool
    def await_first() -> Any:
        return wait_for_signal("first")

    @tool
    def await_second() -> Any:
        return wait_for_signal("second")

    llm = Scripted([Scripted.call("await_first"), Scripted.call("await_second"), "both"])
    return Agent("twowaits", tools=[await_first, await_second], llm=llm)


async def inbox_shows(rt: Any, want: dict[str, list[str]]) -> dict[str, list[str]]:
    """Wait until ``perdure inspect`` (reading only the store) shows ``want``: for each
    execution, the state of each of its pending signals, oldest first."""
    from perdure.status import pending_signals

    with anyio.fail_after(10):
        while True:
            written = rt._inbox_booked  # the pump's next write of its progress sets it
            shown = {
                eid: [p.state for p in signals]
                for eid, signals in (await pending_signals(rt.log)).items()
            }
            if shown == want:
                return shown
            await written.wait()


async def test_a_held_signal_blocks_no_caller_and_no_other_execution(data_dir: Any) -> None:
    from perdure import Runtime
    from perdure.events import INBOX_STREAM, SignalSent, encode, record_types
    from perdure.log import ANY, LmdbLog

    @tool
    def await_go() -> Any:
        return wait_for_signal("go")

    goer = Agent("goer2", tools=[await_go], llm=Scripted([Scripted.call("await_go"), "went"]))
    pair = two_waits_agent()
    flaky = FlakyLog(await LmdbLog.open(data_dir, types=record_types(), durability="process"))
    try:
        async with Runtime(log=flaky, agents=[goer, pair], shutdown_timeout=2.0) as rt:  # type: ignore[arg-type]
            assert (await rt.run(pair, "go", execution_id="p-1")).is_suspended
            for eid in ("g-1", "g-2", "g-3"):
                assert (await rt.run(goer, "wait", execution_id=eid)).is_suspended
            assert await hibernated(rt, "p-1")
            flaky.stream, flaky.failures = execution_stream("p-1"), float("inf")
            with anyio.fail_after(10):
                # Durable in the inbox: each call returns, saying the signal is held,
                # instead of waiting for retries that may never succeed.
                assert await rt.signal("p-1", "first", {"n": 1}) == "held"
                assert await rt.signal("p-1", "second", {"n": 2}) == "held"
                # Another execution's signal is delivered as usual.
                assert await rt.signal("g-1", "go", {}) == "delivered"
            assert (await rt.wait("g-1")).status == "completed"
            # Signals no execution takes (its own is finished; there is none) are not
            # shown as pending: only p-1's are, the oldest held, the other behind it.
            stray = [SignalSent("g-1", "go", {}, "client"), SignalSent("nobody", "go", {}, "c")]
            await rt.log.append(INBOX_STREAM, [encode(s) for s in stray], expect=ANY)
            await inbox_shows(rt, {"p-1": ["held", "waiting"]})
            from perdure.status import pending_signals

            held, behind = (await pending_signals(rt.log))["p-1"]
            assert (held.name, behind.name) == ("first", "second")
            assert held.attempts >= 1 and "injected read failure" in str(held.error)
            # ... and so does 'perdure inspect', read by an operator from another process
            from tests.cli.conftest import perdure

            shown = await anyio.to_thread.run_sync(perdure, data_dir, "inspect", "p-1")
            lines = [ln for ln in shown.out.splitlines() if ln.startswith("  inbox seq")]
            assert len(lines) == 2, shown.out
            assert lines[0].startswith(f"  inbox seq {held.seq}: first ")
            assert "; held: delivery failed " in lines[0] and "being retried" in lines[0]
            assert "injected read failure" in lines[0]
            assert lines[1].startswith(f"  inbox seq {behind.seq}: second ")
            assert lines[1].endswith("; waiting behind a held signal for this execution")
            assert "send it:" not in shown.out  # both wait in the inbox already
            # A retry that hangs holds up nobody else.
            flaky.stall = anyio.Event()
            with anyio.fail_after(10):
                await flaky.stalled.wait()
                assert await rt.signal("g-2", "go", {}) == "delivered"
            assert (await rt.wait("g-2")).status == "completed"
            # The store recovers: p-1 takes both, in the order they were sent.
            flaky.failures = 0
            flaky.stall.set()
            with anyio.fail_after(10):
                r = await rt.wait("p-1", until="finished")
            assert r.status == "completed"
            await inbox_shows(rt, {})
            assert await rt.signal("g-3", "go", {}) == "delivered"
            events = [decode(rec) async for rec in rt.log.read(execution_stream("p-1"))]
    finally:
        await flaky.aclose()
    received = [e.name for e in events if e.type == "signal.received"]
    assert received == ["first", "second"]


async def test_a_signal_that_cannot_apply_is_recorded_as_ignored_and_the_next_one_delivered(
    open_runtime: Any,
) -> None:
    from perdure.events import INBOX_STREAM, SignalSent, encode
    from perdure.log import ANY

    agent = stepping_agent("poisoned", steps=2, budget=Budget(max_llm_calls=1))
    async with open_runtime() as rt:
        r = await rt.run(agent, "go", execution_id="z-1")
        assert r.suspend_reason is not None and r.suspend_reason.kind == "budget"
        # checked up front...
        with pytest.raises(InvalidSignalError, match="a raised limit must be a positive"):
            await rt.signal("z-1", "budget", {"budget": {"max_llm_calls": -1}})
        # ...but a client may write anything to the inbox
        bad = encode(SignalSent("z-1", "budget", {"budget": {"max_llm_calls": -1}}, "client"))
        await rt.log.append(INBOX_STREAM, [bad], expect=ANY)
        r = await rt.resume("z-1", budget=Budget(max_llm_calls=5))
        assert r is not None and r.status == "completed"
        events = [decode(rec) async for rec in rt.log.read(execution_stream("z-1"))]
    [ignored] = [e for e in events if e.type == "signal.ignored"]
    assert ignored.name == "budget" and "cannot apply it: ValueError" in ignored.reason
    assert [e.budget for e in events if e.type == "budget.raised"] == [{"max_llm_calls": 5}]


async def test_a_contract_override_without_a_note_says_so(open_runtime: Any) -> None:
    @tool
    def charge(amount: float) -> str:
        return "charged"

    agent = Agent(
        "shop3", tools=[charge], llm=Scripted([Scripted.call("charge", amount=9e9), "ok"])
    )
    agent.contract("never")(lambda name, args: False)
    async with open_runtime() as rt:
        r = await rt.run(agent, "charge", execution_id="k-2")
        await rt.approve("k-2", r.suspend_reason.confirmation_id, by="erin")  # type: ignore[union-attr]
        assert (await rt.wait("k-2")).status == "completed"
        events = [decode(rec) async for rec in rt.log.read(execution_stream("k-2"))]
    [grant] = [e for e in events if e.type == "approval.granted"]
    assert (grant.override, grant.by, grant.note) == (True, "erin", "no note given")


async def test_a_childs_approval_shows_in_the_parents_result_and_listing(
    open_runtime: Any,
) -> None:
    ran: list[tuple[str, float]] = []
    banker = transfer_agent(ran, final="child done")
    boss = Agent(
        "boss",
        llm=Scripted([Scripted.call("delegate_to_banker", task="move it"), "all done"]),
        agents=[banker],
    )
    async with open_runtime() as rt:
        r = await rt.run(boss, "go", execution_id="bp-1")
        child = await rt.wait("bp-1/2")
        cid = child.suspend_reason.confirmation_id  # type: ignore[union-attr]
        r = await rt.result("bp-1")
        assert r.suspend_reason is not None and r.suspend_reason.kind == "child"
        seen = r.suspend_reason.child
        assert seen["execution_id"] == "bp-1/2" and seen["status"] == "suspended"
        assert seen["status_text"] == f"suspended (approval {cid})"
        assert seen["confirmations"] == [cid]
        [listed] = await rt.executions(agent="boss")
        assert listed.waiting_on == ("bp-1/2",)
        await rt.approve("bp-1/2", cid)
        with anyio.fail_after(10):
            r = await rt.wait("bp-1", until="finished")
        [listed] = await rt.executions(agent="boss")
    assert r.output == "all done" and listed.waiting_on == ()


def _boss_and_banker(ran: list[tuple[str, float]]) -> Agent:
    banker = transfer_agent(ran, final="child done")
    return Agent(
        "boss",
        llm=Scripted([Scripted.call("delegate_to_banker", task="move it"), "all done"]),
        agents=[banker],
    )


async def test_cancelling_a_parent_cancels_its_unfinished_child(open_runtime: Any) -> None:
    """Nobody is left to take the child's result: an approval sent later runs nothing."""
    ran: list[tuple[str, float]] = []
    async with open_runtime() as rt:
        await rt.run(_boss_and_banker(ran), "go", execution_id="cp-1")
        child = await rt.wait("cp-1/2")
        assert child.status == "suspended"
        cid = child.suspend_reason.confirmation_id  # type: ignore[union-attr]
        await rt.cancel("cp-1", "no longer needed")
        with anyio.fail_after(10):
            child = await rt.wait("cp-1/2", until="finished")
        state = await rt.state("cp-1/2")
        with pytest.raises(InvalidSignalError):
            await rt.approve("cp-1/2", cid)
        parent = await rt.result("cp-1")
    assert parent.status == "cancelled" and child.status == "cancelled"
    assert state.cancel_reason == "its parent 'cp-1' was cancelled: no longer needed"
    assert ran == []


async def test_a_child_left_unfinished_by_a_crash_after_its_parents_cancel_is_cancelled_at_open(
    open_runtime: Any,
) -> None:
    ran: list[tuple[str, float]] = []
    boss = _boss_and_banker(ran)
    async with open_runtime() as rt:
        await rt.run(boss, "go", execution_id="cp-2")
        assert (await rt.wait("cp-2/2")).status == "suspended"

        async def crashed_before_cascading(parent: str, reason: str) -> None:
            pass

        rt._cancel_children = crashed_before_cascading  # type: ignore[method-assign]
        await rt.cancel("cp-2", "stop")
        assert (await rt.result("cp-2")).status == "cancelled"
        assert (await rt.result("cp-2/2")).status == "suspended"  # the cascade was lost
    async with open_runtime(agents=[boss]) as rt:
        with anyio.fail_after(10):
            child = await rt.wait("cp-2/2", until="finished")
        state = await rt.state("cp-2/2")
    assert child.status == "cancelled" and ran == []
    assert state.cancel_reason == "its parent 'cp-2' was cancelled"


async def test_approving_a_decided_or_a_childs_confirmation_says_who_or_where(
    open_runtime: Any,
) -> None:
    ran: list[tuple[str, float]] = []

    @tool("transfer_funds", requires_confirmation=True)
    def transfer_funds(dst: str, amount: float) -> str:
        ran.append((dst, amount))
        return "ok"

    twice = Scripted(
        [
            Scripted.call("transfer_funds", dst="savings", amount=1.0),
            Scripted.call("transfer_funds", dst="savings", amount=2.0),
            "done",
        ]
    )
    agent = Agent("twice", tools=[transfer_funds], llm=twice)
    async with open_runtime() as rt:
        first = await rt.run(agent, "go", execution_id="tw-1")
        cid = first.suspend_reason.confirmation_id  # type: ignore[union-attr]
        await rt.approve("tw-1", cid, by="alice")
        second = await rt.wait("tw-1")
        assert second.is_suspended and second.suspend_reason.confirmation_id != cid  # type: ignore[union-attr]
        with pytest.raises(InvalidSignalError) as info:
            await rt.reject("tw-1", cid, "too late")
        assert str(info.value).startswith(
            f"confirmation {cid!r} of execution 'tw-1' was already approved by 'alice' (seq "
        )
        await rt.run(_boss_and_banker(ran), "go", execution_id="cp-3")
        child_cid = (await rt.wait("cp-3/2")).suspend_reason.confirmation_id  # type: ignore[union-attr]
        with pytest.raises(InvalidSignalError, match="belongs to child execution 'cp-3/2'"):
            await rt.approve("cp-3", child_cid)
    assert ran == [("savings", 1.0)]


async def test_a_childs_confirmation_is_found_under_a_parent_whose_id_is_too_long_to_extend(
    open_runtime: Any,
) -> None:
    """A child's id is shortened (with a digest) when "parent/step" would be too long:
    the parent's approve still names the child that holds the confirmation."""
    from perdure.runtime import _child_id

    ran: list[tuple[str, float]] = []
    parent = "P" * 254
    child = _child_id(parent, 2, 0)
    assert not child.startswith(parent)
    async with open_runtime() as rt:
        await rt.run(_boss_and_banker(ran), "go", execution_id=parent)
        child_cid = (await rt.wait(child)).suspend_reason.confirmation_id  # type: ignore[union-attr]
        with pytest.raises(InvalidSignalError, match=f"belongs to child execution '{child}'"):
            await rt.approve(parent, child_cid)
    assert ran == []


async def test_approving_a_grandchilds_confirmation_on_the_root_names_its_owner(
    open_runtime: Any,
) -> None:
    """Two delegations down, the error names the execution that holds the confirmation,
    the chain that leads to it, and the exact call to make; that call then works."""
    ran: list[tuple[str, float]] = []
    root = Agent(
        "ceo",
        llm=Scripted([Scripted.call("delegate_to_boss", task="have it moved"), "ceo done"]),
        agents=[_boss_and_banker(ran)],
    )
    async with open_runtime() as rt:
        await rt.run(root, "go", execution_id="gc-1")
        await rt.wait("gc-1/2")  # suspended once it has spawned its own child
        grandchild = await rt.wait("gc-1/2/2")
        cid = grandchild.suspend_reason.confirmation_id  # type: ignore[union-attr]
        with pytest.raises(InvalidSignalError) as approving:
            await rt.approve("gc-1", cid)
        with pytest.raises(InvalidSignalError) as rejecting:
            await rt.reject("gc-1", cid, "no")
        assert ran == []
        await rt.approve("gc-1/2/2", cid)
        with anyio.fail_after(10):
            done = await rt.wait("gc-1", until="finished")
    assert str(approving.value).startswith(
        f"confirmation {cid!r} belongs to execution 'gc-1/2/2', 2 delegations below 'gc-1' "
        f"('gc-1' waits for 'gc-1/2', which waits for 'gc-1/2/2'); decide it there: "
        f"rt.approve('gc-1/2/2', {cid!r}); nothing was sent"
    )
    assert f"rt.reject('gc-1/2/2', {cid!r}, reason)" in str(rejecting.value)
    assert done.status == "completed" and ran == [("savings", 5000.0)]


class FirstRunHeld:
    """A ``work(name)`` tool that records each call and, while :attr:`holding`, never
    returns (the runtime is closed under it)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.holding = True
        self._never = anyio.Event()

    def tool(self) -> Any:
        @tool
        async def work(name: str) -> str:
            self.started.append(name)
            if self.holding:
                await self._never.wait()
            return name

        return work


async def test_after_a_restart_interrupted_and_queued_executions_start_before_new_ones(
    open_runtime: Any,
) -> None:
    """First come, first served across a restart: a spawn made the moment the runtime
    opens again does not take the slot of an execution the crash interrupted."""
    first = FirstRunHeld()
    started, agent = first.started, calling_once("fifo", first.tool())
    async with open_runtime(max_concurrency=1, agents=[agent]) as rt:
        for name in ("a", "b"):
            await rt.spawn(agent, name, execution_id=name)
        with anyio.fail_after(10):
            while started != ["a"]:
                await anyio.wait_all_tasks_blocked()
        assert [e.execution_id for e in await rt.executions(status="queued")] == ["b"]
    first.holding = False
    started.clear()
    async with open_runtime(max_concurrency=1, agents=[agent]) as rt:
        await rt.spawn(agent, "c", execution_id="c")  # at once, before recovery is done
        with anyio.fail_after(10):
            for name in ("a", "b", "c"):
                assert (await rt.wait(name)).status == "completed"
    assert started == ["a", "b", "c"]


async def test_a_runtime_object_opened_again_keeps_first_come_first_served(
    data_dir: Path,
) -> None:
    """The same Runtime object, closed and opened again: the queue of the last open is
    read from the index again, not kept, so the execution that was running when it
    closed starts first, as after a restart (the kept queue let b and c go first)."""
    first = FirstRunHeld()
    started, agent = first.started, calling_once("fifo-again", first.tool())
    rt = Runtime(
        data_dir, durability="process", max_concurrency=1, shutdown_timeout=2.0, agents=[agent]
    )
    async with rt:
        for name in ("a", "b", "c"):
            await rt.spawn(agent, name, execution_id=name)
        with anyio.fail_after(10):
            while started != ["a"]:
                await anyio.wait_all_tasks_blocked()
    first.holding = False
    started.clear()
    async with rt:
        with anyio.fail_after(10):
            for name in ("a", "b", "c"):
                assert (await rt.wait(name)).status == "completed"
    assert started == ["a", "b", "c"]
