"""Drift detection probed from both sides: changes that must be drift, and must not.

Must be drift (and say what changed, before and after): an agent's sampling parameters,
a tool's default argument value, a tool renamed, a tool removed while a call to it is
in doubt. Must not: the tools listed in another order, a lambda moved to other lines or
its neighbour on the same line edited, a value a closure captures. ``perdure replay
--agent`` must agree with the runtime on every one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import anyio
import pytest

from perdure import Agent, Replayer, Runtime, tool
from perdure.drift import diff_definitions
from perdure.events import decode, execution_stream
from perdure.fingerprint import code_digest
from perdure.journal import load_state
from perdure.providers import Scripted
from perdure.tools import Tool

ROOT = Path(__file__).resolve().parents[2]

AGENTS = '''
"""Agents a deploy changes, importable by ``perdure replay --agent``."""
import anyio
from perdure import Agent, tool
from perdure.providers import Scripted

GATE = {}


@tool("a", description="Say a")
async def a(x: str) -> str:
    if "block" in GATE:
        GATE["started"].set()
        await GATE["block"].wait()
    return "a " + x


@tool("b", description="Say b")
def b(x: str) -> str:
    return "b " + x


def make(order="ab", temperature=0.2, drift="suspend"):
    tools = {"a": a, "b": b}
    return Agent(
        "mixer",
        instructions="Mix.",
        tools=[tools[name] for name in order],
        params={"temperature": temperature},
        drift=drift,
        llm=Scripted([Scripted.call("a", x="1"), Scripted.call("b", x="2"), "done"]),
    )


before = make()
reordered = make(order="ba")
hotter = make(temperature=0.9)
without_a = make(order="b")
'''


def load(path: Path, name: str, source: str) -> types.ModuleType:
    """Write ``source`` to ``path/name.py`` and import it (a real file: source is found)."""
    file = path / f"{name}.py"
    file.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(f"{name}_{abs(hash(str(path)))}", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def agents(tmp_path: Path) -> types.ModuleType:
    """The AGENTS module, imported from a file in the test's tmp dir."""
    return load(tmp_path, "deployed", AGENTS)


async def interrupt_in_a(open_runtime: Any, agents: types.ModuleType, eid: str) -> None:
    """Leave ``eid`` with its call of tool ``a`` started and never finished."""
    agents.GATE.update(started=anyio.Event(), block=anyio.Event())
    try:
        async with open_runtime(shutdown_timeout=0.05) as rt:
            await rt.spawn(agents.before, "go", execution_id=eid)
            await agents.GATE["started"].wait()
    finally:
        agents.GATE.clear()


@pytest.mark.anyio
async def test_tools_listed_in_another_order_are_not_drift_anywhere(
    open_runtime: Any, agents: types.ModuleType
) -> None:
    """The runtime compared definitions by tool name (no drift), while the Replayer
    compared the request digest, which lists tools in order: it reported an LLM drift
    whose list of changes was empty."""
    await interrupt_in_a(open_runtime, agents, "o-1")
    async with open_runtime(agents=[agents.reordered]) as rt:
        r = await rt.wait("o-1")
        state = await load_state(rt.log, "o-1")
        events = [decode(rec) async for rec in rt.log.read(execution_stream("o-1"))]
    assert r.status == "completed" and state.drift == []
    report = Replayer([agents.reordered]).replay(events)
    assert report.ok, report.drift
    assert Replayer([agents.before]).replay(events).ok


@pytest.mark.anyio
async def test_changed_params_are_drift_shown_before_and_after(
    open_runtime: Any, agents: types.ModuleType
) -> None:
    """The report showed two digests for a changed temperature; it shows the values."""
    await interrupt_in_a(open_runtime, agents, "t-1")
    async with open_runtime(agents=[agents.hotter]) as rt:
        r = await rt.wait("t-1")
        events = [decode(rec) async for rec in rt.log.read(execution_stream("t-1"))]
    assert r.status == "suspended" and r.suspend_reason is not None
    change = {"what": "params", "before": '{"temperature":0.2}', "after": '{"temperature":0.9}'}
    assert r.suspend_reason.changes == [change]
    assert "params: '{\"temperature\":0.2}' -> '{\"temperature\":0.9}'" in (
        r.suspend_reason.message
    )
    report = Replayer([agents.hotter]).replay(events)
    assert [d["kind"] for d in report.drift] == ["llm"]  # the one model call recorded
    assert report.drift[0]["changes"] == [change]


ACTIONS = {"suspend": "suspended", "warn": "warned", "accept": "accepted", "fail": "failed"}


@pytest.mark.anyio
@pytest.mark.parametrize("policy", list(ACTIONS))
async def test_a_tool_removed_while_its_call_is_in_doubt(
    open_runtime: Any, agents: types.ModuleType, policy: str
) -> None:
    await interrupt_in_a(open_runtime, agents, "rm-1")
    async with open_runtime(agents=[agents.make(order="b", drift=policy)]) as rt:
        r = await rt.wait("rm-1")
        state = await load_state(rt.log, "rm-1")
        [drift] = state.drift
        assert drift["step"] == 2 and drift["action"] == ACTIONS[policy]
        assert drift["changes"] == [{"what": "tool", "tool": "a", "field": "removed"}]
        if policy == "fail":
            assert r.status == "failed" and r.error is not None
            assert "'rm-1' step 2 (tool 'a')" in r.error["message"]
            assert r.error["message"].endswith("tool 'a' removed")
            return
        if policy == "suspend":
            assert r.status == "suspended" and r.suspend_reason is not None
            assert r.suspend_reason.step == 2 and r.suspend_reason.tool == "a"
            r = await rt.resume("rm-1", accept_drift=True)
            state = await load_state(rt.log, "rm-1")
        assert r is not None and r.status == "completed" and r.output == "done"
    # the call that was in doubt went back to the model as an error, marked as one
    [answer] = [m for m in state.messages if m.role == "tool" and m.name == "a"]
    assert answer.is_error and "no longer exists" in answer.content
    # ... and told that the interrupted call may have happened all the same
    assert "was interrupted after it started (idempotency key rm-1:2:" in answer.content
    assert answer.content.endswith("so it may have taken effect")


def test_perdure_replay_agrees_with_the_runtime(tmp_path: Path) -> None:
    load(tmp_path, "deployed", AGENTS)
    data = tmp_path / "data"
    with Runtime(data, durability="process") as rt:
        agents = load(tmp_path, "deployed", AGENTS)
        assert rt.run(agents.before, "go", execution_id="cli-1").status == "completed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}

    def replay(attr: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "perdure.cli",
                "--data-dir",
                str(data),
                "replay",
                "--agent",
                attr,
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    for same in ("before", "reordered"):
        proc = replay(f"deployed:{same}")
        assert proc.returncode == 0, (same, proc.stdout, proc.stderr)
    proc = replay("deployed:hotter")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cli-1" in proc.stdout and "DRIFT" in proc.stdout
    [shown] = {line.strip() for line in proc.stdout.splitlines() if "params:" in line}
    assert "temperature" in shown and "0.2" in shown and "0.9" in shown, shown  # not digests


# -- the fingerprint of code: what is a change, and what is not ------------------------

LAMBDA_ONE_LINE = """
from perdure.tools import Tool
t = Tool(lambda x: x, name="t", description="T")
"""

LAMBDA_SPREAD = """
from perdure.tools import Tool

# the same tool, formatted over several lines and moved down the file


t = Tool(
    lambda x: x,
    name="t",
    description="T",
)
"""

TWO_LAMBDAS = """
from perdure.tools import Tool as T
t = T(lambda x: x, name="t", description="T"); u = T(lambda y: y, name="u", description="U")
"""

TWO_LAMBDAS_U_EDITED = """
from perdure.tools import Tool as T
t = T(lambda x: x, name="t", description="T"); u = T(lambda y: 2 * y, name="u", description="U")
"""


def test_a_lambda_is_fingerprinted_as_itself_not_as_the_lines_around_it(tmp_path: Path) -> None:
    """The digest was of the whole source line(s): moving a lambda into a call spread
    over lines, or editing its neighbour on the same line, was code drift."""
    one = load(tmp_path, "one", LAMBDA_ONE_LINE)
    spread = load(tmp_path, "spread", LAMBDA_SPREAD)
    two = load(tmp_path, "two", TWO_LAMBDAS)
    edited = load(tmp_path, "edited", TWO_LAMBDAS_U_EDITED)
    assert code_digest(one.t.fn) == code_digest(spread.t.fn) == code_digest(two.t.fn)
    assert code_digest(two.t.fn) == code_digest(edited.t.fn)  # only u changed ...
    assert code_digest(two.u.fn) != code_digest(edited.u.fn)  # ... and u is drift
    assert code_digest(two.t.fn) != code_digest(two.u.fn)  # x -> x is not y -> y
    nested_outer = lambda: lambda x: x  # noqa: E731 - a lambda is what is tested
    nested_changed = lambda: lambda x: x + 1  # noqa: E731
    assert code_digest(nested_outer) != code_digest(nested_changed)
    assert code_digest(nested_outer()) != code_digest(nested_changed())


def definition(*tools: Any) -> dict[str, Any]:
    """The definition of an agent with these tools."""
    return Agent("probe", tools=list(tools), llm=Scripted(["x"])).definition()


def test_a_value_a_closure_captures_is_configuration_not_drift() -> None:
    def make(base_url: str) -> Tool:
        @tool("fetch", description="Fetch a page")
        def fetch(path: str) -> str:
            return base_url + path

        return fetch

    assert diff_definitions(definition(make("https://a")), definition(make("https://b"))) == []


def test_a_default_argument_value_and_a_rename_are_drift_named_as_such() -> None:
    def limited(default: int) -> Tool:
        source = f"def lookup(q: str, limit: int = {default}) -> str:\n    return q\n"
        namespace: dict[str, Any] = {}
        exec(compile(source, "<generated>", "exec"), namespace)
        return Tool(namespace["lookup"], name="lookup", description="Look up")

    changes = diff_definitions(definition(limited(3)), definition(limited(5)))
    [schema] = [c for c in changes if c.get("field") == "schema"]
    assert '"default":3' in schema["before"] and '"default":5' in schema["after"]

    @tool("old_name", description="D")
    def f(x: str) -> str:
        return x

    renamed = Tool(f.fn, name="new_name", description="D")
    assert diff_definitions(definition(f), definition(renamed)) == [
        {"what": "tool", "tool": "old_name", "field": "removed"},
        {"what": "tool", "tool": "new_name", "field": "added"},
    ]


def delegating(new_body: bool = False, gate: dict[str, Any] | None = None) -> Agent:
    """A parent that delegates to a child whose one tool may wait on ``gate``."""
    gate = gate if gate is not None else {}

    if new_body:

        async def work(x: str) -> str:
            return "WORKED " + x
    else:

        async def work(x: str) -> str:
            if "block" in gate:
                gate["started"].set()
                await gate["block"].wait()
            return "worked " + x

    child = Agent(
        "helper",
        instructions="Help.",
        tools=[tool("work", description="Work")(work)],
        llm=Scripted([Scripted.call("work", x="1"), "helped"]),
    )
    llm = Scripted([Scripted.call("delegate_to_helper", task="t"), "parent done"])
    return Agent("boss", instructions="Delegate.", agents=[child], llm=llm)


@pytest.mark.anyio
async def test_a_delegate_agent_changed_under_its_running_child_is_drift_in_the_child(
    open_runtime: Any,
) -> None:
    """The parent's fingerprint holds only the delegate tool (its name and the child's
    description): the child's own definition is checked by the child execution, which
    is where the changed code would run."""
    gate = {"started": anyio.Event(), "block": anyio.Event()}
    async with open_runtime(shutdown_timeout=0.05) as rt:
        await rt.spawn(delegating(gate=gate), "go", execution_id="boss-1")
        await gate["started"].wait()
    async with open_runtime(agents=[delegating(new_body=True)]) as rt:
        child = await rt.wait("boss-1/2")
        assert child.status == "suspended" and child.suspend_reason is not None
        assert child.suspend_reason.kind == "drift" and child.suspend_reason.tool == "work"
        [change] = child.suspend_reason.changes
        assert (change["what"], change["tool"], change["field"]) == ("tool", "work", "code")
        parent = await rt.result("boss-1")
        assert parent.status == "suspended" and parent.suspend_reason is not None
        assert parent.suspend_reason.kind == "child"  # waits for the child, unchanged
        assert (await load_state(rt.log, "boss-1")).drift == []
        resumed = await rt.resume("boss-1/2", accept_drift=True)
        assert resumed is not None and resumed.output == "helped"
        with anyio.fail_after(30):
            done = await rt.wait("boss-1", until="finished")
    assert done.status == "completed" and done.output == "parent done"
