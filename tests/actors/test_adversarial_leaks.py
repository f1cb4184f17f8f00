"""Tens of thousands of start_child/stop_child cycles leave no task, object or memory behind.

asyncio runs here without its debug mode (which records a traceback for every
callback and makes this test take minutes); everything else runs in debug mode.
"""

from __future__ import annotations

import gc
import tracemalloc

import anyio
import pytest
from anyio.lowlevel import checkpoint

from perdure.actors import Actor, ChildSpec, StopReason, Supervisor
from perdure.actors.context import ActorContext
from perdure.actors.mailbox import Mailbox
from perdure.actors.ref import ActorRef

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Both backends, asyncio without debug mode."""
    return request.param  # type: ignore[no-any-return]


class Full(Actor):
    """on_start, receive and on_stop: the kind an execution is."""

    async def on_start(self) -> None:
        pass

    async def receive(self, message: object) -> object:
        return message

    async def on_stop(self, reason: StopReason) -> None:
        pass


class Bare(Actor):
    """receive only: starts dormant, and may stop without ever having had a task."""

    async def receive(self, message: object) -> object:
        return message


async def cycle(sup: Supervisor, i: int) -> None:
    kind = Full if i % 2 else Bare
    ref = await sup.start_child(ChildSpec(f"c{i}", kind))
    if i % 4 >= 2:  # half of them get a runner task before they stop
        assert await ref.ask(i) == i
    await sup.stop_child(f"c{i}")
    # (start_child and stop_child need not yield: let the loop run its housekeeping,
    # as any real caller does between spawns.)
    await checkpoint()


def alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def test_tens_of_thousands_of_start_stop_cycles_leave_nothing_behind() -> None:
    async with Supervisor() as sup:
        for i in range(1000):  # warm up: caches, free lists, the backend's own tables
            await cycle(sup, i)
        gc.collect()
        tasks = len(anyio.get_running_tasks())
        objects = [alive(kind) for kind in (ActorContext, ActorRef, Mailbox, Full, Bare)]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(1000, 11000):
                await cycle(sup, i)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(anyio.get_running_tasks()) == tasks
        assert [alive(kind) for kind in (ActorContext, ActorRef, Mailbox, Full, Bare)] == objects
        assert sup.count_children() == 0 and not sup._graces and not sup._restarts
        # A leak of even one small object per cycle would be 10000 of them (>= 500 KB);
        # what is left is the backends' lazily pruned timer tables.
        assert grown < 384 * 1024, grown
