"""Await a coroutine inside a given ``contextvars.Context`` without a task of its own.

A task runs every step of its coroutine in the task's context. To run one hook of a
child (its first ``on_start``) in the caller's task but in the *child's* context —
so that context variables it sets are the child's, not the caller's — each step of
the coroutine is run with ``context.run`` and whatever it yields is passed through to
the event loop unchanged (futures on asyncio, traps on trio), as are the values and
exceptions the loop sends back.
"""

from __future__ import annotations

import contextvars
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["InContext"]

T = TypeVar("T")


class InContext(Generic[T]):
    """An awaitable that runs ``coro`` step by step in ``context``."""

    __slots__ = ("_context", "_coro")

    def __init__(self, context: contextvars.Context, coro: Coroutine[Any, Any, T]) -> None:
        self._context = context
        self._coro = coro

    def __await__(self) -> Generator[Any, Any, T]:
        run = self._context.run
        coro = self._coro
        send: Any = None
        throw: BaseException | None = None
        while True:
            try:
                if throw is None:
                    yielded = run(coro.send, send)
                else:
                    error, throw = throw, None
                    yielded = run(coro.throw, error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            try:
                send = yield yielded
            except GeneratorExit:
                run(coro.close)
                raise
            except BaseException as exc:
                # Cancellation and anything else the loop throws in goes to the coroutine.
                send, throw = None, exc
