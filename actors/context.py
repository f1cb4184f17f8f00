"""ActorContext: what a running actor knows about itself, and its supervisor's record of it."""

from __future__ import annotations

import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.lowlevel import checkpoint

from perdure.actors.errors import ActorError
from perdure.actors.mailbox import AskEnvelope, Mailbox
from perdure.actors.ref import ActorRef

if TYPE_CHECKING:
    from perdure.actors.actor import Actor
    from perdure.actors.spec import ChildSpec, ChildState
    from perdure.actors.supervisor import Supervisor

__all__ = ["ActorContext"]

logger = logging.getLogger("perdure.actors")


class ActorContext:
    """A supervised child's context: set as ``actor.ctx`` before ``on_start``.

    One context exists per child and survives its restarts (like the ref and the
    mailbox); :attr:`restart_count` and :attr:`stopping` describe the current
    incarnation. The supervisor keeps its bookkeeping for the child here too, in
    private slots, so that an idle child costs one object rather than several.
    """

    __slots__ = (
        "_actor",
        "_backoff_n",
        "_bg",
        "_bg_cancel",
        "_bg_idle",
        "_bg_n",
        "_busy",
        "_context",
        "_crash",
        "_current",
        "_dormant",
        "_final",
        "_forced",
        "_handshake",
        "_held",
        "_initial",
        "_mailbox",
        "_nested",
        "_pending_group",
        "_restarts",
        "_runner_alive",
        "_runner_done",
        "_scope",
        "_start_error",
        "_started_at",
        "_state",
        "_stop_event",
        "_stop_kind",
        "_sup",
        "path",
        "ref",
        "restart_count",
        "spec",
        "stopping",
    )

    def __init__(self, supervisor: Supervisor, spec: ChildSpec) -> None:
        self._sup = supervisor
        self.spec = spec
        """The child spec this child was started from."""
        self.path = f"{supervisor.path}/{spec.id}"
        """The child's path in the supervision tree, for logs."""
        self._mailbox = Mailbox(spec.mailbox_size, self.path, supervisor._parking, self)
        self.ref = ActorRef(self, self._mailbox, spec.id, self.path)
        """This actor's restart-stable ref."""
        self.restart_count = 0
        """0 for the first incarnation, n after n restarts."""
        self.stopping = False
        """True once a graceful stop of this incarnation has begun."""
        self._state: ChildState = "starting"
        self._stop_kind: str = "shutdown"
        self._stop_event: anyio.Event | None = None
        self._final = False  # being stopped for good by the supervisor
        self._held = False  # being stopped by a one_for_all/rest_for_one restart
        self._initial = True  # no incarnation has started yet
        self._scope: anyio.CancelScope | None = None
        self._busy = False  # running on_start or messages, in self._scope
        self._forced = False
        self._crash: BaseException | None = None
        self._bg: set[anyio.CancelScope] | None = None
        self._bg_n = 0
        self._bg_cancel = False
        self._bg_idle: anyio.Event | None = None
        self._current: AskEnvelope | None = None
        self._nested: Supervisor | None = None
        self._actor: Actor | None = None
        self._runner_alive = False
        self._runner_done: anyio.Event | None = None
        self._handshake: Any = None  # a parking waiter while someone waits for on_start
        self._start_error: BaseException | None = None
        self._restarts: deque[float] | None = None
        self._backoff_n = 0
        self._started_at = 0.0
        self._pending_group = False
        # Dormant: started, but no runner task yet (see Supervisor._launch).
        self._dormant = False
        self._context: contextvars.Context | None = None  # to give the runner, once woken

    def __repr__(self) -> str:
        return f"<ActorContext {self.path!r} {self._state} restarts={self.restart_count}>"

    @property
    def id(self) -> str:
        """The child id."""
        return self.spec.id

    @property
    def supervisor(self) -> Supervisor:
        """The supervisor that owns this child."""
        return self._sup

    def stop(self) -> None:
        """Request a NORMAL stop of this incarnation, after the current message.

        Whether the child is then restarted follows its restart type: ``permanent``
        children are, ``transient`` and ``temporary`` ones are removed.
        """
        self._request_stop("normal")

    async def wait_stopping(self) -> None:
        """Return once a graceful stop of this incarnation has begun."""
        if self.stopping:
            await checkpoint()
            return
        if self._stop_event is None:
            self._stop_event = anyio.Event()
        await self._stop_event.wait()

    def start_soon(
        self, fn: Callable[..., Awaitable[Any]], *args: object, name: str | None = None
    ) -> None:
        """Run ``fn(*args)`` as a task scoped to this incarnation.

        If it raises, the actor crashes (as if ``receive`` had raised) and the
        incarnation's other tasks are cancelled. When the incarnation stops, tasks
        still running are given the child's shutdown timeout to finish (they can
        watch :meth:`wait_stopping`), then cancelled.
        """
        if self._actor is None or self._state in ("stopped", "restarting"):
            raise ActorError(
                f"actor {self.path!r}: start_soon called outside a live incarnation "
                f"(state {self._state}); call it from on_start, receive or their tasks"
            )
        if self._dormant:
            self._sup._activate(self)
        if self._bg is None:
            self._bg = set()
        self._bg_n += 1
        task_name = name if name is not None else f"{self.path}:{getattr(fn, '__qualname__', fn)}"
        self._sup._spawn_task(self._run_background, fn, args, name=task_name)

    # ---- supervisor-side bookkeeping (private) ------------------------------------

    async def _run_background(self, fn: Callable[..., Awaitable[Any]], args: tuple) -> None:
        bg = self._bg
        assert bg is not None
        try:
            with anyio.CancelScope() as scope:
                bg.add(scope)
                if self._bg_cancel:
                    scope.cancel()
                try:
                    await fn(*args)
                except Exception as exc:
                    self._background_crashed(exc)
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                    # KeyboardInterrupt / SystemExit: the whole tree stops (no restart);
                    # this incarnation stops in its turn, with on_stop.
                    self._sup._interrupted(exc)
                finally:
                    bg.discard(scope)
        finally:
            self._bg_n -= 1
            if self._bg_n == 0 and self._bg_idle is not None:
                self._bg_idle.set()

    def _background_crashed(self, exc: BaseException) -> None:
        if self._crash is None:
            self._crash = exc
        else:
            logger.warning(
                "%s: another task failed after the actor had already crashed",
                self.path,
                exc_info=exc,
            )
        if self._busy and self._scope is not None:
            self._scope.cancel()
        self._mailbox.wake()  # if idle, the runner wakes up and sees the crash
        self._cancel_background()

    def _cancel_background(self) -> None:
        self._bg_cancel = True
        if self._bg:
            for scope in tuple(self._bg):
                scope.cancel()

    def _request_stop(self, kind: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._stop_kind = kind
        if self._stop_event is not None:
            self._stop_event.set()
        if self._dormant:
            self._sup._activate(self)  # the runner runs the stop (and any restart)
        else:
            self._mailbox.wake()

    def _mail_arrived(self) -> None:
        if self._dormant:
            self._sup._activate(self)

    def _force(self) -> None:
        """Cancel everything the current incarnation is doing (shutdown timeout expired)."""
        self._forced = True
        if self._nested is not None:
            self._nested._hurry()
        if self._scope is not None:
            self._scope.cancel()
        self._cancel_background()

    def _begin_incarnation(self) -> None:
        self._dormant = False
        self._mailbox.dormant = False
        self._context = None
        # A stop for good requested while the child was between incarnations stands.
        self.stopping = self._final
        self._state = "starting"
        self._started_at = self._mailbox.parking.now()
        self._stop_kind = "shutdown"
        self._stop_event = None
        self._held = False
        self._forced = False
        self._crash = None
        self._bg = None
        self._bg_n = 0
        self._bg_cancel = False
        self._bg_idle = None
        self._current = None
        self._nested = None
        self._actor = None
        self._scope = None
        self._busy = False
