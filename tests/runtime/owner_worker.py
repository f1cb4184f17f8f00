"""A Runtime owning a data dir until stdin closes (for the two-process test).

    python -m tests.runtime.owner_worker DATA_DIR

The event loop is ``$PERDURE_TEST_BACKEND`` (``asyncio`` by default, or ``trio``).

Prints ``{"event": "owner", "pid": ...}`` once it owns the dir, or
``{"event": "locked", "error": ...}`` if another process does; spawns one execution
(id given on stdin) per line and prints each result.
"""

from __future__ import annotations

import json
import os
import sys

import anyio

from perdure import Agent, Runtime
from perdure.log import DataDirLockedError
from perdure.providers import Scripted

agent = Agent("greeter", llm=Scripted(["hello"]))


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def main() -> None:
    try:
        async with Runtime(sys.argv[1], agents=[agent]) as rt:
            emit(event="owner", pid=os.getpid())
            while line := await anyio.to_thread.run_sync(sys.stdin.readline):
                r = await rt.run(agent, "hi", execution_id=line.strip())
                emit(event="result", id=r.execution_id, status=r.status)
    except DataDirLockedError as exc:
        emit(event="locked", error=str(exc), pid=exc.pid)


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("PERDURE_TEST_BACKEND", "asyncio"))
