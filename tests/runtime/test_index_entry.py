"""An execution's index entry leaves out fields that hold their default.

Every reader takes the default for a missing field (``journal.INDEX_DEFAULTS``); a
field going back to its default must then be written explicitly (the index merges
fields, it never removes them), also by a journal opened after a restart; and an entry
written by an older version, with every field, must read and update the same.
"""

from __future__ import annotations

from typing import Any

import pytest

from perdure import Agent, tool
from perdure.events import execution_stream
from perdure.journal import INDEX_DEFAULTS
from perdure.providers import Scripted
from perdure.status import describe

pytestmark = pytest.mark.anyio


def approval_agent() -> Agent:
    @tool(requires_confirmation=True)
    def approve_me(n: int) -> str:
        return f"approved {n}"

    llm = Scripted([Scripted.call("approve_me", n=1), "done"], record=False)
    return Agent("fleet", tools=[approve_me], llm=llm)


async def entry(rt: Any, eid: str) -> dict[str, Any]:
    info = await rt.log.stream_info(execution_stream(eid))
    assert info is not None
    return dict(info.meta)


async def test_a_suspended_execution_stores_only_fields_off_their_defaults(
    open_runtime: Any,
) -> None:
    agent = approval_agent()
    async with open_runtime(agents=[agent]) as rt:
        r = await rt.run(agent, "go", execution_id="s-1")
        assert r.suspend_reason is not None
        cid = r.suspend_reason.confirmation_id
        meta = await entry(rt, "s-1")
        assert {"parent", "waiting_on", "signal_seq", "dollars", "tool_calls"}.isdisjoint(meta)
        assert meta["reason"] == "approval" and meta["confirmations"] == [cid]
        assert describe(meta) == f"suspended (approval {cid})"
        # Readers take the defaults for what is left out.
        (info,) = await rt.executions(status="suspended")
        assert (info.execution_id, info.parent, info.waiting_on) == ("s-1", None, ())
        assert (info.tool_calls, info.dollars, info.confirmations) == (0, 0.0, (cid,))


async def test_fields_going_back_to_their_defaults_are_written_after_a_restart(
    open_runtime: Any,
) -> None:
    agent = approval_agent()
    async with open_runtime(agents=[agent]) as rt:
        r = await rt.run(agent, "go", execution_id="s-1")
        assert r.suspend_reason is not None
        cid = r.suspend_reason.confirmation_id
    async with open_runtime(agents=[agent]) as rt:
        await rt.approve("s-1", cid)
        assert (await rt.wait("s-1")).status == "completed"
        meta = await entry(rt, "s-1")
        # Left as they were, "approval" and the confirmation would still be listed.
        assert meta["reason"] is None and meta["confirmations"] == []
        assert meta["tool_calls"] == 1 and meta["signal_seq"] >= 1
        (info,) = await rt.executions()
        assert (info.status, info.reason, info.confirmations) == ("completed", None, ())
        assert "parent" not in meta and "waiting_on" not in meta and "dollars" not in meta


async def test_an_entry_holding_every_field_reads_and_updates_the_same(
    open_runtime: Any,
) -> None:
    agent = approval_agent()
    async with open_runtime(agents=[agent]) as rt:
        r = await rt.run(agent, "go", execution_id="s-1")
        assert r.suspend_reason is not None
        cid = r.suspend_reason.confirmation_id
        # As an older version wrote it: every field, defaults too.
        full = {k: list(v) if isinstance(v, tuple) else v for k, v in INDEX_DEFAULTS.items()}
        old = {**full, **await entry(rt, "s-1")}
        await rt.log.set_meta(execution_stream("s-1"), old)
    async with open_runtime(agents=[agent]) as rt:
        (info,) = await rt.executions(status="suspended")
        assert (info.reason, info.confirmations, info.parent) == ("approval", (cid,), None)
        await rt.approve("s-1", cid)
        assert (await rt.wait("s-1")).status == "completed"
        meta = await entry(rt, "s-1")
        assert set(meta) == set(old)
        assert (meta["reason"], meta["confirmations"], meta["tool_calls"]) == (None, [], 1)
        assert meta["parent"] is None and meta["waiting_on"] == []
