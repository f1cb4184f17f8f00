"""Run an agent on the real OpenAI provider against a local server, maybe crash.

    python -m tests.runtime.provider_worker DATA_DIR BASE_URL MODE CRASH

MODE ``run`` runs execution ``o-1`` to the end; ``stream`` consumes ``rt.stream`` for
execution ``s-1``. CRASH:
- ``tool:N``: SIGKILL inside the N-th ``lookup`` call (after its side effect);
- ``midstream:N``: SIGKILL after the first text piece of the N-th streamed model call;
- ``none``.
Prints the final result as one JSON line; streamed pieces as ``{"delta": ...}`` lines.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import anyio

from perdure import Agent, Result, Runtime, tool
from perdure.providers import OpenAI, RetryPolicy, TextDelta

DATA_DIR, BASE_URL, MODE, CRASH = sys.argv[1:5]
SIDE = os.environ.get("PERDURE_SIDE_FILE", "")
counts = {"tool": 0, "llm": 0}


def crash_if(kind: str, counter: str) -> None:
    if CRASH.startswith(kind + ":") and counts[counter] == int(CRASH.split(":")[1]):
        os.kill(os.getpid(), signal.SIGKILL)


@tool
def lookup(topic: str) -> str:
    """Look a topic up."""
    counts["tool"] += 1
    with open(SIDE, "a") as f:
        f.write(topic + "\n")
    crash_if("tool", "tool")
    return f"{topic}: found"


agent = Agent(
    "researcher",
    instructions="Look things up, then summarise.",
    tools=[lookup],
    llm=OpenAI("gpt-test", base_url=BASE_URL, api_key="sk-test", retry=RetryPolicy(max_attempts=1)),
)


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def summary(r: Result) -> dict[str, Any]:
    return {
        "status": r.status,
        "output": r.output,
        "tools": [m.content for m in r.transcript if m.role == "tool"],
        "llm_calls": r.usage.llm_calls,
    }


async def main() -> None:
    async with Runtime(DATA_DIR, agents=[agent]) as rt:
        if MODE == "run":
            r = await rt.run(agent, "Research cats and dogs.", execution_id="o-1")
            emit(result=summary(r))
            return
        seen_in_call = False
        async for item in rt.stream(agent, "Research cats and dogs.", execution_id="s-1"):
            if isinstance(item, TextDelta):
                emit(delta=item.text)
                if not seen_in_call:
                    seen_in_call = True
                    counts["llm"] += 1
                    crash_if("midstream", "llm")
            elif isinstance(item, Result):
                emit(result=summary(item))
            elif isinstance(item, dict) and item.get("kind") == "llm":
                seen_in_call = False
                emit(step=item["step"])


if __name__ == "__main__":
    anyio.run(main)
