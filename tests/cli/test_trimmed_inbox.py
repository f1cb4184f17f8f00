"""The CLI on a data dir whose inbox the runtime has trimmed: ``perdure health`` is clean,
and ``perdure inspect`` / ``approve`` see exactly the signals still pending."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from perdure import Runtime
from perdure.events import INBOX_STREAM, SignalSent, encode, execution_stream, record_types
from perdure.log import ANY, LmdbLog
from tests.cli import agents
from tests.cli.conftest import Store, perdure


async def deliver_and_trim(path: Path, count: int) -> int:
    """Run a runtime that takes ``count`` signals (notes for wait-1, and strays for an
    execution that does not exist), then stops (and so trims); the inbox's last seq."""
    async with Runtime(path, agents=agents.ALL, durability="process", shutdown_timeout=2.0) as rt:
        records = [
            encode(SignalSent("wait-1" if n % 2 else "nobody", "note", {"n": n}, "test"))
            for n in range(count)
        ]
        last = await rt.log.append(INBOX_STREAM, records, expect=ANY)
        with anyio.fail_after(20):
            while True:
                booked = rt._inbox_booked
                info = await rt.log.stream_info(INBOX_STREAM)
                assert info is not None
                if info.meta.get("cursor") == last:
                    break
                await booked.wait()
    return last


async def inbox_info(path: Path) -> tuple[int, int]:
    log = await LmdbLog.open(path, types=record_types(), client=True)
    try:
        info = await log.stream_info(INBOX_STREAM)
        assert info is not None
        return info.first_seq, info.last_seq
    finally:
        await log.aclose()


@pytest.mark.anyio
async def test_health_is_clean_on_a_trimmed_inbox(fresh_store: Store) -> None:
    path = fresh_store.path
    last = await deliver_and_trim(path, 600)
    assert await inbox_info(path) == (last + 1, last)  # every delivered signal trimmed
    ran = await anyio.to_thread.run_sync(perdure, path, "health")
    assert ran.code == 0, ran.out
    assert ran.out.splitlines()[-1].startswith("healthy: no faults in ")
    doc = (await anyio.to_thread.run_sync(perdure, path, "health", "--json")).json()
    assert doc["ok"] is True and doc["faults"] == []
    # A signal sent after the trims (no runtime running) is checked like any other.
    await anyio.to_thread.run_sync(perdure, path, "signal", "wait-1", "note", '{"n": -1}')
    assert await inbox_info(path) == (last + 1, last + 1)
    ran = await anyio.to_thread.run_sync(perdure, path, "health")
    assert ran.code == 0, ran.out


@pytest.mark.anyio
async def test_inspect_shows_the_pending_signals_of_a_trimmed_inbox(fresh_store: Store) -> None:
    path, cid = fresh_store.path, fresh_store.cids["pay-1"]
    last = await deliver_and_trim(path, 300)
    ran = await anyio.to_thread.run_sync(perdure, path, "approve", "pay-1", cid, "--by", "ann")
    assert ran.code == 0, ran.out + ran.err
    first, now = await inbox_info(path)
    assert (first, now) == (last + 1, last + 1)
    detail = (await anyio.to_thread.run_sync(perdure, path, "inspect", "pay-1", "--json")).json()
    [pending] = detail["pending_signals"]
    assert (pending["inbox_seq"], pending["name"], pending["by"]) == (last + 1, "approve", "ann")
    shown = await anyio.to_thread.run_sync(perdure, path, "inspect", "pay-1")
    assert f"  inbox seq {last + 1}: approve " in shown.out
    # The delivered ones (trimmed) are not shown as pending anywhere.
    waiting = (await anyio.to_thread.run_sync(perdure, path, "inspect", "wait-1", "--json")).json()
    assert waiting["pending_signals"] == []
    # A second decision is still refused: the first waits in the (trimmed) inbox.
    again = await anyio.to_thread.run_sync(perdure, path, "approve", "pay-1", cid)
    assert again.code != 0 and "already has a decision waiting in the inbox" in again.err
    # The next start delivers it once, and trims it too.
    async with Runtime(path, agents=agents.ALL, durability="process", shutdown_timeout=2.0) as rt:
        with anyio.fail_after(10):
            assert (await rt.wait("pay-1", until="finished")).is_completed
        types = [r.type async for r in rt.log.read(execution_stream("pay-1"))]
        notes = [
            r.payload["payload"]["n"]
            async for r in rt.log.read(execution_stream("wait-1"))
            if r.type == "signal.received"
        ]
    assert types.count("approval.granted") == 1
    assert notes == list(range(1, 300, 2))
    assert await inbox_info(path) == (last + 2, last + 1)
    detail = (await anyio.to_thread.run_sync(perdure, path, "inspect", "pay-1", "--json")).json()
    assert detail["pending_signals"] == []
