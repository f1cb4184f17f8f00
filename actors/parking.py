"""One-shot wake-ups, cheaper than ``anyio.Event``, for the actor hot paths.

A mailbox's idle wait, an ask's reply and a child's start handshake each have one
waiter and one waker. ``anyio.Event`` costs more than that needs: on asyncio each one
builds two ``asyncio.Event`` objects (anyio's dispatching ``__new__`` makes the
backend's ``__init__`` run twice), each with a ~600-byte deque, plus a future per
wait; on trio, a ``trio.Event`` with its parking lot. With 10^5 idle actors that is
memory, and garbage-collector work at every spawn. So these paths use each backend's
own primitive directly: an asyncio future, or trio's ``wait_task_rescheduled`` /
``reschedule``. Behaviour is the same on both: a waiter woken before it waits returns
at once; a cancelled waiter raises the backend's cancellation exception (anyio's
cancel scopes see it as they see any other); waking after a cancellation is a no-op.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from perdure.actors.backend import current_backend

__all__ = ["Parking", "current_parking"]


class Parking:
    """Create, await and wake one-shot waiters on the running backend."""

    __slots__ = ()

    def waiter(self) -> Any:
        """A new waiter for the current task (await it with :meth:`wait` once)."""
        raise NotImplementedError

    def wait(self, waiter: Any) -> Awaitable[object]:
        """Wait until :meth:`wake` is called on ``waiter`` (at once if it already was)."""
        raise NotImplementedError

    async def wait_for(self, waiter: Any, timeout: float) -> bool:
        """Like :meth:`wait` but give up after ``timeout`` seconds; True if woken."""
        raise NotImplementedError

    def wake(self, waiter: Any) -> None:
        """Wake ``waiter``; idempotent, and a no-op once its wait was cancelled."""
        raise NotImplementedError

    def now(self) -> float:
        """The backend's clock (``anyio.current_time()``, without its dispatch cost)."""
        raise NotImplementedError


def _expire(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)


class _AsyncioParking(Parking):
    __slots__ = ()

    def waiter(self) -> asyncio.Future[bool]:
        return asyncio.get_running_loop().create_future()

    def wait(self, waiter: asyncio.Future[bool]) -> Awaitable[object]:
        # The future itself is awaitable: no coroutine object per wait.
        return waiter

    async def wait_for(self, waiter: asyncio.Future[bool], timeout: float) -> bool:
        # A timer handle instead of a cancel scope: about a third of the cost per ask.
        handle = asyncio.get_running_loop().call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            handle.cancel()

    def wake(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            waiter.set_result(True)

    def now(self) -> float:
        return asyncio.get_running_loop().time()


class _TrioWaiter:
    __slots__ = ("task", "woken")

    def __init__(self) -> None:
        self.task: Any = None
        self.woken = False

    def abort(self, _: object) -> Any:
        # Called by trio when the waiting task is cancelled: forget it, so that a later
        # wake() does not reschedule a task that is no longer waiting here.
        import trio

        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class _TrioParking(Parking):
    __slots__ = ("_lowlevel", "_move_on_after", "now")

    def __init__(self) -> None:
        import trio

        self._lowlevel = trio.lowlevel
        self._move_on_after = trio.move_on_after
        self.now = trio.current_time  # type: ignore[method-assign]

    def waiter(self) -> _TrioWaiter:
        return _TrioWaiter()

    def wait(self, waiter: _TrioWaiter) -> Awaitable[object]:
        # Returns trio's own coroutine rather than wrapping it: one frame less per
        # idle actor. The caller awaits it at once, so the task recorded is the waiter.
        lowlevel = self._lowlevel
        if waiter.woken:
            return lowlevel.checkpoint()
        waiter.task = lowlevel.current_task()
        return lowlevel.wait_task_rescheduled(waiter.abort)

    async def wait_for(self, waiter: _TrioWaiter, timeout: float) -> bool:
        with self._move_on_after(timeout):
            await self.wait(waiter)
        return waiter.woken

    def wake(self, waiter: _TrioWaiter) -> None:
        waiter.woken = True
        task = waiter.task
        if task is not None:
            waiter.task = None
            self._lowlevel.reschedule(task)


_ASYNCIO = _AsyncioParking()


def current_parking() -> Parking:
    """The :class:`Parking` for the backend running in this thread (asyncio or trio)."""
    if current_backend() == "trio":
        return _TrioParking()
    return _ASYNCIO
