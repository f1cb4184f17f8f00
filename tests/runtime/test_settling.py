"""What ``run`` / ``wait`` / ``result`` / ``signal`` ... answer right after open.

Signals sent while no runtime owned the data dir (by the ``perdure`` CLI, a real
subprocess here) wait in the inbox. A Runtime delivers that backlog when it opens, in
the background; every call whose answer depends on an execution's state waits until
it is delivered, so it never answers from the state before those signals. And ``wait``
(so ``run``) returns a Result that is settled, never one that says "running".

To make the old race certain rather than likely, each backlog starts with many signals
of no consequence (``noise``) for the same execution: delivering them takes far longer
than a read of the index, so a call that did not wait for the backlog would see the
execution as it was before the signal that matters, which comes last.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from perdure import Agent, Result, Runtime, current_idempotency_key, tool
from perdure.errors import InvalidSignalError, RuntimeClosedError
from perdure.events import INBOX_STREAM, SignalSent, encode, execution_stream, record_types
from perdure.log import ANY, DataDirLockedError, LmdbLog, LogError, MemoryLog
from perdure.providers import BadRequestError, Scripted
from tests.cli import agents
from tests.cli.conftest import Owner, cli_env, perdure, perdure_here

#: How many ``noise`` signals come before the one that matters (see the module doc).
NOISE = 60
OPEN = {"durability": "process", "shutdown_timeout": 2.0}


def _down(request: Any) -> Any:
    return BadRequestError("the model is down", provider="scripted")


#: The agent of ``f1``: its model fails. ``flaky_up`` is the same definition once the
#: model answers again (the provider is not part of the fingerprint, its model name is).
flaky_down = Agent("flaky", instructions="You answer.", llm=Scripted(_down))
flaky_up = Agent("flaky", instructions="You answer.", llm=Scripted(["Recovered."]))

#: Two approvals in a row: approving the first leads to the second suspension.
twice = Agent(
    "twice",
    instructions="You move money twice.",
    tools=[agents.transfer_funds],
    llm=Scripted(
        [
            Scripted.call("transfer_funds", dst="savings", amount=10.0),
            Scripted.call("transfer_funds", dst="checking", amount=20.0),
            "Moved twice.",
        ]
    ),
)


@dataclass(frozen=True)
class Base:
    """A data dir with one execution waiting for each kind of signal, and its cids."""

    path: Path
    cids: dict[str, str]


def build_base(path: Path) -> Base:
    """Every execution the tests send signals to, settled, with no runtime left open."""
    cids = {}
    with Runtime(path, **OPEN) as rt:
        r = rt.run(agents.banker, "Move $50 to savings", execution_id="pay-1")
        cids["pay-1"] = r.suspend_reason.confirmation_id
        r = rt.run(twice, "Move it twice", execution_id="twice-1")
        cids["twice-1"] = r.suspend_reason.confirmation_id
        assert rt.run(agents.budgeted, "Weather in Oslo?", execution_id="budget-1").is_suspended
        assert rt.run(flaky_down, "go", execution_id="f1").is_failed
    # A non-idempotent tool in doubt: its process is SIGKILLed inside the call; the
    # next runtime suspends it for a person to decide (unknown_outcome).
    crashing = Owner(
        path,
        "--spawn",
        "charger",
        "charge-1",
        "Charge 9.99",
        env=cli_env(**{agents.CRASH_IN_TOOL: "1"}),
    )
    assert crashing.wait_exit() == -9
    with Runtime(path, agents=[agents.charger], **OPEN) as rt:
        r = rt.wait("charge-1")
        assert r.is_suspended and r.suspend_reason.kind == "unknown_outcome", r
    return Base(path, cids)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """Built once for the module; tests work on copies (see ``fresh``)."""
    return build_base(tmp_path_factory.mktemp("settling") / "data")


@pytest.fixture
def fresh(base: Base, tmp_path: Path) -> Base:
    """A private copy of ``base``."""
    path = tmp_path / "data"
    shutil.copytree(base.path, path)
    return Base(path, dict(base.cids))


async def post_noise(path: Path, target: str, times: int = NOISE) -> None:
    """Append ``times`` signals nothing waits for, as a client (what the CLI does)."""
    log = await LmdbLog.open(path, types=record_types(), client=True)
    try:
        record = encode(SignalSent(target, "noise", {}, "test-client"))
        await log.append(INBOX_STREAM, [record] * times, expect=ANY)
    finally:
        await log.aclose()


def send_with_no_owner(path: Path, *args: str) -> None:
    """``perdure ARGS`` in a subprocess, while no runtime owns the dir."""
    ran = perdure(path, *args)
    assert ran.code == 0, ran.out + ran.err
    assert "no runtime owns" in ran.out, ran.out


async def inspect(path: Path, eid: str) -> dict[str, Any]:
    """``perdure inspect EID --json`` (run in a worker thread: the CLI runs its own loop)."""
    ran = await anyio.to_thread.run_sync(perdure_here, path, "inspect", eid, "--json")
    assert ran.code == 0, ran.out + ran.err
    return ran.json()


async def history(path: Path, eid: str) -> list[tuple[str, Any]]:
    """The execution's records (type, payload), read as a client."""
    log = await LmdbLog.open(path, types=record_types(), client=True)
    try:
        return [(r.type, r.payload) async for r in log.read(execution_stream(eid))]
    finally:
        await log.aclose()


@dataclass(frozen=True)
class Case:
    """One signal sent with no owner, and what the execution must come to after it."""

    eid: str
    agent: Agent
    prompt: str
    command: Callable[[Base], tuple[str, ...]]
    expect: Callable[[Result, Base], None]


def _completed(output: str) -> Callable[[Result, Base], None]:
    def check(result: Result, base: Base) -> None:
        assert result.status == "completed", result
        assert result.output == output

    return check


def _next_approval(result: Result, base: Base) -> None:
    assert result.status == "suspended", result
    assert result.suspend_reason.kind == "approval"
    # the second transfer's confirmation, not the one the CLI approved
    assert result.suspend_reason.confirmation_id != base.cids["twice-1"]
    assert result.suspend_reason.arguments == {"dst": "checking", "amount": 20.0}


CASES = {
    "approve": Case(
        "pay-1",
        agents.banker,
        "Move $50 to savings",
        lambda b: ("approve", "pay-1", b.cids["pay-1"]),
        _completed("Moved $50 to savings."),
    ),
    "approve-then-suspend": Case(
        "twice-1",
        twice,
        "Move it twice",
        lambda b: ("approve", "twice-1", b.cids["twice-1"]),
        _next_approval,
    ),
    "resolve-complete": Case(
        "charge-1",
        agents.charger,
        "Charge 9.99",
        lambda b: ("resolve", "charge-1", "--complete", json.dumps({"charged": 9.99})),
        _completed("Charged $9.99."),
    ),
    "resume-budget": Case(
        "budget-1",
        agents.budgeted,
        "Weather in Oslo?",
        lambda b: ("resume", "budget-1", "--max-llm-calls", "5"),
        _completed("Cold in Oslo."),
    ),
    "resume-failed": Case(
        "f1", flaky_up, "go", lambda b: ("resume", "f1"), _completed("Recovered.")
    ),
}


def backlog(base: Base, case: Case) -> None:
    """Noise, then the case's signal from the CLI: all of it waiting in the inbox."""
    anyio.run(post_noise, base.path, case.eid)
    send_with_no_owner(base.path, *case.command(base))


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(CASES))
async def test_run_right_after_open_returns_the_outcome_after_a_backlog_signal(
    fresh: Base, name: str
) -> None:
    case = CASES[name]
    await anyio.to_thread.run_sync(backlog, fresh, case)
    # As a script does it: open, then run the agent under the id (it is registered by
    # run, not at open, so recovery at open leaves the execution to run).
    async with Runtime(fresh.path, **OPEN) as rt:
        with anyio.fail_after(20):
            result = await rt.run(case.agent, case.prompt, execution_id=case.eid)
        case.expect(result, fresh)
    await _check_left_as(fresh, case.eid, result)


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(CASES))
async def test_wait_right_after_open_returns_the_outcome_after_a_backlog_signal(
    fresh: Base, name: str
) -> None:
    case = CASES[name]
    await anyio.to_thread.run_sync(backlog, fresh, case)
    async with Runtime(fresh.path, agents=[case.agent], **OPEN) as rt:
        with anyio.fail_after(20):
            result = await rt.wait(case.eid)
        case.expect(result, fresh)
    await _check_left_as(fresh, case.eid, result)


async def _check_left_as(base: Base, eid: str, result: Result) -> None:
    """The index says what the Result said, and each signal was taken exactly once."""
    detail = await inspect(base.path, eid)
    assert detail["status"] == result.status
    assert detail["pending_signals"] == []
    types = [t for t, _ in await history(base.path, eid)]
    assert types.count("signal.received") == NOISE
    assert types.count("approval.granted") == (1 if eid in ("pay-1", "twice-1") else 0)
    assert types.count("tool.resolved") == (1 if eid == "charge-1" else 0)
    if eid == "charge-1":
        assert types.count("tool.started") == 1  # decided by hand, never run again


def test_the_sync_facade_waits_for_the_backlog_too(fresh: Base) -> None:
    # The tour: run; if it is suspended, approve and wait. The CLI approved the first
    # transfer meanwhile, so the suspension run returns is the second one.
    case = CASES["approve-then-suspend"]
    backlog(fresh, case)
    with Runtime(fresh.path, **OPEN) as rt:
        r = rt.run(twice, "Move it twice", execution_id="twice-1")
        _next_approval(r, fresh)
        rt.approve("twice-1", r.suspend_reason.confirmation_id)
        r = rt.wait("twice-1")
        assert r.status == "completed" and r.output == "Moved twice."
    granted = [p for t, p in anyio.run(history, fresh.path, "twice-1") if t == "approval.granted"]
    assert len(granted) == 2
    assert granted[0]["confirmation_id"] == fresh.cids["twice-1"]
    assert granted[0]["by"].startswith("cli:")


@pytest.mark.anyio
async def test_result_executions_signal_and_stream_right_after_open_see_the_backlog(
    fresh: Base,
) -> None:
    approve, twice_case = CASES["approve"], CASES["approve-then-suspend"]
    await anyio.to_thread.run_sync(backlog, fresh, twice_case)
    async with Runtime(fresh.path, **OPEN) as rt:
        # result: the first approval is in (running, or at the second suspension)
        r = await rt.result("twice-1")
        assert r.status in ("running", "suspended"), r
        assert r.suspend_reason is None or r.suspend_reason.confirmation_id != fresh.cids["twice-1"]
        # signal: approving the first transfer again is refused, it was decided
        cid = fresh.cids["twice-1"]
        with pytest.raises(
            InvalidSignalError,
            match=f"{cid!r} of execution 'twice-1' was already approved by 'cli:",
        ):
            await rt.approve("twice-1", cid)
    assert [t for t, _ in await history(fresh.path, "twice-1")].count("approval.granted") == 1

    await anyio.to_thread.run_sync(backlog, fresh, approve)
    async with Runtime(fresh.path, agents=[agents.banker], **OPEN) as rt:
        # executions: listed from the index as it is after the approval
        suspended = {e.execution_id for e in await rt.executions(status="suspended")}
        assert "pay-1" not in suspended
        assert {"budget-1", "charge-1"} <= suspended
    await anyio.to_thread.run_sync(backlog, fresh, CASES["resume-budget"])
    async with Runtime(fresh.path, **OPEN) as rt:
        # stream: an execution the backlog made runnable streams to its end
        items = [
            item
            async for item in rt.stream(
                agents.budgeted, "Weather in Oslo?", execution_id="budget-1"
            )
        ]
        final = items[-1]
        assert isinstance(final, Result) and final.status == "completed", items
        assert final.output == "Cold in Oslo."


# -- closed right after a backlog signal resumed an execution ------------------------------

#: A hook for ``gated_transfer`` (not part of its code, so not of its fingerprint):
#: (started, release) events while a test holds the tool inside its call.
GATE: dict[str, tuple[anyio.Event, anyio.Event]] = {}


@tool("gated_transfer", description="Move money, after approval", requires_confirmation=True)
async def gated_transfer(amount: float) -> dict:
    """Move money; while a test holds the gate, wait inside the call."""
    gate = GATE.get("gate")
    if gate is not None:
        started, release = gate
        started.set()
        await release.wait()
    return {"moved": amount, "key": current_idempotency_key()}


gated = Agent(
    "gated",
    instructions="You move money.",
    tools=[gated_transfer],
    llm=Scripted([Scripted.call("gated_transfer", amount=5.0), "Moved $5."]),
)


@pytest.fixture
def gate() -> Iterator[tuple[anyio.Event, anyio.Event]]:
    events = GATE["gate"] = (anyio.Event(), anyio.Event())
    try:
        yield events
    finally:
        GATE.pop("gate", None)


@pytest.mark.anyio
async def test_a_runtime_closed_while_a_backlog_signal_runs_its_tool_leaves_it_to_resume(
    tmp_path: Path, gate: tuple[anyio.Event, anyio.Event]
) -> None:
    path = tmp_path / "data"
    async with Runtime(path, **OPEN) as rt:
        r = await rt.run(gated, "Move $5", execution_id="g-1")
        cid = r.suspend_reason.confirmation_id
    await post_noise(path, "g-1")
    await anyio.to_thread.run_sync(send_with_no_owner, path, "approve", "g-1", cid)

    started, _ = gate
    # shutdown_timeout=0: closing cancels the tool at once, inside its call
    async with Runtime(path, agents=[gated], durability="process", shutdown_timeout=0.0):
        with anyio.fail_after(20):
            await started.wait()  # the approval was delivered and the tool is running
    detail = await inspect(path, "g-1")
    assert detail["status_text"] == "running (no owner: resumes at next start)"
    assert detail["pending_signals"] == []

    GATE.pop("gate")
    async with Runtime(path, agents=[gated], **OPEN) as rt:
        with anyio.fail_after(20):
            result = await rt.wait("g-1")
    assert result.status == "completed" and result.output == "Moved $5."
    records = await history(path, "g-1")
    types = [t for t, _ in records]
    assert types.count("approval.granted") == 1
    keys = [p["key"] for t, p in records if t == "tool.started"]
    assert len(keys) == 2 and keys[0] == keys[1]  # the in-doubt call again, same key
    [done] = [p for t, p in records if t == "tool.completed"]
    assert done["output"]["key"] == keys[0]


@pytest.mark.anyio
async def test_a_runtime_closed_at_once_after_open_leaves_a_backlog_signal_to_apply(
    fresh: Base,
) -> None:
    case = CASES["approve"]
    await anyio.to_thread.run_sync(backlog, fresh, case)
    # Closed while the backlog is delivered (or just after): the approval is either
    # still in the inbox or recorded, and the next open carries on from there.
    async with Runtime(fresh.path, agents=[agents.banker], **OPEN):
        pass
    detail = await inspect(fresh.path, "pay-1")
    assert detail["status"] in ("suspended", "running", "completed"), detail
    async with Runtime(fresh.path, agents=[agents.banker], **OPEN) as rt:
        with anyio.fail_after(20):
            result = await rt.wait("pay-1")
        case.expect(result, fresh)
    await _check_left_as(fresh, "pay-1", result)


# -- wait judges and returns one read -------------------------------------------------------


@pytest.mark.anyio
async def test_wait_returns_a_settled_result_while_a_signal_races_it(data_dir: Path) -> None:
    # No backlog here: an approval sent in this process lands while wait reads. wait
    # may see the execution before the approval (the first suspension) or after it (the
    # second), never in between, running.
    async with Runtime(data_dir, agents=[twice], **OPEN) as rt:
        for i in range(40):
            eid = f"race-{i}"
            r = await rt.run(twice, "Move it twice", execution_id=eid)
            first = r.suspend_reason.confirmation_id
            approved = anyio.Event()

            async def approve(eid: str = eid, cid: str = first, done: Any = approved) -> None:
                await rt.approve(eid, cid)
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(approve)
                # wait again and again while the approval is delivered and recorded
                while not approved.is_set():
                    got = await rt.wait(eid)
                    assert got.status == "suspended", got
                    await anyio.lowlevel.checkpoint()  # a read of the index may not yield
            got = await rt.wait(eid)
            assert got.status == "suspended" and got.suspend_reason.confirmation_id != first
            await rt.cancel(eid, "done with it")


@pytest.mark.anyio
async def test_wait_until_finished_returns_only_a_finished_result(data_dir: Path) -> None:
    async with Runtime(data_dir, agents=[twice], **OPEN) as rt:
        r = await rt.run(twice, "Move it twice", execution_id="fin-1")
        finished: list[Result] = []

        async def wait_finished() -> None:
            finished.append(await rt.wait("fin-1", until="finished"))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_finished)
                await rt.approve("fin-1", r.suspend_reason.confirmation_id)
                second = await rt.wait("fin-1")
                assert second.is_suspended
                assert not finished  # a suspension is not the end
                await rt.approve("fin-1", second.suspend_reason.confirmation_id)
        [done] = finished
        assert done.status == "completed" and done.output == "Moved twice."


# -- a second Runtime on the same dir in this process -----------------------------------------


@pytest.mark.anyio
async def test_a_second_runtime_in_this_process_is_told_it_is_this_process(
    data_dir: Path,
) -> None:
    async with Runtime(data_dir, **OPEN):
        with pytest.raises(DataDirLockedError) as caught:
            async with Runtime(data_dir, **OPEN):
                pass
    assert caught.value.pid == os.getpid()
    message = str(caught.value)
    assert repr(str(data_dir)) in message
    assert f"already open in this process (pid {os.getpid()})" in message
    assert "close that one first, or reuse it" in message
    assert "stop that process" not in message
    async with Runtime(data_dir, **OPEN) as rt:  # the first one released it on close
        assert await rt.executions() == []


# -- the work at open fails ---------------------------------------------------------------------


class _UnreadableIndex(MemoryLog):
    """A store whose index cannot be listed by status: recovery at open fails on it."""

    def streams(self, prefix: str = "", where: Any = None) -> Any:
        if where and where.get("status") == "running":
            raise LogError("the index cannot be read (injected)")
        return super().streams(prefix=prefix, where=where)


@pytest.mark.anyio
async def test_calls_raise_instead_of_hanging_when_the_work_at_open_fails() -> None:
    with pytest.raises(BaseExceptionGroup) as closing:
        async with Runtime(None, log=_UnreadableIndex(record_types())) as rt:
            with anyio.fail_after(10):
                with pytest.raises(RuntimeClosedError, match="could not finish opening") as e:
                    await rt.wait("any-1")
                assert "LogError: the index cannot be read (injected)" in str(e.value)
                assert "perdure health" in str(e.value)
                with pytest.raises(RuntimeClosedError, match="could not finish opening"):
                    await rt.wait_recovered()
    # and closing says what went wrong, having shut everything down
    assert closing.group_contains(LogError, match="injected")
