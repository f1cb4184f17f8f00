"""A service owning a data dir, for the CLI tests.

    python tests/cli/owner.py DIR [--spawn AGENT ID PROMPT] [--without AGENT]


Opens a Runtime on DIR with every agent of ``tests.cli.agents`` registered (but the one
named by ``--without``), optionally spawns one execution, and reports on stdout, one
flushed line per event:

    ready PID                       the runtime is open (it owns DIR, its inbox is tailed)
    completed ID / suspended ID KIND / failed ID / cancelled ID    as executions settle

It runs until its stdin is closed, then closes the runtime cleanly. The event loop is
``$PERDURE_TEST_BACKEND`` (``asyncio`` by default, or ``trio``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from perdure import Result, Runtime
from tests.cli import agents


def say(*words: object) -> None:
    """One line to the parent, flushed at once (it may kill us at any moment)."""
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--spawn", nargs=3, metavar=("AGENT", "ID", "PROMPT"))
    parser.add_argument("--without", metavar="AGENT", help="leave this agent unregistered")
    args = parser.parse_args()
    registered = [a for a in agents.ALL if a.name != args.without]
    async with Runtime(
        args.data_dir, agents=registered, durability="process", shutdown_timeout=2.0
    ) as rt:

        @rt.on_complete
        def completed(result: Result) -> None:
            say("completed", result.execution_id)

        @rt.on_suspend
        def suspended(result: Result, reason: object) -> None:
            say("suspended", result.execution_id, getattr(reason, "kind", "?"))

        @rt.on_fail
        def failed(result: Result, error: object) -> None:
            say("failed", result.execution_id)

        @rt.on_cancel
        def cancelled(result: Result) -> None:
            say("cancelled", result.execution_id)

        say("ready", os.getpid())
        if args.spawn:
            name, eid, prompt = args.spawn
            await rt.spawn(name, prompt, execution_id=eid)
        await anyio.to_thread.run_sync(sys.stdin.read)


if __name__ == "__main__":
    anyio.run(main, backend=os.environ.get("PERDURE_TEST_BACKEND", "asyncio"))
