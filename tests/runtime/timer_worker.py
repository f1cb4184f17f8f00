"""A Runtime in its own process that sleeps in a tool, for the SIGKILL timer tests.

    python -m tests.runtime.timer_worker DATA_DIR MODE

The event loop is ``$PERDURE_TEST_BACKEND`` (``asyncio`` by default, or ``trio``). The
runtime's wall clock is ``time.time() + $PERDURE_TEST_CLOCK_OFFSET`` (seconds, 0 by
default), so a later run can be "after the deadline" without anyone waiting for it.
Side effects are appended to ``$PERDURE_SIDE_FILE``, one fsync'd line each.

Modes:
- ``sleep``: runs execution ``z-1`` of ``dozer``, whose tool writes ``before``, sleeps an
  hour, then writes ``after`` and returns; prints ``{"event": "suspended", "until": ...}``
  once it sleeps, then keeps owning the data dir until it is killed.
- ``wake``: opens the data dir (the timer is then overdue and fires at open); the tool,
  past its sleep, writes ``after-sleep`` and SIGKILLs the process before it returns.
- ``deadline``: runs execution ``d-1`` of ``signer`` with an execution timeout of an
  hour; its tool needs an approval, so it suspends; prints ``{"event": "suspended",
  "deadline": ...}``, then keeps owning the data dir until it is killed.
- ``approval``: runs execution ``a-1`` of ``expiring``, whose tool needs an approval
  within an hour; prints ``{"event": "suspended", "until": ...}`` (the expiry), then
  keeps owning the data dir until it is killed.

Every line on stdout is one JSON object, flushed at once.
"""

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

from perdure import Agent, Runtime, sleep, tool
from perdure.providers import Scripted

#: Set in a worker's environment to make ``doze`` SIGKILL its process past its sleep.
DIE_AFTER_SLEEP = "PERDURE_TEST_DIE_AFTER_SLEEP"


async def suspended_then_killed(
    data_dir: Path, mode: str, side_file: Path, backend: str, **env: str
) -> dict[str, Any]:
    """Run this worker in ``mode`` (a mode that suspends) until it reports its
    execution suspended, SIGKILL it there, and return that report.

    For the tests: ``env`` is added to the worker's environment.
    """
    root = Path(__file__).resolve().parents[2]
    argv = [sys.executable, "-m", "tests.runtime.timer_worker", str(data_dir), mode]
    environ = {
        **os.environ,
        "PERDURE_TEST_BACKEND": backend,
        "PERDURE_SIDE_FILE": str(side_file),
        **env,
    }
    proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, text=True, env=environ)
    try:
        assert proc.stdout is not None
        with anyio.fail_after(60):
            line = await anyio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
        event: dict[str, Any] = json.loads(line)
        assert event["event"] == "suspended", event
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        return event
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def side(line: str) -> None:
    path = os.environ.get("PERDURE_SIDE_FILE", "")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


@tool("doze", description="Sleep an hour")
def doze() -> str:
    """Write ``before``, sleep an hour, write ``after`` (or die past the sleep in wake).

    The test's own runtime runs this same tool (the same code fingerprint).
    """
    side("before")
    sleep(3600)
    if os.environ.get(DIE_AFTER_SLEEP):
        side("after-sleep")
        os.kill(os.getpid(), signal.SIGKILL)
    side("after")
    return "rested"


dozer = Agent("dozer", tools=[doze], llm=Scripted([Scripted.call("doze"), "awake"], record=False))


@tool("sign", description="Sign the contract", requires_confirmation=True)
def sign() -> str:
    """Write ``signed`` (it never should: the deadline passes before an approval)."""
    side("signed")
    return "signed"


signer = Agent("signer", tools=[sign], llm=Scripted([Scripted.call("sign"), "done"], record=False))


@tool("sign_soon", description="Sign it", requires_confirmation=True, approval_timeout=3600)
def sign_soon() -> str:
    """Write ``signed`` (it never should: the approval expires undecided)."""
    side("signed")
    return "signed"


expiring = Agent(
    "expiring", tools=[sign_soon], llm=Scripted([Scripted.call("sign_soon"), "ok"], record=False)
)


async def main(data_dir: str, mode: str) -> None:
    offset = float(os.environ.get("PERDURE_TEST_CLOCK_OFFSET", "0"))
    rt = Runtime(data_dir, agents=[dozer, signer, expiring], shutdown_timeout=2.0)
    rt._wall_clock = lambda: time.time() + offset
    async with rt:
        if mode == "sleep":
            r = await rt.run(dozer, "doze off", execution_id="z-1")
            assert r.suspend_reason is not None
            emit(event="suspended", kind=r.suspend_reason.kind, until=r.suspend_reason.until)
            await anyio.sleep_forever()
        if mode == "deadline":
            r = await rt.run(signer, "sign it", execution_id="d-1", execution_timeout=3600)
            assert r.deadline is not None and r.suspend_reason is not None
            emit(event="suspended", kind=r.suspend_reason.kind, deadline=r.deadline.timestamp())
            await anyio.sleep_forever()
        if mode == "approval":
            r = await rt.run(expiring, "sign it", execution_id="a-1")
            assert r.suspend_reason is not None
            emit(event="suspended", kind=r.suspend_reason.kind, until=r.suspend_reason.until)
            await anyio.sleep_forever()
        # wake: the timer fires at open; the tool kills this process past its sleep.
        await rt.wait("z-1", until="finished")
        emit(event="unexpected", result=(await rt.result("z-1")).status)


if __name__ == "__main__":
    if sys.argv[2] == "wake":
        os.environ[DIE_AFTER_SLEEP] = "1"
    backend = os.environ.get("PERDURE_TEST_BACKEND", "asyncio")
    anyio.run(main, sys.argv[1], sys.argv[2], backend=backend)
