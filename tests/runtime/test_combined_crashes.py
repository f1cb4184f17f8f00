"""SIGKILL anywhere in scenarios that combine features, compared with a crash-free run.

The worker is ``combined_worker.py``: (a) delegation to a child that needs an approval,
the parent's budget used up by the child and raised, then two concurrent calls, one of
them not idempotent; (b) a durable sleep on a wall clock the worker moves, then a
``wait_for_signal`` with a timeout whose signal the test sends through the CLI while no
process owns the dir, then the cancel of a second execution suspended all along, and a
third's approval that nobody decides, rejected when its approval timeout passes; (c)
``max_concurrency=2`` with six executions queued; (d) two children delegated in one
turn sharing their parent's budget, one handed what the other left. Hypothesis kills
the worker right after any of its durable writes to the log (every record boundary, the
inbox's included: the crash-free run's count bounds the draw), inside any model call,
or inside any side-effecting tool call, before or after its effect; then restarts it
until the scenario is done. Hypothesis also draws the event loop, and who decides: the worker
through the API, or the test through the ``perdure`` CLI while no process owns the dir
(approve, resume with a raise, resolve, cancel); and in (b) whether the runs after the
signal start two hours late, past the wait's timeout (the signal must still win).

Against the crash-free run: the same status, output, error, steps and transcript (byte
for byte, tool call ids included) for every execution, the same usage (model and tool
calls, tokens, dollars; own and delegated) and index rows; in the tools' ledger, every
effect exactly once per idempotency key, no key for two different calls, no call under
two keys, and every key one the log issued; nothing left running or queued, no signal
left in the inbox, and ``perdure health`` clean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perdure.events import record_types
from perdure.log import LmdbLog
from perdure.status import pending_signals

ROOT = Path(__file__).resolve().parents[2]
BACKEND = st.sampled_from(["asyncio", "trio"])
#: Each example starts two to five worker processes and one to three CLI ones (about a
#: second each on a shared 2-core box): four per scenario keep the file near a minute and
#: a half. ``PERDURE_COMBINED_EXAMPLES=200`` explores more, by hand, and
#: ``PERDURE_COMBINED_KILLS=4`` kills up to four runs in a row (two by default).
MATRIX = settings(
    max_examples=int(os.environ.get("PERDURE_COMBINED_EXAMPLES", "4")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FINISHED = {"completed", "failed", "cancelled"}


def run_worker(
    base: Path, scenario: str, crash: str, backend: str, drive: str, offset: float = 0.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.runtime.combined_worker",
            str(base / "data"),
            str(base / "ledger"),
            scenario,
            crash,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PERDURE_TEST_BACKEND": backend,
            "PERDURE_TEST_DRIVE": drive,
            "PERDURE_TEST_CLOCK_OFFSET": str(offset),
        },
    )


def perdure(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``perdure`` CLI on the scenario's data dir, as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "perdure.cli", "--data-dir", str(base / "data"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_until_done(
    base: Path, scenario: str, crashes: list[str], backend: str, drive: str, late: bool = False
) -> dict[str, Any]:
    """Run the worker with each crash spec in turn, then without, until it is done.

    When the worker says it waits for an operator (the payment signal in scenario b;
    every approval, raise, resolve and cancel when ``drive`` is ``cli``), the test runs
    that ``perdure`` command while no process owns the dir, and returns the commands it
    ran with the final document. Asking for the same command twice would mean one was
    lost: that fails. With ``late``, every run after the payment signal was sent starts
    two hours on (its clock is past every deadline the scenario sets, the wait's timeout
    included): the signal, already in the inbox, must still win over the timeout.
    """
    pending = list(crashes)
    sent: list[list[str]] = []
    writes = 0
    for _ in range(len(crashes) + 8):
        crash = pending.pop(0) if pending else "none"
        paid = any(c[0] == "signal" for c in sent)
        offset = 7200.0 if late and paid else 0.0
        proc = run_worker(base, scenario, crash, backend, drive, offset)
        if proc.returncode == -signal.SIGKILL and crash != "none":
            continue
        assert proc.returncode == 0, (
            f"scenario {scenario} worker with crash={crash} exited {proc.returncode}:\n"
            f"{proc.stderr[-3000:]}"
        )
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        writes += doc["writes"]
        if "waiting" in doc:
            command = doc["waiting"]
            assert command not in sent, f"asked for {command} again after {sent}"
            cli = perdure(base, *command, "--json")
            assert cli.returncode == 0, f"perdure {command}: {cli.stdout}{cli.stderr}"
            assert json.loads(cli.stdout)["owner_pid"] is None  # sent while none runs
            sent.append(command)
            continue
        return {**doc, "writes": writes, "sent": sent}
    raise AssertionError(f"scenario {scenario} never finished")


def ledger(base: Path) -> list[tuple[str, str, str, str]]:
    path = base / "ledger"
    lines = path.read_text().splitlines() if path.exists() else []
    return [tuple(line.split("\t")) for line in lines]  # type: ignore[misc]


def call_of(key: str) -> str:
    """``execution:step`` of an idempotency key (its last part is the execution's run)."""
    return key.rsplit(":", 1)[0]


def read_log(base: Path) -> tuple[set[str], dict[str, str], dict[str, int]]:
    """From the data dir as a client: every idempotency key a ``tool.started`` record
    carries, each execution's index status, and the signals still pending per execution
    (as ``perdure status`` counts them)."""

    async def read() -> tuple[set[str], dict[str, str], dict[str, int]]:
        log = await LmdbLog.open(base / "data", types=record_types(), client=True)
        try:
            keys: set[str] = set()
            statuses: dict[str, str] = {}
            async for info in log.streams(prefix="exec/"):
                statuses[info.stream.removeprefix("exec/")] = info.meta["status"]
                async for rec in log.read(info.stream):
                    if rec.type == "tool.started":
                        keys.add(rec.payload["key"])
            pending = {eid: len(p) for eid, p in (await pending_signals(log)).items() if p}
            return keys, statuses, pending
        finally:
            await log.aclose()

    return anyio.run(read)


def effects_by_call(base: Path) -> dict[str, tuple[str, str]]:
    """Check the ledger as a payment API's books; return each call's (tool, arguments)."""
    lines = ledger(base)
    per_key = Counter(key for kind, key, _, _ in lines if kind == "effect")
    assert all(n == 1 for n in per_key.values()), f"an effect applied twice: {per_key}"
    calls: dict[str, set[tuple[str, str]]] = {}
    for _, key, name, args in lines:
        calls.setdefault(key, set()).add((name, args))
    reused = {key: what for key, what in calls.items() if len(what) > 1}
    assert not reused, f"one idempotency key used for different calls: {reused}"
    by_call = Counter(call_of(key) for key in calls)
    assert all(n == 1 for n in by_call.values()), f"one call ran under two keys: {by_call}"
    attempted = {key for kind, key, _, _ in lines if kind == "attempt"}
    assert attempted == set(per_key), "an attempt without its effect, or the reverse"
    assert set(per_key) <= read_log(base)[0], "a tool ran under a key the log never issued"
    return {call_of(key): next(iter(what)) for key, what in calls.items()}


def check_data_dir(base: Path) -> None:
    """Nothing running or queued, no signal left in the inbox, ``perdure health`` clean."""
    _, statuses, pending = read_log(base)
    left = {eid: status for eid, status in statuses.items() if status not in FINISHED}
    assert not left, f"executions left unfinished: {left}"
    assert not pending, f"signals left in the inbox: {pending}"
    health = perdure(base, "health", "--json")
    assert health.returncode == 0 and json.loads(health.stdout)["ok"], health.stdout


_references: dict[tuple[str, str], tuple[dict[str, Any], dict[str, tuple[str, str]]]] = {}


def reference(
    scenario: str, drive: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """The crash-free run of a scenario: its final document and its ledger's calls."""
    if (scenario, drive) not in _references:
        base = tmp_path_factory.mktemp(f"reference-{scenario}-{drive}")
        doc = run_until_done(base, scenario, [], "asyncio", drive)
        check_data_dir(base)
        _references[scenario, drive] = doc, effects_by_call(base)
    return _references[scenario, drive]


def crash_points(writes: int, tools: int, llm_calls: int) -> st.SearchStrategy[str]:
    """After the n-th durable write of a process, or inside its n-th tool or model call."""
    return st.one_of(
        st.integers(1, writes).map(lambda n: f"write:{n}"),
        st.integers(1, llm_calls).map(lambda n: f"llm:{n}"),
        st.tuples(st.sampled_from(["tool-before", "tool-after"]), st.integers(1, tools)).map(
            lambda t: f"{t[0]}:{t[1]}"
        ),
    )


def check_scenario(
    scenario: str,
    data: st.DataObject,
    backend: str,
    drive: str,
    tmp_path_factory: pytest.TempPathFactory,
    late: bool = False,
) -> None:
    expected, expected_calls = reference(scenario, drive, tmp_path_factory)
    llm_calls = sum(r["usage"]["llm_calls"] for r in expected["results"].values()) + sum(
        r["delegated_usage"]["llm_calls"] for r in expected["results"].values()
    )
    points = crash_points(expected["writes"], len(expected_calls), llm_calls)
    kills = int(os.environ.get("PERDURE_COMBINED_KILLS", "2"))
    crashes = data.draw(st.lists(points, min_size=1, max_size=kills), label="crashes")
    base = tmp_path_factory.mktemp(f"crash-{scenario}")
    got = run_until_done(base, scenario, crashes, backend, drive, late)
    for eid, want in expected["results"].items():
        assert got["results"][eid] == want, f"{eid} diverged after crashes {crashes}"
    assert got["results"].keys() == expected["results"].keys()
    assert got["index"] == expected["index"], f"index rows diverged after crashes {crashes}"
    assert effects_by_call(base) == expected_calls
    # the same operator commands (confirmation ids aside: each run draws its own), but
    # for the resolve of a call a crash put in doubt
    resolves = [c for c in got["sent"] if c[0] == "resolve"]
    assert len(resolves) <= len(crashes)
    assert [c[:2] for c in got["sent"] if c[0] != "resolve"] == [c[:2] for c in expected["sent"]]
    assert [c for c in got["sent"] if c[0] not in ("resolve", "approve")] == [
        c for c in expected["sent"] if c[0] != "approve"
    ]
    check_data_dir(base)


def test_the_reference_runs_do_what_the_scenarios_say(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Each crash-free run goes through every feature it is meant to combine."""
    for drive in ("api", "cli"):
        a, a_calls = reference("a", drive, tmp_path_factory)
        assert a["results"]["a-1"]["status"] == "completed"
        assert a["results"]["a-1"]["delegated_usage"]["llm_calls"] == 2  # charged by the child
        assert a["results"]["a-1"]["usage"]["llm_calls"] == 3  # past its first limit of 3
        assert sorted(name for name, _ in a_calls.values()) == ["log_entry", "pay", "sign"]
        b, b_calls = reference("b", drive, tmp_path_factory)
        assert b["results"]["b-1"]["output"] == (
            'done: rested | settle({"order": "o-1", "ref": "p-1"}) ok'
        )
        assert b["results"]["b-2"]["status"] == "cancelled"
        assert b["results"]["b-3"]["output"] == (
            "done: REJECTED by timeout: no decision came before its approval timeout; the "
            "call was not made"
        )
        assert sorted(name for name, _ in b_calls.values()) == ["prepare", "settle"]
    assert [c[0] for c in reference("a", "cli", tmp_path_factory)[0]["sent"]] == [
        "approve",
        "resume",
    ]
    assert [c[0] for c in reference("b", "cli", tmp_path_factory)[0]["sent"]] == [
        "signal",
        "cancel",
    ]
    c, c_calls = reference("c", "api", tmp_path_factory)
    assert {r["status"] for r in c["results"].values()} == {"completed"}
    assert len(c_calls) == 6
    d, d_calls = reference("d", "api", tmp_path_factory)
    assert {r["status"] for r in d["results"].values()} == {"completed"}
    assert d["results"]["d-1"]["usage"]["llm_calls"] == 2
    assert d["results"]["d-1"]["delegated_usage"]["llm_calls"] == 6  # 8 in all, none past
    assert sorted(d_calls.values()) == [
        ("job", '{"name": "quick"}'),
        ("job", '{"name": "slow-0"}'),
        ("job", '{"name": "slow-1"}'),
        ("job", '{"name": "slow-2"}'),
    ]


DRIVE = st.sampled_from(["api", "cli"])


@pytest.mark.slow
@MATRIX
@given(data=st.data(), backend=BACKEND, drive=DRIVE)
def test_delegation_approval_budget_raise_and_a_non_idempotent_call_survive_any_crash(
    data: st.DataObject, backend: str, drive: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    check_scenario("a", data, backend, drive, tmp_path_factory)


@pytest.mark.slow
@MATRIX
@given(data=st.data(), backend=BACKEND, drive=DRIVE, late=st.booleans())
def test_a_sleep_a_signal_sent_while_dead_and_a_cancel_survive_any_crash(
    data: st.DataObject,
    backend: str,
    drive: str,
    late: bool,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``late``: the runs after the signal start past the wait's timeout; it still wins."""
    check_scenario("b", data, backend, drive, tmp_path_factory, late)


@pytest.mark.slow
@MATRIX
@given(data=st.data(), backend=BACKEND)
def test_two_children_sharing_their_parents_budget_survive_any_crash(
    data: st.DataObject, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    check_scenario("d", data, backend, "api", tmp_path_factory)


@pytest.mark.slow
@MATRIX
@given(data=st.data(), backend=BACKEND)
def test_six_executions_queued_behind_two_slots_survive_any_crash(
    data: st.DataObject, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    check_scenario("c", data, backend, "api", tmp_path_factory)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_killed_with_executions_queued_and_running_each_runs_once_as_without_the_kill(
    backend: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Killed right after the fourth of six spawns: some executions hold the slots, some
    wait in the queue, two are not spawned yet. (Each spawn waits for its own commit and
    an execution's four appends come one after another, so by then the first may be
    done, the second still runs and the fourth waits.) The restart starts the queue
    again, in order, the driver spawns the last two behind it, and the end is the
    crash-free run's."""
    expected, expected_calls = reference("c", "api", tmp_path_factory)
    proc = run_worker(tmp_path, "c", "spawned:4", backend, "api")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    statuses = Counter(read_log(tmp_path)[1].values())
    assert statuses["queued"] >= 1 and statuses["running"] >= 1, statuses
    assert statuses["running"] <= 2 and sum(statuses.values()) == 4, statuses
    got = run_until_done(tmp_path, "c", [], backend, "api")
    assert got["results"] == expected["results"] and got["index"] == expected["index"]
    assert effects_by_call(tmp_path) == expected_calls
    check_data_dir(tmp_path)
