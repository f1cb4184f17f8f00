"""Signal commands: while another process owns the data dir, and with no runtime at all.

The owner is ``owner.py`` in a subprocess; every wait is on its output (or on a
Runtime's ``wait``) with a timeout, never a sleep.
"""

from __future__ import annotations

import time

import anyio
import pytest

from perdure import Agent, Budget, InvalidSignalError, Runtime
from perdure.events import execution_stream
from tests.cli import agents
from tests.cli.conftest import Owner, Store, cli_env, perdure, perdure_here


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_approve_while_another_process_owns_the_dir_resumes_it(
    fresh_store: Store, owner_factory: type[Owner], backend: str
) -> None:
    path, cid = fresh_store.path, fresh_store.cids["pay-1"]
    owner = owner_factory(path, env=cli_env(PERDURE_TEST_BACKEND=backend))
    pid = int(owner.expect("ready").split()[1])
    # Reading works while the dir is owned, and says who owns it.
    listed = perdure(path, "status", "--json").json()
    assert listed["owner_pid"] == pid
    pay = next(e for e in listed["executions"] if e["execution_id"] == "pay-1")
    assert pay["status_text"] == f"suspended (approval {cid})"

    ran = perdure(path, "approve", "pay-1", cid, "--note", "fine by me")
    assert ran.code == 0, ran.err
    assert f"runtime pid {pid} delivers it and resumes the execution" in ran.out
    owner.expect("completed pay-1", timeout=10)  # auto-resumed by the owner

    steps = perdure_here(path, "steps", "pay-1", "--json").json()["steps"]
    approved = next(e for e in steps if e["kind"] == "approved")
    assert approved["confirmation_id"] == cid and approved["note"] == "fine by me"
    assert approved["by"].startswith("cli:")
    tool = next(e for e in steps if e["kind"] == "tool")
    assert tool["status"] == "ok" and tool["output"]["moved"] == 50.0
    assert perdure_here(path, "inspect", "pay-1", "--json").json()["status"] == "completed"
    owner.close()
    assert owner.proc.returncode == 0


def test_an_owner_without_the_executions_agent_is_named_not_said_to_resume_it(
    fresh_store: Store, owner_factory: type[Owner]
) -> None:
    path, cid = fresh_store.path, fresh_store.cids["pay-1"]
    owner = owner_factory(path, "--without", "banker")
    pid = int(owner.expect("ready").split()[1])
    # The agents are published as the runtime opens: wait for them, by asking.
    deadline = time.monotonic() + 10
    while "agents" not in (perdure(path, "status", "--json").json().get("owner") or {}):
        assert time.monotonic() < deadline, "the owner never published its agents"
    ran = perdure(path, "approve", "pay-1", cid, "--wait", "5")
    assert ran.code == 1  # delivered, but it does not settle: nothing runs it
    assert (
        f"runtime pid {pid} delivers it, but has no agent 'banker' registered: the execution "
        f"carries on once that runtime registers it (rt.register)"
    ) in ran.out
    listed = perdure(path, "status", "--json").json()
    pay = next(e for e in listed["executions"] if e["execution_id"] == "pay-1")
    assert pay["status"] == "running"
    assert pay["status_text"] == (
        "running (the owner has no agent 'banker' registered: waits until it does)"
    )
    published = listed["owner"]
    assert published["pid"] == pid and "banker" not in published["agents"]
    assert {a.name for a in agents.ALL} - {"banker"} <= set(published["agents"])
    owner.close()
    # A runtime that has the agent carries it on, the approval already in hand.
    owner = owner_factory(path)
    owner.expect("ready")
    owner.expect("completed pay-1", timeout=10)
    owner.close()


def test_reject_signal_resume_and_cancel_through_a_live_owner(
    fresh_store: Store, owner_factory: type[Owner]
) -> None:
    path = fresh_store.path
    owner = owner_factory(path)
    owner.expect("ready")

    cid = fresh_store.cids["guard-1"]
    doc = perdure(path, "reject", "guard-1", cid, "--reason", "not today", "--wait", "10", "--json")
    assert doc.code == 0, doc.out
    sent = doc.json()
    [one] = sent["sent"]
    assert (one["name"], one["payload"]) == (
        "reject",
        {"confirmation_id": cid, "reason": "not today"},
    )
    assert one["inbox_seq"] > 0
    assert sent["settled"] is True and sent["status"] == "completed"
    rejected = [
        e
        for e in perdure_here(path, "steps", "guard-1", "--json").json()["steps"]
        if e["kind"] == "tool"
    ]
    assert rejected[0]["status"] == "rejected"
    assert rejected[0]["error"]["message"] == "not today"

    # A name no tool waits for is stored, and the CLI does not claim it resumes anything.
    wrong = perdure(path, "signal", "wait-1", "wrongname", "{}")
    assert wrong.code == 0, wrong.err
    assert wrong.out.splitlines()[1:3] == [
        f"runtime pid {owner.proc.pid} delivers it; it does not resume the execution",
        "the execution waits for signal 'go' (step 2, await_go), not 'wrongname': 'wrongname' "
        "is stored for a tool that calls wait_for_signal('wrongname') later",
    ]
    ran = perdure(path, "signal", "wait-1", "go", '{"ok": true}', "--wait", "10")
    assert ran.code == 0 and "status: completed" in ran.out
    waited = perdure_here(path, "steps", "wait-1", "--json").json()["steps"]
    assert [e["output"] for e in waited if e["kind"] == "tool"] == [{"ok": True}]

    resumed = perdure(
        path, "resume", "budget-1", "--max-llm-calls", "5", "--wait", "10", "--json"
    ).json()
    assert [s["name"] for s in resumed["sent"]] == ["budget"]
    assert resumed["sent"][0]["payload"] == {"budget": {"max_llm_calls": 5}}
    assert resumed["status"] == "completed"

    ran = perdure(path, "cancel", "pay-1", "--reason", "stop")
    assert ran.code == 0, ran.err
    assert f"runtime pid {owner.proc.pid} delivers it and cancels the execution" in ran.out
    owner.expect("cancelled pay-1", timeout=10)
    assert perdure_here(path, "inspect", "pay-1", "--json").json()["cancel_reason"] == "stop"

    # A failed execution is retried from its log (this scripted model fails again).
    retried = perdure_here(path, "resume", "fail-1", "--wait", "10", "--json").json()
    assert [s["name"] for s in retried["sent"]] == ["resume"]
    assert retried["settled"] is True and retried["status"] == "failed"
    owner.close()


@pytest.mark.anyio
async def test_approve_with_no_runtime_is_durable_and_applies_at_the_next_start(
    fresh_store: Store,
) -> None:
    path, cid = fresh_store.path, fresh_store.cids["pay-1"]
    ran = perdure(path, "approve", "pay-1", cid, "--note", "later", "--by", "alice", "--wait", "5")
    # Stored, but nothing will take it before a runtime starts: --wait says so at once.
    assert ran.code == 1, ran.err
    assert f"no runtime owns {path}: the signal is stored" in ran.out
    assert ran.out.splitlines()[-1] == "not waiting: no runtime is there to take it"
    detail = perdure(path, "inspect", "pay-1", "--json").json()
    assert detail["status_text"] == (
        f"suspended (approval {cid}; 1 signal pending, delivered at next start)"
    )
    [pending] = detail["pending_signals"]
    assert (pending["name"], pending["by"]) == ("approve", "alice")
    assert pending["payload"] == {"confirmation_id": cid, "note": "later"}

    async with Runtime(path, agents=agents.ALL, durability="process", shutdown_timeout=2.0) as rt:
        with anyio.fail_after(10):
            result = await rt.wait("pay-1", until="finished")
        assert result.is_completed and result.output == "Moved $50 to savings."
        types = [(r.type, r.payload) async for r in rt.log.read(execution_stream("pay-1"))]
    granted = [p for t, p in types if t == "approval.granted"]
    assert [(g["by"], g["note"]) for g in granted] == [("alice", "later")]


def test_cancel_with_no_runtime_is_durable_and_nothing_runs_at_the_next_start(
    fresh_store: Store, owner_factory: type[Owner]
) -> None:
    path = fresh_store.path
    ran = perdure(path, "cancel", "pay-1", "--reason", "not any more", "--json")
    assert ran.code == 0, ran.out
    doc = ran.json()
    assert doc["owner_pid"] is None and doc["sent"][0]["name"] == "cancel"
    cid = fresh_store.cids["pay-1"]
    pending = "1 signal pending, delivered at next start"
    assert doc["status_text"] == f"suspended (approval {cid}; {pending})"
    with owner_factory(path) as owner:
        owner.expect("ready")
        owner.expect("cancelled pay-1", timeout=10)
    detail = perdure(path, "inspect", "pay-1", "--json").json()
    assert detail["status"] == "cancelled" and detail["cancel_reason"] == "not any more"
    assert detail["pending_signals"] == []
    steps = perdure_here(path, "steps", "pay-1", "--json").json()["steps"]
    assert not any(e["kind"] == "tool" and e.get("status") == "ok" for e in steps)


def test_resolve_an_in_doubt_call_with_no_runtime_then_restart(
    fresh_store: Store, owner_factory: type[Owner]
) -> None:
    path = fresh_store.path
    crashing = owner_factory(
        path,
        "--spawn",
        "charger",
        "charge-1",
        "Charge 9.99",
        env=cli_env(**{agents.CRASH_IN_TOOL: "1"}),
    )
    assert crashing.wait_exit() == -9  # SIGKILLed inside the non-idempotent tool

    listed = perdure(path, "status", "--json").json()
    charge = next(e for e in listed["executions"] if e["execution_id"] == "charge-1")
    assert charge["status_text"] == "running (no owner: resumes at next start)"
    detail = perdure_here(path, "inspect", "charge-1", "--json").json()
    [call] = detail["open_calls"]
    assert (call["tool"], call["status"], call["idempotent"], call["attempts"]) == (
        "charge_card",
        "started",
        False,
        1,
    )
    assert "perdure resolve charge-1 --retry" in detail["next_steps"][0]

    ran = perdure(path, "resolve", "charge-1", "--complete", '{"charged": 9.99, "by": "hand"}')
    assert ran.code == 0, ran.err
    with owner_factory(path) as owner:
        owner.expect("completed charge-1", timeout=10)
    steps = perdure_here(path, "steps", "charge-1", "--json").json()["steps"]
    resolved = next(e for e in steps if e["kind"] == "resolved")
    assert resolved["action"] == "complete" and resolved["output"] == {
        "charged": 9.99,
        "by": "hand",
    }
    # the restarted runtime may record the unknown_outcome suspension before it takes the
    # resolve signal from the inbox, or take the signal first: either way, never re-run
    assert [e["kind"] for e in steps].count("suspended") <= 1
    tool = next(e for e in steps if e["kind"] == "tool")
    assert tool["status"] == "ok" and tool["attempts"] == 1  # never re-run


@pytest.mark.anyio
async def test_resume_accept_drift_lets_a_drifted_execution_carry_on(fresh_store: Store) -> None:
    path, cid = fresh_store.path, fresh_store.cids["pay-1"]
    changed = Agent(
        "banker",
        instructions="You move money when asked, twice as carefully.",
        tools=[agents.transfer_funds],
        llm=agents.banker.llm,
    )
    async with Runtime(path, agents=[changed], durability="process", shutdown_timeout=2.0) as rt:
        await rt.approve("pay-1", cid)
        with anyio.fail_after(10):
            result = await rt.wait("pay-1")
        assert result.suspend_reason is not None and result.suspend_reason.kind == "drift"

    inspected = perdure(path, "inspect", "pay-1")
    assert "status     suspended (drift)" in inspected.out
    assert "perdure resume pay-1 --accept-drift" in inspected.out
    ran = perdure(path, "resume", "pay-1", "--accept-drift", "--json")
    assert ran.code == 0, ran.out
    assert [s["name"] for s in ran.json()["sent"]] == ["accept_drift"]

    async with Runtime(path, agents=[changed], durability="process", shutdown_timeout=2.0) as rt:
        with anyio.fail_after(10):
            result = await rt.wait("pay-1", until="finished")
        assert result.is_completed


def test_a_signal_is_said_to_resume_the_execution_only_when_a_tool_waits_for_it(
    fresh_store: Store,
) -> None:
    path = fresh_store.path
    stored = f"no runtime owns {path}: the signal is stored and takes effect when a runtime"
    wrong = perdure(path, "signal", "wait-1", "paid:123", '{"amount": 5}')
    assert wrong.code == 0, wrong.err
    assert wrong.out.splitlines()[1].startswith(stored)
    assert wrong.out.splitlines()[2] == (
        "the execution waits for signal 'go' (step 2, await_go), not 'paid:123': 'paid:123' is "
        "stored for a tool that calls wait_for_signal('paid:123') later"
    )
    doc = perdure_here(path, "signal", "wait-1", "later", "--json").json()
    assert doc["resumes"] is False and "waits for signal 'go'" in doc["note"]
    right = perdure_here(path, "signal", "wait-1", "go", "--json").json()
    assert right["resumes"] is True and right["note"] == "step 2 (await_go) waits for 'go'"
    # Suspended for something else: no tool waits for any signal now.
    cid = fresh_store.cids["pay-1"]
    other = perdure(path, "signal", "pay-1", "go")
    assert other.out.splitlines()[2] == (
        f"no tool waits for 'go' now (the execution waits for approval {cid}): 'go' is stored "
        f"for a tool that calls wait_for_signal('go') later"
    )
    approve = perdure_here(path, "approve", "pay-1", cid, "--json").json()
    assert approve["resumes"] is True and approve["note"] is None
    budget = perdure_here(path, "resume", "pay-1", "--max-llm-calls", "9", "--json").json()
    assert budget["resumes"] is False
    assert budget["note"] == f"it still waits for approval {cid}"


def test_rt_resume_refuses_a_budget_that_raises_nothing(fresh_store: Store) -> None:
    # The same precheck as the CLI's: a limit of 0 (or infinity) would be recorded as a
    # "raise" and suspend the execution again at once (NaN is refused by Budget itself).
    with Runtime(fresh_store.path, agents=agents.ALL, durability="process") as rt:
        for budget in (Budget(max_llm_calls=0), Budget(max_dollars=float("inf"))):
            with pytest.raises(InvalidSignalError, match="a raised limit must be a positive"):
                rt.resume("budget-1", budget=budget, wait=False)
        assert rt.result("budget-1").is_suspended
    records = perdure_here(fresh_store.path, "events", "budget-1", "--json").json()["records"]
    assert "budget.raised" not in [r["type"] for r in records]
    assert (
        perdure_here(fresh_store.path, "inspect", "budget-1", "--json").json()["pending_signals"]
        == []
    )
