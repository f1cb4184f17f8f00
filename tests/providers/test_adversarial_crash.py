"""A process SIGKILLed while a tool call is streaming in: the half-seen call never runs.

The consumer of ``rt.stream`` has already been shown the first piece of a tool call
when the process dies. Nothing of that call is in the log (only the completed message
is recorded), so on restart the model call is made again -- and this time the model
asks for something else. Only what the model finally answered may run, once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "openai", reason="the optional 'openai' extra is not installed (pip install '.[dev]')"
)

from tests.support.http_server import Gate, RecordedRequest
from tests.support.openai_server import OpenAIServer, completion

ROOT = Path(__file__).resolve().parents[2]

WORKER = """
import json, os, signal, sys
import anyio
from perdure import Agent, Result, Runtime, tool
from perdure.providers import OpenAI, RetryPolicy, TextDelta, ToolCallDelta

DATA_DIR, BASE_URL, SIDE, CRASH = sys.argv[1:5]

@tool
def lookup(topic: str) -> str:
    \"\"\"Look a topic up.\"\"\"
    with open(SIDE, "a") as f:
        f.write(topic + "\\n")
    return topic + ": found"

llm = OpenAI("gpt-test", base_url=BASE_URL, api_key="sk-test", retry=RetryPolicy(max_attempts=1))
agent = Agent("researcher", instructions="Look it up.", tools=[lookup], llm=llm)

def emit(**fields):
    print(json.dumps(fields), flush=True)

async def main():
    async with Runtime(DATA_DIR, agents=[agent]) as rt:
        async for item in rt.stream(agent, "Research something.", execution_id="t-1"):
            if isinstance(item, ToolCallDelta):
                emit(call=[item.index, item.id, item.name])
                if CRASH == "on-first-call-piece":
                    os.kill(os.getpid(), signal.SIGKILL)
            elif isinstance(item, TextDelta):
                emit(delta=item.text)
            elif isinstance(item, Result):
                emit(result=[item.status, item.output, item.usage.llm_calls])

anyio.run(main)
"""


def turn_of(request: RecordedRequest) -> int:
    return sum(1 for m in request.json["messages"] if m["role"] == "assistant")


def run_worker(data: Path, base_url: str, side: Path, crash: str) -> tuple[int, list[Any]]:
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(data), base_url, str(side), crash],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()]


def test_a_crash_while_a_tool_call_streams_in_runs_only_the_call_finally_answered(
    tmp_path: Path,
) -> None:
    # role chunk, "Checking.", then the head of the call: the server waits there.
    gate = Gate(after=3)
    served: list[int] = []

    def handler(request: RecordedRequest) -> Any:
        turn = turn_of(request)
        served.append(turn)
        if turn == 0 and len(served) == 1:
            cats = completion("Checking.", [("call_cats", "lookup", {"topic": "cats"})])
            return dataclasses.replace(cats, gate=gate)
        if turn == 0:
            return completion("Checking.", [("call_dogs", "lookup", {"topic": "dogs"})])
        return completion("Dogs: found.")

    data, side = tmp_path / "data", tmp_path / "side.txt"
    with OpenAIServer(handler) as server:
        code, lines = run_worker(data, server.base_url, side, "on-first-call-piece")
        assert code == -signal.SIGKILL and gate.reached.is_set()
        assert lines == [{"delta": "Checking."}, {"call": [0, "call_cats", "lookup"]}]
        assert not side.exists()  # shown, never run

        code, lines = run_worker(data, server.base_url, side, "none")
        assert code == 0
        assert served == [0, 0, 1]  # only the interrupted call again, then the next one
        assert {"call": [0, "call_dogs", "lookup"]} in lines
        assert lines[-1] == {"result": ["completed", "Dogs: found.", 2]}

        code, lines = run_worker(data, server.base_url, side, "none")  # replay
        assert code == 0 and lines == [{"result": ["completed", "Dogs: found.", 2]}]
        assert served == [0, 0, 1]
    assert side.read_text().split() == ["dogs"]
