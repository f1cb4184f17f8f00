"""Durable timers: an agent that comes back to a job later, by itself.

    python examples/reminder.py [DATA_DIR] [--seconds N]

The agent's ``follow_up`` tool waits N seconds (3 by default; a real agent would wait
a day) with ``perdure.sleep`` before it checks the order. While it waits, the execution
is suspended with reason ``timer``: no task, no memory beyond its index entry. The
runtime fires the timer when the time comes and the execution carries on by itself.

Stop this script with Ctrl-C while it waits and run it again with the same DATA_DIR:
the same execution is picked up, and its timer fires at the deadline it was given (at
once if that has passed while nothing ran). ``perdure --data-dir DATA_DIR status``
shows it waiting meanwhile.
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
import time

from perdure import Agent, Runtime, sleep, tool
from perdure.cli import console_command
from perdure.providers import Scripted


def build_agent(seconds: float) -> Agent:
    """The agent, with its wait of ``seconds`` before the follow-up."""

    @tool("follow_up")
    def follow_up(order: str) -> str:
        """Check an order again once the courier has had time to deliver it."""
        # First in the tool: the code before a sleep runs again when the timer fires.
        sleep(seconds)
        return f"order {order}: delivered (checked at {time.strftime('%H:%M:%S')})"

    return Agent(
        "courier-watch",
        instructions="Follow up on orders once the courier has had time.",
        tools=[follow_up],
        llm=Scripted(
            [
                Scripted.call("follow_up", order="A-1001"),
                "Order A-1001 has been delivered; no need to chase the courier.",
            ]
        ),
    )


def main(data_dir: str, seconds: float) -> None:
    """Run the follow-up, show it sleeping, and wait until the timer has woken it."""
    agent = build_agent(seconds)
    with Runtime(data_dir, agents=[agent]) as rt:
        r = rt.run(agent, "Follow up on order A-1001.", execution_id="follow-up-A-1001")
        reason = r.suspend_reason
        if r.is_suspended and reason is not None and reason.kind == "timer":
            until = time.strftime("%H:%M:%S", time.localtime(reason.until))
            print(f"execution {r.execution_id} sleeps until {until}; it holds no task now")
            status = [*shlex.split(console_command()), "--data-dir", data_dir, "status"]
            print(f"  {shlex.join(status)}  shows it waiting")
            r = rt.wait(r.execution_id, until="finished")
            print("the timer fired and the execution carried on by itself")
        print(f"{r.status}: {r.output}")
        print(next(m.content for m in r.transcript if m.role == "tool"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", nargs="?", default=None)
    parser.add_argument("--seconds", type=float, default=3.0, help="how long the tool waits")
    args = parser.parse_args()
    main(args.data_dir or tempfile.mkdtemp(prefix="perdure-reminder-"), args.seconds)
