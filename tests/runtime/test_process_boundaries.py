"""Signals and delegation across real process boundaries (subprocesses, SIGKILL).

The worker is ``signal_worker.py``; every wait is on its output, with a deadline. The
auto-resume and delegation crash tests run the worker on both event loops.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure.events import INBOX_STREAM, SignalSent, decode, encode, execution_stream, record_types
from perdure.log import ANY, LmdbLog
from tests.cli.conftest import perdure

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ["asyncio", "trio"]
LONG_PARENT = "dir-" + "x" * 250  # signal_worker.LONG_PARENT (not imported: it reads argv)


def start(
    data_dir: Path, mode: str, crash: str = "none", backend: str = "asyncio", **env: str
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.signal_worker", str(data_dir), mode, crash],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PERDURE_TEST_BACKEND": backend, **env},
    )
    _Lines.of(proc)
    return proc


class _Lines:
    """A process's stdout and stderr, read by threads so a wait can have a deadline."""

    _all: weakref.WeakKeyDictionary[subprocess.Popen[str], _Lines] = weakref.WeakKeyDictionary()

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.err: list[str] = []
        self.err_done = threading.Event()
        assert proc.stdout is not None and proc.stderr is not None
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()
        threading.Thread(target=self._pump_err, args=(proc.stderr,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def _pump_err(self, stream: Any) -> None:
        self.err.extend(stream)
        self.err_done.set()

    @classmethod
    def of(cls, proc: subprocess.Popen[str]) -> _Lines:
        lines = cls._all.get(proc)
        if lines is None:
            lines = cls._all[proc] = cls(proc)
        return lines


def next_event(proc: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """The worker's next JSON line; fails with what it said if none comes in time."""
    lines = _Lines.of(proc)
    try:
        line = lines.lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(
            f"worker said nothing more within {timeout}s; it said {lines.seen}; "
            f"stderr: {''.join(lines.err)[-3000:]}"
        ) from None
    if line is None:
        proc.wait(timeout=30)
        raise AssertionError(
            f"worker exited {proc.returncode} after saying {lines.seen}; "
            f"stderr: {''.join(lines.err)[-3000:]}"
        )
    lines.seen.append(line.strip())
    return json.loads(line)


def stderr_of(proc: subprocess.Popen[str]) -> str:
    """What the worker wrote to stderr (complete once it has exited)."""
    proc.wait(timeout=30)
    lines = _Lines.of(proc)
    assert lines.err_done.wait(timeout=30), "the worker's stderr never closed"
    return "".join(lines.err)


def killed(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the worker and reap it."""
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def side_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def post_as_client(
    data_dir: Path, target: str, name: str, payload: Any, times: int = 1
) -> None:
    """What the CLI does: open the dir as a client and append to the inbox."""
    log = await LmdbLog.open(data_dir, types=record_types(), client=True)
    try:
        record = encode(SignalSent(target, name, payload, "test-client"))
        await log.append(INBOX_STREAM, [record] * times, expect=ANY)
    finally:
        await log.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_signal_from_another_process_auto_resumes_within_a_second(
    tmp_path: Path, backend: str
) -> None:
    data_dir = tmp_path / "data"
    owner = start(data_dir, "approval", backend=backend)
    try:
        suspended = next_event(owner)
        assert suspended["event"] == "suspended"
        sent_at = time.time()
        anyio.run(post_as_client, data_dir, "x-1", "approve", {"confirmation_id": suspended["cid"]})
        completed = next_event(owner)
        assert completed["event"] == "completed" and completed["output"] == "done"
        assert completed["at"] - sent_at < 1.0, f"auto-resume took {completed['at'] - sent_at:.3f}s"
        assert owner.wait(timeout=30) == 0
    finally:
        owner.kill()


def test_a_signal_sent_while_no_runtime_runs_takes_effect_at_the_next_start(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    first = start(data_dir, "approval")
    cid = next_event(first)["cid"]
    first.send_signal(signal.SIGKILL)  # the owner dies while the execution is suspended
    first.wait(timeout=30)
    anyio.run(post_as_client, data_dir, "x-1", "approve", {"confirmation_id": cid})
    second = start(data_dir, "approval", PERDURE_RESTARTED="1")
    try:
        event = next_event(second)
        assert event["event"] == "completed" and event["output"] == "done"
        assert second.wait(timeout=30) == 0
    finally:
        second.kill()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("crash", ["child-tool", "parent-after-child"])
def test_delegation_recovers_from_a_crash_in_the_child_or_the_parent(
    tmp_path: Path, crash: str, backend: str
) -> None:
    data_dir, side = tmp_path / "data", tmp_path / "side.txt"
    env = {"PERDURE_SIDE_FILE": str(side)}
    first = start(data_dir, "delegate", crash, backend, **env)
    assert first.wait(timeout=60) == -signal.SIGKILL
    second = start(data_dir, "delegate", crash, backend, PERDURE_CRASHED="1", **env)
    try:
        event = next_event(second)
    finally:
        second.kill()
    assert event == {
        "event": "finished",
        "status": "completed",
        "output": "Report: done.",
        "tools": ["Paris: 2.1M people."],
    }
    lookups = [line for line in side.read_text().splitlines() if line.startswith("lookup")]
    # killed inside the child's tool: re-run once with the same key; after the child
    # completed: never re-run
    assert len(lookups) == (2 if crash == "child-tool" else 1)

    async def child_attempts() -> list[int]:
        log = await LmdbLog.open(data_dir, types=record_types(), client=True)
        try:
            return [
                r.payload["attempt"]
                async for r in log.read(execution_stream("p-1/2"))
                if r.type == "tool.started"
            ]
        finally:
            await log.aclose()

    assert anyio.run(child_attempts) == ([1, 2] if crash == "child-tool" else [1])


def test_two_processes_on_one_data_dir_only_one_runs_executions(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    def owner() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.runtime.owner_worker", str(data_dir)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = owner()
    try:
        assert next_event(first) == {"event": "owner", "pid": first.pid}
        second = owner()
        refused = next_event(second)
        # the second process cannot own the dir: it runs nothing, new work included
        assert refused["event"] == "locked" and refused["pid"] == first.pid
        assert str(first.pid) in refused["error"]
        assert second.wait(timeout=30) == 0
        assert first.stdin is not None
        first.stdin.write("new-1\n")
        first.stdin.flush()
        assert next_event(first) == {"event": "result", "id": "new-1", "status": "completed"}
        # the lock dies with its owner: a killed owner never locks the dir out
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        third = owner()
        try:
            assert next_event(third)["event"] == "owner"
        finally:
            third.kill()
    finally:
        first.kill()


async def _records(data_dir: Path, eid: str) -> list[Any]:
    log = await LmdbLog.open(data_dir, types=record_types(), client=True)
    try:
        return [decode(r) async for r in log.read(execution_stream(eid))]
    finally:
        await log.aclose()


def records(data_dir: Path, eid: str) -> list[Any]:
    """The execution's events, read as a client (as the CLI does)."""
    return anyio.run(_records, data_dir, eid)


def events_until_finished(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    seen = []
    while not seen or seen[-1]["event"] != "finished":
        seen.append(next_event(proc))
    return seen


def test_a_cancel_sent_while_no_runtime_runs_lands_before_anything_resumes(
    tmp_path: Path,
) -> None:
    data_dir, side = tmp_path / "data", tmp_path / "side.txt"
    env = {"PERDURE_SIDE_FILE": str(side)}
    first = start(data_dir, "cancel", **env)
    assert next_event(first) == {"event": "ready"}
    assert next_event(first) == {"event": "tool-started"}
    killed(first)  # mid-execution: the tool started, never finished
    # a backlog: other signals first, then the cancel
    anyio.run(post_as_client, data_dir, "c-1", "noise", {}, 100)
    ran = perdure(data_dir, "cancel", "c-1", "--reason", "stop it")
    assert ran.code == 0, ran.err
    assert "no runtime owns" in ran.out
    second = start(data_dir, "cancel", PERDURE_CRASHED="1", **env)
    try:
        seen = events_until_finished(second)
        assert second.wait(timeout=30) == 0
    finally:
        second.kill()
    # delivered from the inbox backlog before recovery could resume the execution
    assert seen[0] == {"event": "cancelled", "id": "c-1"}
    assert {"event": "tool-started"} not in seen
    assert seen[-1]["status"] == "cancelled"
    assert side_lines(side) == ["long_job started"]  # never ran again
    history = records(data_dir, "c-1")
    types = [e.type for e in history]
    assert types.count("tool.started") == 1 and types.count("llm.completed") == 1
    assert types.count("signal.received") == 100  # the backlog, in order, then the cancel
    assert history[-1].type == "execution.cancelled" and history[-1].reason == "stop it"


def test_cancel_a_running_execution_then_sigkill_it_never_resumes(tmp_path: Path) -> None:
    data_dir, side = tmp_path / "data", tmp_path / "side.txt"
    env = {"PERDURE_SIDE_FILE": str(side)}
    first = start(data_dir, "cancel", **env)
    assert next_event(first) == {"event": "ready"}
    assert next_event(first) == {"event": "tool-started"}
    ran = perdure(data_dir, "cancel", "c-1", "--reason", "enough", "--wait", "10")
    assert ran.code == 0, ran.out
    assert next_event(first) == {"event": "cancelled", "id": "c-1"}
    killed(first)
    second = start(data_dir, "cancel", PERDURE_CRASHED="1", **env)
    try:
        seen = events_until_finished(second)
    finally:
        second.kill()
    assert seen == [
        {"event": "ready"},
        {
            "event": "finished",
            "status": "cancelled",
            "output": None,
            "tools": [],
            "llm_calls": 1,
            "tool_calls": 1,
        },
    ]
    assert side_lines(side) == ["long_job started"]


def test_reject_after_a_restart_reaches_the_model(tmp_path: Path) -> None:
    data_dir, side = tmp_path / "data", tmp_path / "side.txt"
    env = {"PERDURE_SIDE_FILE": str(side)}
    first = start(data_dir, "reject", **env)
    assert next_event(first) == {"event": "ready"}
    suspended = next_event(first)
    assert suspended["kind"] == "approval"
    killed(first)
    second = start(data_dir, "reject", PERDURE_CRASHED="1", **env)
    try:
        assert next_event(second) == {"event": "ready"}
        payload = {"confirmation_id": suspended["cid"], "reason": "too much"}
        anyio.run(post_as_client, data_dir, "rej-1", "reject", payload)
        done = next_event(second)
    finally:
        second.kill()
    assert done["status"] == "completed"
    assert done["output"] == "model saw: REJECTED by test-client: too much"
    # the tool never ran; each model turn was asked once, across both processes
    assert side_lines(side) == ["llm 0", "llm 1", "saw REJECTED by test-client: too much"]


def test_a_contract_override_after_a_restart_is_recorded_with_who_and_why(
    tmp_path: Path,
) -> None:
    data_dir, side = tmp_path / "data", tmp_path / "side.txt"
    env = {"PERDURE_SIDE_FILE": str(side)}
    first = start(data_dir, "contract", **env)
    assert next_event(first) == {"event": "ready"}
    suspended = next_event(first)
    assert suspended["kind"] == "contract"
    killed(first)
    second = start(data_dir, "contract", PERDURE_CRASHED="1", **env)
    try:
        assert next_event(second) == {"event": "ready"}
        cid = suspended["cid"]
        ran = perdure(data_dir, "approve", "k-1", cid, "--note", "VIP", "--by", "carol")
        assert ran.code == 0, ran.err
        done = next_event(second)
    finally:
        second.kill()
    assert done["status"] == "completed" and done["tools"] == ["charged"]
    assert side_lines(side) == ["charge 900.0"]
    [grant] = [e for e in records(data_dir, "k-1") if e.type == "approval.granted"]
    assert (grant.override, grant.by, grant.note) == (True, "carol", "VIP")


def test_budget_exhausted_raised_then_a_crash_keeps_usage_and_repeats_no_llm_call(
    tmp_path: Path,
) -> None:
    data_dir, side = tmp_path / "data", tmp_path / "side.txt"
    env = {"PERDURE_SIDE_FILE": str(side)}
    first = start(data_dir, "budget", "budget-step", **env)
    assert next_event(first) == {"event": "ready"}
    assert next_event(first) == {"event": "suspended", "kind": "budget", "cid": None}
    ran = perdure(data_dir, "resume", "b-1", "--max-llm-calls", "10")
    assert ran.code == 0, ran.err
    assert first.wait(timeout=60) == -signal.SIGKILL  # killed inside step 3, after the raise
    usage = perdure(data_dir, "inspect", "b-1", "--json").json()["usage"]
    assert (usage["llm_calls"], usage["tool_calls"]) == (4, 4)  # usage survived the crash
    second = start(data_dir, "budget", "budget-step", PERDURE_CRASHED="1", **env)
    try:
        assert next_event(second) == {"event": "ready"}
        done = next_event(second)
    finally:
        second.kill()
    assert done["status"] == "completed" and done["llm_calls"] == 6
    lines = side_lines(side)
    assert [x for x in lines if x.startswith("llm")] == [f"llm {n}" for n in range(6)]
    # only the interrupted tool call ran again (same idempotency key)
    assert [x for x in lines if x.startswith("step")] == [
        "step 0",
        "step 1",
        "step 2",
        "step 3",
        "step 3",
        "step 4",
    ]
    [raised] = [e for e in records(data_dir, "b-1") if e.type == "budget.raised"]
    assert raised.budget == {"max_llm_calls": 10}


def test_approve_after_a_restart_runs_the_tool_once_and_raising_callbacks_harm_nothing(
    tmp_path: Path,
) -> None:
    data_dir, side = tmp_path / "data", tmp_path / "side.txt"
    env = {"PERDURE_SIDE_FILE": str(side)}
    first = start(data_dir, "approve", **env)
    assert next_event(first) == {"event": "ready"}
    suspended = next_event(first)
    killed(first)
    second = start(data_dir, "approve", PERDURE_CRASHED="1", **env)
    try:
        assert next_event(second) == {"event": "ready"}
        ran = perdure(data_dir, "approve", "app-1", suspended["cid"])
        assert ran.code == 0, ran.err
        assert next_event(second) == {"event": "alive", "status": "completed"}
        done = next_event(second)
        assert second.wait(timeout=30) == 0
    finally:
        second.kill()
    assert done["status"] == "completed" and done["output"] == "model saw: paid 5.0"
    assert [x for x in side_lines(side) if x.startswith("pay")] == ["pay 5.0"]
    err = stderr_of(second)
    assert "execution app-1: on_complete callback" in err
    assert "sync callback bug" in err and "async callback bug" in err


def test_a_parent_waiting_on_an_approval_and_a_child_is_woken_after_a_crash(
    tmp_path: Path,
) -> None:
    data_dir, side = tmp_path / "data", tmp_path / "side.txt"
    env = {"PERDURE_SIDE_FILE": str(side)}
    first = start(data_dir, "delegate-approval", **env)
    suspended = next_event(first)
    child_id, child_cid = suspended["child_id"], suspended["child_cid"]
    assert "~" in child_id  # the parent's id is too long to prefix its child's
    # the child's approval is visible from the parent
    detail = perdure(data_dir, "inspect", LONG_PARENT, "--json").json()
    [child] = detail["waiting_on"]
    assert child["execution_id"] == child_id
    assert child["status_text"] == f"suspended (approval {child_cid})"
    text = perdure(data_dir, "inspect", LONG_PARENT).out
    assert f"waits for child execution {child_id}: suspended (approval {child_cid})" in text
    ran = perdure(data_dir, "approve", child_id, child_cid)
    assert ran.code == 0, ran.err
    # killed once the child completed, before its parent heard of it
    assert first.wait(timeout=60) == -signal.SIGKILL
    second = start(data_dir, "delegate-approval", PERDURE_CRASHED="1", **env)
    try:
        assert next_event(second) == {"event": "recovered"}
        payload = {"confirmation_id": suspended["parent_cid"]}
        anyio.run(post_as_client, data_dir, LONG_PARENT, "approve", payload)
        done = next_event(second)
    finally:
        second.kill()
    assert done["status"] == "completed" and done["output"] == "Director: all done."
    assert done["tools"] == ["signed q3", "Claim filed."]
    assert sorted(side_lines(side)) == ["file_claim 12.5", "sign_off q3"]
