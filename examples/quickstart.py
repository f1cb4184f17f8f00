"""perdure quickstart: a durable agent with a tool that needs a person's approval.

Runs with no API key on a scripted model; set OPENAI_API_KEY (and optionally
OPENAI_BASE_URL / PERDURE_MODEL for an OpenAI-compatible server) to use a real one.

    python examples/quickstart.py [DATA_DIR]

Every LLM call and tool call below is a durable step in DATA_DIR (default
./perdure-data). Inspect it afterwards with the perdure command, which the install put
beside this Python (.venv/bin/perdure; plain ``perdure`` once the venv is activated):

    .venv/bin/perdure --data-dir ./perdure-data status
"""

from __future__ import annotations

import os
import shlex
import sys

from perdure import Agent, Budget, Runtime, current_idempotency_key, tool
from perdure.cli import console_command
from perdure.providers import Provider, Scripted


@tool("get_weather", description="Get the current weather for a city")
def get_weather(city: str) -> dict:
    """Current weather.

    Args:
        city: City name, e.g. "Paris".
    """
    return {"city": city, "forecast": "sunny", "celsius": 21}


@tool("transfer_funds", description="Move money between two accounts", requires_confirmation=True)
def transfer_funds(src: str, dst: str, amount: float) -> dict:
    """Move ``amount`` from ``src`` to ``dst``; the bank deduplicates by idempotency key."""
    return {"moved": amount, "from": src, "to": dst, "idempotency_key": current_idempotency_key()}


def model() -> Provider:
    """A real model when OPENAI_API_KEY is set, else a scripted one."""
    if os.environ.get("OPENAI_API_KEY"):
        from perdure.providers import OpenAI

        return OpenAI(os.environ.get("PERDURE_MODEL", "gpt-4o-mini"))
    return Scripted(
        [
            Scripted.call("get_weather", city="Paris"),
            Scripted.call("transfer_funds", src="checking", dst="savings", amount=50.0),
            "It is sunny and 21°C in Paris, and $50 moved from checking to savings.",
        ]
    )


agent = Agent(
    "assistant",
    instructions="You are a careful assistant. Use the tools; never move money unasked.",
    tools=[get_weather, transfer_funds],
    llm=model(),
    budget=Budget(max_dollars=0.50, max_llm_calls=10),
)


def main() -> None:
    data_dir = sys.argv[1] if len(sys.argv) > 1 else "./perdure-data"
    # Registered at open, so an execution a previous run left unfinished resumes too.
    with Runtime(data_dir, agents=[agent]) as rt:
        r = rt.run(agent, "What's the weather in Paris? Then move $50 from checking to savings.")
        print(f"execution {r.execution_id}: {r.status}")
        if r.is_suspended and r.suspend_reason.kind == "approval":
            reason = r.suspend_reason
            call = f"{reason.tool}({reason.arguments})"
            print(f"  waiting for approval {reason.confirmation_id}: {call}")
            print(f"  approving it (a person would: '{console_command()} approve ID CID')")
            rt.approve(r.execution_id, reason.confirmation_id, note="ok from the quickstart")
            r = rt.resume(r.execution_id)
        print(f"execution {r.execution_id}: {r.status}")
        print(f"  output: {r.output}")
        u = r.usage
        print(
            f"  usage: {u.llm_calls} LLM calls, {u.tool_calls} tool calls, "
            f"{u.total_tokens} tokens, ${u.dollars:.4f}"
        )
        # The command as it works from here: .venv/bin/perdure unless the venv is active.
        command = f"{console_command()} --data-dir {shlex.quote(data_dir)}"
        print(f"\nsee every step:  {command} steps {r.execution_id}")


if __name__ == "__main__":
    main()
