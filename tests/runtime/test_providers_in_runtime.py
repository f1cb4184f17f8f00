"""Providers through the runtime: the real openai client against a local server.

Crash tests run the agent in a subprocess that SIGKILLs itself; the server, in this
process, counts every request, so "no LLM request for a completed step" is checked on
the wire.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure import Agent, Result, Runtime, tool
from perdure.events import decode, execution_stream
from perdure.providers import Fallback, LLMRequest, OpenAI, RetryPolicy, Scripted, TextDelta
from tests.support.http_server import Gate, RecordedRequest
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
    # The second model call stops after its first text piece until the test ends: the
    # worker (which kills itself on that piece) dies with the call surely unfinished.
    gate = Gate(after=2)  # the role chunk, then "Now"
    gated: list[RecordedRequest] = []

    def handler(request: RecordedRequest) -> Any:
        reply = research(request)
        if turn_of(request) == 1 and not gated:
            gated.append(request)
            return dataclasses.replace(reply, gate=gate)
        return reply

    with OpenAIServer(handler) as server:
        code, lines = worker(data, server.base_url, "stream", "midstream:2", side)
        assert code == -signal.SIGKILL and gate.reached.is_set()
        deltas = [x["delta"] for x in lines if "delta" in x]
        assert "".join(deltas) == "Let me look up cats.Now"
        assert [turn_of(r) for r in server.chat_requests] == [0, 1]
        assert all(r.json.get("stream") for r in server.chat_requests)
        code, lines = worker(data, server.base_url, "stream", "none", side)
        assert code == 0
        # only the interrupted call was made again, then the next one, both streamed
        assert [turn_of(r) for r in server.chat_requests] == [0, 1, 1, 2]
        resumed = "".join(x["delta"] for x in lines if "delta" in x)
        assert resumed == "Now dogs.Cats and dogs: both found."
        assert [x["step"] for x in lines if "step" in x] == [3, 5]
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
async def test_a_stream_cut_after_some_deltas_is_asked_again_whole(tmp_path: Path) -> None:
    """A dropped connection mid-stream is retried (the consumer is told), not a failure."""
    with OpenAIServer(lambda r: completion("Hello there, friend.")) as server:
        server.push(completion("Hello there, friend.", drop_after=3))  # role, Hello, there
        llm = OpenAI(
            "gpt-test",
            base_url=server.base_url,
            api_key="sk-test",
            retry=RetryPolicy(max_attempts=2, sleep=_no_sleep),
        )
        agent = Agent("retrier", llm=llm)
        async with Runtime(tmp_path / "data", durability="process") as rt:
            items = [i async for i in rt.stream(agent, "hi", execution_id="rs-1")]
        assert len(server.chat_requests) == 2
    kinds = [
        "delta" if isinstance(i, TextDelta) else i["event"] if isinstance(i, dict) else "result"
        for i in items
    ]
    retry = kinds.index("retrying")
    assert kinds[:retry] == ["delta", "delta"] and kinds[-2:] == ["step", "result"]
    event = items[retry]
    assert event["step"] == 1 and event["attempt"] == 2 and "connection" in event["error"]
    assert "".join(i.text for i in items[retry:] if isinstance(i, TextDelta)) == (
        "Hello there, friend."
    )
    final = items[-1]
    assert final.status == "completed" and final.output == "Hello there, friend."
    assert final.usage.llm_calls == 1


@pytest.mark.anyio
async def test_a_stream_cut_again_and_again_fails_within_the_retry_policy(
    tmp_path: Path,
) -> None:
    with OpenAIServer(lambda r: completion("Hello there, friend.", drop_after=3)) as server:
        llm = OpenAI(
            "gpt-test",
            base_url=server.base_url,
            api_key="sk-test",
            retry=RetryPolicy(max_attempts=3, sleep=_no_sleep),
        )
        async with Runtime(tmp_path / "data", durability="process") as rt:
            items = [i async for i in rt.stream(Agent("r", llm=llm), "hi", execution_id="rs-2")]
        assert len(server.chat_requests) == 3
    assert [i["attempt"] for i in items if isinstance(i, dict)] == [2, 3]
    final = items[-1]
    assert final.status == "failed" and final.error["type"] == "ProviderUnavailableError"


def _interruptible(gates: dict[str, anyio.Event]) -> Agent:
    @tool
    async def lookup(topic: str) -> str:
        """Blocks while the test holds the gate."""
        gates["started"].set()
        await gates["release"].wait()
        return f"{topic}: found"

    def script(request: LLMRequest) -> Any:
        if any(m.role == "tool" for m in request.messages):
            return "Cats are found and fine."
        return Scripted.call("lookup", topic="cats")

    return Agent("resumable", tools=[lookup], llm=Scripted(script))


@pytest.mark.anyio
async def test_streaming_an_execution_that_recovery_resumed_first(tmp_path: Path) -> None:
    """The engine looks its stream sink up when it needs it, not once when it starts."""
    gates = {"started": anyio.Event(), "release": anyio.Event()}
    async with Runtime(tmp_path / "data", durability="process", shutdown_timeout=0.05) as rt:
        await rt.spawn(_interruptible(gates), "cats?", execution_id="rr-1")
        await gates["started"].wait()
    # closed inside the tool; reopened, recovery re-runs the tool before anyone streams
    gates = {"started": anyio.Event(), "release": anyio.Event()}
    agent = _interruptible(gates)
    items: list[Any] = []
    entered = anyio.Event()

    async def consume() -> None:
        entered.set()  # the sink is registered before this task first yields
        async for item in rt.stream(agent, "cats?", execution_id="rr-1"):
            items.append(item)

    async with Runtime(tmp_path / "data", durability="process", agents=[agent]) as rt:
        with anyio.fail_after(10):
            await gates["started"].wait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await entered.wait()
                gates["release"].set()
    text = "".join(i.text for i in items if isinstance(i, TextDelta))
    assert text == "Cats are found and fine."
    assert [(i["kind"], i["step"]) for i in items if isinstance(i, dict)] == [
        ("tool", 2),
        ("llm", 3),
    ]
    assert isinstance(items[-1], Result) and items[-1].output == "Cats are found and fine."


@pytest.mark.anyio
async def test_a_stream_whose_execution_finished_before_spawn_returned_loses_nothing(
    tmp_path: Path,
) -> None:
    llm = Scripted(["Quick answer, all of it."])
    agent = Agent("quick", llm=llm)
    async with Runtime(tmp_path / "data", durability="process") as rt:
        spawn = rt.spawn

        async def spawn_then_settle(*args: Any, **kwargs: Any) -> Any:
            handle = await spawn(*args, **kwargs)
            await rt.wait(handle.execution_id)  # finished before stream() looks again
            return handle

        rt.spawn = spawn_then_settle  # type: ignore[method-assign]
        items = [i async for i in rt.stream(agent, "quick?", execution_id="q-1")]
    assert "".join(i.text for i in items if isinstance(i, TextDelta)) == (
        "Quick answer, all of it."
    )
    assert isinstance(items[-1], Result) and items[-1].status == "completed"
    assert llm.calls == 1


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


@pytest.mark.anyio
@pytest.mark.parametrize("streaming", [False, True], ids=["complete", "stream"])
async def test_a_rejected_api_key_fails_the_execution_and_is_never_recorded_or_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, streaming: bool
) -> None:
    key = "sk-live-0123456789abcdefghijklmnopqrstuvwxyz"
    caplog.set_level(logging.DEBUG)  # every logger: perdure's, the SDK's, the HTTP stack's
    with OpenAIServer(lambda r: error(401, f"Incorrect API key provided: {key}.")) as server:
        agent = Agent("keyed", llm=OpenAI("gpt-test", base_url=server.base_url, api_key=key))
        async with Runtime(tmp_path / "data", durability="process") as rt:
            if streaming:
                r = [i async for i in rt.stream(agent, "hi", execution_id="k-1")][-1]
            else:
                r = await rt.run(agent, "hi", execution_id="k-1")
            recorded = [repr(x.payload) async for x in rt.log.read(execution_stream("k-1"))]
        assert len(server.chat_requests) == 1  # terminal: not retried
    assert r.status == "failed" and r.error["type"] == "AuthenticationError"
    assert r.error["status"] == 401 and "[REDACTED]" in r.error["message"]
    assert any("execution.failed" in t or "AuthenticationError" in t for t in recorded)
    logged = [rec.getMessage() for rec in caplog.records]
    assert any("k-1" in line and "authentication failed" in line for line in logged)
    for text in (*recorded, *logged, repr(r.error), repr(agent.llm)):
        assert key not in text and key[8:24] not in text
