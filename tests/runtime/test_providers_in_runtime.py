"""Providers through the runtime: the real openai client against a local server.

Crash tests run the agent in a subprocess that SIGKILLs itself; the server, in this
process, counts every request, so "no LLM request for a completed step" is checked on
the wire.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from perdure import Agent, Result, Runtime, tool
from perdure.events import decode, execution_stream
from perdure.providers import Fallback, OpenAI, RetryPolicy, Scripted, TextDelta
from tests.support.http_server import RecordedRequest
from tests.support.openai_server import OpenAIServer, completion, error

ROOT = Path(__file__).resolve().parents[2]


def research(request: RecordedRequest) -> Any:
    """Deterministic by conversation: look up cats, then dogs, then summarise."""
    results = [m for m in request.json["messages"] if m["role"] == "tool"]
    if not results:
        return completion("Let me look up cats.", [("call_1", "lookup", {"topic": "cats"})])
    if len(results) == 1:
        return completion("Now dogs.", [("call_2", "lookup", {"topic": "dogs"})])
    return completion("Cats and dogs: both found.")


def turn_of(request: RecordedRequest) -> int:
    return sum(1 for m in request.json["messages"] if m["role"] == "assistant")


def worker(
    data_dir: Path, base_url: str, mode: str, crash: str, side: Path
) -> tuple[int, list[Any]]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.runtime.provider_worker",
            str(data_dir),
            base_url,
            mode,
            crash,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PERDURE_SIDE_FILE": str(side)},
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()]


def test_an_openai_agent_killed_mid_run_resumes_without_repeating_requests(
    tmp_path: Path,
) -> None:
    with OpenAIServer(research) as server:
        code, _ = worker(tmp_path / "ref", server.base_url, "run", "none", tmp_path / "ref.txt")
        reference = _  # the uncrashed run
        assert code == 0 and len(server.chat_requests) == 3
    with OpenAIServer(research) as server:
        data, side = tmp_path / "data", tmp_path / "side.txt"
        code, _ = worker(data, server.base_url, "run", "tool:2", side)
        assert code == -signal.SIGKILL
        assert [turn_of(r) for r in server.chat_requests] == [0, 1]
        code, lines = worker(data, server.base_url, "run", "none", side)
        assert code == 0
        # the resumed run asked only for the step that had not happened yet
        assert [turn_of(r) for r in server.chat_requests] == [0, 1, 2]
    assert lines == reference
    assert lines[-1]["result"]["output"] == "Cats and dogs: both found."
    # dogs was interrupted after its effect and re-run (same key); cats never again
    assert Counter(side.read_text().split()) == Counter({"cats": 1, "dogs": 2})


def test_streaming_survives_a_crash_mid_stream_and_replay_streams_nothing(
    tmp_path: Path,
) -> None:
    data, side = tmp_path / "data", tmp_path / "side.txt"
    with OpenAIServer(research) as server:
        code, lines = worker(data, server.base_url, "stream", "midstream:2", side)
        assert code == -signal.SIGKILL
        deltas = [x["delta"] for x in lines if "delta" in x]
        assert "".join(deltas).startswith("Let me look up cats.")
        assert [turn_of(r) for r in server.chat_requests] == [0, 1]
        assert all(r.json.get("stream") for r in server.chat_requests)
        code, lines = worker(data, server.base_url, "stream", "none", side)
        assert code == 0
        # only the interrupted call was made again, then the next one
        assert [turn_of(r) for r in server.chat_requests] == [0, 1, 1, 2]
        result = lines[-1]["result"]
        assert result["status"] == "completed" and result["output"] == "Cats and dogs: both found."
        assert result["llm_calls"] == 3
        # replaying the completed execution streams nothing and calls nothing
        code, lines = worker(data, server.base_url, "stream", "none", side)
        assert code == 0 and [x for x in lines if "delta" in x] == []
        assert lines[-1]["result"] == result
        assert len(server.chat_requests) == 4
    assert Counter(side.read_text().split()) == Counter({"cats": 1, "dogs": 1})


@pytest.mark.anyio
async def test_a_fallback_chain_serves_when_the_primary_fails(tmp_path: Path) -> None:
    @tool
    def lookup(topic: str) -> str:
        return f"{topic}: found"

    no_wait = RetryPolicy(max_attempts=2, sleep=_no_sleep)
    with (
        OpenAIServer(lambda r: error(503, "overloaded", type="server_error")) as down,
        OpenAIServer(research) as up,
    ):
        llm = Fallback(
            [
                OpenAI("gpt-big", base_url=down.base_url, api_key="sk-a", retry=no_wait),
                OpenAI("gpt-small", base_url=up.base_url, api_key="sk-b", name="backup"),
            ]
        )
        agent = Agent("fallback", tools=[lookup], llm=llm)
        async with Runtime(tmp_path / "data", durability="process") as rt:
            r = await rt.run(agent, "Research cats and dogs.", execution_id="f-1")
            records = [decode(x) async for x in rt.log.read(execution_stream("f-1"))]
        assert len(down.chat_requests) == 6  # 3 calls x 2 attempts, all refused
        assert [turn_of(x) for x in up.chat_requests] == [0, 1, 2]
    assert r.status == "completed" and r.output == "Cats and dogs: both found."
    # usage names the member that served and the model the server says it used
    assert set(r.usage.by_model) == {"backup/gpt-test"}
    served = [e.response["provider"] for e in records if e.type == "llm.completed"]
    assert served == ["backup"] * 3


async def _no_sleep(seconds: float) -> None:
    return None


@pytest.mark.anyio
async def test_streaming_through_the_runtime(tmp_path: Path) -> None:
    @tool
    def lookup(topic: str) -> str:
        return f"{topic}: found"

    llm = Scripted([Scripted.call("lookup", topic="cats"), "Cats are found and fine."])
    agent = Agent("streamer", tools=[lookup], llm=llm)
    items: list[Any] = []
    async with Runtime(tmp_path / "data", durability="process") as rt:
        async for item in rt.stream(agent, "cats?", execution_id="st-1"):
            items.append(item)
        again = [item async for item in rt.stream(agent, "cats?", execution_id="st-1")]
    text = "".join(i.text for i in items if isinstance(i, TextDelta))
    assert text == "Cats are found and fine."
    steps = [(i["kind"], i["step"]) for i in items if isinstance(i, dict)]
    assert steps == [("llm", 1), ("tool", 2), ("llm", 3)]
    final = items[-1]
    assert isinstance(final, Result) and final.output == "Cats are found and fine."
    assert llm.calls == 2
    assert len(again) == 1 and isinstance(again[0], Result)  # nothing streams on replay
    assert again[0].output == final.output and llm.calls == 2
