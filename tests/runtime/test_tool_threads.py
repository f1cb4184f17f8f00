"""ToolThreads: the worker threads that run sync tools, on both backends.

The tools here block on ``threading`` events the test controls, so every ordering is
forced, never waited for with a sleep. Waiting for a thread's event from the loop goes
through anyio's own worker threads (``anyio.to_thread``), which are not under test.
"""

from __future__ import annotations

import contextvars
import inspect
import threading
import traceback
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure import Agent, Runtime, current_idempotency_key, tool
from perdure.errors import RuntimeClosedError
from perdure.providers import Scripted
from perdure.tool_threads import ToolThreads

pytestmark = pytest.mark.anyio

#: Seconds before a test gives up on an event (a hang is a failure, not a wait).
PATIENCE = 10.0

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


async def wait_for(event: threading.Event) -> None:
    """Wait for an event set by a worker thread, without blocking the loop."""
    assert await anyio.to_thread.run_sync(event.wait, PATIENCE), "the thread never got there"


async def acquire(semaphore: threading.Semaphore) -> None:
    """Take one token of a semaphore released by worker threads, without blocking the loop."""
    assert await anyio.to_thread.run_sync(semaphore.acquire, True, PATIENCE), "nothing started"


class Gated:
    """Sync tool calls that record when they start and block until released, one by one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.started: list[int] = []
        self.finished: list[int] = []
        self.any_started = threading.Semaphore(0)
        self.gates: dict[int, threading.Event] = {}
        self.done: dict[int, threading.Event] = {}
        self.loop_thread = threading.get_ident()

    def call(self, i: int) -> Any:
        """The function for call ``i``: it returns ``i * 10`` once released."""
        self.gates[i] = threading.Event()
        self.done[i] = threading.Event()

        def fn() -> int:
            assert threading.get_ident() != self.loop_thread
            with self.lock:
                self.running += 1
                self.most_running = max(self.most_running, self.running)
                self.started.append(i)
            self.any_started.release()
            self.gates[i].wait(PATIENCE)
            with self.lock:
                self.running -= 1
                self.finished.append(i)
            self.done[i].set()
            return i * 10

        return fn


async def test_calls_run_in_a_worker_thread_in_a_copy_of_the_callers_context() -> None:
    threads = ToolThreads(4)
    loop_thread = threading.get_ident()

    def work() -> tuple[int, str]:
        seen = request_id.get()
        request_id.set("changed in the thread")  # must not leak back into the caller
        return threading.get_ident(), seen

    token = request_id.set("req-1")
    try:
        thread, seen = await threads.run(work)
        assert request_id.get() == "req-1"
    finally:
        request_id.reset(token)
    threads.close()
    assert thread != loop_thread
    assert seen == "req-1"


async def test_at_most_max_threads_run_at_once_and_the_rest_start_in_fifo_order() -> None:
    threads = ToolThreads(2)
    gated = Gated()
    results: dict[int, int] = {}

    async def caller(i: int) -> None:
        results[i] = await threads.run(gated.call(i))

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(caller, i)
            # submitted one at a time, so the queue order is 0, 1, 2, ...
            await anyio.wait_all_tasks_blocked()
        await acquire(gated.any_started)
        await acquire(gated.any_started)
        assert sorted(gated.started) == [0, 1]
        for i in range(4):
            # finishing one call lets exactly the next queued one in
            gated.gates[i].set()
            await acquire(gated.any_started)
            assert gated.started[2:] == list(range(2, 3 + i))
        gated.gates[4].set()
        gated.gates[5].set()
    assert gated.most_running == 2
    assert results == {i: i * 10 for i in range(6)}
    threads.close()


async def test_a_cancelled_call_is_abandoned_at_once_and_its_thread_finishes_alone() -> None:
    threads = ToolThreads(1)
    gated = Gated()
    outcome: list[Any] = []

    async def caller(i: int) -> None:
        outcome.append(await threads.run(gated.call(i)))

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(caller, 0)
            await acquire(gated.any_started)
            scope.cancel()
    # the caller has moved on while the thread is still inside the call
    assert not gated.done[0].is_set()
    async with anyio.create_task_group() as tg:
        tg.start_soon(caller, 1)
        await anyio.wait_all_tasks_blocked()
        # The abandoned call still holds the only thread: call 1 waits its turn (were
        # it let in, most_running below would be 2, with call 0 still held at its gate).
        gated.gates[0].set()
        await acquire(gated.any_started)
        assert gated.done[0].is_set()  # call 1 started only once call 0 was over
        gated.gates[1].set()
    assert gated.most_running == 1
    assert outcome == [10]  # call 0's result (0) was dropped, not delivered to anyone
    threads.close()


async def test_a_timed_out_call_raises_timeout_and_the_thread_finishes_alone() -> None:
    threads = ToolThreads(2)
    gated = Gated()
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.05):
            await threads.run(gated.call(0))
    assert not gated.done[0].is_set()
    gated.gates[0].set()
    await wait_for(gated.done[0])
    assert await threads.run(lambda: "next") == "next"
    threads.close()


async def test_a_coroutine_an_abandoned_call_returns_is_closed_not_leaked() -> None:
    """Nobody is left to refuse it as a tool error, so the pool closes it itself."""
    threads = ToolThreads(1)
    release = threading.Event()

    async def never_awaited() -> None:
        raise AssertionError("an abandoned call's coroutine must not run")

    coro = never_awaited()

    def returns_a_coroutine() -> Any:
        release.wait(PATIENCE)
        return coro

    with anyio.move_on_after(0.05):
        await threads.run(returns_a_coroutine)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CREATED
    release.set()
    # One thread: this call runs after the abandoned one, and its outcome is handed
    # back after the abandoned one's has been dealt with.
    assert await threads.run(lambda: "next") == "next"
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    threads.close()


async def test_a_call_cancelled_while_queued_never_runs() -> None:
    threads = ToolThreads(1)
    gated = Gated()
    ran: list[str] = []

    def queued() -> None:
        ran.append("queued")

    async with anyio.create_task_group() as tg:
        tg.start_soon(threads.run, gated.call(0))
        await acquire(gated.any_started)
        scope = anyio.CancelScope()
        tg.start_soon(_run_in, scope, threads, queued)
        await anyio.wait_all_tasks_blocked()  # queued behind call 0
        scope.cancel()
        await anyio.wait_all_tasks_blocked()  # and given up on
        gated.gates[0].set()
    # FIFO: had the cancelled call not been dropped, it would have run before this one
    assert await threads.run(lambda: ran.append("after")) is None
    assert ran == ["after"]
    threads.close()


async def _run_in(scope: anyio.CancelScope, threads: ToolThreads, fn: Any) -> None:
    with scope:
        await threads.run(fn)


async def test_exceptions_propagate_with_their_traceback() -> None:
    threads = ToolThreads(2)

    def explode() -> None:
        raise ValueError("kaput")

    with pytest.raises(ValueError, match="kaput") as info:
        await threads.run(explode)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "explode" in frames

    def stop() -> None:
        raise StopIteration  # cannot travel through a coroutine as itself

    with pytest.raises(RuntimeError):
        await threads.run(stop)
    assert await threads.run(lambda: "still working") == "still working"
    threads.close()


async def test_close_stops_taking_calls_and_lets_taken_calls_finish() -> None:
    threads = ToolThreads(1)
    gated = Gated()
    results: dict[int, int] = {}

    async def caller(i: int) -> None:
        results[i] = await threads.run(gated.call(i))

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller, 0)
        await acquire(gated.any_started)
        tg.start_soon(caller, 1)  # queued behind call 0
        await anyio.wait_all_tasks_blocked()
        threads.close()
        with pytest.raises(RuntimeClosedError, match="closed"):
            await threads.run(lambda: None)
        gated.gates[0].set()
        gated.gates[1].set()
    assert results == {0: 0, 1: 10}


async def test_many_concurrent_calls_all_complete_with_their_own_results() -> None:
    threads = ToolThreads(8)
    loop_thread = threading.get_ident()
    results: dict[int, tuple[int, str]] = {}

    def work(i: int) -> tuple[int, str]:
        assert threading.get_ident() != loop_thread
        return i * i, request_id.get()

    async def caller(i: int) -> None:
        request_id.set(f"req-{i}")  # each task has its own context
        for _ in range(5):
            results[i] = await threads.run(lambda: work(i))

    with anyio.fail_after(PATIENCE):
        async with anyio.create_task_group() as tg:
            for i in range(500):
                tg.start_soon(caller, i)
    assert results == {i: (i * i, f"req-{i}") for i in range(500)}
    threads.close()


async def test_a_runtime_opened_again_still_runs_sync_tools(tmp_path: Path) -> None:
    keys: list[str] = []

    @tool
    def remember() -> str:
        """Note the idempotency key (only set in the copied context)."""
        keys.append(current_idempotency_key())
        return "ok"

    def agent() -> Agent:
        return Agent("again", tools=[remember], llm=Scripted([Scripted.call("remember"), "done"]))

    runtime = Runtime(tmp_path / "data", durability="process", shutdown_timeout=2.0)
    async with runtime:
        first = await runtime.run(agent(), "go", execution_id="first")
    async with runtime:
        second = await runtime.run(agent(), "go", execution_id="second")
    assert [m.is_error for r in (first, second) for m in r.transcript if m.role == "tool"] == [
        False,
        False,
    ]
    assert len(keys) == 2 and keys[0] != keys[1]
