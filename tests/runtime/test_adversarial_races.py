"""Races inside one process: concurrent spawns of one id, cancels against approvals and
queue slots, and a store whose reads take their time (as a networked store's do).

Each test states the combination it adds to test_suspension.py / test_runtime_core.py.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from perdure import Agent, Budget, PromptMismatchError, Runtime, current_idempotency_key, tool
from perdure.events import execution_stream, record_types
from perdure.log import MemoryLog
from perdure.providers import LLMRequest, Scripted
from tests.runtime.conftest import calling_once
from tests.runtime.test_suspension import actor_starts, hibernated

pytestmark = pytest.mark.anyio


class YieldingLog:
    """A real log whose index reads yield to the event loop before answering, the way a
    store across a network does (the in-process stores answer without yielding)."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)

    async def stream_info(self, stream: str) -> Any:
        await anyio.lowlevel.checkpoint()
        return await self._log.stream_info(stream)


def worker(ran: list[str], gate: anyio.Event | None = None) -> Agent:
    """One tool call (waiting for ``gate`` if given), then an answer."""

    @tool
    async def work(name: str) -> str:
        ran.append(f"{name} {current_idempotency_key()}")
        if gate is not None:
            await gate.wait()
        return name

    return calling_once("worker", work)


async def test_concurrent_spawns_of_an_undriven_execution_on_a_yielding_store(
    anyio_backend: Any,
) -> None:
    """Two spawns (and recovery for the agent just registered) race to start the actor
    of an execution that was left running; each must return its handle, one actor must
    drive it, and the interrupted call re-runs once, under its key.

    Not covered before: concurrent starts of one execution's actor when the store's
    reads yield (every other test runs on stores that answer without yielding).
    """
    ran: list[str] = []
    started = anyio.Event()
    gate = anyio.Event()

    @tool
    async def work(name: str) -> str:
        ran.append(f"{name} {current_idempotency_key()}")
        started.set()
        await gate.wait()
        return name

    def make() -> Agent:
        return calling_once("worker", work)

    log = YieldingLog(MemoryLog(record_types()))
    async with Runtime(log=log, shutdown_timeout=0.05) as rt:  # type: ignore[arg-type]
        await rt.spawn(make(), "a", execution_id="u-1")
        await started.wait()  # closed with the call in flight: it stays "running"
    gate.set()
    async with Runtime(log=log, shutdown_timeout=2.0) as rt:  # type: ignore[arg-type]
        await rt.wait_recovered()  # the agent is not registered: left alone
        agent = make()
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(lambda: rt.spawn(agent, "a", execution_id="u-1"))
        with anyio.fail_after(10):
            r = await rt.wait("u-1")
    assert r.status == "completed" and r.output == "done"
    assert len(ran) == 2 and ran[0] == ran[1]  # the in-doubt call, re-run once, same key


async def spawn_as(rt: Runtime, agent: Agent, prompt: str, eid: str, out: dict[str, Any]) -> None:
    try:
        out[prompt] = (await rt.spawn(agent, prompt, execution_id=eid)).execution_id
    except PromptMismatchError as exc:
        out[prompt] = exc


async def test_one_id_spawned_at_once_with_two_prompts_under_a_full_queue(
    open_runtime: Any,
) -> None:
    """One new id spawned concurrently with two prompts, while the only slot is taken:
    exactly one prompt wins, the other is an error naming both, and no slot or queue
    entry leaks (the winner runs once a slot frees, and so does the next execution).

    Not covered before: concurrent spawns of one id with *different* prompts, queued.
    """
    ran: list[str] = []
    gate = anyio.Event()
    agent = worker(ran, gate)
    async with open_runtime(max_concurrency=1) as rt:
        await rt.spawn(agent, "first", execution_id="s-0")
        out: dict[str, Any] = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(spawn_as, rt, agent, "left", "s-1", out)
            tg.start_soon(spawn_as, rt, agent, "right", "s-1", out)
        [winner] = [p for p, v in out.items() if v == "s-1"]
        [loser] = [p for p, v in out.items() if p != winner]
        error = out[loser]
        assert isinstance(error, PromptMismatchError)
        assert repr(winner) in str(error) and repr(loser) in str(error)
        assert (await rt.result("s-1")).status == "queued"
        await rt.spawn(agent, "after", execution_id="s-2")
        gate.set()
        with anyio.fail_after(10):
            for eid in ("s-0", "s-1", "s-2"):
                assert (await rt.wait(eid)).status == "completed"
        assert rt._slots == set() and not rt._queue and not rt._queued
    assert [x.split()[0] for x in ran] == ["first", winner, "after"]


async def test_cancel_and_approve_sent_together_end_cancelled_and_stay_so(
    open_runtime: Any,
) -> None:
    """Approve and cancel sent at once to a suspended execution whose approved tool then
    blocks: whichever lands first, it ends cancelled, the tool ran at most once, and no
    restart ever resumes it.

    Not covered before: a cancel racing an approval of the same execution.
    """
    ran: list[str] = []
    blocking = anyio.Event()

    @tool(requires_confirmation=True)
    async def pay(amount: float) -> str:
        ran.append(current_idempotency_key())
        await blocking.wait()  # never set: only the cancel ends it
        return "paid"

    def make() -> Agent:
        return Agent("payer", tools=[pay], llm=Scripted([Scripted.call("pay", amount=1.0), "x"]))

    async with open_runtime() as rt:
        r = await rt.run(make(), "pay", execution_id="ca-1")
        cid = r.suspend_reason.confirmation_id  # type: ignore[union-attr]
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.approve, "ca-1", cid)
            tg.start_soon(rt.cancel, "ca-1", "stop")
        with anyio.fail_after(10):
            assert (await rt.wait("ca-1")).status == "cancelled"
        assert await hibernated(rt, "ca-1")
    assert len(ran) <= 1
    async with open_runtime(agents=[make()]) as rt:
        starts = actor_starts(rt)
        assert await hibernated(rt, "ca-1")
        assert starts == [] and (await rt.result("ca-1")).status == "cancelled"
        types = [rec.type async for rec in rt.log.read(execution_stream("ca-1"))]
    assert types[-1] == "execution.cancelled" and len(ran) <= 1


async def test_cancel_of_a_queued_execution_racing_its_slot_never_leaks_the_slot(
    open_runtime: Any,
) -> None:
    """The slot frees (the running execution finishes) while the queued one is being
    cancelled: it ends cancelled (never completed), its slot goes to the next one, and
    it never resumes after a restart.

    Not covered before: cancel and slot hand-over of the same queued execution at once.
    """
    ran: list[str] = []
    gate = anyio.Event()
    agent = worker(ran, gate)
    async with open_runtime(max_concurrency=1) as rt:
        await rt.spawn(agent, "a", execution_id="qr-a")
        await rt.spawn(agent, "b", execution_id="qr-b")
        await rt.spawn(agent, "c", execution_id="qr-c")
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.cancel, "qr-b", "not needed")
            gate.set()
        with anyio.fail_after(10):
            assert (await rt.wait("qr-a")).status == "completed"
            assert (await rt.wait("qr-b")).status == "cancelled"
            assert (await rt.wait("qr-c")).status == "completed"
        assert rt._slots == set() and not rt._queue
    assert [x.split()[0] for x in ran if not x.startswith("b ")] == ["a", "c"]
    async with open_runtime(agents=[worker(ran)]) as rt:
        starts = actor_starts(rt)
        await rt.wait_recovered()
        assert "qr-b" not in starts and (await rt.result("qr-b")).status == "cancelled"


async def test_a_second_approval_of_one_turn_is_taken_while_the_first_call_runs(
    open_runtime: Any,
) -> None:
    """Two calls of one turn need approval; the first is approved and runs (slowly);
    approving the second meanwhile is accepted, and each runs once, in turn order.

    Not covered before: approving a pending call while a sibling call is running.
    """
    ran: list[str] = []
    first_running = anyio.Event()
    release = anyio.Event()

    @tool(requires_confirmation=True)
    async def pay(to: str) -> str:
        ran.append(f"{to} {current_idempotency_key()}")
        if to == "a":
            first_running.set()
            await release.wait()
        return f"paid {to}"

    llm = Scripted([[Scripted.call("pay", to="a"), Scripted.call("pay", to="b")], "both paid"])
    agent = Agent("payer2", tools=[pay], llm=llm)
    async with open_runtime() as rt:
        r = await rt.run(agent, "pay both", execution_id="ap-1")
        assert r.suspend_reason is not None
        first, second = (b["confirmation_id"] for b in r.suspend_reason.pending)
        await rt.approve("ap-1", first)
        with anyio.fail_after(10):
            await first_running.wait()
            # the index lists the call still waiting for a decision while its sibling runs
            [info] = await rt.executions(agent="payer2")
            assert info.status == "running" and info.confirmations == (second,)
            assert await rt.approve("ap-1", second) == "delivered"
            release.set()
            r = await rt.wait("ap-1")
    assert r.status == "completed" and r.output == "both paid"
    assert [m.content for m in r.transcript if m.role == "tool"] == ["paid a", "paid b"]
    assert [x.split()[0] for x in ran] == ["a", "b"]


class SlowDisk:
    """A real log with the LMDB writer's cancellation rule (an append, once taken, is
    committed whatever happens to its caller) and one slow commit: the first append to
    ``stream`` holding a ``hold_type`` record is committed only once another append to
    that stream queues behind it (appends to a stream are taken in order)."""

    def __init__(self, log: Any, tg: Any, stream: str, hold_type: str) -> None:
        self._log = log
        self._tg = tg
        self._stream = stream
        self._hold_type: str | None = hold_type
        self.held = anyio.Event()  # the slow commit has been taken and waits
        self._behind = anyio.Event()
        self._done: anyio.Event | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)

    async def append(self, stream: str, records: Any, expect: Any, meta: Any = None) -> int:
        if stream == self._stream and self._done is not None and not self._done.is_set():
            self._behind.set()
            await self._done.wait()  # in order: after the slow one
        elif stream == self._stream and any(r.type == self._hold_type for r in records):
            self._hold_type = None
            done = self._done = anyio.Event()
            outcome: dict[str, Any] = {}

            async def commit() -> None:
                await self._behind.wait()
                try:
                    outcome["seq"] = await self._log.append(stream, records, expect, meta)
                except Exception as exc:
                    outcome["error"] = exc
                finally:
                    done.set()

            self._tg.start_soon(commit)  # the disk's, not the caller's: cancelling the
            self.held.set()  # caller does not take it back
            await done.wait()
            if "error" in outcome:
                raise outcome["error"]
            return outcome["seq"]  # type: ignore[no-any-return]
        return await self._log.append(stream, records, expect, meta)  # type: ignore[no-any-return]


async def test_a_cancel_that_cuts_an_append_short_still_cancels_at_once(
    anyio_backend: Any,
) -> None:
    """The cancel lands while the engine's append of a tool outcome is on its way to
    disk; the append is committed after the cancel re-read the log. The cancel must
    still be recorded and stop the execution at once: no further model call or tool
    call, and never resumed.

    Not covered before, and failing before the fix: the cancel's append conflicted
    with the late commit, the actor crashed and restarted, and its new incarnation
    drove the execution on (model and tools called after the cancel) until the
    delivery was retried; under enough steps it failed with 'crash' instead.
    """
    asked: list[int] = []

    @tool
    def step(n: int) -> int:
        return n

    def script(request: LLMRequest) -> Any:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        asked.append(turn)
        return Scripted.call("step", n=turn) if turn < 50 else "done"

    agent = Agent("stepper", tools=[step], llm=Scripted(script, record=False), max_steps=100)
    memory = MemoryLog(record_types())
    async with anyio.create_task_group() as disk:
        log = SlowDisk(memory, disk, execution_stream("cx-1"), "tool.completed")
        async with Runtime(log=log, shutdown_timeout=2.0) as rt:  # type: ignore[arg-type]
            await rt.spawn(agent, "go", execution_id="cx-1")
            with anyio.fail_after(10):
                await log.held.wait()  # the first tool outcome is on its way to disk
                assert await rt.cancel("cx-1", "stop") == "delivered"
                r = await rt.wait("cx-1")
            assert r.status == "cancelled"
            assert asked == [0]  # nothing was asked after the cancel
            types = [rec.type async for rec in memory.read(execution_stream("cx-1"))]
            assert types[-2:] == ["tool.completed", "execution.cancelled"]
        async with Runtime(log=memory, agents=[agent], shutdown_timeout=2.0) as rt:  # type: ignore[arg-type]
            assert await hibernated(rt, "cx-1")
            assert (await rt.result("cx-1")).status == "cancelled"
    assert asked == [0]


async def test_on_suspend_fires_again_when_a_signal_leaves_it_waiting_for_something_else(
    open_runtime: Any,
) -> None:
    """Approving a call the tool budget then blocks: the execution goes on waiting, now
    for a budget raise; on_suspend says so (a service that raises budgets from its
    callback would otherwise never hear of it), and the raise finishes the run.

    Not covered before, and failing before the fix: on_suspend fired for the approval
    only, and the execution sat waiting for a raise nobody was told about.
    """

    @tool(requires_confirmation=True)
    def gated() -> str:
        return "gated ran"

    @tool
    def free() -> str:
        return "free ran"

    llm = Scripted([[Scripted.call("gated"), Scripted.call("free")], "done"])
    agent = Agent("budgeted2", tools=[gated, free], llm=llm, budget=Budget(max_tool_calls=1))
    async with open_runtime() as rt:
        seen: list[str] = []
        raised = anyio.Event()

        @rt.on_suspend
        async def route(result: Any, reason: Any) -> None:
            seen.append(reason.kind)
            if reason.kind == "budget":
                await rt.resume(result.execution_id, budget=Budget(max_tool_calls=5), wait=False)
                raised.set()

        r = await rt.run(agent, "go", execution_id="ob-1")
        assert r.suspend_reason is not None and r.suspend_reason.kind == "approval"
        await rt.approve("ob-1", r.suspend_reason.confirmation_id)
        with anyio.fail_after(10):
            await raised.wait()
            r = await rt.wait("ob-1", until="finished")
    assert seen == ["approval", "budget"]
    assert r.status == "completed"
    assert [m.content for m in r.transcript if m.role == "tool"] == ["gated ran", "free ran"]


class HeldMetaLog(YieldingLog):
    """A real log whose ``set_meta`` waits while the test holds it (a slow store)."""

    def __init__(self, log: Any) -> None:
        super().__init__(log)
        self.held: anyio.Event | None = None  # set_meta waits for it while it is set
        self.holding = anyio.Event()  # set once a set_meta is waiting

    async def set_meta(self, stream: str, meta: Any) -> None:
        if self.held is not None:
            self.holding.set()
            await self.held.wait()
        await self._log.set_meta(stream, meta)


def holder_and_waiter(gate: anyio.Event) -> tuple[Agent, Agent]:
    """Agent ``a`` holds its slot in a tool until ``gate`` is set, then says "a done";
    agent ``b`` waits for the signal "go" in a tool, then says "b done"."""

    @tool
    async def hold() -> str:
        await gate.wait()
        return "held"

    @tool
    async def approval() -> str:
        from perdure import wait_for_signal

        return str(wait_for_signal("go"))

    a = Agent("a", tools=[hold], llm=Scripted([Scripted.call("hold"), "a done"]))
    b = Agent(
        "b", tools=[approval], llm=Scripted([Scripted.call("approval"), "b done"], record=False)
    )
    return a, b


async def test_a_signal_that_queues_an_execution_while_a_slot_frees_does_not_strand_it(
    anyio_backend: Any,
) -> None:
    """max_concurrency=1: B waits for a signal while A holds the slot. B's signal comes;
    B must queue, and its "queued" status write takes its time (a slow store); A ends
    meanwhile and frees the slot. B used to be queued before that write, so the queue
    made B's old actor drive an instant before it stopped: B stopped after one step,
    out of the queue, "queued" in the index, and nothing ever started it again.

    Not covered before: the slot freeing while a signal's execution is being queued
    (seen only under load, in the two-deep delegation test).
    """
    gate = anyio.Event()
    a, b = holder_and_waiter(gate)
    log = HeldMetaLog(MemoryLog(record_types()))
    async with Runtime(log=log, max_concurrency=1, shutdown_timeout=2.0) as rt:  # type: ignore[arg-type]
        with anyio.fail_after(20):
            rb = await rt.run(b, "go", execution_id="b-1")
            assert rb.is_suspended, rb
            await rt.spawn(a, "go", execution_id="a-1")  # takes the only slot
            assert rt._slots == {"a-1"}
            held = log.held = anyio.Event()
            async with anyio.create_task_group() as tg:
                # (signal returns once B has taken it, which waits for the write.)
                tg.start_soon(rt.signal, "b-1", "go", "yes")  # B is runnable, no slot
                await log.holding.wait()  # ... and its "queued" write is under way
                gate.set()
                assert (await rt.wait("a-1")).status == "completed"  # the slot is free
                log.held = None
                held.set()
            done = await rt.wait("b-1")
    assert done.status == "completed" and done.output == "b done", done
    info = await log.stream_info(execution_stream("b-1"))
    assert info is not None and info.meta["status"] == "completed"


async def test_recovery_resuming_an_execution_as_it_settles_leaves_no_idle_actor(
    anyio_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery at open lists an execution spawned meanwhile as running and resumes it
    just as it fails. It takes a slot, waits for the stopping actor, whose stop gives
    that slot back; the fresh actor then started without a slot, so it did not drive,
    found nothing to do and never stopped: an actor alive for good, in the way of
    every later start of that execution (seen under load, once in a few hundred runs).

    The window is held open here: the failed execution's actor is kept in its
    ``on_stop`` until recovery's resume is waiting for it.
    """
    from perdure.execution_actor import ExecutionActor
    from perdure.providers import TerminalProviderError

    stopping, release = anyio.Event(), anyio.Event()
    on_stop = ExecutionActor.on_stop

    async def held_stop(self: ExecutionActor, reason: Any) -> None:
        if self.execution_id == "d-1" and not release.is_set():
            stopping.set()
            await release.wait()
        await on_stop(self, reason)

    monkeypatch.setattr(ExecutionActor, "on_stop", held_stop)
    down = Agent("down", llm=Scripted([TerminalProviderError("the model is down")]))
    async with Runtime(log=MemoryLog(record_types()), agents=[down]) as rt:
        with anyio.fail_after(20):
            await rt.wait_recovered()
            assert (await rt.run(down, "go", execution_id="d-1")).status == "failed"
            await stopping.wait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(rt._resume_at_open, "d-1")  # what recovery does with it
                await anyio.wait_all_tasks_blocked()  # it waits for the stopping actor
                release.set()
            assert await hibernated(rt, "d-1")
            assert not rt._slots
            assert (await rt.result("d-1")).status == "failed"


async def test_a_queued_execution_whose_old_actor_is_still_stopping_is_not_stranded(
    anyio_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_concurrency=1: B's signal makes it runnable while A holds the slot, so B
    queues and its actor stops. When A ends, the queue gives B the slot and waits for
    B's old actor to finish stopping; that stop gave the slot back, and the fresh actor
    started without one: it never drove, and B stayed "queued" for good while C, queued
    after it, ran. Now B takes its turn again (after C, who was next in the queue).
    """
    from perdure.execution_actor import ExecutionActor

    gate, stopping, release = anyio.Event(), anyio.Event(), anyio.Event()
    hold = False
    on_stop = ExecutionActor.on_stop

    async def held_stop(self: ExecutionActor, reason: Any) -> None:
        if hold and self.execution_id == "b-1" and not release.is_set():
            stopping.set()
            await release.wait()
        await on_stop(self, reason)

    monkeypatch.setattr(ExecutionActor, "on_stop", held_stop)

    a, b = holder_and_waiter(gate)
    c = Agent("c", llm=Scripted(["c done"]))
    async with Runtime(log=MemoryLog(record_types()), max_concurrency=1) as rt:
        with anyio.fail_after(20):
            assert (await rt.run(b, "go", execution_id="b-1")).is_suspended
            await rt.spawn(a, "go", execution_id="a-1")  # takes the only slot
            hold = True
            await rt.signal("b-1", "go", "yes")  # B can run, has no slot: it queues
            await stopping.wait()  # ... and its actor is stopping
            await rt.spawn(c, "go", execution_id="c-1")  # queued after B
            gate.set()
            assert (await rt.wait("a-1")).status == "completed"
            await anyio.wait_all_tasks_blocked()  # the queue waits for B's old actor
            release.set()
            done_b, done_c = await rt.wait("b-1"), await rt.wait("c-1")
    assert (done_b.status, done_b.output) == ("completed", "b done"), done_b
    assert (done_c.status, done_c.output) == ("completed", "c done"), done_c
