"""The step engine through a real Runtime: steps, tools, keys, ids, bad input, replay."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from perdure import (
    Agent,
    Budget,
    InvalidExecutionIdError,
    PromptMismatchError,
    Result,
    Runtime,
    RuntimeClosedError,
    ToolError,
    current_idempotency_key,
    tool,
)
from perdure.events import SignalIgnored, encode, execution_stream, record_types
from perdure.log import ANY, MemoryLog
from perdure.providers import (
    CallableProvider,
    LLMRequest,
    Message,
    Pricing,
    RateLimitError,
    Scripted,
    ToolCall,
)
from perdure.providers.types import LLMResponse, Usage

pytestmark = pytest.mark.anyio


async def records(rt: Any, eid: str) -> list[Any]:
    return [r async for r in rt.log.read(execution_stream(eid))]


async def test_a_run_records_every_step_and_completes(open_runtime: Any) -> None:
    seen: list[tuple[str, str]] = []

    @tool
    def get_weather(city: str) -> dict:
        seen.append(("weather", current_idempotency_key()))
        return {"city": city, "celsius": 21}

    llm = Scripted([Scripted.call("get_weather", city="Paris"), "Sunny, 21."])
    agent = Agent("weather", instructions="Be brief.", tools=[get_weather], llm=llm)
    async with open_runtime() as rt:
        r = await rt.run(agent, "Weather in Paris?", execution_id="w-1")
        assert r.status == "completed" and r.output == "Sunny, 21."
        assert r.usage.llm_calls == 2 and r.usage.tool_calls == 1
        assert r.usage.total_tokens == 30 and r.steps == 3
        types = [rec.type for rec in await records(rt, "w-1")]
    assert types == [
        "execution.started",
        "llm.completed",
        "tool.started",
        "tool.completed",
        "llm.completed",
        "execution.completed",
    ]
    # one call; its idempotency key is derived from the execution id and its step
    assert len(seen) == 1 and seen[0][1].startswith("w-1:2:")
    # the model saw the system prompt, the user prompt and the tool result
    second = llm.requests[1]
    assert [m.role for m in second.messages] == ["system", "user", "assistant", "tool"]
    assert second.messages[0].content == "Be brief."
    assert second.messages[3].content == '{"city": "Paris", "celsius": 21}'


async def test_spawn_returns_once_the_first_record_is_durable(open_runtime: Any) -> None:
    release = anyio.Event()

    @tool
    async def slow() -> str:
        await release.wait()
        return "done"

    agent = Agent("slow", tools=[slow], llm=Scripted([Scripted.call("slow"), "ok"]))
    async with open_runtime() as rt:
        handle = await rt.spawn(agent, "go")
        info = await rt.log.stream_info(execution_stream(handle.execution_id))
        assert info is not None and info.last_seq >= 1
        release.set()
        assert (await handle.result()).output == "ok"


async def test_tool_calls_in_one_turn_run_concurrently_and_failures_stay_local(
    open_runtime: Any,
) -> None:
    a_started, b_started = anyio.Event(), anyio.Event()

    @tool
    async def a() -> str:
        a_started.set()
        await b_started.wait()  # deadlocks unless b runs at the same time
        return "a"

    @tool
    async def b() -> str:
        b_started.set()
        await a_started.wait()
        return "b"

    @tool
    async def boom() -> str:
        raise ValueError("kaput")

    llm = Scripted([[Scripted.call("b"), Scripted.call("boom"), Scripted.call("a")], "done"])
    agent = Agent("par", tools=[a, b, boom], llm=llm)
    async with open_runtime() as rt:
        with anyio.fail_after(10):
            r = await rt.run(agent, "go")
    assert r.status == "completed"
    tool_messages = [m for m in r.transcript if m.role == "tool"]
    # in call order (b, boom, a), whatever the completion order; the failure is marked
    assert [(m.name, m.is_error) for m in tool_messages] == [
        ("b", False),
        ("boom", True),
        ("a", False),
    ]
    assert tool_messages[1].content == "ERROR (ValueError): kaput"


async def test_sync_tools_run_in_worker_threads(open_runtime: Any) -> None:
    threads: list[int] = []

    @tool
    def where() -> str:
        threads.append(threading.get_ident())
        return "here"

    agent = Agent("t", tools=[where], llm=Scripted([Scripted.call("where"), "ok"]))
    async with open_runtime() as rt:
        await rt.run(agent, "go")
    assert threads and threads[0] != threading.get_ident()


async def test_idempotency_key_is_stable_across_retries_and_unique_per_call(
    open_runtime: Any,
) -> None:
    keys: list[str] = []
    attempts = {"n": 0}

    @tool(retries=2, retry_delay=0.001)
    def flaky(x: int) -> int:
        keys.append(current_idempotency_key())
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise ConnectionError("try again")
        return x

    @tool
    def other(x: int) -> int:
        keys.append(current_idempotency_key())
        return x

    llm = Scripted([[Scripted.call("flaky", x=1), Scripted.call("other", x=2)], "ok"])
    async with open_runtime() as rt:
        r = await rt.run(Agent("k", tools=[flaky, other], llm=llm), "go", execution_id="keys")
    assert r.status == "completed"
    flaky_keys = [k for k in keys if k.startswith("keys:2:")]
    other_keys = [k for k in keys if k.startswith("keys:3:")]
    assert len(flaky_keys) == 3 and len(set(flaky_keys)) == 1  # three attempts, one key
    assert len(other_keys) == 1 and len(keys) == 4


async def test_bad_input_is_recorded_and_returned_to_the_model(open_runtime: Any) -> None:
    @tool(timeout=0.05)
    async def sleepy() -> str:
        await anyio.sleep(10)
        return "never"

    @tool
    def strict(n: int) -> int:
        return n

    @tool
    def raises() -> None:
        raise ToolError("card declined")

    turn = [
        Scripted.call("nope"),
        Scripted.call("strict", n="three"),
        Scripted.call("strict", '{"n": 1'),  # malformed JSON from the model
        Scripted.call("raises"),
        Scripted.call("sleepy"),
    ]
    llm = Scripted([turn, "handled"])
    async with open_runtime() as rt:
        r = await rt.run(Agent("bad", tools=[sleepy, strict, raises], llm=llm), "go")
    assert r.status == "completed"
    results = [m for m in r.transcript if m.role == "tool"]
    assert all(m.is_error for m in results)
    texts = [m.content for m in results]
    assert "UnknownTool" in texts[0] and "no tool named 'nope'" in texts[0]
    assert "arguments.n: expected integer" in texts[1]
    assert "must be a JSON object" in texts[2]
    assert texts[3] == "ERROR (ToolError): card declined"
    assert "did not finish within 0.05s" in texts[4]


async def test_provider_errors_fail_the_execution_at_once_with_a_typed_error(
    open_runtime: Any,
) -> None:
    llm = Scripted([RateLimitError("slow down", retry_after=1.0)])
    async with open_runtime() as rt:
        with anyio.fail_after(10):
            r = await rt.run(Agent("e", llm=llm), "go", execution_id="err-1")
    assert r.status == "failed"
    assert r.error is not None and r.error["type"] == "RateLimitError"
    assert r.error["provider"] == "scripted"


async def test_execution_ids(open_runtime: Any) -> None:
    agent = Agent("ids", llm=Scripted(["one", "two"]))
    async with open_runtime() as rt:
        for bad in ("", " x", "a\nb", "x" * 300, "../../etc"):
            with pytest.raises(InvalidExecutionIdError):
                await rt.spawn(agent, "p", execution_id=bad)
        first = await rt.run(agent, "the prompt", execution_id="order-123")
        again = await rt.run(agent, "the prompt", execution_id="order-123")
        assert again.output == first.output == "one"
        with pytest.raises(PromptMismatchError) as info:
            await rt.spawn(agent, "another prompt", execution_id="order-123")
        assert "the prompt" in str(info.value) and "another prompt" in str(info.value)


async def test_an_existing_id_spawned_with_another_budget_or_metadata_is_refused(
    open_runtime: Any,
) -> None:
    agent = Agent("ids", llm=Scripted(["one", "two"]))
    budget = Budget(max_llm_calls=5)
    async with open_runtime() as rt:
        first = await rt.run(
            agent, "p", execution_id="b-1", budget=budget, metadata={"tags": ("a", "b")}
        )
        # the same spawn again (metadata as it reads back, tuples as lists) is the same
        # execution; so is one that does not say
        again = await rt.run(
            agent, "p", execution_id="b-1", budget=budget, metadata={"tags": ["a", "b"]}
        )
        assert (await rt.run(agent, "p", execution_id="b-1")).output == again.output
        assert again.output == first.output == "one"
        with pytest.raises(PromptMismatchError) as info:
            await rt.spawn(agent, "p", execution_id="b-1", budget=Budget(max_llm_calls=50))
        message = str(info.value)
        assert "'b-1'" in message and "'max_llm_calls': 5" in message
        assert "'max_llm_calls': 50" in message and "rt.resume('b-1', budget=...)" in message
        with pytest.raises(PromptMismatchError, match="metadata"):
            await rt.spawn(agent, "p", execution_id="b-1", metadata={"tags": ["c"]})
        after = await rt.result("b-1")
    assert after.output == "one" and after.usage.llm_calls == 1  # nothing ran again


async def test_replaying_a_completed_execution_calls_and_writes_nothing(
    open_runtime: Any,
) -> None:
    ran = {"n": 0}

    @tool
    def side_effect() -> str:
        ran["n"] += 1
        return "done"

    def agent_with(llm: Scripted) -> Agent:
        return Agent("replay", tools=[side_effect], llm=llm)

    first_llm = Scripted([Scripted.call("side_effect"), "finished"])
    async with open_runtime() as rt:
        r = await rt.run(agent_with(first_llm), "go", execution_id="done-1")
        assert r.output == "finished"
    second_llm = Scripted([Scripted.call("side_effect"), "finished"])
    async with open_runtime(agents=[agent_with(second_llm)]) as rt:
        before = await rt.log.last_seq(execution_stream("done-1"))
        again = await rt.run(agent_with(second_llm), "go", execution_id="done-1")
        after = await rt.log.last_seq(execution_stream("done-1"))
    assert again.output == "finished" and again.transcript == r.transcript
    assert second_llm.calls == 0 and ran["n"] == 1 and before == after


async def test_an_llm_step_records_only_what_is_new(open_runtime: Any) -> None:
    @tool
    def echo(text: str) -> str:
        return text

    def script(request: LLMRequest) -> Any:
        n = sum(1 for m in request.messages if m.role == "assistant")
        return Scripted.call("echo", text=f"step {n:03d} " + "x" * 200) if n < 40 else "end"

    async with open_runtime() as rt:
        r = await rt.run(
            Agent("growth", tools=[echo], llm=Scripted(script, record=False), max_steps=100),
            "go",
            execution_id="grow",
        )
        assert r.status == "completed"
        sizes = [
            len(repr(rec.payload))
            for rec in await records(rt, "grow")
            if rec.type == "llm.completed"
        ]
    # the 40th answer is recorded with no more bytes than the 2nd: history is not re-stored
    assert max(sizes[1:-1]) - min(sizes[1:-1]) <= 8


async def test_engine_crashes_restart_the_actor_and_then_fail_it(open_runtime: Any) -> None:
    from perdure.providers import Pricing

    class FlakyPricing(Pricing):
        failures = 1

        def cost(self, model: str, usage: Usage) -> float | None:
            if FlakyPricing.failures > 0:
                FlakyPricing.failures -= 1
                raise RuntimeError("engine bug")
            return 0.0

    agent = Agent("crashy", llm=Scripted(["fine"]))
    async with open_runtime(pricing=FlakyPricing()) as rt:
        r = await rt.run(agent, "go")
        assert r.status == "completed"  # crashed once, restarted, replayed, carried on
        FlakyPricing.failures = 100
        with anyio.fail_after(20):
            r = await rt.run(agent, "go again")
        assert r.status == "failed"
        assert r.error is not None and "engine bug" in r.error["message"]
        assert r.error["type"] == "RuntimeError"


class _SignalSlipsIn:
    """A real log on which a signal record lands just before the first append of an
    ``execution.failed`` record, as inbox delivery can while the failure is recorded."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self.slipped = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)

    async def append(self, stream: str, records: Any, expect: Any, meta: Any = None) -> int:
        if not self.slipped and any(r.type == "execution.failed" for r in records):
            self.slipped = True
            ignored = encode(SignalIgnored("nudge", "nothing to do", "test"))
            await self._log.append(stream, [ignored], expect=ANY)
        return await self._log.append(stream, records, expect, meta)  # type: ignore[no-any-return]


async def test_a_failure_after_repeated_crashes_is_recorded_after_a_signal_that_raced_it(
    tmp_path: Any,
) -> None:
    class AlwaysBroken(Pricing):
        def cost(self, model: str, usage: Usage) -> float | None:
            raise RuntimeError("engine bug")

    log = _SignalSlipsIn(MemoryLog(record_types()))
    agent = Agent("crashy", llm=Scripted(["fine"]))
    async with Runtime(log=log, pricing=AlwaysBroken(), shutdown_timeout=2.0) as rt:  # type: ignore[arg-type]
        with anyio.fail_after(20):  # the failure used to be lost: wait() never returned
            r = await rt.run(agent, "go", execution_id="racy")
        types = [rec.type async for rec in rt.log.read(execution_stream("racy"))]
    assert log.slipped
    assert r.status == "failed" and r.error is not None and "engine bug" in r.error["message"]
    assert types[-2:] == ["signal.ignored", "execution.failed"]


async def test_custom_provider_returning_garbage_fails_clearly(open_runtime: Any) -> None:
    class Broken:
        name = "broken"
        model = "m"

        async def complete(self, request: LLMRequest) -> LLMResponse:
            raise ValueError("not a response")

        async def stream(self, request: LLMRequest) -> Any:
            raise ValueError("not a response")
            yield  # pragma: no cover

    async with open_runtime() as rt:
        r = await rt.run(Agent("b", llm=Broken()), "go")
    assert r.status == "failed" and r.error is not None
    assert r.error["type"] == "ValueError" and r.error["provider"] == "broken"


@pytest.mark.parametrize(
    ("mode", "fragment"),
    [
        ("complete", "returned a str, not an LLMResponse"),
        ("stream-event", "its stream yielded a dict, not an event"),
        ("stream-response", "returned None, not an LLMResponse"),
        ("stream-empty", "ended without a ResponseCompleted"),
        ("bad-call", "bad tool call"),
    ],
)
async def test_a_provider_returning_garbage_fails_at_once_and_is_asked_once(
    open_runtime: Any, mode: str, fragment: str
) -> None:
    from perdure.providers import ResponseCompleted, TextDelta

    class Garbage:
        name = "garbage"
        model = "m"
        calls = 0

        async def complete(self, request: LLMRequest) -> Any:
            Garbage.calls += 1
            if mode == "bad-call":
                return LLMResponse(Message("assistant", "", (ToolCall("1", "t", {1, 2}),)))  # type: ignore[arg-type]
            return "not a response"

        async def stream(self, request: LLMRequest) -> Any:
            Garbage.calls += 1
            yield TextDelta("partial ")
            if mode == "stream-event":
                yield {"text": "not an event"}
            elif mode == "stream-response":
                yield ResponseCompleted(None)  # type: ignore[arg-type]

    agent = Agent("g", llm=Garbage())
    async with open_runtime() as rt:
        with anyio.fail_after(10):
            if mode.startswith("stream"):
                items = [i async for i in rt.stream(agent, "go", execution_id="gb-1")]
                r = items[-1]
            else:
                r = await rt.run(agent, "go", execution_id="gb-1")
    assert Garbage.calls == 1  # not asked again per engine restart
    assert r.status == "failed" and r.error is not None
    assert r.error["type"] == "MalformedResponseError" and r.error["provider"] == "garbage"
    message = r.error["message"]
    assert fragment in message and "'gb-1' step 1" in message and "garbage" in message
    assert "perdure resume gb-1" in message


def test_message_types_are_plain() -> None:
    # The transcript uses the provider layer's canonical types.
    assert Message("tool", "x", tool_call_id="1").to_dict()["tool_call_id"] == "1"
    assert ToolCall("1", "t", {}).to_dict() == {"id": "1", "name": "t", "arguments": {}}


async def test_a_failed_execution_resumes_once_the_provider_is_back(open_runtime: Any) -> None:
    down = {"on": True}

    def script(request: LLMRequest) -> Any:
        if down["on"]:
            return RateLimitError("provider down", retry_after=None)
        return "back in business"

    llm = Scripted(script)
    agent = Agent("flaky", llm=llm)
    async with open_runtime() as rt:
        r = await rt.run(agent, "go", execution_id="fr-1")
        assert r.status == "failed" and r.error is not None
        assert r.error["type"] == "RateLimitError"
        down["on"] = False
        r = await rt.resume("fr-1")
    assert r is not None and r.status == "completed" and r.output == "back in business"
    assert r.usage.llm_calls == 1 and llm.calls == 2  # the failed call was not recorded


async def test_executions_of_unregistered_agents_are_left_alone_and_named(
    open_runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    _GATE["started"] = anyio.Event()
    _GATE["block"] = anyio.Event()

    def make() -> Agent:
        return Agent("orphan", tools=[gated], llm=Scripted([Scripted.call("gated"), "done"]))

    async with open_runtime(shutdown_timeout=0.05) as rt:
        await rt.spawn(make(), "go", execution_id="or-1")
        await _GATE["started"].wait()
    _GATE.clear()  # the same tool no longer blocks
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="perdure.runtime")
    async with open_runtime() as rt:  # the agent is not registered
        await rt.wait_recovered()  # recovery runs in the background once open returns
        info = await rt.executions(agent="orphan")
        assert [(e.execution_id, e.status) for e in info] == [("or-1", "running")]
        assert "or-1" not in rt._live
        [message] = [r.getMessage() for r in caplog.records if "left alone" in r.getMessage()]
        assert "'orphan'" in message and "or-1" in message and "rt.register" in message
        rt.register(make())  # registering it later resumes the execution
        r = await rt.wait("or-1")
    assert r.status == "completed" and r.output == "done"


_GATE: dict[str, Any] = {}


@tool
async def gated() -> str:
    """Blocks while a test holds the gate."""
    if "block" in _GATE:
        _GATE["started"].set()
        await _GATE["block"].wait()
    return "passed"


async def test_a_user_execution_under_a_childs_id_is_never_taken_for_the_child(
    open_runtime: Any,
) -> None:
    """Ids may contain "/": a user's ``m-1/2`` is not the child of ``m-1``'s step 2."""
    release = anyio.Event()

    @tool
    async def hold() -> str:
        await release.wait()
        return "held"

    squatter_llm = Scripted(["the squatter's answer", "the squatter's answer"])
    squatter = Agent("researcher", llm=squatter_llm)
    blocker = Agent("blocker", tools=[hold], llm=Scripted([Scripted.call("hold"), "late"]))

    def manager() -> Agent:
        researcher = Agent("researcher", llm=Scripted(["the child's answer"] * 2))
        llm = Scripted([Scripted.call("delegate_to_researcher", task="look it up"), "done"] * 2)
        return Agent("manager", llm=llm, agents=[researcher])

    async with open_runtime() as rt:
        # completed, same agent, same task: once taken for the child, its output returned
        done = await rt.run(squatter, "look it up", execution_id="m-1/2")
        assert done.status == "completed"
        # running: once taken for the child, the parent waited for a signal never sent
        await rt.spawn(blocker, "look it up", execution_id="m-2/2")
        with anyio.fail_after(10):
            one = await rt.wait(
                (await rt.spawn(manager(), "go", execution_id="m-1")).execution_id, until="finished"
            )
            two = await rt.wait(
                (await rt.spawn(manager(), "go", execution_id="m-2")).execution_id, until="finished"
            )
        for r, eid in ((one, "m-1"), (two, "m-2")):
            assert r.status == "completed" and r.output == "done"
            assert [m.content for m in r.transcript if m.role == "tool"] == ["the child's answer"]
            child = await rt.result(f"{eid}/2~1")
            assert child.output == "the child's answer"
            info = {e.execution_id: e for e in await rt.executions()}
            assert info[f"{eid}/2~1"].parent == eid and info[f"{eid}/2"].parent is None
        assert squatter_llm.calls == 1  # the user's executions were left as they were
        assert (await rt.result("m-2/2")).status == "running"
        release.set()
        assert (await rt.wait("m-2/2")).output == "late"


async def test_a_sync_tool_past_its_timeout_is_abandoned_and_reported(open_runtime: Any) -> None:
    release, finished = threading.Event(), threading.Event()

    @tool(timeout=0.2)
    def stuck() -> str:
        release.wait(30)  # a thread cannot be interrupted: it is abandoned, not stopped
        finished.set()
        return "too late"

    llm = Scripted([Scripted.call("stuck"), "gave up on it"])
    async with open_runtime() as rt:
        with anyio.fail_after(10):
            r = await rt.run(Agent("slow", tools=[stuck], llm=llm), "go", execution_id="to-1")
        assert not finished.is_set()  # the execution went on while the thread still ran
        release.set()
        await anyio.to_thread.run_sync(finished.wait, 10)
        again = await rt.result("to-1")
    assert r.status == "completed" and r.output == "gave up on it"
    [message] = [m for m in r.transcript if m.role == "tool"]
    assert message.is_error
    assert message.content == "ERROR (TimeoutError): tool 'stuck' did not finish within 0.2s"
    assert again.transcript == r.transcript  # the late result changed nothing


async def test_a_tool_calling_sys_exit_is_a_tool_error_and_spares_its_siblings(
    open_runtime: Any,
) -> None:
    exited = anyio.Event()

    @tool
    def sync_quit() -> str:
        raise SystemExit(3)

    @tool
    async def async_quit() -> str:
        exited.set()
        raise SystemExit("bye")

    @tool
    async def steady() -> str:
        await exited.wait()
        await anyio.sleep(0)  # a cancelled task group would cancel us here
        return "fine"

    calls = [Scripted.call("sync_quit"), Scripted.call("async_quit"), Scripted.call("steady")]
    agent = Agent("quits", tools=[sync_quit, async_quit, steady], llm=Scripted([calls, "ok"]))
    async with open_runtime() as rt:
        with anyio.fail_after(10):
            r = await rt.run(agent, "go", execution_id="se-1")
    assert r.status == "completed" and r.output == "ok"
    assert [(m.name, m.is_error, m.content) for m in r.transcript if m.role == "tool"] == [
        (
            "sync_quit",
            True,
            "ERROR (SystemExit): tool 'sync_quit' called sys.exit(3); a tool should return "
            "a result or raise an exception",
        ),
        (
            "async_quit",
            True,
            "ERROR (SystemExit): tool 'async_quit' called sys.exit('bye'); a tool should "
            "return a result or raise an exception",
        ),
        ("steady", False, "fine"),
    ]


_INTERRUPTED = """
import os, sys
import anyio
from perdure import Agent, Runtime, tool
from perdure.providers import Scripted

@tool
def ctrl_c() -> str:
    if os.environ.get("PRESS_CTRL_C"):
        raise KeyboardInterrupt
    return "calm"

agent = Agent("ki", tools=[ctrl_c], llm=Scripted([Scripted.call("ctrl_c"), "done"]))

async def main() -> None:
    async with Runtime(sys.argv[1], durability="process", backend=sys.argv[2]) as rt:
        r = await rt.run(agent, "go", execution_id="ki-1")
        print(r.status, r.output)

anyio.run(main, backend=sys.argv[2])
"""


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_tool_raising_keyboard_interrupt_stops_the_process_and_leaves_the_call_in_doubt(
    tmp_path: Any, loop: str
) -> None:
    import os
    import subprocess
    import sys

    script = tmp_path / "interrupted.py"
    script.write_text(_INTERRUPTED)
    data = str(tmp_path / "data")

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), data, loop],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )

    pressed = run(PRESS_CTRL_C="1")
    assert pressed.returncode != 0 and "KeyboardInterrupt" in pressed.stderr
    # the call started and has no outcome: on restart it is re-run, as after a crash
    resumed = run()
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.split() == ["completed", "done"]


async def test_an_unknown_execution_id_is_a_clear_error_saying_what_to_check(
    open_runtime: Any, data_dir: Any
) -> None:
    from perdure import ExecutionNotFoundError

    async with open_runtime() as rt:
        for call in (rt.result, rt.wait, rt.cancel):
            with pytest.raises(ExecutionNotFoundError) as info:
                await call("no-such-run")
            message = str(info.value)
            assert message.startswith(f"no execution 'no-such-run' in data dir {str(data_dir)!r}")
            assert "'perdure status' lists them" in message
            assert info.value.execution_id == "no-such-run"


#: While a test holds it: (started, release) events for the ``held`` tool.
HOLD: dict[str, tuple[anyio.Event, anyio.Event]] = {}


@tool("held", description="Wait while a test holds it")
async def held(x: str) -> str:
    """Return ``x``; while a test holds the gate, wait for its release first."""
    gate = HOLD.get("gate")
    if gate is not None:
        started, release = gate
        started.set()
        await release.wait()
    return x


holder = Agent("holder", tools=[held], llm=Scripted([Scripted.call("held", x="y"), "done"]))


async def test_a_stream_being_read_when_another_task_closes_the_runtime_ends_with_a_clear_error(
    open_runtime: Any,
) -> None:
    started, release = HOLD["gate"] = (anyio.Event(), anyio.Event())
    got: list[Any] = []
    errors: list[BaseException] = []

    async def consume(rt: Runtime) -> None:
        try:
            async for item in rt.stream(holder, "go", execution_id="sc-1"):
                got.append(item)
        except RuntimeClosedError as exc:
            errors.append(exc)
        finally:
            # The tool holds the close (its shutdown timeout is far longer than the
            # limit below) until the stream has ended: only a stream that ends while
            # the close waits lets the close finish in time.
            release.set()

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg, open_runtime(shutdown_timeout=60.0) as rt:
                tg.start_soon(consume, rt)
                await started.wait()
    finally:
        HOLD.clear()
    [error] = errors
    message = str(error)
    assert "execution 'sc-1'" in message and "resumes" in message, message
    assert "next" in message and "start" in message, message
    assert not any(isinstance(item, Result) for item in got)
    # Durable all along: the next start carries it on to the end.
    async with open_runtime(agents=[holder]) as rt:
        with anyio.fail_after(20):
            assert (await rt.wait("sc-1")).status == "completed"


async def test_two_streams_reading_one_execution_both_get_its_pieces_and_its_end(
    open_runtime: Any,
) -> None:
    started, release = HOLD["gate"] = (anyio.Event(), anyio.Event())
    first: list[Any] = []
    second: list[Any] = []

    async def consume(rt: Runtime, into: list[Any]) -> None:
        async for item in rt.stream(holder, "go", execution_id="two-1"):
            into.append(item)

    try:
        async with open_runtime() as rt:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume, rt, first)
                    await started.wait()  # the execution runs its tool, held
                    # The second stream is in before the tool is released: it saw
                    # nothing yet, and both must hear everything from here to the end.
                    tg.start_soon(consume, rt, second)
                    await anyio.wait_all_tasks_blocked()
                    release.set()
    finally:
        HOLD.clear()
    for items in (first, second):
        assert isinstance(items[-1], Result) and items[-1].status == "completed", items
    # Everything the second stream got is what the first got from the release on.
    assert second == first[len(first) - len(second) :]
    assert any(isinstance(i, dict) and i.get("event") == "step" for i in second), second


async def test_an_execution_that_completes_while_the_runtime_closes_still_fires_its_callbacks(
    open_runtime: Any,
) -> None:
    # The close waits (gracefully) for each running execution to reach a step boundary;
    # one whose last model call is in flight then completes during the close, and its
    # on_complete callbacks, sync and async, must still run.
    started, release = anyio.Event(), anyio.Event()
    seen: list[tuple[str, str]] = []

    async def answer(messages: Any, tools: Any, model: str) -> dict[str, Any]:
        started.set()
        await release.wait()
        return {"content": "done", "usage": {"input_tokens": 1, "output_tokens": 1}}

    closing = Agent("closing", llm=CallableProvider(answer))

    async def release_once_closing() -> None:
        # Runs once the body below has left the runtime's block: the close is under way.
        await anyio.wait_all_tasks_blocked()
        release.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg, open_runtime(shutdown_timeout=30.0) as rt:

            @rt.on_complete
            async def completed_async(result: Result) -> None:
                await anyio.sleep(0)  # a real await: it needs a task to run in
                seen.append(("async", result.execution_id))

            @rt.on_complete
            def completed_sync(result: Result) -> None:
                seen.append(("sync", result.execution_id))

            await rt.spawn(closing, "go", execution_id="late-1")
            await started.wait()
            tg.start_soon(release_once_closing)
    assert sorted(seen) == [("async", "late-1"), ("sync", "late-1")], seen
    async with open_runtime(agents=[closing]) as rt:
        assert (await rt.wait("late-1")).status == "completed"


async def test_an_agent_built_per_request_is_looked_up_in_the_index_once(
    open_runtime: Any,
) -> None:
    """A service that builds its Agent for each request (spawn registers it) replaces
    the registered object each time; only the first registration of the name looks for
    executions left alone for want of it, not every spawn."""
    looked: list[str] = []
    async with open_runtime() as rt:
        recover = rt._recover_agent

        async def counting(name: str) -> None:
            looked.append(name)
            await recover(name)

        rt._recover_agent = counting  # type: ignore[method-assign]
        for i in range(5):
            agent = Agent("per-request", llm=Scripted([f"answer {i}"], record=False))
            r = await rt.run(agent, "go", execution_id=f"pr-{i}")
            assert r.output == f"answer {i}" and rt.agent("per-request") is agent
    assert looked == ["per-request"]
