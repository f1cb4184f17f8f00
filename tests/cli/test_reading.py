"""The reading commands (status, inspect, steps, events, export) as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from perdure.cli_export import records_from_export
from perdure.events import execution_stream, record_types
from perdure.log import LmdbLog, Record
from tests.cli import agents
from tests.cli.conftest import EXPECTED, Store, cli_env, perdure, perdure_here


def read_records(path: Path, execution_id: str) -> list[Record]:
    """The execution's records, read through the log (as a client, like the CLI)."""

    async def read() -> list[Record]:
        log = await LmdbLog.open(path, types=record_types(), client=True)
        try:
            return [r async for r in log.read(execution_stream(execution_id))]
        finally:
            await log.aclose()

    return anyio.run(read)


def test_status_json_lists_every_execution_with_its_status(store: Store) -> None:
    ran = perdure(store.path, "status", "--json")
    assert ran.code == 0, ran.err
    doc = ran.json()
    assert doc["owner_pid"] is None
    assert doc["data_dir"] == str(store.path)
    got = {e["execution_id"]: e for e in doc["executions"]}
    assert list(got) == list(EXPECTED)  # creation order
    for eid, (agent, status, reason) in EXPECTED.items():
        assert (got[eid]["agent"], got[eid]["status"], got[eid]["reason"]) == (
            agent,
            status,
            reason,
        )
    assert got["pay-1"]["status_text"] == f"suspended (approval {store.cids['pay-1']})"
    assert got["pay-1"]["confirmations"] == [store.cids["pay-1"]]
    assert got["guard-1"]["status_text"] == f"suspended (contract {store.cids['guard-1']})"
    assert got["budget-1"]["status_text"] == "suspended (budget)"
    assert got["weather-1"]["steps"] == 3 and got["weather-1"]["llm_calls"] == 2
    assert got["weather-1"]["tokens"] == 30 and got["weather-1"]["tool_calls"] == 1
    assert got["boss-1/2"]["parent"] == "boss-1"


def test_status_table_is_aligned_and_filters(store: Store) -> None:
    ran = perdure(store.path, "status")
    assert ran.code == 0
    lines = ran.out.splitlines()
    assert lines[0] == f"data dir {store.path}: no runtime owns it"
    header, rows, summary = lines[1], lines[2:-1], lines[-1]
    assert header.split() == ["EXECUTION", "AGENT", "STATUS", "STEPS", "TOKENS", "COST", "UPDATED"]
    at = header.index("STATUS")
    for row in rows:
        eid = row.split()[0]
        assert row[at:].startswith(EXPECTED[eid][1]), row  # every status in one column
    assert summary == "11 executions: 1 cancelled, 5 completed, 1 failed, 4 suspended"

    suspended = perdure_here(store.path, "status", "--status", "suspended", "--json").json()
    assert {e["execution_id"] for e in suspended["executions"]} == {
        "pay-1",
        "guard-1",
        "budget-1",
        "wait-1",
    }
    banker = perdure_here(store.path, "--json", "status", "--agent", "banker").json()
    assert [e["execution_id"] for e in banker["executions"]] == ["pay-1", "cancel-1"]
    none = perdure_here(store.path, "status", "--agent", "nobody")
    assert none.code == 0 and "no executions with agent 'nobody'" in none.out


def test_status_and_inspect_agree_on_every_execution(store: Store) -> None:
    doc = perdure(store.path, "status", "--json").json()
    listed = {e["execution_id"]: e for e in doc["executions"]}
    assert set(listed) == set(EXPECTED)
    for eid in listed:
        ran = perdure_here(store.path, "inspect", eid, "--json")
        assert ran.code == 0, ran.err
        detail = ran.json()
        assert detail["status"] == listed[eid]["status"], eid
        assert detail["status_text"] == listed[eid]["status_text"], eid
        assert detail["reason"] == listed[eid]["reason"], eid
    text = perdure(store.path, "inspect", "pay-1").out
    assert f"status     {listed['pay-1']['status_text']}\n" in text


def test_inspect_shows_prompt_fingerprints_usage_suspension_and_children(store: Store) -> None:
    pay = perdure(store.path, "inspect", "pay-1", "--json").json()
    cid = store.cids["pay-1"]
    assert pay["prompt"] == "Move $50 to savings" and pay["agent"] == "banker"
    assert pay["definition"] == agents.banker.definition()
    assert pay["request_fingerprint"] == agents.banker.request_fingerprint
    assert pay["usage"]["llm_calls"] == 1 and pay["usage"]["total_tokens"] == 15
    assert pay["suspension"]["kind"] == "approval"
    assert pay["suspension"]["confirmation_id"] == cid
    assert pay["suspension"]["arguments"] == {"dst": "savings", "amount": 50.0}
    assert [c["status"] for c in pay["open_calls"]] == ["approval"]
    assert f"perdure approve pay-1 {cid} [--note TEXT]" in " ".join(pay["next_steps"])

    guard = perdure_here(store.path, "inspect", "guard-1", "--json").json()
    assert guard["suspension"]["contract"] == "no-zurich"
    assert "second pair of eyes" in guard["suspension"]["message"]

    budget = perdure_here(store.path, "inspect", "budget-1").out
    assert "budget: max_llm_calls 1 reached (used 1)" in budget
    assert "perdure resume budget-1 --max-llm-calls N" in budget
    assert "budget     max_llm_calls 1\n" in budget

    boss = perdure_here(store.path, "inspect", "boss-1", "--json").json()
    assert [(c["execution_id"], c["agent"], c["status"]) for c in boss["children"]] == [
        ("boss-1/2", "helper", "completed")
    ]
    assert boss["output"] == "Boss done."
    child = perdure(store.path, "inspect", "boss-1/2", "--json").json()
    assert child["parent"] == {"execution_id": "boss-1", "step": 2}

    failed = perdure_here(store.path, "inspect", "fail-1").out
    assert "error      llm: BadRequestError:" in failed
    assert "retry it from its log: perdure resume fail-1" in failed
    cancelled = perdure_here(store.path, "inspect", "cancel-1", "--json").json()
    assert cancelled["cancel_reason"] == "changed my mind"


def test_steps_show_a_delegate_call_woken_by_its_childs_outcome_as_one_attempt(
    store: Store,
) -> None:
    doc = perdure(store.path, "steps", "boss-1", "--json").json()
    (call,) = [e for e in doc["steps"] if e["kind"] == "tool"]
    # started, suspended for its child, invoked again when the child finished
    assert (call["tool"], call["status"], call["attempts"], call["wakeups"]) == (
        "delegate_to_helper",
        "ok",
        2,
        1,
    )
    text = perdure(store.path, "steps", "boss-1").out
    assert f"key {call['key']}, attempt 1, woken 1 time" in text


def test_steps_show_llm_and_tool_calls_approvals_and_suspensions(store: Store) -> None:
    doc = perdure(store.path, "steps", "weather-1", "--json").json()
    kinds = [e["kind"] for e in doc["steps"]]
    assert kinds == ["started", "llm", "tool", "llm", "completed"]
    llm = doc["steps"][1]
    assert (llm["model"], llm["provider"], llm["input_tokens"], llm["output_tokens"]) == (
        "scripted",
        "scripted",
        10,
        5,
    )
    assert llm["cost"] == 0.0 and llm["latency_ms"] >= 0
    assert llm["tool_calls"] == [{"step": 2, "name": "get_weather", "arguments": {"city": "Paris"}}]
    tool = doc["steps"][2]
    assert tool["tool"] == "get_weather" and tool["arguments"] == {"city": "Paris"}
    assert tool["status"] == "ok" and tool["output"]["forecast"] == "sunny"
    assert tool["key"].startswith("weather-1:2:") and tool["attempts"] == 1

    text = perdure(store.path, "steps", "weather-1").out
    assert text.splitlines()[0] == "execution weather-1: completed"
    assert f"key {tool['key']}, attempt 1" in text
    assert "scripted/scripted  10+5 tokens  $0.0000" in text

    pay = perdure_here(store.path, "steps", "pay-1", "--json").json()["steps"]
    approval = next(e for e in pay if e["kind"] == "approval")
    assert approval["confirmation_id"] == store.cids["pay-1"] and approval["decision"] is None
    assert pay[-1]["kind"] == "suspended" and pay[-1]["reason"]["kind"] == "approval"

    boss = [
        e["kind"] for e in perdure_here(store.path, "steps", "boss-1", "--json").json()["steps"]
    ]
    assert "waiting" in boss and "signal" in boss  # the child's result arrives as a signal


def test_events_print_every_raw_record(store: Store) -> None:
    records = read_records(store.path, "weather-1")
    doc = perdure(store.path, "events", "weather-1", "--json").json()
    assert [(r["seq"], r["type"], r["version"]) for r in doc["records"]] == [
        (r.seq, r.type, r.version) for r in records
    ]
    lines = perdure(store.path, "events", "weather-1").out.splitlines()
    assert len(lines) == len(records)
    for line, record in zip(lines, records, strict=True):
        assert line.split()[0] == str(record.seq) and f" {record.type} v1 " in line


@pytest.mark.parametrize("execution_id", ["weather-1", "archive-1", "boss-1"])
def test_export_round_trips(store: Store, tmp_path: Path, execution_id: str) -> None:
    target = tmp_path / "export.json"
    ran = perdure(store.path, "export", execution_id, "-o", str(target))
    assert ran.code == 0 and f"to {target}" in ran.out
    doc = json.loads(target.read_text())
    rebuilt = records_from_export(doc)
    records = read_records(store.path, execution_id)
    # Record equality is field by field; NaN is never equal to itself, so compare the
    # CBOR payloads' canonical repr instead of the floats.
    assert [(r.stream, r.seq, r.type, r.version, r.timestamp) for r in rebuilt] == [
        (r.stream, r.seq, r.type, r.version, r.timestamp) for r in records
    ]
    assert [repr(r.payload) for r in rebuilt] == [repr(r.payload) for r in records]
    assert doc["index"]["last_seq"] == len(records)
    # The same document on stdout.
    assert json.loads(perdure_here(store.path, "export", execution_id).out) == doc


def test_export_tags_what_json_lacks(store: Store) -> None:
    doc = perdure(store.path, "export", "archive-1").json()
    done = next(r for r in doc["records"] if r["type"] == "tool.completed")
    output = done["payload"]["output"]
    assert output["$map"]  # a key that looks like a tag forces the explicit form
    pairs = dict((k, v) for k, v in output["$map"])
    assert pairs["blob"] == {"$bytes": "AP9kYXRh"}
    assert pairs["ratio"] == {"$float": "nan"}
    assert pairs["$bytes"] == "not a tag"


def test_reading_commands_never_take_the_owner_lock(store: Store) -> None:
    lock = store.path / "owner.lock"
    before = lock.read_text()
    assert before.strip() == str(store.builder_pid)
    for args in (("status",), ("inspect", "pay-1"), ("steps", "pay-1"), ("export", "pay-1")):
        assert perdure_here(store.path, *args).code == 0
    assert perdure(store.path, "health").code == 0
    # An owner writes its pid into the lock file when it takes the lock.
    assert lock.read_text() == before


def test_data_dir_from_the_environment_and_the_console_script(store: Store) -> None:
    script = Path(sys.executable).with_name("perdure")
    proc = subprocess.run(
        [str(script), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(PERDURE_DATA_DIR=str(store.path)),
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["executions"]) == len(EXPECTED)


@pytest.mark.parametrize("unbuffered", [False, True])
def test_piping_into_head_is_quiet(store: Store, unbuffered: bool) -> None:
    # report-1 holds a 300 kB tool output: far more than a pipe buffers, so `events` and
    # `export` are still writing when head exits, and their next write hits the closed
    # pipe: exit 141, as SIGPIPE would, for every command and however Python buffers
    # stdout (PYTHONUNBUFFERED once made a short write pass unnoticed, exit 0). `steps`
    # clips values, so its whole output may fit in the pipe before head exits: 0.
    env = cli_env()
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    for command, codes in (
        ("events report-1", ("rc=141",)),
        ("export report-1", ("rc=141",)),
        ("steps report-1", ("rc=0", "rc=141")),  # clipped values: may fit the pipe
    ):
        script = (
            f"set -o pipefail; {sys.executable} -m perdure.cli --data-dir {store.path} "
            f"{command} | head -c 10; rc=$?; echo; echo rc=$rc"
        )
        proc = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env
        )
        assert proc.stderr == "", (command, proc.stderr)
        assert proc.stdout.splitlines()[-1] in codes, (command, proc.stdout[-200:])
    line = subprocess.run(
        [
            "sh",
            "-c",
            f"{sys.executable} -m perdure.cli --data-dir {store.path} events report-1 | head -1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert line.returncode == 0 and line.stderr == ""
    [first] = line.stdout.splitlines()
    assert first.split()[0] == "1" and " execution.started v1 " in first
