"""A Runtime in its own process, for tests that need a process boundary.

    python -m tests.runtime.signal_worker DATA_DIR MODE [CRASH]

Modes:
- ``approval``: runs an execution of ``banker`` (a tool that requires confirmation) with
  id ``x-1`` until it suspends, prints ``{"event": "suspended", "cid": ...}``, then keeps
  owning the data dir; when the execution completes (after a signal from another
  process) prints ``{"event": "completed", "at": <time>, "output": ...}`` and exits.
- ``delegate``: runs a ``manager`` that delegates to ``researcher`` (execution
  ``p-1``); CRASH ``child-tool`` SIGKILLs the process inside the child's tool,
  ``parent-after-child`` SIGKILLs it right after the child completed; prints the final
  result of ``p-1`` as JSON when it finishes.

Every line on stdout is one JSON object, flushed at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import anyio

from perdure import Agent, Result, Runtime, tool
from perdure.providers import Scripted

CRASH = sys.argv[3] if len(sys.argv) > 3 else "none"
SIDE = os.environ.get("PERDURE_SIDE_FILE", "")


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def side(line: str) -> None:
    if SIDE:
        with open(SIDE, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


@tool("transfer", requires_confirmation=True)
def transfer(amount: float) -> str:
    side(f"transfer {amount}")
    return f"moved {amount}"


banker = Agent(
    "banker", tools=[transfer], llm=Scripted([Scripted.call("transfer", amount=5.0), "done"])
)


@tool
def lookup(topic: str) -> str:
    side(f"lookup {topic}")
    if CRASH == "child-tool" and not os.environ.get("PERDURE_CRASHED"):
        os.kill(os.getpid(), signal.SIGKILL)
    return f"facts about {topic}"


researcher = Agent(
    "researcher",
    tools=[lookup],
    llm=Scripted([Scripted.call("lookup", topic="paris"), "Paris: 2.1M people."]),
    description="Finds facts.",
)
manager = Agent(
    "manager",
    llm=Scripted(
        [Scripted.call("delegate_to_researcher", task="population of Paris?"), "Report: done."]
    ),
    agents=[researcher],
)


async def approval(data_dir: str) -> None:
    async with Runtime(data_dir, agents=[banker]) as rt:
        done = anyio.Event()

        @rt.on_complete
        def completed(result: Result) -> None:
            if result.execution_id == "x-1":
                emit(event="completed", at=time.time(), output=result.output)
                done.set()

        r = await rt.run(banker, "move 5", execution_id="x-1")
        if r.is_suspended and not os.environ.get("PERDURE_RESTARTED"):
            emit(event="suspended", cid=r.suspend_reason.confirmation_id)  # type: ignore[union-attr]
            await done.wait()
        else:
            # after a restart, an approval sent while no runtime ran is delivered by the
            # recovery that starts as the runtime opens
            r = await rt.wait("x-1", until="finished")
            emit(event="completed", at=time.time(), output=r.output)


async def delegate(data_dir: str) -> None:
    async with Runtime(data_dir, agents=[manager]) as rt:

        @rt.on_complete
        def completed(result: Result) -> None:
            crash_now = CRASH == "parent-after-child" and not os.environ.get("PERDURE_CRASHED")
            if result.execution_id == "p-1/2" and crash_now:
                os.kill(os.getpid(), signal.SIGKILL)

        await rt.spawn(manager, "research paris", execution_id="p-1")
        r = await rt.wait("p-1", until="finished")
        emit(
            event="finished",
            status=r.status,
            output=r.output,
            tools=[m.content for m in r.transcript if m.role == "tool"],
        )


def main() -> None:
    data_dir, mode = sys.argv[1], sys.argv[2]
    anyio.run(approval if mode == "approval" else delegate, data_dir)


if __name__ == "__main__":
    main()
