"""The sync facade (``with Runtime(path) as rt``) used the way scripts misuse it.

Each test drives the blocking API from plain threads on both loops the facade can run
(``backend="asyncio"`` / ``"trio"``); the Ctrl-C test interrupts a real process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure import Agent, Runtime, tool
from perdure.errors import RuntimeClosedError
from perdure.log import DataDirLockedError
from perdure.providers import Scripted

ROOT = Path(__file__).resolve().parents[2]

BACKENDS = ["asyncio", "trio"]


@pytest.fixture(params=BACKENDS)
def loop(request: pytest.FixtureRequest) -> str:
    """The event loop the facade runs in its background thread."""
    return request.param  # type: ignore[no-any-return]


@tool("echo", description="Say it back")
def echo(x: str) -> str:
    """Return ``x``."""
    return x


def quick() -> Agent:
    """One tool call, then an answer."""
    return Agent("quick", tools=[echo], llm=Scripted([Scripted.call("echo", x="y"), "done"]))


def stuck(forever: bool = True) -> Agent:
    """An agent whose tool never returns (until cancelled): its stream never ends.

    ``forever=False``: the same agent (same fingerprint) as the code a later deploy runs.
    """

    @tool("hang", description="Wait for ever")
    async def hang(x: str) -> str:
        if forever:
            await anyio.sleep_forever()
        return x

    return Agent("stuck", tools=[hang], llm=Scripted([Scripted.call("hang", x="y"), "done"]))


def perdure_threads() -> list[str]:
    """Threads the facade or the runtime started that are still alive."""
    return [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread()
        and ("portal" in t.name or t.name.startswith("perdure") or not t.daemon)
    ]


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a thread; fail (instead of hanging the suite) if it takes too long."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s (a hang)"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_callbacks_run_on_the_loop_thread_and_one_that_raises_harms_nothing(
    tmp_path: Path, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="perdure.runtime")
    seen: list[tuple[str, str, int]] = []
    both_async = threading.Event()
    with Runtime(tmp_path / "d", durability="process", backend=loop) as rt:

        @rt.on_complete
        def sync_cb(result: Any) -> None:
            seen.append(("sync", result.execution_id, threading.get_ident()))
            raise RuntimeError("sync callback bug")

        @rt.on_complete
        async def async_cb(result: Any) -> None:
            seen.append(("async", result.execution_id, threading.get_ident()))
            if result.execution_id == "cb-2":
                both_async.set()
            raise ValueError("async callback bug")

        first = rt.run(quick(), "go", execution_id="cb-1")
        second = rt.run(quick(), "go", execution_id="cb-2")
        assert both_async.wait(30)
    # (the async callback logs right after setting the event, with no await between:
    # the close, a later task on the same loop, comes after it)
    assert first.status == second.status == "completed"
    assert sorted((k, e) for k, e, _ in seen) == [
        ("async", "cb-1"),
        ("async", "cb-2"),
        ("sync", "cb-1"),
        ("sync", "cb-2"),
    ]
    threads = {t for _, _, t in seen}
    assert len(threads) == 1 and threads != {threading.get_ident()}  # the loop's thread
    logged = [r.getMessage() for r in caplog.records]
    assert sum("on_complete callback" in m and "raised" in m for m in logged) == 4


def test_a_stream_abandoned_mid_execution_does_not_hang_the_exit(tmp_path: Path, loop: str) -> None:
    """break out of rt.stream while the execution waits in a tool: __exit__ used to
    wait for ever for the pump task, which nothing ended once the runtime closed."""
    data = tmp_path / "d"

    def script() -> list[Any]:
        items = []
        with Runtime(data, durability="process", shutdown_timeout=0.2, backend=loop) as rt:
            for item in rt.stream(stuck(), "go", execution_id="st-1"):
                items.append(item)
                break
            kept = rt.stream(stuck(), "go", execution_id="st-2")
            items.append(next(kept))  # held, never finished nor closed, at the exit
        return items

    items = within(60, script)
    assert len(items) == 2
    assert perdure_threads() == []
    # Both executions were stopped by the close, not lost: they resume at the next open.
    with Runtime(data, durability="process", backend=loop) as rt:
        rt.register(stuck(forever=False))
        assert rt.wait("st-1").status == "completed"
        assert rt.wait("st-2").status == "completed"


def test_a_stream_read_in_another_thread_ends_with_a_clear_error_at_the_exit(
    tmp_path: Path, loop: str
) -> None:
    got: dict[str, Any] = {}
    first = threading.Event()

    def consume(it: Iterator[Any]) -> None:
        try:
            for _ in it:
                first.set()
        except BaseException as exc:
            got["error"] = exc
        finally:
            first.set()

    def script() -> None:
        with Runtime(
            tmp_path / "d", durability="process", shutdown_timeout=0.2, backend=loop
        ) as rt:
            reader = threading.Thread(
                target=consume, args=(rt.stream(stuck(), "go", execution_id="th-1"),)
            )
            reader.start()
            first.wait()
        reader.join()

    within(60, script)
    error = got.get("error")
    assert isinstance(error, RuntimeClosedError), error
    assert "'th-1'" in str(error) and "resumes" in str(error)


def test_using_the_facade_after_exit_is_a_clear_error_at_the_call(
    tmp_path: Path, loop: str
) -> None:
    with Runtime(tmp_path / "d", durability="process", backend=loop) as rt:
        rt.run(quick(), "go", execution_id="ax-1")
    for call in (
        lambda: rt.run(quick(), "go"),
        lambda: rt.result("ax-1"),
        lambda: rt.stream(quick(), "go"),  # at the call, not at the first next()
    ):
        with pytest.raises(RuntimeClosedError, match=r"with Runtime\(\.\.\.\)"):
            call()


def test_a_second_with_on_an_open_runtime_is_refused_and_the_first_still_closes(
    tmp_path: Path, loop: str
) -> None:
    """The refused second 'with' used to replace the open facade: the outer exit then
    closed nothing, leaking the loop thread and the data dir's lock."""
    data = tmp_path / "d"
    runtime = Runtime(data, durability="process", backend=loop)
    with runtime as rt:
        with pytest.raises(RuntimeError, match="already open"), runtime:
            pass
        assert rt.run(quick(), "go", execution_id="re-1").status == "completed"
    assert perdure_threads() == []
    with Runtime(data, durability="process", backend=loop) as again:  # the lock was released
        assert again.result("re-1").status == "completed"


def test_a_nested_runtime_on_the_same_dir_names_this_process(tmp_path: Path, loop: str) -> None:
    data = tmp_path / "d"
    with Runtime(data, durability="process", backend=loop) as rt:
        with (
            pytest.raises(DataDirLockedError) as caught,
            Runtime(data, durability="process", backend=loop),
        ):
            pass
        assert caught.value.pid == os.getpid() and f"pid {os.getpid()}" in str(caught.value)
        assert rt.run(quick(), "go", execution_id="n-1").status == "completed"  # unharmed
    assert perdure_threads() == []


def test_many_threads_share_one_facade(tmp_path: Path, loop: str) -> None:
    results: dict[int, Any] = {}
    with Runtime(tmp_path / "d", durability="process", backend=loop) as rt:

        def worker(i: int) -> None:
            results[i] = rt.run(quick(), f"go {i}", execution_id=f"mt-{i}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        listed = {e.execution_id for e in rt.executions(status="completed")}
    assert sorted(results) == list(range(12))
    assert {r.status for r in results.values()} == {"completed"}
    assert listed == {f"mt-{i}" for i in range(12)}


CTRL_C_SCRIPT = """
import os, sys, time
import anyio
from perdure import Agent, Runtime, current_idempotency_key, tool
from perdure.providers import Scripted

data, side, kind, backend = sys.argv[1:5]

def first_time():
    seen = os.path.exists(side)
    with open(side, "a") as f:
        f.write(current_idempotency_key() + "\\n")
    return not seen

@tool("slow_sync", description="slow")
def slow_sync(x: str) -> str:
    if first_time():
        print("started", flush=True)
        time.sleep(120)
    return x

@tool("slow_async", description="slow")
async def slow_async(x: str) -> str:
    if first_time():
        print("started", flush=True)
        await anyio.sleep(120)
    return x

agent = Agent("ki", tools=[slow_sync, slow_async],
              llm=Scripted([Scripted.call("slow_" + kind, x="y"), "done"]))
# A graceful close would give the tool a whole minute: Ctrl-C must not wait for it.
with Runtime(data, agents=[agent], backend=backend, shutdown_timeout=60.0) as rt:
    r = rt.run(agent, "go", execution_id="ki-1")
    print("result", r.status, r.output, flush=True)
"""


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_ctrl_c_during_run_exits_promptly_and_the_run_resumes_at_the_next_open(
    tmp_path: Path, loop: str, kind: str
) -> None:
    script = tmp_path / "ki.py"
    script.write_text(CTRL_C_SCRIPT)
    args = [sys.executable, str(script), str(tmp_path / "d"), str(tmp_path / "side"), kind, loop]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"  # inside the tool, in rt.run
    proc.send_signal(signal.SIGINT)
    try:
        # Ctrl-C stops the executions at once (they are durable): neither the 60 s
        # shutdown timeout of a graceful close, nor the 120 s the tool would take.
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT, err[-3000:]  # KeyboardInterrupt, re-raised
    assert "KeyboardInterrupt" in err
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "result completed done"
    keys = (tmp_path / "side").read_text().split()
    assert len(keys) == 2 and keys[0] == keys[1]  # re-invoked once, with the same key
