"""Human in the loop: an agent waits for approval, a person approves from outside.

    python examples/approval.py [DATA_DIR]          # approve it yourself from another terminal
    python examples/approval.py [DATA_DIR] --auto   # the script runs that command for you

This process owns the data dir and runs the agent. When the agent wants to issue a
refund it suspends: no task, no memory, just its log. It prints the command to run; a
person runs it from any terminal (the CLI writes the approval into the data dir as a
client while this process owns it). This process notices within milliseconds, and the
execution resumes by itself, runs the refund exactly once, and finishes.
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
import time

import anyio

from perdure import Agent, Result, Runtime, current_idempotency_key, tool
from perdure.cli import console_command
from perdure.providers import Scripted


@tool("issue_refund", requires_confirmation=True)
def issue_refund(order: str, amount: float) -> str:
    """Refund an order (a person must approve first)."""
    return f"refunded ${amount:.2f} on {order} (idempotency key {current_idempotency_key()})"


agent = Agent(
    "support",
    instructions="Refund damaged orders after a person approves.",
    tools=[issue_refund],
    llm=Scripted(
        [
            Scripted.call("issue_refund", order="A-1001", amount=79.0),
            "The refund of $79.00 for order A-1001 is done.",
        ]
    ),
)


async def main(data_dir: str, auto: bool) -> None:
    async with Runtime(data_dir, agents=[agent]) as rt:
        resumed = anyio.Event()

        @rt.on_complete
        def done(result: Result) -> None:
            resumed.set()

        r = await rt.run(agent, "Order A-1001 arrived broken; refund it.")
        if not r.is_suspended or r.suspend_reason is None:
            print(f"unexpected: {r.status}")
            return
        reason = r.suspend_reason
        # The perdure command as it works from here (.venv/bin/perdure unless the venv
        # is activated), so the line printed below can be pasted as it is.
        command = [
            *shlex.split(console_command()),
            "--data-dir",
            data_dir,
            "approve",
            r.execution_id,
            reason.confirmation_id,
        ]
        print(f"execution {r.execution_id} is suspended: {reason.tool}({reason.arguments})")
        print("it holds no task now. To approve it, from any terminal run:")
        print(f"  {shlex.join(command)}")
        command += ["--note", "checked the photos"]
        started = time.perf_counter()
        if auto:
            print(f"(--auto: running  {shlex.join(command)})")
            await anyio.run_process(command, check=True, stdout=None)
        await resumed.wait()
        print(f"auto-resumed {time.perf_counter() - started:.2f}s after the approval was sent")
        r = await rt.result(r.execution_id)
        print(f"{r.status}: {r.output}")
        print(next(m.content for m in r.transcript if m.role == "tool"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", nargs="?", default=None)
    parser.add_argument("--auto", action="store_true", help="approve from a subprocess")
    args = parser.parse_args()
    anyio.run(main, args.data_dir or tempfile.mkdtemp(prefix="perdure-approval-"), args.auto)
