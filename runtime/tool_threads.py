"""Worker threads for sync tools, owned by a Runtime.

Sync tools must never block the event loop, so each call runs in a worker thread. On
asyncio this goes straight to a ``ThreadPoolExecutor`` through ``run_in_executor``; on
trio through ``trio.to_thread.run_sync`` with a limiter of our own. Measured with 200
concurrent calls, this costs about half the CPU of ``anyio.to_thread.run_sync`` per
call, which matters when a fleet runs thousands of tool steps a second.

Either way the call runs in a copy of the caller's context (so
``current_idempotency_key()`` works in the thread), and a cancelled or timed-out call
is abandoned: the caller moves on, the thread finishes on its own and its result is
dropped (a thread cannot be interrupted).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from perdure.actors.backend import current_backend

__all__ = ["ToolThreads"]


class ToolThreads:
    """Up to ``max_threads`` sync tool calls at once; the rest wait their turn."""

    def __init__(self, max_threads: int = 40) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be >= 1")
        self.max_threads = max_threads
        self._executor: ThreadPoolExecutor | None = None
        self._trio_limiter: Any = None
        self._backend: str | None = None

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in a worker thread and return its result (or raise its error)."""
        ctx = contextvars.copy_context()
        backend = self._backend or self._detect()
        if backend == "asyncio":
            import asyncio

            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.max_threads, thread_name_prefix="perdure-tool"
                )
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, ctx.run, fn)
        import trio

        if self._trio_limiter is None:
            self._trio_limiter = trio.CapacityLimiter(self.max_threads)
        return await trio.to_thread.run_sync(
            ctx.run, fn, abandon_on_cancel=True, limiter=self._trio_limiter
        )

    def _detect(self) -> str:
        self._backend = current_backend()
        return self._backend

    def close(self) -> None:
        """Stop taking calls; threads still running finish in the background."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
