"""Signals and delegation across real process boundaries (subprocesses, SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure.events import INBOX_STREAM, SignalSent, encode, execution_stream, record_types
from perdure.log import ANY, LmdbLog

ROOT = Path(__file__).resolve().parents[2]


def start(data_dir: Path, mode: str, crash: str = "none", **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.signal_worker", str(data_dir), mode, crash],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def next_event(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise AssertionError(f"worker exited {proc.returncode}: {proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
    return json.loads(line)


async def post_as_client(data_dir: Path, target: str, name: str, payload: Any) -> None:
    """What the CLI does: open the dir as a client and append to the inbox."""
    log = await LmdbLog.open(data_dir, types=record_types(), client=True)
    try:
        record = encode(SignalSent(target, name, payload, "test-client"))
        await log.append(INBOX_STREAM, [record], expect=ANY)
    finally:
        await log.aclose()


def test_a_signal_from_another_process_auto_resumes_within_a_second(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    owner = start(data_dir, "approval")
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


@pytest.mark.parametrize("crash", ["child-tool", "parent-after-child"])
def test_delegation_recovers_from_a_crash_in_the_child_or_the_parent(
    tmp_path: Path, crash: str
) -> None:
    data_dir, side = tmp_path / "data", tmp_path / "side.txt"
    first = start(data_dir, "delegate", crash, PERDURE_SIDE_FILE=str(side))
    assert first.wait(timeout=60) == -signal.SIGKILL
    second = start(data_dir, "delegate", crash, PERDURE_SIDE_FILE=str(side), PERDURE_CRASHED="1")
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
