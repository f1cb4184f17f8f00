"""Start the drift tests' agent and SIGKILL this process inside its tool call.

    python -m tests.runtime.drift_worker DATA_DIR EXECUTION_ID

The log then shows the call started and never finished, as after any crash; the test
reopens the data dir with a changed agent.
"""

from __future__ import annotations

import os
import signal
import sys

import anyio

from perdure import Runtime
from tests.runtime.test_drift import make_agent


class _KillOnStart:
    """Stands in for the gate's ``started`` event: the tool sets it once it is running."""

    def set(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


async def main(data_dir: str, execution_id: str) -> None:
    agent = make_agent(gate={"started": _KillOnStart(), "block": anyio.Event()})
    async with Runtime(data_dir) as rt:  # fsync: what a real deployment does
        await rt.spawn(agent, "find x", execution_id=execution_id)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:3])
