"""Drift: the agent changes between an interruption and the resume.

The interruption is a runtime closed while a tool is running (its task is cancelled at
the shutdown timeout, so the log shows the call started and never finished, exactly as
after a crash), or a process SIGKILLed inside the tool. The runtime is then reopened
with a changed agent, under each drift policy.
"""

from __future__ import annotations

import functools
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure import Agent, Replayer, tool
from perdure.drift import describe_changes
from perdure.events import decode, execution_stream
from perdure.journal import load_state
from perdure.providers import Scripted

pytestmark = pytest.mark.anyio


async def _gate(gate: dict[str, Any]) -> None:
    if "block" in gate:
        gate["started"].set()
        await gate["block"].wait()


def make_agent(
    *,
    instructions: str = "Be brief.",
    model: str = "scripted",
    description: str = "Look something up",
    schema_extra: bool = False,
    body: int = 1,
    drift: Any = "suspend",
    gate: dict[str, Any] | None = None,
) -> Agent:
    gate = gate if gate is not None else {}

    if schema_extra:

        async def lookup(q: str, limit: int = 3) -> str:
            await _gate(gate)
            return f"found {q}" if body == 1 else f"FOUND {q}"
    elif body == 1:

        async def lookup(q: str) -> str:
            await _gate(gate)
            return f"found {q}"
    else:

        async def lookup(q: str) -> str:
            await _gate(gate)
            return f"FOUND {q}"

    lookup_tool = tool("lookup", description=description)(lookup)
    llm = Scripted([Scripted.call("lookup", q="x"), "done"], model=model)
    return Agent("drifty", instructions=instructions, tools=[lookup_tool], llm=llm, drift=drift)


async def interrupt(open_runtime: Any, eid: str) -> None:
    """Leave ``eid`` interrupted inside its tool call."""
    started = anyio.Event()
    agent = make_agent(gate={"started": started, "block": anyio.Event()})
    async with open_runtime(shutdown_timeout=0.05) as rt:
        await rt.spawn(agent, "find x", execution_id=eid)
        await started.wait()
    # closed: the tool call was started and never completed


SCHEMA_BEFORE = (
    '{"additionalProperties":false,"properties":{"q":{"type":"string"}},'
    '"required":["q"],"type":"object"}'
)
SCHEMA_AFTER = (
    '{"additionalProperties":false,"properties":{"limit":{"default":3,"type":"integer"},'
    '"q":{"type":"string"}},"required":["q"],"type":"object"}'
)

#: (label, the changed agent, the change the report must hold, the step it must name:
#: the interrupted call of a changed tool, else the next model call)
CHANGES: list[tuple[str, Callable[..., Agent], dict[str, Any], int]] = [
    (
        "instructions",
        lambda **kw: make_agent(instructions="Be verbose.", **kw),
        {"what": "instructions", "before": "Be brief.", "after": "Be verbose."},
        3,
    ),
    (
        "model",
        lambda **kw: make_agent(model="bigger", **kw),
        {"what": "model", "before": "scripted", "after": "bigger"},
        3,
    ),
    (
        "description",
        lambda **kw: make_agent(description="Search the web", **kw),
        {
            "what": "tool",
            "tool": "lookup",
            "field": "description",
            "before": "Look something up",
            "after": "Search the web",
        },
        2,
    ),
    (
        "schema",
        lambda **kw: make_agent(schema_extra=True, **kw),
        {
            "what": "tool",
            "tool": "lookup",
            "field": "schema",
            "before": SCHEMA_BEFORE,
            "after": SCHEMA_AFTER,
        },
        2,
    ),
    (
        "body",
        lambda **kw: make_agent(body=2, **kw),
        {"what": "tool", "tool": "lookup", "field": "code"},
        2,
    ),
]
CHANGE_IDS = [c[0] for c in CHANGES]
ACTIONS = {"suspend": "suspended", "warn": "warned", "accept": "accepted", "fail": "failed"}


def matching(changes: list[dict[str, Any]], expected: dict[str, Any]) -> dict[str, Any]:
    """The one reported change that holds everything ``expected`` says."""
    found = [c for c in changes if all(c.get(k) == v for k, v in expected.items())]
    assert len(found) == 1, f"{expected} not (once) in {changes}"
    item = found[0]
    if item.get("field") == "code":  # code is shown as its digests, which must differ
        assert len(item["before"]) == len(item["after"]) == 16
        assert item["before"] != item["after"]
    return item


@pytest.mark.parametrize("policy", list(ACTIONS))
@pytest.mark.parametrize(("label", "changed", "expected", "step"), CHANGES, ids=CHANGE_IDS)
async def test_each_change_under_each_policy_is_reported_as_specified(
    open_runtime: Any,
    caplog: pytest.LogCaptureFixture,
    label: str,
    changed: Callable[..., Agent],
    expected: dict[str, Any],
    step: int,
    policy: str,
) -> None:
    await interrupt(open_runtime, "d-1")
    caplog.set_level(logging.WARNING, logger="perdure.engine")
    caplog.clear()
    async with open_runtime(agents=[changed(drift=policy)]) as rt:
        r = await rt.wait("d-1")
        state = await load_state(rt.log, "d-1")
    # the record: which step, what changed (before and after), what the policy did
    [drift] = state.drift
    assert drift["step"] == step and drift["action"] == ACTIONS[policy]
    item = matching(drift["changes"], expected)
    where = f"'d-1' step {step}" + (" (tool 'lookup')" if step == 2 else "")
    if policy == "suspend":
        assert r.status == "suspended" and r.suspend_reason is not None
        reason = r.suspend_reason
        assert reason.kind == "drift" and reason.step == step and reason.changes == drift["changes"]
        assert where in reason.message
        if "before" in expected:
            assert f"{item['before']!r} -> {item['after']!r}" in reason.message
    elif policy == "fail":
        assert r.status == "failed" and r.error is not None
        assert r.error["type"] == "DriftError" and where in r.error["message"]
        assert r.error["message"].endswith(describe_changes(drift["changes"]))
    else:
        assert r.status == "completed"
        warned = [rec.getMessage() for rec in caplog.records if "drift policy" in rec.getMessage()]
        if policy == "warn":
            [line] = warned
            assert f"d-1 step {step}" in line and describe_changes(drift["changes"]) in line
        else:
            assert warned == []  # accepted silently, yet recorded


@pytest.mark.parametrize(("label", "changed", "expected", "step"), CHANGES, ids=CHANGE_IDS)
async def test_drift_after_a_sigkill_inside_a_tool(
    open_runtime: Any,
    data_dir: Path,
    label: str,
    changed: Callable[..., Agent],
    expected: dict[str, Any],
    step: int,
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.runtime.drift_worker", str(data_dir), "k-1"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    async with open_runtime(agents=[changed()]) as rt:
        r = await rt.wait("k-1")
        assert r.status == "suspended" and r.suspend_reason is not None
        assert r.suspend_reason.kind == "drift" and r.suspend_reason.step == step
        matching(r.suspend_reason.changes, expected)
        r = await rt.resume("k-1", accept_drift=True)
        assert r is not None and r.status == "completed"


@pytest.mark.parametrize(("label", "changed", "expected", "step"), CHANGES, ids=CHANGE_IDS)
async def test_drift_suspends_by_default_naming_what_changed(
    open_runtime: Any,
    label: str,
    changed: Callable[..., Agent],
    expected: dict[str, Any],
    step: int,
) -> None:
    await interrupt(open_runtime, "d-1")
    agent = changed()
    async with open_runtime() as rt:
        rt.register(agent)
        r = await rt.wait("d-1")
        assert r.status == "suspended" and r.suspend_reason is not None
        assert r.suspend_reason.kind == "drift"
        matching(r.suspend_reason.changes, expected)
        assert "d-1" in r.suspend_reason.message and "step" in r.suspend_reason.message
        # the operator accepts the new definition: it resumes and completes
        r = await rt.resume("d-1", accept_drift=True)
        assert r.status == "completed"
        state = await load_state(rt.log, "d-1")
        assert [d["action"] for d in state.drift] == ["suspended"]


async def test_drift_warn_logs_and_continues(
    open_runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await interrupt(open_runtime, "d-2")
    caplog.set_level(logging.WARNING, logger="perdure.engine")
    async with open_runtime(agents=[make_agent(instructions="Be verbose.", drift="warn")]) as rt:
        r = await rt.wait("d-2")
        assert r.status == "completed"
        state = await load_state(rt.log, "d-2")
    assert [d["action"] for d in state.drift] == ["warned"]
    assert any(
        "d-2" in rec.getMessage() and "instructions" in rec.getMessage() for rec in caplog.records
    )


async def test_drift_accept_records_and_continues_silently(open_runtime: Any) -> None:
    await interrupt(open_runtime, "d-3")
    async with open_runtime(agents=[make_agent(body=2, drift="accept")]) as rt:
        r = await rt.wait("d-3")
        assert r.status == "completed"
        types = [decode(rec).type async for rec in rt.log.read(execution_stream("d-3"))]
    assert "drift.detected" in types and "drift.accepted" in types


async def test_drift_fail_policy_fails_the_execution(open_runtime: Any) -> None:
    await interrupt(open_runtime, "d-4")
    async with open_runtime(agents=[make_agent(model="other", drift="fail")]) as rt:
        r = await rt.wait("d-4")
    assert r.status == "failed" and r.error is not None
    assert r.error["type"] == "DriftError" and "model" in r.error["message"]


async def test_no_drift_no_report(open_runtime: Any) -> None:
    await interrupt(open_runtime, "d-5")
    async with open_runtime(agents=[make_agent()]) as rt:
        r = await rt.wait("d-5")
        assert r.status == "completed"
        assert (await load_state(rt.log, "d-5")).drift == []


async def test_replayer_reports_drift_per_step_without_calling_anything(
    open_runtime: Any,
) -> None:
    agent = make_agent()
    async with open_runtime() as rt:
        await rt.run(agent, "find x", execution_id="d-6")
        events = [decode(rec) async for rec in rt.log.read(execution_stream("d-6"))]
    same = Replayer([make_agent()]).replay(events)
    assert same.ok and same.status == "completed"
    drifted = Replayer([make_agent(description="Search the web", body=2)]).replay(events)
    assert not drifted.ok
    tool_items = [d for d in drifted.drift if d["kind"] == "tool"]
    assert tool_items and tool_items[0]["step"] == 2
    fields = {c["field"] for c in tool_items[0]["changes"]}
    assert fields == {"description", "code"}
    llm_items = [d for d in drifted.drift if d["kind"] == "llm"]
    assert [d["step"] for d in llm_items] == [1, 3]  # the tool spec is part of every request
    renamed = Replayer([make_agent(schema_extra=True)]).replay(events)
    assert any(d["kind"] == "tool" for d in renamed.drift)


# A partial binds configuration (a key, a client, a gate) the way an instance's
# attributes do: its values are not code, the names it binds are part of the interface.
async def search(q: str, api_key: str, gate: dict[str, Any], region: str = "eu") -> str:
    await _gate(gate)
    return f"{region} results for {q}"


async def search_changed(q: str, api_key: str, gate: dict[str, Any], region: str = "eu") -> str:
    await _gate(gate)
    return f"{region} RESULTS for {q}"


def partial_agent(
    api_key: str,
    *,
    fn: Callable[..., Any] = search,
    gate: dict[str, Any] | None = None,
    **bound: Any,
) -> Agent:
    bound_search = functools.partial(fn, api_key=api_key, gate=gate or {}, **bound)
    search_tool = tool("search", description="Search the web")(bound_search)
    llm = Scripted([Scripted.call("search", q="x"), "done"])
    return Agent("partial", instructions="Be brief.", tools=[search_tool], llm=llm)


async def test_rotating_a_value_a_partial_binds_is_not_drift(open_runtime: Any) -> None:
    started = anyio.Event()
    gate = {"started": started, "block": anyio.Event()}
    async with open_runtime(shutdown_timeout=0.05) as rt:
        await rt.spawn(partial_agent("sk-old", gate=gate), "find x", execution_id="p-1")
        await started.wait()
    # interrupted inside the call; the key is rotated before the resume re-runs it
    async with open_runtime(agents=[partial_agent("sk-new")]) as rt:
        r = await rt.wait("p-1")
        state = await load_state(rt.log, "p-1")
        events = [decode(rec) async for rec in rt.log.read(execution_stream("p-1"))]
    assert r.status == "completed" and r.output == "done"
    assert state.drift == []
    assert "sk-old" not in repr(events) and "sk-new" not in repr(events)
    assert Replayer([partial_agent("sk-newer")]).replay(events).ok


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(lambda: partial_agent("sk-old", fn=search_changed), id="function-code"),
        pytest.param(lambda: partial_agent("sk-old", region="us"), id="bound-keyword-added"),
    ],
)
async def test_a_partials_code_or_bound_names_changing_is_drift(
    open_runtime: Any, changed: Callable[[], Agent]
) -> None:
    async with open_runtime() as rt:
        r = await rt.run(partial_agent("sk-old"), "find x", execution_id="p-2")
        assert r.status == "completed"
        events = [decode(rec) async for rec in rt.log.read(execution_stream("p-2"))]
    assert Replayer([partial_agent("sk-old")]).replay(events).ok
    drifted = Replayer([changed()]).replay(events)
    assert not drifted.ok
    [item] = [d for d in drifted.drift if d["kind"] == "tool"]
    assert item["step"] == 2
    matching(item["changes"], {"what": "tool", "tool": "search", "field": "code"})
