"""Fixtures for the CLI tests: data dirs made by real executions, and real subprocesses.

``store`` is built once per session by running the agents of ``tests.cli.agents`` with
a Runtime in this process (scripted models); every execution ends in a different state
(completed, suspended for each reason, failed, cancelled, parent and child). Tests that
only read use it directly; tests that send signals take ``fresh_store``, a copy.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from perdure import Runtime
from perdure.cli import run
from tests.cli import agents

REPO = Path(__file__).resolve().parents[2]
OWNER_SCRIPT = Path(__file__).with_name("owner.py")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this repo importable, no data dir preset."""
    env = {k: v for k, v in os.environ.items() if k not in ("PERDURE_DATA_DIR", "PERDURE_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@dataclass
class Ran:
    """A finished CLI subprocess."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout parsed as one JSON document."""
        return json.loads(self.out)


def perdure(
    data_dir: Path | str | None,
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Ran:
    """Run ``python -m perdure.cli [--data-dir DIR] ARGS`` and return what it did."""
    argv = [sys.executable, "-m", "perdure.cli"]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    proc = subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or REPO,
        env=env or cli_env(),
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return Ran(proc.returncode, proc.stdout, proc.stderr)


def perdure_here(data_dir: Path | str, *args: str) -> Ran:
    """The same command line run in this process (``perdure.cli.run``): for checks
    that need many invocations; every command also has tests through ``perdure``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run(["--data-dir", str(data_dir), *args], out=out)
    return Ran(code, out.getvalue(), err.getvalue())


@dataclass
class Store:
    """A data dir and what is in it."""

    path: Path
    #: Confirmation ids of the executions suspended for approval / contract.
    cids: dict[str, str]
    #: The pid of the process that built it (written into owner.lock).
    builder_pid: int

    @property
    def ids(self) -> list[str]:
        """Every execution id, in creation order."""
        return list(EXPECTED)


#: execution id -> (agent, status, suspension reason) of what ``store`` holds.
EXPECTED: dict[str, tuple[str, str, str | None]] = {
    "weather-1": ("weather", "completed", None),
    "pay-1": ("banker", "suspended", "approval"),
    "guard-1": ("guarded", "suspended", "contract"),
    "budget-1": ("budgeted", "suspended", "budget"),
    "wait-1": ("waiter", "suspended", "signal"),
    "fail-1": ("failing", "failed", None),
    "cancel-1": ("banker", "cancelled", None),
    "report-1": ("reporter", "completed", None),
    "archive-1": ("archiver", "completed", None),
    "boss-1": ("boss", "completed", None),
    "boss-1/2": ("helper", "completed", None),
}


def build_store(path: Path) -> Store:
    """Run one execution per state with a real Runtime on ``path``."""
    cids = {}
    with Runtime(path, durability="process", shutdown_timeout=2.0) as rt:
        assert rt.run(agents.weather, "Weather in Paris?", execution_id="weather-1").is_completed
        r = rt.run(agents.banker, "Move $50 to savings", execution_id="pay-1")
        cids["pay-1"] = r.suspend_reason.confirmation_id
        r = rt.run(agents.guarded, "Weather in Zurich?", execution_id="guard-1")
        cids["guard-1"] = r.suspend_reason.confirmation_id
        assert rt.run(agents.budgeted, "Weather in Oslo?", execution_id="budget-1").is_suspended
        assert rt.run(agents.waiter, "Wait for the go", execution_id="wait-1").is_suspended
        assert rt.run(agents.failing, "Fail", execution_id="fail-1").is_failed
        assert rt.run(agents.banker, "Move it, then not", execution_id="cancel-1").is_suspended
        rt.cancel("cancel-1", "changed my mind")
        assert rt.run(agents.reporter, "Write the report", execution_id="report-1").is_completed
        assert rt.run(agents.archiver, "Archive", execution_id="archive-1").is_completed
        rt.spawn(agents.boss, "Delegate", execution_id="boss-1")
        assert rt.wait("boss-1", until="finished").is_completed
        for eid, (agent, status, _) in EXPECTED.items():
            result = rt.result(eid)
            assert (result.agent, result.status) == (agent, status), eid
    return Store(path, cids, os.getpid())


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """The shared, read-only data dir (do not send it signals: use ``fresh_store``)."""
    return build_store(tmp_path_factory.mktemp("store") / "data")


@pytest.fixture
def fresh_store(store: Store, tmp_path: Path) -> Store:
    """A private copy of ``store`` (copied with no process holding it open)."""
    path = tmp_path / "data"
    shutil.copytree(store.path, path)
    return Store(path, dict(store.cids), store.builder_pid)


class Owner:
    """``owner.py`` in a subprocess: a Runtime owning a data dir, reporting line by line."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.stderr_path = Path(data_dir).parent / f"owner-{time.monotonic_ns()}.err"
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(OWNER_SCRIPT), str(data_dir), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env or cli_env(),
        )
        self.said: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, prefix: str, timeout: float = 15.0) -> str:
        """Wait (on the owner's output, never by sleeping) for a line starting with prefix."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                raise AssertionError(
                    f"owner did not say {prefix!r} within {timeout}s; it said {self.said}; "
                    f"stderr: {self.stderr_path.read_text()[-2000:]}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"owner exited with {self.proc.wait()} before saying {prefix!r}; it said "
                    f"{self.said}; stderr: {self.stderr_path.read_text()[-2000:]}"
                )
            self.said.append(line)
            if line.startswith(prefix):
                return line

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to end by itself; its exit status."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._stderr.close()

    def close(self) -> None:
        """Close its stdin (it shuts the runtime down cleanly); SIGKILL if it hangs."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self._stderr.close()

    def __enter__(self) -> Owner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def owner_factory() -> Iterator[type[Owner]]:
    """``Owner`` (the class); every owner it started is closed at teardown."""
    started: list[Owner] = []

    class Tracked(Owner):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    yield Tracked
    for owner in started:
        if owner.proc.poll() is None:
            owner.proc.kill()
            owner.proc.wait()
