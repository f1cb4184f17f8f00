"""Every example runs, as a user would run it (a subprocess, no API key)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.openai_server import OpenAIServer, demo_handler

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_quickstart(tmp_path: Path) -> None:
    out = run(str(ROOT / "examples/quickstart.py"), str(tmp_path / "data"))
    assert "waiting for approval" in out and ": completed" in out
    assert "$50 moved from checking to savings" in out


#: What a core install (``pip install perdure``) does not bring: extras, dev tools, and
#: sniffio, which anyio no longer depends on.
NOT_IN_CORE_INSTALL = (
    "sniffio",
    "trio",
    "outcome",
    "openai",
    "anthropic",
    "httpx",
    "hypothesis",
    "pytest",
)


def run_core_only(target: str, *args: str) -> str:
    """Run a script (or ``-m module``) with every non-core package made unimportable."""
    launch = (
        "import runpy, sys\n"
        f"for name in {NOT_IN_CORE_INSTALL!r}:\n"
        "    sys.modules[name] = None  # import raises ModuleNotFoundError\n"
        "target, sys.argv = sys.argv[1], sys.argv[1:]\n"
        "if target.endswith('.py'):\n"
        "    runpy.run_path(target, run_name='__main__')\n"
        "else:\n"
        "    runpy.run_module(target, run_name='__main__')\n"
    )
    return run("-c", launch, target, *args)


def test_quickstart_and_cli_need_only_the_core_dependencies(tmp_path: Path) -> None:
    """The README's first command installs no extras; the demo and the CLI must run."""
    data = str(tmp_path / "data")
    out = run_core_only(str(ROOT / "examples/quickstart.py"), data)
    assert ": completed" in out and "$50 moved from checking to savings" in out
    status = run_core_only("perdure.cli", "--data-dir", data, "status")
    assert "completed" in status


def test_crash_recovery(tmp_path: Path) -> None:
    out = run(str(ROOT / "examples/crash_recovery.py"), str(tmp_path / "data"))
    assert "child exit status -9" in out
    assert "each side effect happened exactly once" in out


def test_fleet(tmp_path: Path) -> None:
    out = run(str(ROOT / "examples/fleet.py"), str(tmp_path / "data"), "--count", "200")
    assert "200 executions settled" in out and "'suspended for approval': 20" in out
    assert "lists 200 completed executions" in out


def test_service(tmp_path: Path) -> None:
    out = run(str(ROOT / "examples/service.py"), str(tmp_path / "data"), "--demo")
    assert "suspended (approval" in out and "1 waiting" in out
    assert "completed: Expense handled: paid 42.50 to ada" in out


def test_approval(tmp_path: Path) -> None:
    out = run(str(ROOT / "examples/approval.py"), str(tmp_path / "data"), "--auto")
    assert "sent approve" in out and "auto-resumed" in out
    assert "completed" in out


@pytest.mark.parametrize("configured", [False, True])
def test_openai_agent(tmp_path: Path, configured: bool) -> None:
    script = str(ROOT / "examples/openai_agent.py")
    if not configured:
        proc = subprocess.run(
            [sys.executable, script, "--data-dir", str(tmp_path / "d")],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")},
        )
        assert proc.returncode != 0 and "OPENAI_BASE_URL" in proc.stderr
        return
    with OpenAIServer(demo_handler) as server:
        out = run(
            script, "--data-dir", str(tmp_path / "d"), env={"OPENAI_BASE_URL": server.base_url}
        )
        assert len(server.chat_requests) == 2
    assert "get_weather -> ok" in out and "completed: Here is what I found" in out
