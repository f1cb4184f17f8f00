"""The CLI on a data dir with a sleeping execution (``perdure.sleep_until``): status,
inspect and steps show the deadline; ``perdure signal ID timer:...`` wakes it early.

Real subprocesses (``perdure(...)``), with ``TZ=UTC`` so local times read the same on
every machine. The deadline is far in the future: nothing here waits for it.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from perdure import Agent, Runtime, sleep_until, tool
from perdure.providers import Scripted
from tests.cli.conftest import cli_env, perdure
from tests.runtime.test_timers import Clock, on_clock, settled

#: 2099-06-01 08:30:00 UTC.
DEADLINE = 4_083_985_800.0
SHOWN = "2099-06-01 08:30:00"


@tool("wait_for_summer", description="Sleep until the deadline")
def wait_for_summer() -> str:
    """Sleep durably until DEADLINE."""
    sleep_until(DEADLINE)
    return "summer"


sleeper = Agent(
    "sleeper",
    tools=[wait_for_summer],
    llm=Scripted([Scripted.call("wait_for_summer"), "It is summer."], record=False),
)


@pytest.fixture(params=["asyncio", "trio"])
def sleeping(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A data dir whose execution ``nap-1`` sleeps until DEADLINE (no owner)."""
    path = tmp_path / "data"
    with Runtime(path, durability="process", shutdown_timeout=2.0, backend=request.param) as rt:
        r = rt.run(sleeper, "wait", execution_id="nap-1")
        assert r.is_suspended and r.suspend_reason.kind == "timer"
    return path


def test_status_inspect_and_steps_show_the_deadline(sleeping: Path) -> None:
    env = cli_env(TZ="UTC")
    listed = perdure(sleeping, "status", "--json", env=env).json()
    (item,) = listed["executions"]
    assert item["status_text"] == f"suspended (timer until {SHOWN})"
    assert item["reason"] == "timer" and item["wakes_at"] == DEADLINE
    table = perdure(sleeping, "status", env=env)
    assert table.code == 0 and f"suspended (timer until {SHOWN})" in table.out

    doc = perdure(sleeping, "inspect", "nap-1", "--json", env=env).json()
    assert doc["wakes_at"] == DEADLINE
    assert doc["suspension"]["kind"] == "timer" and doc["suspension"]["until"] == DEADLINE
    assert doc["suspension"]["name"] == "timer:2:0"
    text = perdure(sleeping, "inspect", "nap-1", env=env).out
    assert f"{SHOWN} (timer)" in text
    assert f"timer: step 2 wait_for_summer sleeps until {SHOWN} (timer 'timer:2:0')" in text
    assert f"it resumes by itself at {SHOWN}" in text
    assert "perdure signal nap-1 timer:2:0 '{}'" in text

    steps = perdure(sleeping, "steps", "nap-1", env=env)
    assert steps.code == 0
    assert f"for timer 'timer:2:0' until {SHOWN}" in steps.out
    assert f"timer 'timer:2:0' until {SHOWN}" in steps.out.split("suspended", 1)[1]


def test_signalling_the_timer_by_name_wakes_it_early(sleeping: Path) -> None:
    ran = perdure(sleeping, "signal", "nap-1", "timer:2:0", "{}")
    assert ran.code == 0, ran.err
    assert "takes effect when a runtime with agent 'sleeper' registered opens it" in ran.out
    assert "step 2 (wait_for_summer) waits for 'timer:2:0'" in ran.out
    with Runtime(sleeping, durability="process", shutdown_timeout=2.0, agents=[sleeper]) as rt:
        r = rt.wait("nap-1")
        assert r.status == "completed" and r.output == "It is summer."
    listed = perdure(sleeping, "status", "--json").json()
    (item,) = listed["executions"]
    assert item["status_text"] == "completed" and item["wakes_at"] is None


@tool("countersign", description="Needs an approval", requires_confirmation=True)
def countersign() -> str:
    """Never runs here: the execution is cancelled first."""
    return "signed"


signing = Agent(
    "signing",
    tools=[countersign],
    llm=Scripted([Scripted.call("countersign"), "Signed."], record=False),
)


def test_status_and_inspect_show_an_execution_timeout_and_who_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "data"
    with Runtime(path, durability="process", shutdown_timeout=2.0) as rt:
        rt.runtime._wall_clock = lambda: DEADLINE - 3600
        r = rt.run(signing, "sign", execution_id="tl-1", execution_timeout=3600)
        assert r.is_suspended and r.deadline is not None
    env = cli_env(TZ="UTC")
    (item,) = perdure(path, "status", "--json", env=env).json()["executions"]
    assert item["deadline"] == DEADLINE
    doc = perdure(path, "inspect", "tl-1", "--json", env=env).json()
    assert doc["deadline"] == DEADLINE and doc["cancelled_by"] is None
    text = perdure(path, "inspect", "tl-1", env=env).out
    assert f"deadline   {SHOWN} (execution timeout)" in text
    assert perdure(path, "cancel", "tl-1", "--reason", "not needed").code == 0
    with Runtime(path, durability="process", shutdown_timeout=2.0, agents=[signing]) as rt:
        by = rt.wait("tl-1").cancelled_by
    assert by is not None and by.startswith("cli:")  # cli:user@host
    text = perdure(path, "inspect", "tl-1", env=env).out
    assert f"cancelled  not needed (by {by})" in text


@tool("wire", description="Wire money", requires_confirmation=True, approval_timeout=86_400)
def wire() -> str:
    """Needs a person's yes within a day."""
    return "wired"


wirer = Agent("wirer", tools=[wire], llm=Scripted([Scripted.call("wire"), "Wired."], record=False))


def test_an_approval_timeout_shows_when_the_call_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "data"
    with Runtime(path, durability="process", shutdown_timeout=2.0) as rt:
        r = rt.run(wirer, "wire it", execution_id="wire-1")
        assert r.suspend_reason is not None and r.suspend_reason.kind == "approval"
        cid, expires = r.suspend_reason.confirmation_id, r.suspend_reason.until
    shown = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(expires))
    env = cli_env(TZ="UTC")
    (item,) = perdure(path, "status", "--json", env=env).json()["executions"]
    assert item["status_text"] == f"suspended (approval {cid}; expires {shown})"
    assert item["wakes_at"] == expires
    text = perdure(path, "inspect", "wire-1", env=env).out
    assert f"undecided, {cid} is rejected by itself at {shown}" in text
    steps = perdure(path, "steps", "wire-1", env=env).out
    assert f"confirmation {cid} (pending; rejected if undecided at {shown})" in steps

    async def past_the_expiry() -> None:  # the next start, a day later by its clock
        rt = Runtime(path, durability="process", shutdown_timeout=2.0, agents=[wirer])
        on_clock(rt, Clock(expires + 1))
        async with rt:
            await settled(rt, "wire-1", "completed")

    anyio.run(past_the_expiry)
    late = perdure(path, "approve", "wire-1", cid)
    assert late.code == 1, late
    assert (
        f"confirmation {cid!r} of execution 'wire-1' was already rejected by its approval "
        f"timeout (nobody decided in time) (seq "
    ) in late.err
