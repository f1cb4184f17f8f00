"""Output under pressure: a reader that is gone, a terminal that cannot show Unicode,
values that would break a table (control characters, huge arguments), and statuses
that must read the same in every command and in JSON and text alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from perdure import Agent, Budget, Runtime, tool
from perdure.cli_export import records_from_export
from perdure.providers import Scripted
from tests.cli import agents
from tests.cli.conftest import EXPECTED, REPO, Store, cli_env, perdure, perdure_here
from tests.cli.test_reading import read_records

#: Every command that prints something, in text and JSON, and errors in both.
PRINTING = [
    ("status",),
    ("status", "--json"),
    ("inspect", "pay-1"),
    ("inspect", "boss-1", "--json"),
    ("steps", "report-1"),
    ("steps", "pay-1", "--json"),
    ("events", "weather-1"),
    ("events", "weather-1", "--json"),
    ("export", "weather-1"),
    ("health",),
    ("health", "--json"),
    ("replay", "--agent", "tests.cli.agents:ALL"),
    ("replay", "--agent", "tests.cli.agents:ALL", "--json"),
    ("inspect", "nope", "--json"),
    ("approve", "pay-1", "c-wrong", "--json"),
    ("status", "--bogus", "--json"),
]


@pytest.mark.parametrize("args", PRINTING, ids=" ".join)
def test_a_reader_gone_before_the_first_write_exits_141_quietly(
    store: Store, args: tuple[str, ...]
) -> None:
    # The read end is closed before the command starts, so its first write fails
    # whatever it prints and however much: every command must notice, and say nothing.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "perdure.cli", "--data-dir", str(store.path), *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            cwd=REPO,
            env=cli_env(),
        )
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("args", [("--help",), ("--version",), ("approve", "--help")], ids=" ".join)
def test_help_and_version_into_a_closed_pipe_exit_141_quietly(
    args: tuple[str, ...], unbuffered: bool
) -> None:
    # argparse prints these to sys.stdout itself: buffered, the failed flush at exit
    # said "Exception ignored ... BrokenPipeError" and exited 120; unbuffered, argparse
    # swallowed the error and exited 0, as if the text had been read.
    env = cli_env()
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "perdure.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            cwd=REPO,
            env=env,
        )
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


def run_with_encoding(store: Store, encoding: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI with stdout in ``encoding`` (PYTHONIOENCODING), output as bytes."""
    return subprocess.run(
        [sys.executable, "-m", "perdure.cli", "--data-dir", str(store.path), *args],
        capture_output=True,
        timeout=60,
        cwd=REPO,
        env=cli_env(PYTHONIOENCODING=encoding),
    )


@tool("echo", description="Echo text back")
def echo(text: str) -> str:
    """The text, as given."""
    return text


#: A 300 kB argument of wide and accented characters, with a line break in it.
HUGE = "日本語ü€" * 50_000 + "\nend"
echoer = Agent(
    "echoer",
    instructions="You echo.",
    tools=[echo],
    llm=Scripted([Scripted.call("echo", text=HUGE), "Echoed — 完了."]),
)


@pytest.fixture(scope="module")
def unicode_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A data dir with one execution full of non-ASCII text and a huge tool argument,
    and one cancelled with control characters in its reason and its operator."""
    path = tmp_path_factory.mktemp("unicode") / "data"
    with Runtime(path, durability="process", shutdown_timeout=2.0) as rt:
        assert rt.run(echoer, "Écris « bonjour » 日本", execution_id="uni-1").is_completed
        assert rt.run(agents.waiter, "Wait", execution_id="ctl-1").is_suspended
        rt.signal("ctl-1", "late\x1b[2J", {"x": 1}, by="eve\r\nroot")
        rt.cancel("ctl-1", "first line\nsecond line\x1b[31m red\u2028", by="eve\nmallory")
    return Store(path, {}, os.getpid())


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_a_terminal_that_cannot_show_unicode_gets_escapes_and_valid_json(
    unicode_store: Store, encoding: str
) -> None:
    for args in (("status",), ("steps", "uni-1"), ("inspect", "uni-1"), ("events", "uni-1")):
        proc = run_with_encoding(unicode_store, encoding, *args)
        assert (proc.returncode, proc.stderr) == (0, b""), args
        text = proc.stdout.decode(encoding)
        assert "unexpected" not in text
    steps = run_with_encoding(unicode_store, encoding, "steps", "uni-1").stdout.decode(encoding)
    assert r"\u65e5\u672c" in steps  # 日本, escaped where the encoding lacks it
    for args in (("inspect", "uni-1", "--json"), ("export", "uni-1")):
        proc = run_with_encoding(unicode_store, encoding, *args)
        assert proc.returncode == 0, args
        as_utf8 = perdure_here(unicode_store.path, *args).json()
        assert json.loads(proc.stdout.decode(encoding)) == as_utf8, args
    assert as_utf8["records"][0]["payload"]["prompt"] == "Écris « bonjour » 日本"


def test_huge_and_non_ascii_values_keep_the_table_one_row_per_entry(
    unicode_store: Store,
) -> None:
    ran = perdure(unicode_store.path, "steps", "uni-1")
    assert ran.code == 0
    entries = perdure_here(unicode_store.path, "steps", "uni-1", "--json").json()["steps"]
    lines = ran.out.splitlines()
    assert len(lines) == 2 + len(entries)  # title, header, one line per entry
    header = lines[1]
    for line in lines[2:]:
        assert len(line) < 400, line[:100]  # a 300 kB argument is clipped
        # Every KIND cell starts under its header (values are in the last column).
        assert line[header.index("KIND") - 1] == " " and line[header.index("KIND")] != " "
    tool_line = next(line for line in lines if " tool " in line)
    assert "日本語ü€" in tool_line and "…" in tool_line
    assert "Écris « bonjour » 日本" in ran.out and "Echoed — 完了." in ran.out


def test_control_characters_from_the_log_are_shown_escaped(unicode_store: Store) -> None:
    steps = perdure(unicode_store.path, "steps", "ctl-1")
    inspect = perdure(unicode_store.path, "inspect", "ctl-1")
    for out in (steps.out, inspect.out):
        assert "\x1b" not in out and "\r" not in out and "\u2028" not in out
    entries = perdure_here(unicode_store.path, "steps", "ctl-1", "--json").json()["steps"]
    assert len(steps.out.splitlines()) == 2 + len(entries)
    assert r"by eve\nmallory: first line\nsecond line\x1b[31m red\u2028" in steps.out
    assert "late\\x1b[2J" in steps.out and r"by eve\r\nroot" in steps.out
    cancelled_line = r"cancelled  first line\nsecond line\x1b[31m red\u2028 (by eve\nmallory)"
    assert cancelled_line + "\n" in inspect.out
    # JSON keeps the values exactly as recorded.
    cancelled = next(e for e in entries if e["kind"] == "cancelled")
    assert cancelled["reason"] == "first line\nsecond line\x1b[31m red\u2028"
    assert cancelled["by"] == "eve\nmallory"


def test_every_command_reads_the_same_status_in_json_and_text(store: Store) -> None:
    listed = {
        e["execution_id"]: e for e in perdure(store.path, "status", "--json").json()["executions"]
    }
    table = perdure(store.path, "status").out.splitlines()
    replayed = perdure(store.path, "replay", "--agent", "tests.cli.agents:ALL", "--json").json()
    assert {r["execution_id"]: r["status"] for r in replayed["executions"]} == {
        eid: e["status"] for eid, e in listed.items()
    }
    for eid, (_, status, _) in EXPECTED.items():
        text = listed[eid]["status_text"]
        assert listed[eid]["status"] == status
        assert any(line.startswith(eid + " ") and f"  {text}  " in line for line in table), eid
        steps = perdure_here(store.path, "steps", eid, "--json").json()
        assert (steps["status"], steps["status_text"]) == (status, text), eid
        steps_text = perdure_here(store.path, "steps", eid).out
        assert steps_text.splitlines()[0] == f"execution {eid}: {text}", eid
        detail = perdure_here(store.path, "inspect", eid).out
        assert f"status     {text}\n" in detail, eid


@pytest.mark.anyio
async def test_export_round_trips_approvals_rejections_signals_budgets_and_drift(
    fresh_store: Store, tmp_path: Path
) -> None:
    path = fresh_store.path
    changed = Agent(
        "banker",
        instructions="You move money when asked, with a second look.",
        tools=[agents.transfer_funds],
        llm=agents.banker.llm,
    )
    registered = [changed, agents.guarded, agents.waiter, agents.budgeted]
    async with Runtime(path, agents=registered, durability="process", shutdown_timeout=2.0) as rt:
        await rt.approve("pay-1", fresh_store.cids["pay-1"], note="ok ✓", by="ops")
        await rt.reject("guard-1", fresh_store.cids["guard-1"], "non, merci", by="ops")
        await rt.signal("wait-1", "go", {"ok": True, "blob": b"\x00\xff"}, by="ops")
        with anyio.fail_after(10):
            drifted = await rt.wait("pay-1")
            assert drifted.suspend_reason is not None
            assert drifted.suspend_reason.kind == "drift"
            await rt.resume("pay-1", accept_drift=True, wait=False)
            await rt.resume("budget-1", budget=Budget(max_llm_calls=5), wait=False)
            for eid in ("pay-1", "guard-1", "wait-1", "budget-1"):
                assert (await rt.wait(eid, until="finished")).is_completed, eid

    def check(eid: str, must_have: set[str]) -> None:
        target = tmp_path / f"{eid}.json"
        ran = perdure(path, "export", eid, "-o", str(target))
        assert ran.code == 0, ran.err
        rebuilt = records_from_export(json.loads(target.read_text()))
        records = read_records(path, eid)
        assert must_have <= {r.type for r in records}, eid
        assert [(r.stream, r.seq, r.type, r.version, r.timestamp) for r in rebuilt] == [
            (r.stream, r.seq, r.type, r.version, r.timestamp) for r in records
        ]
        assert [r.payload for r in rebuilt] == [r.payload for r in records], eid

    for eid, types in {
        "pay-1": {"approval.granted", "drift.detected", "drift.accepted"},
        "guard-1": {"approval.rejected"},
        "wait-1": {"signal.received"},
        "budget-1": {"budget.raised"},
    }.items():
        await anyio.to_thread.run_sync(check, eid, types)


def test_an_export_never_lands_in_the_data_dir(fresh_store: Store, tmp_path: Path) -> None:
    # -o DIR/data.mdb used to rename the export over the log: the whole store, gone.
    path = fresh_store.path
    # lock.mdb is LMDB's reader table, which every reader writes: not compared.
    kept = ("data.mdb", "owner.lock")
    before = {name: (path / name).read_bytes() for name in kept}
    link = tmp_path / "innocent.json"
    link.symlink_to(path / "data.mdb")
    for target in (path / "data.mdb", path / "owner.lock", path / "new.json", link):
        ran = perdure(path, "export", "weather-1", "-o", str(target))
        assert (ran.code, ran.out) == (2, ""), target
        assert ran.err == (
            f"perdure: error: cannot write the export of 'weather-1' to {str(target)!r}: it is "
            f"inside the data dir {str(path)!r}, next to (or onto) the log itself; write the "
            f"export somewhere else, e.g. -o weather-1.json\n"
        )
    assert {name: (path / name).read_bytes() for name in kept} == before
    assert sorted(p.name for p in path.iterdir()) == ["data.mdb", "lock.mdb", "owner.lock"]
    assert perdure_here(path, "health").code == 0
    # A directory given for a child's export: the suggested file name has no slash.
    child = perdure_here(path, "export", "boss-1/2", "-o", str(tmp_path))
    assert child.code == 2
    assert f"give a file name, e.g. -o {tmp_path / 'boss-1_2'}.json" in child.err


gate = threading.Event()


@tool("hold", description="Hold until released")
def hold() -> str:
    """Blocks its execution (and its concurrency slot) until the test releases it."""
    gate.wait(timeout=30)
    return "released"


holder = Agent(
    "holder",
    instructions="You hold.",
    tools=[hold],
    llm=Scripted([Scripted.call("hold"), "Held."]),
)


@pytest.mark.anyio
async def test_a_queued_execution_reads_queued_in_status_and_replay(tmp_path: Path) -> None:
    path = tmp_path / "data"
    gate.clear()
    async with Runtime(
        path, agents=[holder], max_concurrency=1, durability="process", shutdown_timeout=5.0
    ) as rt:
        try:
            await rt.spawn(holder, "first", execution_id="hold-1")
            await rt.spawn(holder, "second", execution_id="hold-2")  # waits for the slot
            listed = await anyio.to_thread.run_sync(perdure, path, "status", "--json")
            replayed = await anyio.to_thread.run_sync(
                perdure, path, "replay", "--agent", f"{__name__}:holder", "--json"
            )
        finally:
            gate.set()
        with anyio.fail_after(10):
            assert (await rt.wait("hold-2", until="finished")).is_completed
    statuses = {e["execution_id"]: e["status"] for e in listed.json()["executions"]}
    assert statuses["hold-2"] == "queued"
    assert {e["execution_id"]: e["status"] for e in replayed.json()["executions"]} == statuses
