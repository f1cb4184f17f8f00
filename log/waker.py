"""Waking tasks from a foreign thread: one thread-safe callback per event loop per batch.

The LMDB writer thread finishes a batch of appends that were made by tasks on one or
more event loops (asyncio or trio). Scheduling one thread-safe callback per waiting
task would cost a self-pipe write and a lock per task; instead :func:`wake` groups the
outcomes by loop and schedules ONE callback per loop (``loop.call_soon_threadsafe`` on
asyncio, ``TrioToken.run_sync_soon`` on trio), which resolves every waiter of that
loop in one go.

A :class:`Completion` is the waiter: created on the loop thread by the task that will
await it, resolved on the loop thread by that callback. On asyncio it is a bare
``asyncio.Future``; on trio the task parks with ``wait_task_rescheduled``. Both are far
cheaper than an ``anyio.Event`` and both are cancellable by anyio's cancel scopes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

__all__ = ["AppendWaiters", "Completion", "wake"]


class Completion:
    """A one-shot outcome that another thread supplies and one task awaits.

    Create it in the task that will await it. The outcome is either a value or an
    exception instance, which :meth:`wait` raises.
    """

    __slots__ = ("_done", "_future", "_outcome", "_task", "loop")

    def __init__(self) -> None:
        self._done = False
        self._outcome: Any = None
        self._task: Any = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            #: The loop this completion resolves on (a grouping key for :func:`wake`).
            self.loop: Any = loop
            self._future: asyncio.Future[Any] | None = loop.create_future()
        else:
            # anyio runs on asyncio or trio; not asyncio, so trio.
            import trio

            self.loop = trio.lowlevel.current_trio_token()
            self._future = None

    # The two ways to call back are looked up when used, not kept: a bound method per
    # attribute would be two more objects per append for a fleet's garbage collector to
    # scan while the append is in flight.

    @property
    def schedule(self) -> Callable[..., Any]:
        """Thread-safe, non-blocking: ``schedule(fn, arg)`` runs ``fn(arg)`` on :attr:`loop`."""
        if self._future is not None:
            return self.loop.call_soon_threadsafe  # type: ignore[no-any-return]
        return self.loop.run_sync_soon  # type: ignore[no-any-return]

    @property
    def call_soon(self) -> Callable[..., Any]:
        """Like :attr:`schedule`, but only from the loop's own thread (cheaper on asyncio)."""
        if self._future is not None:
            return self.loop.call_soon  # type: ignore[no-any-return]
        return self.loop.run_sync_soon  # type: ignore[no-any-return]

    def wait(self) -> Awaitable[Any]:
        """Wait for the outcome: ``await`` it for the value (or the exception, raised)."""
        # On asyncio the future itself is the awaitable: no coroutine object per append,
        # which a fleet's garbage collector would otherwise scan while it is in flight.
        if self._future is not None:
            return self._future
        return self._wait_trio()

    async def _wait_trio(self) -> Any:
        if not self._done:
            import trio

            self._task = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._task = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def resolve(self, outcome: Any) -> None:
        """Supply the outcome. Must run on the completion's loop thread; idempotent."""
        if self._done:
            return
        self._done = True
        future = self._future
        if future is not None:
            if not future.done():  # a cancelled waiter is gone; nothing to tell it
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            return
        self._outcome = outcome
        task = self._task
        if task is not None:
            import outcome as outcome_lib  # a trio dependency
            import trio

            self._task = None
            # The outcome itself is stashed above; wait() picks it up from there.
            trio.lowlevel.reschedule(task, outcome_lib.Value(None))


def _resolve_all(items: list[tuple[Completion, Any]]) -> None:
    for completion, outcome in items:
        completion.resolve(outcome)


def wake(
    items: Iterable[tuple[Completion, Any]], before: Callable[[int], None] | None = None
) -> int:
    """Resolve completions from any thread with one callback per event loop.

    Returns how many callbacks were scheduled. ``before(n)``, if given, is told that
    number before any callback is scheduled: once one is, its loop may resume the woken
    tasks at once, and they must find the books already kept (the log's counters). A
    loop that has already finished is skipped: its tasks are gone.
    """
    groups: dict[int, tuple[Completion, list[tuple[Completion, Any]]]] = {}
    for item in items:
        key = id(item[0].loop)
        group = groups.get(key)
        if group is None:
            groups[key] = (item[0], [item])
        else:
            group[1].append(item)
    if before is not None:
        before(len(groups))
    for first, batch in groups.values():
        try:
            first.schedule(_resolve_all, batch)
        except RuntimeError:
            # asyncio: "Event loop is closed"; trio.RunFinishedError is a RuntimeError.
            pass
    return len(groups)


class AppendWaiters:
    """The tasks blocked in ``wait_for_append``, by stream; safe to use from any thread."""

    __slots__ = ("_by_stream", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_stream: dict[str, list[tuple[int, Completion]]] = {}

    def add(self, stream: str, after: int) -> Completion:
        """Register the calling task as waiting for ``stream`` to pass seq ``after``."""
        completion = Completion()
        with self._lock:
            self._by_stream.setdefault(stream, []).append((after, completion))
        return completion

    def remove(self, stream: str, completion: Completion) -> None:
        """Forget a waiter (woken, timed out or cancelled)."""
        with self._lock:
            waiters = self._by_stream.get(stream)
            if waiters is None:
                return
            waiters[:] = [w for w in waiters if w[1] is not completion]
            if not waiters:
                del self._by_stream[stream]

    def due(self, last_seqs: Iterable[tuple[str, int]]) -> list[tuple[Completion, Any]]:
        """Pop the waiters that ``stream``'s new ``last_seq`` satisfies, with their outcome."""
        woken: list[tuple[Completion, Any]] = []
        with self._lock:
            if not self._by_stream:
                return woken
            for stream, last_seq in last_seqs:
                waiters = self._by_stream.get(stream)
                if waiters is None:
                    continue
                keep = []
                for after, completion in waiters:
                    if last_seq > after:
                        woken.append((completion, last_seq))
                    else:
                        keep.append((after, completion))
                if keep:
                    waiters[:] = keep
                else:
                    del self._by_stream[stream]
        return woken

    def pop_stream(self, stream: str) -> list[Completion]:
        """Remove and return every waiter on ``stream`` (to fail them together)."""
        with self._lock:
            waiters = self._by_stream.pop(stream, [])
        return [completion for _, completion in waiters]

    def streams(self) -> list[str]:
        """The streams someone is waiting on (a snapshot)."""
        with self._lock:
            return list(self._by_stream)

    def pop_all(self) -> list[Completion]:
        """Remove and return every waiter (used when the log closes)."""
        with self._lock:
            everyone = [c for waiters in self._by_stream.values() for _, c in waiters]
            self._by_stream.clear()
        return everyone

    def __bool__(self) -> bool:
        return bool(self._by_stream)

    def __len__(self) -> int:
        """How many tasks are waiting, on every stream."""
        with self._lock:
            return sum(map(len, self._by_stream.values()))
