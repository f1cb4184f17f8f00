"""Every example runs, as a user would run it (a subprocess, no API key)."""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

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


def test_the_command_the_quickstart_prints_works_as_printed(tmp_path: Path) -> None:
    """A new user pastes "see every step: ..." into a shell whose PATH lacks the venv."""
    venv_bin = Path(sys.executable).parent.resolve()
    path = os.pathsep.join(
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and Path(p).resolve() != venv_bin
    )
    out = run(str(ROOT / "examples/quickstart.py"), str(tmp_path / "data"), env={"PATH": path})
    [line] = [line for line in out.splitlines() if line.startswith("see every step:")]
    command = shlex.split(line.removeprefix("see every step:"))
    assert command[0] != "perdure"  # not on this PATH: it names the script in the venv
    proc = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": path},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("execution ") and "completed" in proc.stdout.splitlines()[0]
    # With the venv active (its bin first on PATH), plain "perdure" is what works.
    active = run(
        str(ROOT / "examples/quickstart.py"),
        str(tmp_path / "data"),
        env={"PATH": os.pathsep.join([str(Path(sys.executable).parent), path])},
    )
    assert f"see every step:  perdure --data-dir {tmp_path / 'data'} steps " in active


def test_crash_recovery_resumes_with_no_false_warning(tmp_path: Path) -> None:
    """The agent is registered at open: no "left alone until it is registered" line
    appears right before the execution is resumed (seen once a program logs warnings)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import logging\nlogging.basicConfig(level=logging.INFO, format='LOG %(message)s')\n"
        "logging.getLogger('hook').info('logging on')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples/crash_recovery.py"), str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "each side effect happened exactly once" in proc.stdout
    # The script and both of its children log their warnings to stderr.
    assert proc.stderr.count("LOG logging on") == 3, proc.stderr
    assert "left alone" not in proc.stderr, proc.stderr


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


def _http(port: int, raw: bytes) -> tuple[int, dict[str, Any]]:
    """Send ``raw`` as is; the status and JSON body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def _post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def test_service_answers_bad_requests_and_keeps_serving(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples/service.py"), str(tmp_path / "d"), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        first = lines.get(timeout=30)
        port = int(first.split("http://127.0.0.1:")[1].split()[0])
        for raw, status in [
            (b"garbage\r\n\r\n", 400),  # no method, path, version
            (b"GET /runs HTTP/1.1\r\nno colon here\r\n\r\n", 400),
            (b"POST /runs HTTP/1.1\r\nContent-Length: many\r\n\r\n", 400),
            (_post("/runs", b"{not json"), 400),
            (_post("/runs", b"[1, 2]"), 400),  # JSON, but not an object
            (_post("/runs", b'{"id": "r-1"}'), 400),  # no prompt
            (_post("/runs", b'{"prompt": "ada: 1", "id": "bad id!"}'), 400),
            (_post("/runs/nope/approve", b'{"confirmation_id": "c-1"}'), 404),
        ]:
            assert _http(port, raw)[0] == status, raw
        for partial in (b"", b"POST /runs HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(partial)  # and hang up before the request is complete
        assert _http(port, _post("/runs", b'{"prompt": "ada: 1", "id": "r-1"}'))[0] == 202
        status, body = _http(port, _post("/runs", b'{"prompt": "bob: 2", "id": "r-1"}'))
        assert status == 409 and "already exists" in body["error"]
        # after all that, a good request is served as usual
        status, body = _http(port, _post("/runs", b'{"prompt": "cy: 3.50", "id": "r-2"}'))
        assert (status, body) == (202, {"execution_id": "r-2"})
        status, body = _http(port, b"GET /runs/r-2 HTTP/1.1\r\n\r\n")
        assert status == 200 and body["execution_id"] == "r-2"
        assert proc.poll() is None  # still serving
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err


def test_approval(tmp_path: Path) -> None:
    out = run(str(ROOT / "examples/approval.py"), str(tmp_path / "data"), "--auto")
    assert "sent approve" in out and "auto-resumed" in out
    assert "completed" in out


def test_reminder(tmp_path: Path) -> None:
    out = run(str(ROOT / "examples/reminder.py"), str(tmp_path / "data"), "--seconds", "1")
    assert "sleeps until" in out and "the timer fired" in out
    assert "completed: Order A-1001 has been delivered" in out


def test_reminder_sleeps_through_a_kill_and_wakes_by_itself(tmp_path: Path) -> None:
    """The timer is set in the first process, which is SIGKILLed while it sleeps; the
    second run of the script picks the same execution up and its timer fires."""
    data = str(tmp_path / "data")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "examples/reminder.py"), data, "--seconds", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=clean,
    )
    try:
        assert first.stdout is not None
        line = first.stdout.readline()
        assert "sleeps until" in line and "holds no task" in line, line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # Still asleep when it opens (it then says so and waits), or overdue by then on a
    # slow machine (the timer fires at open): either way it completes, checking once.
    out = run(str(ROOT / "examples/reminder.py"), data, "--seconds", "2")
    assert "completed: Order A-1001 has been delivered" in out
    assert out.count("order A-1001: delivered") == 1


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


def test_the_readme_memory_log_snippet_imports_what_it_uses() -> None:
    """``Runtime(log=MemoryLog(record_types()))``: both names import as the README shows."""
    readme = (ROOT / "README.md").read_text()
    assert "from perdure import Runtime, record_types\nfrom perdure.log import MemoryLog\n" in (
        readme
    )
    script = (
        "import anyio\n"
        "from perdure import Agent, Runtime, record_types\n"
        "from perdure.log import MemoryLog\n"
        "from perdure.providers import Scripted\n"
        "agent = Agent('a', instructions='Say hi.', llm=Scripted(['hi']))\n"
        "async def main():\n"
        "    async with Runtime(log=MemoryLog(record_types())) as rt:\n"
        "        print((await rt.run(agent, 'hello')).output)\n"
        "anyio.run(main)\n"
    )
    assert run("-c", script) == "hi\n"
