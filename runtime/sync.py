"""The blocking face of a Runtime, for scripts: ``with Runtime("./data") as rt``.

The event loop (asyncio by default, or trio) runs in a background thread started with
anyio's blocking portal; every method here is the async method of the same name, called
through the portal and waited for. Callbacks still run on the loop thread.

Ctrl-C (``KeyboardInterrupt``) while a call waits, or anywhere in the ``with`` body,
closes the runtime without its graceful ``shutdown_timeout``: running executions are
cancelled at once (each resumes at the next start, nothing is lost), and the
``KeyboardInterrupt`` is raised on out of ``with``.
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from perdure.agent import Agent
from perdure.budget import Budget
from perdure.errors import RuntimeClosedError
from perdure.result import ExecutionInfo, Result
from perdure.retention import FINISHED
from perdure.signals import SignalStatus

if TYPE_CHECKING:
    from perdure.runtime import ExecutionHandle, Runtime

__all__ = ["SyncRuntime"]

_END = object()


class SyncRuntime:
    """Blocking versions of the Runtime's methods (see :class:`perdure.Runtime`)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._stack = contextlib.ExitStack()
        self._portal: BlockingPortal | None = None
        # The pumps of the streams still open: closing the runtime ends none of them (an
        # execution stopped by the close never sends its Result), so __exit__ stops them
        # first, or the portal would wait for them for ever.
        self._pumps: set[Future[Any]] = set()

    def __enter__(self) -> SyncRuntime:
        try:
            self._portal = self._stack.enter_context(start_blocking_portal(self.runtime.backend))
            self._stack.enter_context(self._portal.wrap_async_context_manager(self.runtime))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for future in list(self._pumps):
            future.cancel()
        self._stack.__exit__(*exc_info)
        self._portal = None

    def _open_portal(self) -> BlockingPortal:
        if self._portal is None:
            raise RuntimeClosedError("the Runtime is closed: use it inside 'with Runtime(...)'")
        return self._portal

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self._open_portal().call(lambda: fn(*args, **kwargs))

    def register(self, agent: Agent) -> None:
        """See :meth:`Runtime.register` (run on the loop thread: it may start recovery)."""
        self._call(self.runtime.register, agent)

    def on_complete(self, fn: Any) -> Any:
        """See :meth:`Runtime.on_complete`."""
        return self.runtime.on_complete(fn)

    def on_suspend(self, fn: Any) -> Any:
        """See :meth:`Runtime.on_suspend`."""
        return self.runtime.on_suspend(fn)

    def on_fail(self, fn: Any) -> Any:
        """See :meth:`Runtime.on_fail`."""
        return self.runtime.on_fail(fn)

    def on_cancel(self, fn: Any) -> Any:
        """See :meth:`Runtime.on_cancel`."""
        return self.runtime.on_cancel(fn)

    def on_step(self, fn: Any) -> Any:
        """See :meth:`Runtime.on_step`."""
        return self.runtime.on_step(fn)

    def spawn(self, agent: Agent | str, prompt: str, **kwargs: Any) -> ExecutionHandle:
        """See :meth:`Runtime.spawn`."""
        return self._call(self.runtime.spawn, agent, prompt, **kwargs)

    def run(self, agent: Agent | str, prompt: str, **kwargs: Any) -> Result:
        """See :meth:`Runtime.run`."""
        return self._call(self.runtime.run, agent, prompt, **kwargs)

    def wait(self, execution_id: str, *, until: str = "settled") -> Result:
        """See :meth:`Runtime.wait`."""
        return self._call(self.runtime.wait, execution_id, until=until)

    def result(self, execution_id: str) -> Result:
        """See :meth:`Runtime.result`."""
        return self._call(self.runtime.result, execution_id)

    def wait_recovered(self) -> None:
        """See :meth:`Runtime.wait_recovered`."""
        self._call(self.runtime.wait_recovered)

    def executions(
        self, status: str | None = None, agent: str | None = None
    ) -> list[ExecutionInfo]:
        """See :meth:`Runtime.executions`."""
        return self._call(self.runtime.executions, status=status, agent=agent)

    def purge(
        self,
        older_than: float | datetime.timedelta,
        *,
        statuses: Iterable[str] = FINISHED,
        dry_run: bool = False,
    ) -> list[str]:
        """See :meth:`Runtime.purge`."""
        return self._call(self.runtime.purge, older_than, statuses=statuses, dry_run=dry_run)

    def signal(
        self, execution_id: str, name: str, payload: Any = None, **kwargs: Any
    ) -> SignalStatus:
        """See :meth:`Runtime.signal`."""
        return self._call(self.runtime.signal, execution_id, name, payload, **kwargs)

    def approve(
        self, execution_id: str, confirmation_id: str, note: str | None = None, **kwargs: Any
    ) -> SignalStatus:
        """See :meth:`Runtime.approve`."""
        return self._call(self.runtime.approve, execution_id, confirmation_id, note, **kwargs)

    def reject(
        self, execution_id: str, confirmation_id: str, reason: str, **kwargs: Any
    ) -> SignalStatus:
        """See :meth:`Runtime.reject`."""
        return self._call(self.runtime.reject, execution_id, confirmation_id, reason, **kwargs)

    def cancel(self, execution_id: str, reason: str = "", **kwargs: Any) -> SignalStatus:
        """See :meth:`Runtime.cancel`."""
        return self._call(self.runtime.cancel, execution_id, reason, **kwargs)

    def resolve(self, execution_id: str, **kwargs: Any) -> SignalStatus:
        """See :meth:`Runtime.resolve`."""
        return self._call(self.runtime.resolve, execution_id, **kwargs)

    def resume(
        self,
        execution_id: str,
        *,
        budget: Budget | None = None,
        accept_drift: bool = False,
        wait: bool = True,
        **kwargs: Any,
    ) -> Result | None:
        """See :meth:`Runtime.resume`."""
        return self._call(
            self.runtime.resume,
            execution_id,
            budget=budget,
            accept_drift=accept_drift,
            wait=wait,
            **kwargs,
        )

    def stream(self, agent: Agent | str, prompt: str, **kwargs: Any) -> Iterator[Any]:
        """See :meth:`Runtime.stream`: the same items, as a blocking iterator.

        Leaving the loop early (``break``) stops the stream, not the execution: it runs
        on in the runtime, and one the runtime's close interrupts resumes at the next
        open. The close ends a stream still being read with ``RuntimeClosedError``.
        """
        portal = self._open_portal()  # now, not at the first next()
        kwargs["execution_id"] = kwargs.get("execution_id") or uuid.uuid4().hex
        return self._stream(portal, agent, prompt, kwargs)

    def _stream(
        self, portal: BlockingPortal, agent: Agent | str, prompt: str, kwargs: dict[str, Any]
    ) -> Iterator[Any]:
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        eid = kwargs["execution_id"]

        async def pump() -> None:
            try:
                async for item in self.runtime.stream(agent, prompt, **kwargs):
                    items.put(item)
            except anyio.get_cancelled_exc_class():  # the close (or an abandoned stream)
                items.put(
                    _Failure(
                        RuntimeClosedError(
                            f"the Runtime closed while execution {eid!r} was being "
                            f"streamed; it resumes when a Runtime opens this data dir again"
                        )
                    )
                )
                raise
            except BaseException as exc:  # handed to the consuming thread, then re-raised
                items.put(_Failure(exc))
                raise
            finally:
                items.put(_END)

        future = portal.start_task_soon(pump)
        self._pumps.add(future)
        try:
            while True:
                item = items.get()
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
            future.result()
        finally:
            self._pumps.discard(future)
            # Abandoned (break, an exception in the loop body): nothing reads the pump
            # any more, and it would keep the portal from closing.
            future.cancel()


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
