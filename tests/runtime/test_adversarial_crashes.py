"""SIGKILL at every record boundary of flows the crash matrix does not drive.

The worker is ``adversarial_worker.py``. Its crash points include "right after the
n-th durable append" (so: between an approval and the tool's start, between a resolve
and the re-run, between a budget raise and the calls it lets through, ...), drawn by
hypothesis together with the event loop. After every sequence of crashes the final
results must equal an uncrashed run's, no model turn may have been asked twice by one
process (a turn is asked again only by a restart, when the process that asked it died
before its answer was recorded), and a tool call must have run once unless a crash hit
it, and then only again under the same idempotency key.
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

ROOT = Path(__file__).resolve().parents[2]
BACKEND = st.sampled_from(["asyncio", "trio"])
EXAMPLES = settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def crash_points(appends: int, tools: int) -> st.SearchStrategy[str]:
    """One crash spec: after the n-th durable append, or inside the n-th tool call."""
    return st.one_of(
        st.integers(1, appends).map(lambda n: f"append:{n}"),
        st.tuples(st.sampled_from(["tool-before", "tool-after"]), st.integers(1, tools)).map(
            lambda t: f"{t[0]}:{t[1]}"
        ),
    )


def run_worker(
    base: Path, scenario: str, crash: str, backend: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.runtime.adversarial_worker",
            str(base / "data"),
            str(base / "side.txt"),
            scenario,
            crash,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PERDURE_TEST_BACKEND": backend, **env},
    )


def results_of(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}


def run_until_done(
    base: Path, scenario: str, crashes: list[str], backend: str, **env: str
) -> dict[str, dict[str, Any]]:
    """Run the worker with each crash spec in turn, then without, until it finishes."""
    for run, crash in enumerate([*crashes, "none"]):
        proc = run_worker(base, scenario, crash, backend, PERDURE_RUN=str(run), **env)
        if proc.returncode == 0:
            return results_of(proc)
        assert proc.returncode == -signal.SIGKILL, (
            f"{scenario} worker with crash={crash} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    raise AssertionError("the worker never finished")


def side_lines(base: Path) -> list[list[str]]:
    path = base / "side.txt"
    return [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []


def starts_by_key(base: Path) -> dict[str, int]:
    """Per idempotency key, the last attempt the log recorded a start for."""

    async def read() -> dict[str, int]:
        log = await LmdbLog.open(base / "data", types=record_types(), client=True)
        try:
            out: dict[str, int] = {}
            async for info in log.streams(prefix="exec/"):
                async for rec in log.read(info.stream):
                    if rec.type == "tool.started":
                        out[rec.payload["key"]] = rec.payload["attempt"]
            return out
        finally:
            await log.aclose()

    return anyio.run(read)


def check_effects(base: Path, crashes: int) -> Counter[str]:
    """Each model turn asked at most once per run; each tool call once, or again only
    after a crash, under the same key."""
    lines = side_lines(base)
    runs: dict[tuple[str, str], list[str]] = {}
    for _, agent, turn, run in (x for x in lines if x[0] == "llm"):
        runs.setdefault((agent, turn), []).append(run)
    for turn, asked in runs.items():
        assert len(asked) == len(set(asked)), f"model turn {turn} asked twice in one run"
        assert len(asked) <= 1 + crashes, f"model turn {turn} asked in runs {asked}"
    effects = Counter(x[0] for x in lines if x[0] != "llm")
    starts = starts_by_key(base)
    assert set(effects) <= set(starts), "a tool ran under a key the log never issued"
    for key, attempts in starts.items():
        ran = effects[key]
        if attempts == 1:
            assert ran <= 1, f"{key} was started once yet ran {ran} times"
        else:
            assert ran <= attempts <= 1 + crashes, f"{key}: {attempts} starts, ran {ran}x"
    return effects


_references: dict[str, dict[str, dict[str, Any]]] = {}


def reference(scenario: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if scenario not in _references:
        base = tmp_path_factory.mktemp(f"reference-{scenario}")
        _references[scenario] = run_until_done(base, scenario, [], "asyncio")
        assert all(r["status"] == "completed" for r in _references[scenario].values())
    return _references[scenario]


@EXAMPLES
@given(crashes=st.lists(crash_points(11, 3), min_size=1, max_size=3), backend=BACKEND)
def test_an_approval_among_concurrent_calls_survives_a_crash_at_any_record(
    crashes: list[str], backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """One turn: plain call, call needing approval, plain call; approve; crash anywhere.

    Not covered before: a turn mixing a gated call with ungated ones, killed between the
    approval record and the gated tool's start or outcome (or while the ungated ones run).
    Results join the transcript by position in the turn, whatever finished first.
    """
    base = tmp_path_factory.mktemp("mixed")
    result = run_until_done(base, "mixed", crashes, backend)
    assert result == reference("mixed", tmp_path_factory)
    tools = [m for m in result["mx-1"]["transcript"] if m[0] == "tool"]
    assert [m[2] for m in tools] == ["plain_a", "guarded", "plain_b"]
    effects = check_effects(base, len(crashes))
    assert len(effects) == 3  # three calls, each under its one key


@EXAMPLES
@given(
    crashes=st.lists(crash_points(24, 5), min_size=1, max_size=3),
    backend=BACKEND,
)
def test_queued_executions_survive_crashes_none_lost_none_twice_in_order(
    crashes: list[str], backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """max_concurrency=1, five executions queued durably, crashes anywhere.

    Not covered before: a queue under max_concurrency across SIGKILLs.
    """
    base = tmp_path_factory.mktemp("queue")
    result = run_until_done(base, "queue", crashes, backend)
    assert result == reference("queue", tmp_path_factory)
    check_effects(base, len(crashes))
    jobs = [x[2] for x in side_lines(base) if x[1] == "job"]
    first_runs = list(dict.fromkeys(jobs))
    assert first_runs == [f"q-{n}" for n in range(5)]  # started in the order spawned
    # one slot: nobody started before the one ahead of it had finished its tool call
    assert jobs == sorted(jobs)


@EXAMPLES
@given(crashes=st.lists(crash_points(11, 3), min_size=1, max_size=3), backend=BACKEND)
def test_a_tool_budget_running_out_inside_a_turn_survives_crashes_and_a_raise(
    crashes: list[str], backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Three calls in one turn under max_tool_calls=2: two run, the third waits for the
    raise; crashes anywhere, including between the raise and the call it lets through.

    Not covered before: tool-budget exhaustion inside a multi-call turn, with restarts.
    """
    base = tmp_path_factory.mktemp("budget")
    result = run_until_done(base, "budget", crashes, backend)
    assert result == reference("budget", tmp_path_factory)
    assert len(check_effects(base, len(crashes))) == 3


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize(
    ("first", "second", "final"),
    [
        ("tool-before:1", "tool-before:1", "complete"),
        ("tool-after:1", "tool-after:1", "retry"),
        ("tool-after:1", "append:2", "fail"),  # the re-run's start durable, not yet made
        ("tool-before:1", "append:1", None),  # the resolve durable, the re-run not started
    ],
)
def test_an_in_doubt_call_resolved_retry_then_killed_in_the_retry_asks_again(
    tmp_path: Path, backend: str, first: str, second: str, final: str | None
) -> None:
    """Non-idempotent tool killed; resolved ``retry``; killed again in the re-run (or
    right after its start is durable): it is in doubt again, same key, and the final
    decision is the one recorded. Killed right after the ``retry`` decision is durable
    (before the re-run's start): the next start carries the decision out by itself.

    Not covered before: a second crash during (or just before) the retried call.
    """
    proc = run_worker(tmp_path, "doubt", first, backend)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = run_worker(tmp_path, "doubt", "none", backend, PERDURE_RESOLVE="stop")
    [r] = results_of(proc).values()
    assert r["reason"]["kind"] == "unknown_outcome" and r["reason"]["attempts"] == 1
    key = r["reason"]["key"]
    # resolve retry, then die inside the re-run (or at one of its records)
    proc = run_worker(tmp_path, "doubt", second, backend, PERDURE_RESOLVE="retry")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    proc = run_worker(tmp_path, "doubt", "none", backend, PERDURE_RESOLVE="stop")
    [r] = results_of(proc).values()
    if final is None:
        final = "retry"  # carried out at the restart, without asking anyone again
    else:
        assert r["status"] == "suspended" and r["reason"]["kind"] == "unknown_outcome"
        assert r["reason"]["key"] == key and r["reason"]["attempts"] == 2
        proc = run_worker(tmp_path, "doubt", "none", backend, PERDURE_RESOLVE=final)
        assert proc.returncode == 0, proc.stderr[-3000:]
        [r] = results_of(proc).values()
    assert r["status"] == "completed"
    tool_result = next(m for m in r["transcript"] if m[0] == "tool")
    expected = {
        "complete": ["tool", "wired by hand", "wire", False],
        "retry": ["tool", "wire(10.0) ok", "wire", False],
        "fail": ["tool", "ERROR (Failed): bank says no", "wire", True],
    }[final]
    assert tool_result == expected
    lines = side_lines(tmp_path)
    assert [x[:3] for x in lines if x[0] == "llm"] == [["llm", "wirer", "0"], ["llm", "wirer", "1"]]
    wires = [x[0] for x in lines if x[1] == "wire"]
    assert set(wires) <= {key}  # every run of the tool, under the one key
    ran = {"tool-before:1": 0, "tool-after:1": 1, "append:1": 0, "append:2": 0}
    assert len(wires) == ran[first] + ran[second] + (final == "retry")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("crash", ["none", "append:1", "append:2", "tool-after:1", "append:4"])
def test_a_child_suspended_on_approval_when_the_process_dies_is_approved_after_restart(
    tmp_path: Path, backend: str, crash: str
) -> None:
    """Parent delegates; the child waits for an approval; SIGKILL; approve after the
    restart (and crash again at the approval's records); the parent resumes with the
    child's answer exactly once.

    Not covered before: a restart while the child (not the parent) waits on a person.
    """
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.runtime.adversarial_worker",
            str(tmp_path / "data"),
            str(tmp_path / "side.txt"),
            "delegate",
            "none",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PERDURE_TEST_BACKEND": backend,
            "PERDURE_APPROVE": "0",
            "PERDURE_RUN": "first",
        },
    )
    try:
        assert proc.stdout is not None
        child = json.loads(proc.stdout.readline() or "null")
        assert child is not None, proc.stderr.read() if proc.stderr else ""
        assert child["id"] == "d-1/2" and child["reason"]["kind"] == "approval"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    result = run_until_done(tmp_path, "delegate", [crash], backend)
    assert result["d-1"]["status"] == "completed"
    assert result["d-1"]["output"] == "done: done: sign(nda) ok"
    tools = [m for m in result["d-1"]["transcript"] if m[0] == "tool"]
    assert tools == [["tool", "done: sign(nda) ok", "delegate_to_signer", False]]
    effects = check_effects(tmp_path, 2)
    assert sum(effects.values()) >= 1 and len(effects) == 1  # the one approved call
    turns = {tuple(x[1:3]) for x in side_lines(tmp_path) if x[0] == "llm"}
    assert turns == {("boss", "0"), ("boss", "1"), ("signer", "0"), ("signer", "1")}
    # the parent was resumed with the child's answer once: its second turn, asked once
    assert [x[1:3] for x in side_lines(tmp_path) if x[0] == "llm"].count(["boss", "1"]) == 1
