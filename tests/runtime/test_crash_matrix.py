"""Real crashes: a worker process SIGKILLs itself at points hypothesis chooses.

After every sequence of crashes and restarts, the final transcript must equal an
uncrashed run's, every tool call that completed without interruption must have run
exactly once, and an interrupted call at most once more per crash that hit it, always
with the same idempotency key. The crash points include recovery itself (the n-th
record replayed), and the worker runs on asyncio or trio, as hypothesis draws.
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

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]


def run_worker(
    data_dir: Path, side: Path, crash: str, backend: str = "asyncio"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.runtime.crash_worker", str(data_dir), str(side), crash],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PERDURE_TEST_BACKEND": backend},
    )


def run_until_done(
    data_dir: Path, side: Path, crashes: list[str], backend: str = "asyncio"
) -> dict[str, Any]:
    """Run the worker with each crash spec in turn, then without, until it completes."""
    for crash in [*crashes, "none"]:
        proc = run_worker(data_dir, side, crash, backend)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        assert proc.returncode == -signal.SIGKILL, (
            f"worker with crash={crash} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    raise AssertionError("the worker never completed")


def side_effects(side: Path) -> list[tuple[str, str, str]]:
    if not side.exists():
        return []
    return [tuple(line.split("\t")) for line in side.read_text().splitlines()]  # type: ignore[misc]


def attempts_by_key(data_dir: Path) -> dict[str, int]:
    """How many times the log says each tool call was started (by idempotency key)."""
    import anyio

    from perdure.events import execution_stream, record_types
    from perdure.log import LmdbLog

    async def read() -> dict[str, int]:
        log = await LmdbLog.open(data_dir, types=record_types(), client=True)
        try:
            out: dict[str, int] = {}
            async for rec in log.read(execution_stream("order-1")):
                if rec.type == "tool.started":
                    out[rec.payload["key"]] = rec.payload["attempt"]
            return out
        finally:
            await log.aclose()

    return anyio.run(read)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("reference")
    result = run_until_done(base / "data", base / "side.txt", [])
    assert result["status"] == "completed"
    assert len(side_effects(base / "side.txt")) == 4
    return result


#: Where a crash may hit: inside the n-th model call, after the n-th durable step,
#: inside the n-th tool call (before or after its effect), or while recovery replays the
#: n-th record (the log has at most 14).
RECOVERY = st.integers(1, 14).map(lambda n: f"replay:{n}")
CRASH = st.one_of(
    st.tuples(st.sampled_from(["llm", "step"]), st.integers(1, 7)),
    st.tuples(st.sampled_from(["tool-before", "tool-after"]), st.integers(1, 4)),
).map(lambda t: f"{t[0]}:{t[1]}")
BACKEND = st.sampled_from(["asyncio", "trio"])
MATRIX = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def check_crashed_run(
    reference: dict[str, Any], base: Path, crashes: list[str], backend: str
) -> None:
    """Crash at each point in turn, restart until done; check transcript and effects."""
    data_dir, side = base / "data", base / "side.txt"
    result = run_until_done(data_dir, side, crashes, backend)
    assert result == reference
    effects = side_effects(side)
    per_key = Counter(key for key, _, _ in effects)
    attempts = attempts_by_key(data_dir)
    assert set(per_key) <= set(attempts), "a side effect ran under a key the log never issued"
    assert len(attempts) == 4  # four tool calls, whatever the crashes
    for key, count in per_key.items():
        if attempts[key] == 1:
            assert count == 1, f"{key} completed without interruption yet ran {count} times"
        else:
            # Each re-run follows a crash inside the call, and every attempt is recorded
            # before the call is made: at most one extra run per crash, same key.
            assert count <= attempts[key] <= 1 + len(crashes), f"in-doubt {key} ran {count}x"
    # every call that the final transcript reports ran at least once, under its one key
    assert len(per_key) == 4
    names = Counter(name for _, name, _ in {(k, n, a) for k, n, a in effects})
    assert names == Counter({"reserve": 2, "charge": 1, "notify": 1})


@MATRIX
@given(crashes=st.lists(CRASH | RECOVERY, min_size=1, max_size=3), backend=BACKEND)
def test_crash_anywhere_same_transcript_each_effect_once(
    crashes: list[str],
    backend: str,
    reference: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    check_crashed_run(reference, tmp_path_factory.mktemp("crash"), crashes, backend)


@settings(MATRIX, max_examples=8)
@given(first=CRASH, during_recovery=st.lists(RECOVERY, min_size=1, max_size=2), backend=BACKEND)
def test_crash_during_recovery_then_restart_at_once(
    first: str,
    during_recovery: list[str],
    backend: str,
    reference: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Crash; crash again while the restart replays the log (maybe twice); restart at once.

    No lockout (the dead process's lock does not stop the next one), the same result.
    """
    crashes = [first, *during_recovery]
    check_crashed_run(reference, tmp_path_factory.mktemp("recovery"), crashes, backend)


def test_a_crash_while_recovery_replays_is_a_real_crash(tmp_path: Path) -> None:
    """The recovery crash point fires: the worker dies while replaying, then recovers."""
    data_dir, side = tmp_path / "data", tmp_path / "side.txt"
    assert run_worker(data_dir, side, "tool-after:1").returncode == -signal.SIGKILL
    before = _last_seq(data_dir)
    proc = run_worker(data_dir, side, "replay:2", "trio")
    assert proc.returncode == -signal.SIGKILL
    assert _last_seq(data_dir) == before  # it died replaying, before writing anything
    assert run_worker(data_dir, side, "none", "trio").returncode == 0


def test_replaying_an_execution_that_once_crashed_calls_and_writes_nothing(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    data_dir, side = tmp_path / "data", tmp_path / "side.txt"
    assert run_until_done(data_dir, side, ["tool-after:3", "llm:2"]) == reference
    effects = side.read_text()
    before = attempts_by_key(data_dir), _last_seq(data_dir)
    proc = run_worker(data_dir, side, "none")  # opens the dir again, asks for the result
    assert proc.returncode == 0 and json.loads(proc.stdout.strip()) == reference
    assert side.read_text() == effects  # no tool ran
    assert (attempts_by_key(data_dir), _last_seq(data_dir)) == before  # nothing written


def _last_seq(data_dir: Path) -> int:
    import anyio

    from perdure.events import execution_stream, record_types
    from perdure.log import LmdbLog

    async def read() -> int:
        log = await LmdbLog.open(data_dir, types=record_types(), client=True)
        try:
            return await log.last_seq(execution_stream("order-1"))
        finally:
            await log.aclose()

    return anyio.run(read)
