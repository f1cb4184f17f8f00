"""An operator doing the wrong thing with the signal commands (twice, too late, at the
wrong execution, with odd values) or pointing the CLI at the wrong dir. Each is refused
with a message naming the execution (and the confirmation or signal in the way) and
what to do, exits non-zero, and appends nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from perdure import Agent, ExecutionNotFoundError, InvalidSignalError, Runtime
from perdure.events import INBOX_STREAM, SignalSent, encode, execution_stream, record_types
from perdure.log import ANY, LmdbLog, LogError, codec
from perdure.providers import Scripted
from tests.cli import agents
from tests.cli.conftest import Owner, Store, cli_env, perdure, perdure_here


def inbox_last_seq(path: Path) -> int:
    """How many signals the inbox holds (read as a client, like the CLI)."""

    async def read() -> int:
        log = await LmdbLog.open(path, types=record_types(), client=True)
        try:
            info = await log.stream_info(INBOX_STREAM)
            return info.last_seq if info is not None else 0
        finally:
            await log.aclose()

    return anyio.run(read)


def test_a_second_decision_while_the_first_waits_in_the_inbox_is_refused(
    fresh_store: Store, owner_factory: type[Owner]
) -> None:
    path, cid = fresh_store.path, fresh_store.cids["pay-1"]
    assert perdure(path, "approve", "pay-1", cid, "--by", "alice").code == 0
    sent = inbox_last_seq(path)
    waiting = (
        f"confirmation {cid!r} already has a decision waiting in the inbox, approve by alice "
        f"(inbox seq {sent}); a confirmation is decided once; no runtime owns {path}: it is "
        f"delivered at the next start. Nothing was sent; see 'perdure inspect pay-1'"
    )
    for args in (("approve", "pay-1", cid), ("reject", "pay-1", cid, "--reason", "no")):
        ran = perdure(path, *args)
        assert (ran.code, ran.out) == (1, ""), args
        assert ran.err == f"perdure: error: execution 'pay-1': {waiting}\n"
    as_json = perdure_here(path, "approve", "pay-1", cid, "--json").json()
    assert as_json["error"]["kind"] == "already_sent"
    assert inbox_last_seq(path) == sent  # nothing appended

    # A cancel waiting in the inbox: nothing more is taken, a second cancel included.
    assert perdure(path, "cancel", "wait-1", "--by", "bob").code == 0
    cancel_seq = inbox_last_seq(path)
    for args in (
        ("cancel", "wait-1"),
        ("signal", "wait-1", "go"),
        ("resume", "wait-1", "--max-llm-calls", "9"),
    ):
        ran = perdure_here(path, *args)
        assert ran.code == 1, args
        assert ran.err.startswith(
            f"perdure: error: execution 'wait-1': a cancel waits in the inbox, cancel by bob "
            f"(inbox seq {cancel_seq}), and then it takes no more signals"
        ), args
    assert inbox_last_seq(path) == cancel_seq

    # The approval runs once when a runtime starts: one grant, one tool call.
    with owner_factory(path) as owner:
        owner.expect("ready")
        want, seen = {"completed pay-1", "cancelled wait-1"}, set()
        while seen != want:  # in either order
            line = owner.expect("")
            seen |= {line} & want
    steps = perdure_here(path, "steps", "pay-1", "--json").json()["steps"]
    assert [e["kind"] for e in steps].count("approved") == 1
    assert [e for e in steps if e["kind"] == "signal_ignored"] == []
    [tool] = [e for e in steps if e["kind"] == "tool"]
    assert (tool["status"], tool["attempts"]) == ("ok", 1)


def test_a_repeated_resume_sends_only_what_is_new(fresh_store: Store) -> None:
    path = fresh_store.path
    assert perdure_here(path, "resume", "fail-1").code == 0
    seq = inbox_last_seq(path)
    again = perdure(path, "resume", "fail-1")
    assert again.code == 1
    assert again.err == (
        f"perdure: error: execution 'fail-1': resume by {again_by(path)} (inbox seq {seq}) "
        f"already waits in the inbox and does the same; no runtime owns {path}: it is "
        f"delivered at the next start. Nothing was sent; see 'perdure inspect fail-1'\n"
    )
    # A budget with it is still new: only the budget is sent.
    more = perdure_here(path, "resume", "fail-1", "--max-llm-calls", "9", "--json")
    assert more.code == 0, more.out
    assert [s["name"] for s in more.json()["sent"]] == ["budget"]
    assert inbox_last_seq(path) == seq + 1


def again_by(path: Path) -> str:
    """Who the CLI says it is, as recorded with the last pending signal of fail-1."""
    [*_, last] = perdure_here(path, "inspect", "fail-1", "--json").json()["pending_signals"]
    return str(last["by"])


def test_a_decision_on_a_confirmation_already_decided_names_who_decided(
    fresh_store: Store, owner_factory: type[Owner]
) -> None:
    path = fresh_store.path
    pay, guard = fresh_store.cids["pay-1"], fresh_store.cids["guard-1"]
    with owner_factory(path) as owner:
        owner.expect("ready")
        assert perdure(path, "approve", "pay-1", pay, "--by", "alice", "--wait", "10").code == 0
        rejected = perdure(path, "reject", "guard-1", guard, "--reason", "no", "--by", "bob")
        assert rejected.code == 0
        owner.expect("completed guard-1")
        sent = inbox_last_seq(path)
        # Through the live owner and with none: the same answer, from the records.
        again = perdure(path, "approve", "guard-1", guard)
    steps = perdure_here(path, "steps", "guard-1", "--json").json()["steps"]
    seq = next(e["seq"] for e in steps if e["kind"] == "rejected")
    assert (again.code, again.out) == (1, "")
    assert again.err == (
        f"perdure: error: confirmation {guard!r} of execution 'guard-1' was already rejected "
        f"by bob (seq {seq}, step 2); the execution is completed; a confirmation is decided "
        f"once, so nothing was sent; see 'perdure steps guard-1'\n"
    )
    twice = perdure_here(path, "reject", "pay-1", pay, "--reason", "late", "--json")
    assert twice.code == 1 and twice.json()["error"]["kind"] == "invalid_signal"
    assert (
        f"{pay!r} of execution 'pay-1' was already approved by alice"
        in (twice.json()["error"]["message"])
    )
    assert inbox_last_seq(path) == sent


def test_resume_of_a_suspension_it_cannot_decide_names_the_command_that_does(
    store: Store,
) -> None:
    ran = perdure(store.path, "resume", "wait-1")
    assert (ran.code, ran.out) == (1, "")
    assert ran.err == (
        "perdure: error: execution 'wait-1' is suspended (signal); resume does not decide "
        "that: send it: perdure signal wait-1 go JSON\n"
    )
    budget = perdure_here(store.path, "resume", "budget-1")
    assert budget.code == 1
    assert budget.err.endswith("raise the budget: perdure resume budget-1 --max-llm-calls N\n")


@pytest.mark.parametrize("value", ["nan", "-1", "soon"])
def test_a_bad_wait_is_a_usage_error_before_anything_is_sent(
    fresh_store: Store, value: str
) -> None:
    before = inbox_last_seq(fresh_store.path)
    ran = perdure(fresh_store.path, "signal", "wait-1", "go", "--wait", value)
    assert (ran.code, ran.out) == (2, "")
    assert "perdure signal: error: argument --wait: " in ran.err
    assert "Traceback" not in ran.err and "unexpected" not in ran.err
    assert inbox_last_seq(fresh_store.path) == before


@pytest.mark.parametrize("name", ["go ", " go", "go\n", "g\x1bo", ""])
def test_signal_names_with_spaces_or_control_characters_are_refused(
    fresh_store: Store, name: str
) -> None:
    before = inbox_last_seq(fresh_store.path)
    ran = perdure_here(fresh_store.path, "signal", "wait-1", name)
    assert ran.code == 2
    if name:
        assert f"signal name {name!r} has surrounding spaces or control characters" in ran.err
        assert "perdure signal wait-1 go" in ran.err
    else:
        assert "a signal needs a name" in ran.err
    assert inbox_last_seq(fresh_store.path) == before


def test_a_dir_that_is_no_perdure_log_says_which_dir_to_pass(tmp_path: Path) -> None:
    import lmdb

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "data.mdb").write_bytes(os.urandom(8192))
    ran = perdure(junk, "status")
    assert ran.code == 1
    assert "MDB_INVALID" in ran.err
    assert ran.err.endswith(
        "is it the data dir a Runtime opened? pass --data-dir DIR or set PERDURE_DATA_DIR\n"
    )
    other = tmp_path / "other"
    env = lmdb.open(str(other), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"key", b"value")
    env.close()
    doc = perdure_here(other, "approve", "x-1", "c-1", "--json").json()
    assert doc["error"]["kind"] == "no_data_dir"
    assert "holds no perdure log; is it the data dir a Runtime opened?" in doc["error"]["message"]


# -- a confirmation of a child execution, sent to its parent ---------------------------------

payer = Agent(
    "payer",
    instructions="You pay when asked.",
    tools=[agents.transfer_funds],
    llm=Scripted([Scripted.call("transfer_funds", dst="vendor", amount=7.0), "Paid."]),
)
manager = Agent(
    "manager",
    instructions="You delegate payments.",
    agents=[payer],
    llm=Scripted([Scripted.call("delegate_to_payer", task="pay the vendor"), "Managed."]),
)


@pytest.mark.anyio
async def test_a_childs_confirmation_sent_to_its_parent_points_to_the_child(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data"
    async with Runtime(path, agents=[manager], durability="process", shutdown_timeout=2.0) as rt:
        await rt.spawn(manager, "Pay the vendor", execution_id="mgr-1")
        with anyio.fail_after(10):
            parent = await rt.wait("mgr-1")
        assert parent.is_suspended
        [child] = [e for e in await rt.executions() if e.execution_id != "mgr-1"]
        child_result = await rt.wait(child.execution_id)
        cid = child_result.suspend_reason.confirmation_id
    child_id = child.execution_id

    wrong = await anyio.to_thread.run_sync(perdure, path, "approve", "mgr-1", cid)
    assert (wrong.code, wrong.out) == (1, "")
    assert wrong.err == (
        f"perdure: error: confirmation {cid!r} belongs to child execution {child_id!r}, "
        f"which execution 'mgr-1' waits for; decide it there: perdure approve {child_id} "
        f"{cid} [--note TEXT]; nothing was sent\n"
    )
    assert await anyio.to_thread.run_sync(inbox_last_seq, path) == 0
    right = await anyio.to_thread.run_sync(perdure, path, "approve", child_id, cid)
    assert right.code == 0, right.err

    # With no runtime the approval waited; the next start runs the child, then the parent.
    async with Runtime(path, agents=[manager], durability="process", shutdown_timeout=2.0) as rt:
        with anyio.fail_after(10):
            done = await rt.wait("mgr-1", until="finished")
        assert done.is_completed and done.output == "Managed."
        kinds = [r.type async for r in rt.log.read(execution_stream(child_id))]
    assert kinds.count("approval.granted") == 1 and kinds.count("tool.completed") == 1


# -- the same mistakes through the Runtime's operator API -------------------------------------


@pytest.mark.anyio
async def test_rt_resolve_with_nothing_in_doubt_is_refused_and_records_nothing(
    fresh_store: Store,
) -> None:
    path = fresh_store.path
    async with Runtime(path, agents=agents.ALL, durability="process", shutdown_timeout=2.0) as rt:
        before = [r.type async for r in rt.log.read(execution_stream("pay-1"))]
        with pytest.raises(InvalidSignalError) as caught:
            await rt.resolve("pay-1", retry=True)
        assert str(caught.value) == (
            "execution 'pay-1' has no tool call in doubt (status suspended); resolve decides a "
            "non-idempotent tool call that started but never finished"
        )
        after = [r.type async for r in rt.log.read(execution_stream("pay-1"))]
        assert after == before  # no signal.ignored either
        with pytest.raises(ExecutionNotFoundError):
            await rt.resolve("nope", fail="x")
        with pytest.raises(ValueError, match="unknown status 'bogus'; use one of running, "):
            await rt.executions(status="bogus")
        assert [e.execution_id for e in await rt.executions(status="failed")] == ["fail-1"]
    # The CLI says the same, from the same check.
    ran = await anyio.to_thread.run_sync(perdure, path, "resolve", "pay-1", "--retry")
    assert ran.err == f"perdure: error: {caught.value}\n"


def test_an_empty_data_dir_never_falls_back_to_another_store(store: Store) -> None:
    # --data-dir "$DIR" with DIR unset, while PERDURE_DATA_DIR names a real store: acting
    # on that store instead would approve in the wrong place.
    env = cli_env(PERDURE_DATA_DIR=str(store.path))
    for where in (("--data-dir", "", "status"), ("status", "--data-dir", " ")):
        ran = perdure(None, *where, env=env)
        assert (ran.code, ran.out) == (2, ""), where
        assert ran.err == (
            "perdure: error: --data-dir is empty (an unset shell variable?); pass the data dir "
            "a Runtime opened, or leave --data-dir out to use $PERDURE_DATA_DIR\n"
        )
    assert perdure(None, "status", "--json", env=env).json()["data_dir"] == str(store.path)


def test_built_in_signals_sent_by_name_get_the_same_checks(fresh_store: Store) -> None:
    path = fresh_store.path
    before = inbox_last_seq(path)
    resolve = perdure(path, "signal", "pay-1", "resolve", '{"action": "retry"}')
    assert (resolve.code, resolve.out) == (1, "")
    assert resolve.err == (
        "perdure: error: execution 'pay-1' has no tool call in doubt (status suspended); "
        "resolve decides a non-idempotent tool call that started but never finished\n"
    )
    bare = perdure_here(path, "signal", "pay-1", "approval")
    assert bare.code == 1
    assert bare.err == (
        "perdure: error: 'approval' needs a confirmation_id in its payload; see 'perdure "
        "inspect pay-1' for the pending ones\n"
    )
    assert inbox_last_seq(path) == before


def test_reject_signal_and_budget_sent_with_no_runtime_apply_at_the_next_start(
    fresh_store: Store, owner_factory: type[Owner]
) -> None:
    path, cid = fresh_store.path, fresh_store.cids["guard-1"]
    sent = [
        perdure(path, "reject", "guard-1", cid, "--reason", "not Zurich", "--by", "ops"),
        perdure(path, "signal", "wait-1", "go", '{"ready": "oui ✓"}', "--by", "ops"),
        perdure(path, "resume", "budget-1", "--max-llm-calls", "3", "--by", "ops"),
    ]
    assert [r.code for r in sent] == [0, 0, 0], [r.err for r in sent]
    listed = {e["execution_id"]: e for e in perdure(path, "status", "--json").json()["executions"]}
    for eid in ("guard-1", "wait-1", "budget-1"):
        assert listed[eid]["pending_signals"] == 1, eid
        assert "1 signal pending, delivered at next start" in listed[eid]["status_text"], eid
    with owner_factory(path) as owner:
        owner.expect("ready")
        want, seen = {"completed guard-1", "completed wait-1", "completed budget-1"}, set()
        while seen != want:
            seen |= {owner.expect("")} & want

    def steps(eid: str) -> list[dict]:
        return perdure_here(path, "steps", eid, "--json").json()["steps"]

    [rejected] = [e for e in steps("guard-1") if e["kind"] == "tool"]
    assert rejected["status"] == "rejected" and rejected["error"]["message"] == "not Zurich"
    [waited] = [e for e in steps("wait-1") if e["kind"] == "tool"]
    assert waited["output"] == {"ready": "oui ✓"}
    [raised] = [e for e in steps("budget-1") if e["kind"] == "budget_raised"]
    assert raised["by"] == "ops" and raised["budget"]["max_llm_calls"] == 3
    after = {e["execution_id"]: e for e in perdure(path, "status", "--json").json()["executions"]}
    assert [after[eid]["pending_signals"] for eid in ("guard-1", "wait-1", "budget-1")] == [0] * 3


# -- a payload nested deeper than the log can read back -----------------------------------------


def nested(depth: int) -> list:
    """A list nested ``depth`` levels deep."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_a_payload_nested_deeper_than_the_log_reads_is_refused(fresh_store: Store) -> None:
    path = fresh_store.path
    before = inbox_last_seq(path)
    for depth in (65, 450, 5000):
        text = "[" * depth + "]" * depth
        ran = perdure_here(path, "signal", "wait-1", "go", text, "--json")
        assert ran.code == 1, depth
        error = ran.json()["error"]
        assert error["kind"] == "bad_json"
        assert (
            "levels deep, more than the 64 a payload may (the log could not read it "
            in (error["message"])
        )
    complete = perdure(path, "resolve", "pay-1", "--complete", "[" * 500 + "]" * 500)
    assert complete.code == 1 and "nests 500 levels deep" in complete.err
    assert inbox_last_seq(path) == before
    assert perdure_here(path, "signal", "wait-1", "go", "[" * 64 + "]" * 64).code == 0


def test_an_unreadable_inbox_record_neither_stops_the_runtime_nor_the_status_views(
    fresh_store: Store, owner_factory: type[Owner]
) -> None:
    # What 'perdure signal' used to write for a payload 450 levels deep: CBOR the log
    # encodes but its decoder refuses (more than 400 levels). The owner's inbox pump
    # died on it at every restart until the supervisor stopped the whole runtime. The
    # log now refuses to write such a record; one written by an older version, or
    # damaged so that it still checks out, must still not stop anything.
    path = fresh_store.path

    async def append_poison() -> int:
        log = await LmdbLog.open(path, types=record_types(), client=True)
        try:
            record = encode(SignalSent("wait-1", "go", nested(450), "test"))
            with pytest.raises(LogError, match="could not be read back"):
                await log.append(INBOX_STREAM, [record], expect=ANY)
            with pytest.MonkeyPatch.context() as patch:  # as an older version wrote it
                patch.setattr(codec, "_check_readable", lambda *args: None)
                return await log.append(INBOX_STREAM, [record], expect=ANY)
        finally:
            await log.aclose()

    bad = anyio.run(append_poison)
    listed = perdure(path, "status", "--json")
    assert listed.code == 0, listed.err
    health = perdure(path, "health", "--json")
    assert health.code == 1
    assert [(f["stream"], f["seq"]) for f in health.json()["faults"]] == [(INBOX_STREAM, bad)]

    with owner_factory(path) as owner:
        owner.expect("ready")
        ran = perdure(path, "signal", "wait-1", "go", '{"after": "poison"}', "--wait", "10")
        assert ran.code == 0, ran.out + ran.err
        owner.expect("completed wait-1")
        # Still serving: an approval after it is delivered too.
        assert perdure(path, "approve", "pay-1", fresh_store.cids["pay-1"]).code == 0
        owner.expect("completed pay-1")
    assert owner.proc.returncode == 0
    assert f"inbox seq {bad}: refused, the record cannot be read" in owner.stderr_path.read_text()
    [tool] = [
        e
        for e in perdure_here(path, "steps", "wait-1", "--json").json()["steps"]
        if e["kind"] == "tool"
    ]
    assert tool["output"] == {"after": "poison"}


def test_inspect_does_not_suggest_a_decision_that_already_waits_in_the_inbox(
    fresh_store: Store,
) -> None:
    path, cid = fresh_store.path, fresh_store.cids["pay-1"]
    before = perdure_here(path, "inspect", "pay-1", "--json").json()["next_steps"]
    assert any(f"perdure approve pay-1 {cid}" in s for s in before)
    assert perdure_here(path, "approve", "pay-1", cid).code == 0
    seq = inbox_last_seq(path)
    after = perdure_here(path, "inspect", "pay-1", "--json").json()["next_steps"]
    assert after == [
        f"waiting in the inbox: approve (inbox seq {seq}) (delivered when a runtime next "
        f"opens the dir)"
    ]
    assert perdure_here(path, "cancel", "wait-1").code == 0
    text = perdure(path, "inspect", "wait-1").out
    assert text.endswith(
        "next\n  a cancel waits in the inbox (delivered when a runtime next opens the dir); "
        "nothing more to decide\n"
    )


def test_a_childs_result_cannot_be_forged_by_hand(store: Store) -> None:
    ran = perdure(store.path, "signal", "boss-1", "child:boss-1/2", '{"output": "fake"}')
    assert (ran.code, ran.out) == (2, "")
    assert ran.err == (
        "perdure: error: signal name 'child:boss-1/2' is reserved: the runtime sends a child "
        "execution's result to its parent under it; act on the child itself (perdure "
        "inspect boss-1/2)\n"
    )
