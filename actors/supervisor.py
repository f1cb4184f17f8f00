"""Supervisor: an OTP-style supervisor of actors and of nested supervisors.

The reference is Erlang/OTP's ``supervisor.erl``; the names (strategies, restart
types, intensity/period) are OTP's. Each child is run by one task (its *runner*) in
the supervisor's task group::

    runner:  factory() -> on_start -> [receive ...] -> on_stop -> decide
             decide: forget it (temporary, transient after a normal stop, per-child
             limit), restart it here after its backoff delay (one_for_one), hand it
             to a group restart task (one_for_all / rest_for_one), or fail the
             supervisor (intensity exceeded)

Each decision is taken synchronously by the runner of the child that exited, so one
slow restart (a backoff delay, an ``on_start``) never blocks the supervisor from
handling its other children. Group restarts and shutdown are serialised by one lock;
a shutdown first stops the child a group restart is starting (its ``on_start`` may
never return), so that the lock is always let go within that child's timeout.

A child gets its runner task only once it needs one. The first ``on_start`` of an
actor runs in the task that starts it (``start_child``, ``async with``, a group
restart), but in the child's own copy of that task's context, which its runner later
starts from. Then the child is *dormant* — no task at all — until its first message,
``ctx.stop()`` or ``ctx.start_soon`` wakes it; if its supervisor stops it before that,
its ``on_stop`` runs in the stopping task (in the child's context, within its shutdown
timeout). So 10^5 started-but-idle children cost about a kilobyte each instead of a
task's five, and a start costs no task spawn and no task switch. Nothing else differs.
"""

from __future__ import annotations

import contextvars
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
from anyio.abc import TaskGroup
from anyio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled

from perdure.actors.actor import Actor, StopReason
from perdure.actors.context import ActorContext
from perdure.actors.errors import ActorCrashed, ActorError, MailboxClosed, RestartIntensityExceeded
from perdure.actors.incontext import InContext
from perdure.actors.mailbox import EMPTY, AskEnvelope
from perdure.actors.parking import Parking, current_parking
from perdure.actors.ref import ActorRef
from perdure.actors.spec import Backoff, ChildInfo, ChildSpec, LifecycleEvent, LifecycleKind

__all__ = ["Strategy", "Supervisor"]

logger = logging.getLogger("perdure.actors")

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
SupervisorState = Literal["new", "running", "stopping", "failed", "stopped"]

_STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")

# What a runner does after an incarnation ended.
_EXIT = 0  # the runner returns (child forgotten, or someone else takes over)
_RESTART = 1  # the runner restarts the child itself, after its backoff delay


_current_child: contextvars.ContextVar[ActorContext] = contextvars.ContextVar(
    "perdure_actors_current_child"
)
"""The child whose code is running (its hooks, receive, tasks): set in its context."""


def _requested(ctx: ActorContext) -> StopReason:
    return StopReason.NORMAL if ctx._stop_kind == "normal" else StopReason.SHUTDOWN


def _over_limit(history: deque[float], now: float, period: float, limit: int) -> bool:
    """Record a restart at ``now``; True if more than ``limit`` fall within ``period``."""
    history.append(now)
    threshold = now - period
    while history[0] < threshold:
        history.popleft()
    return len(history) > limit


class Supervisor:
    """Supervises children: starts them in order, restarts them, stops them in reverse.

    Use it as an async context manager; every task of the tree lives in the task
    groups of the supervisors, so none outlives ``async with``::

        async with Supervisor(name="root", children=[ChildSpec("db", Db)]) as root:
            ref = await root.start_child(ChildSpec("order-1", Order, restart="transient"))
            await ref.ask("status")

    ``strategy``: which children restart when one must restart — ``one_for_one``
    (just that one), ``one_for_all`` (all: the others are stopped in reverse start
    order, then all are restarted in start order), ``rest_for_one`` (that one and
    those started after it). Temporary children stopped by a sibling's restart are
    removed, not restarted (as in OTP).

    ``intensity``/``period``: more than ``intensity`` restarts within ``period``
    seconds and the supervisor stops all its children in reverse order and fails
    with :class:`RestartIntensityExceeded` (its ``__cause__`` is the last crash).
    Nested in a parent, that failure is a crash of this child, so escalation travels
    up the tree. At the root, the body of ``async with`` is cancelled and
    ``RestartIntensityExceeded`` itself (not an exception group) is raised out of
    ``async with``: catch that. ``intensity=None`` means unlimited.

    ``backoff``: the delay before a restart, per child (see :class:`Backoff`).

    Exiting ``async with`` (normally, with an error or by cancellation) stops the
    children gracefully in reverse start order, each within its ``shutdown``
    timeout, then cancelled; this shutdown is shielded from the caller's
    cancellation so that it always completes (bounded by the sum of the timeouts).

    A ``KeyboardInterrupt`` or ``SystemExit`` raised by any actor of the tree is no
    crash: the whole tree stops as above and that exception leaves the root's
    ``async with`` as itself (see :mod:`perdure.actors`).
    """

    def __init__(
        self,
        *,
        strategy: Strategy = "one_for_one",
        children: Sequence[ChildSpec] = (),
        intensity: int | None = 3,
        period: float = 5.0,
        backoff: Backoff = Backoff(),  # noqa: B008 (a frozen dataclass: safe to share)
        name: str = "supervisor",
    ) -> None:
        if strategy not in _STRATEGIES:
            raise ValueError(f"supervisor {name!r}: strategy must be one of {_STRATEGIES}")
        if intensity is not None and not (isinstance(intensity, int) and intensity >= 0):
            raise ValueError(f"supervisor {name!r}: intensity must be None or an int >= 0")
        if not period > 0:
            raise ValueError(f"supervisor {name!r}: period must be > 0, got {period}")
        if not isinstance(backoff, Backoff):
            raise TypeError(f"supervisor {name!r}: backoff must be a Backoff, got {backoff!r}")
        seen: set[str] = set()
        for spec in children:
            if spec.id in seen:
                raise ValueError(f"supervisor {name!r}: two children have the id {spec.id!r}")
            seen.add(spec.id)
        self._strategy: Strategy = strategy
        self._specs = tuple(children)
        self._intensity = intensity
        self._period = float(period)
        self._backoff = backoff
        self._name = name
        self._path = name
        self._parent: Supervisor | None = None
        self._children: dict[str, ActorContext] = {}
        self._observers: list[Callable[[LifecycleEvent], None]] = []
        self._restarts: deque[float] = deque()
        self._state: SupervisorState = "new"
        self._tg: TaskGroup | None = None  # the children's, hosted by _host
        self._outer: TaskGroup  # the body's: set by __aenter__
        self._released: anyio.Event  # lets _host return: set by __aexit__
        self._failure: RestartIntensityExceeded | None = None
        # At the root only: the KeyboardInterrupt / SystemExit an actor raised, which
        # stops the whole tree and is raised out of the root's async with.
        self._interrupt: BaseException | None = None
        self._brutal = False  # set by a parent whose shutdown timeout for us expired
        self._graces: set[anyio.CancelScope] = set()  # graceful stop waits in progress
        self._group_lock: anyio.Lock | None = None
        self._group_launching: ActorContext | None = None  # in a group restart's _launch
        self._closing_event: anyio.Event | None = None
        self._shutdown_done: anyio.Event | None = None
        self._random = random.Random()
        self._parking: Parking  # the running backend's: set by __aenter__

    def __repr__(self) -> str:
        return (
            f"<Supervisor {self._path!r} {self._strategy} {self._state} "
            f"children={len(self._children)}>"
        )

    # ---- public API --------------------------------------------------------------

    @property
    def path(self) -> str:
        """This supervisor's path in the tree (its name at the root)."""
        return self._path

    @property
    def strategy(self) -> Strategy:
        """The restart strategy."""
        return self._strategy

    @property
    def state(self) -> SupervisorState:
        """``new``, ``running``, ``stopping``, ``failed`` or ``stopped``."""
        return self._state

    async def __aenter__(self) -> Supervisor:
        """Start the static children in order, each once its predecessor's on_start returned.

        If one fails to start, those already started are stopped in reverse order and
        :class:`ActorCrashed` is raised (its ``__cause__`` is the error).
        """
        if self._state != "new":
            raise ActorError(
                f"supervisor {self._path!r} is {self._state}; a Supervisor can be entered "
                f"once — create a new one (a ChildSpec factory must return a fresh one)"
            )
        self._parking = current_parking()
        outer = anyio.create_task_group()
        await outer.__aenter__()
        self._outer = outer
        self._released = anyio.Event()
        try:
            self._tg = await outer.start(self._host, name=f"{self._path}:host")
            self._state = "running"
            for spec in self._specs:
                await self._start(spec)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._shutdown()
            self._state = "stopped"
            await self._close_task_group(exc)
            if self._interrupt is not None:
                raise self._interrupt from None  # (what cancelled the start)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Stop all children in reverse start order, then raise the failure if there was one."""
        try:
            with anyio.CancelScope(shield=True):
                await self._shutdown()
        finally:
            if self._state != "failed":
                self._state = "stopped"
            suppress = await self._close_task_group(exc)
        if self._interrupt is not None and exc is not self._interrupt:
            # An actor's KeyboardInterrupt / SystemExit: it cancelled the body (see
            # _interrupted), and leaves as itself, whatever the body raised then.
            raise self._interrupt from None
        if self._failure is not None:
            raise self._failure
        return suppress

    async def _host(self, *, task_status: anyio.abc.TaskStatus[TaskGroup]) -> None:
        """Host the children's task group, shielded from cancellation of the body.

        The children do not live in the caller's task (the body of ``async with``) but
        in this one, under a shield: when the body is cancelled from outside, the
        children are not torn down at random; ``__aexit__`` stops them gracefully,
        in reverse start order within their timeouts, and only then does the
        cancellation carry on. Nothing is lost: ``__aexit__`` always releases us.
        """
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                task_status.started(tg)
                await self._released.wait()

    async def _close_task_group(self, exc: BaseException | None) -> bool | None:
        """Release the host task and exit the outer task group (every child has finished).

        A cancellation is handed to the group (its own scope absorbs the one our
        failure caused); any other exception from the body is not, so that it
        propagates as itself rather than wrapped in an exception group.
        """
        self._released.set()
        if exc is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
            return await self._outer.__aexit__(type(exc), exc, exc.__traceback__)
        await self._outer.__aexit__(None, None, None)
        return None

    async def start_child(self, spec: ChildSpec) -> ActorRef:
        """Start a dynamic child; return its ref once its ``on_start`` returned.

        Raises :class:`ActorCrashed` (cause: the error) if the factory or
        ``on_start`` raised — the child is then not added — and :class:`ActorError`
        if the id is taken or the supervisor is not running. If the caller is
        cancelled while ``on_start`` runs, the child is cancelled and removed.

        Always a checkpoint (as anyio's own calls are), even when the child starts
        without awaiting anything: cancelled on entry, it raises and starts nothing;
        on every outcome it lets other tasks run before it returns or raises.
        """
        await checkpoint_if_cancelled()
        try:
            return await self._start(spec)
        finally:
            # Shielded: a child that started is not to be lost to a cancellation now.
            await cancel_shielded_checkpoint()

    async def stop_child(self, id: str) -> None:
        """Stop a child for good (gracefully, within its shutdown timeout) and remove it.

        Returns once it has stopped; does nothing if there is no such child. The stop
        completes even if the caller is cancelled meanwhile. A child stops itself with
        ``ctx.stop()``: calling this on itself raises :class:`ActorError` (and calling
        it on one of its ancestors would wait for itself until the timeouts expire).
        """
        ctx = self._children.get(id)
        if ctx is None:
            return
        if _current_child.get(None) is ctx:
            # Waiting for our own incarnation to finish would never return.
            raise ActorError(
                f"actor {ctx.path!r} called stop_child on itself, which would wait for "
                f"itself forever; call ctx.stop() to stop after the current message"
            )
        with anyio.CancelScope(shield=True):
            await self._terminate(ctx, final=True)
        self._forget(ctx, "it was stopped by stop_child")

    def hurry(self) -> None:
        """Make this supervisor's shutdown (coming or under way) cancel children at once.

        No child gets its graceful ``shutdown`` timeout any more (those being waited
        out are cut short): each is cancelled, its ``on_stop`` run in a cancelled scope,
        and nested supervisors hurry in turn. The stop order stays reverse start order.
        For a process that must stop now (Ctrl-C) over state that is durable anyway.
        """
        self._hurry()

    def ref(self, id: str) -> ActorRef | None:
        """The ref of child ``id``, or None if there is no such child (O(1))."""
        ctx = self._children.get(id)
        return None if ctx is None else ctx.ref

    def child_supervisor(self, id: str) -> Supervisor | None:
        """The current incarnation of nested supervisor ``id``, or None.

        A restart creates a new Supervisor from the spec's factory: look it up again
        rather than keeping it (and observe an ancestor, whose observers see the
        events of the whole subtree).
        """
        ctx = self._children.get(id)
        return None if ctx is None else ctx._nested

    def children(self) -> list[ChildInfo]:
        """A snapshot of the children (ids and states), in start order."""
        return [
            ChildInfo(ctx.spec.id, ctx.path, ctx._state, ctx.restart_count, ctx._nested is not None)
            for ctx in self._children.values()
        ]

    def count_children(self) -> int:
        """How many children this supervisor has (running, starting or restarting); O(1)."""
        return len(self._children)

    def observe(self, fn: Callable[[LifecycleEvent], None]) -> Callable[[], None]:
        """Call ``fn(event)`` for every lifecycle event of this supervisor's subtree.

        ``fn`` runs synchronously in the supervisor's task; an exception from it is
        logged and swallowed. Returns a function that unsubscribes ``fn``.
        """
        self._observers.append(fn)

        def unsubscribe() -> None:
            try:
                self._observers.remove(fn)
            except ValueError:
                pass

        return unsubscribe

    # ---- starting ----------------------------------------------------------------

    def _spawn_task(
        self, fn: Callable[..., Awaitable[Any]], *args: object, name: str | None = None
    ) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn, *args, name=name)

    async def _start(self, spec: ChildSpec) -> ActorRef:
        if self._state != "running":
            raise ActorError(
                f"supervisor {self._path!r} is {self._state}; children can only be started "
                f"while it runs (inside its 'async with')"
            )
        if spec.id in self._children:
            raise ActorError(
                f"supervisor {self._path!r} already has a child {spec.id!r}; child ids are "
                f"unique — stop that child first or choose another id"
            )
        ctx = ActorContext(self, spec)
        self._children[spec.id] = ctx
        try:
            error = await self._launch(ctx)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._terminate(ctx, final=True, brutal=True)
            self._forget(ctx, "its start was cancelled")
            raise
        if error is not None:
            self._forget(ctx, "it failed to start")
            raise ActorCrashed(ctx.path, error, during="on_start") from error
        return ctx.ref

    async def _launch(self, ctx: ActorContext) -> BaseException | None:
        """Start a new incarnation of ``ctx``; return None once its ``on_start`` returned.

        Returns the error that prevented the start otherwise (the restart decision for
        it has been taken by then). The factory and an actor's first ``on_start`` run
        here, in the caller's task — but in a copy of the caller's context, which the
        child's runner later starts from, so the child sees what its ``on_start`` set
        and the caller does not. A child then gets its runner task at once only if it
        needs one (an ``on_stop`` to run, tasks or mail pending, a stop requested);
        otherwise it stays dormant until its first message. A nested supervisor is
        started by its runner, which hands the result back.
        """
        ctx._begin_incarnation()
        ctx._start_error = None
        ctx._state = "starting"
        try:
            made = ctx.spec.factory()
        except Exception as exc:
            self._after_exit(ctx, StopReason.crashed(exc))
            return exc
        context = contextvars.copy_context()
        context.run(_current_child.set, ctx)
        parking = self._parking
        if not isinstance(made, Actor):
            # A supervisor (or a wrong value, which its runner reports as a crash).
            ctx._runner_alive = True
            ctx._runner_done = None
            handshake = ctx._handshake = parking.waiter()
            context.run(self._spawn_task, self._run_child, ctx, made, False, name=ctx.path)
            await parking.wait(handshake)
            return ctx._start_error
        made.ctx = ctx
        ctx._actor = made
        if type(made).on_start is not Actor.on_start:
            # This task stands in for the runner while on_start runs: a stop waits for
            # it, or cancels its scope.
            ctx._runner_alive = True
            ctx._runner_done = None
            reason: StopReason | None = None
            try:
                with anyio.CancelScope() as scope:
                    ctx._scope = scope
                    ctx._busy = True
                    try:
                        await InContext(context, made.on_start())
                    except Exception as exc:
                        reason = StopReason.crashed(exc)
                    ctx._busy = False
            except BaseException:
                # The caller was cancelled: the child never started.
                ctx._scope = None
                ctx._busy = False
                ctx._actor = None
                ctx._cancel_background()
                self._stand_in_done(ctx)
                raise
            ctx._scope = None
            if reason is None and scope.cancelled_caught:
                reason = _requested(ctx) if ctx._crash is None else StopReason.crashed(ctx._crash)
            if reason is not None:
                # on_start did not complete: no on_stop (as OTP skips terminate after init).
                ctx._request_stop(reason.kind)
                await self._drain_background(ctx, reason)
                ctx._actor = None
                self._stand_in_done(ctx)
                self._after_exit(ctx, reason)
                return reason.error or ActorError(
                    f"actor {ctx.path!r} stopped before its on_start returned ({reason})"
                )
        self._on_started(ctx)
        mailbox = ctx._mailbox
        if not (ctx.stopping or ctx._crash is not None or ctx._bg_n or len(mailbox)):
            # Nothing for a task to do yet: stay dormant until the first message (or
            # ctx.stop(), or ctx.start_soon) wakes the child; its runner starts from
            # ``context``, as if spawned now. If its supervisor stops it first, its
            # on_stop runs in the stopper's task (see _stop_dormant).
            ctx._runner_alive = False
            ctx._context = context
            ctx._dormant = True
            mailbox.dormant = True
            return None
        if not ctx._runner_alive:
            ctx._runner_alive = True
            ctx._runner_done = None
        # (Otherwise a stop may already wait on _runner_done: the runner sets it.)
        context.run(self._spawn_task, self._run_child, ctx, made, True, name=ctx.path)
        return None

    def _stand_in_done(self, ctx: ActorContext) -> None:
        """The launcher stood in for a runner and is done: release whoever waits."""
        ctx._runner_alive = False
        done = ctx._runner_done
        if done is not None:
            done.set()

    def _activate(self, ctx: ActorContext) -> None:
        """Give a dormant child its runner task (its first message has arrived)."""
        if not ctx._dormant:
            return
        ctx._dormant = False
        ctx._mailbox.dormant = False
        context, ctx._context = ctx._context, None
        ctx._runner_alive = True
        ctx._runner_done = None
        assert context is not None
        context.run(self._spawn_task, self._run_child, ctx, ctx._actor, True, name=ctx.path)

    def _on_started(self, ctx: ActorContext) -> None:
        ctx._state = "running"
        ctx._initial = False
        handshake, ctx._handshake = ctx._handshake, None
        if handshake is not None:
            self._parking.wake(handshake)
        kind: LifecycleKind = "started" if ctx.restart_count == 0 else "restarted"
        self._emit(kind, ctx, None, False)

    # ---- the runner ----------------------------------------------------------------

    async def _run_child(self, ctx: ActorContext, made: object, started: bool) -> None:
        """The task that owns one child: one incarnation after another, until it is done.

        ``made`` is what the launcher's factory call returned for the first
        incarnation; ``started`` says the launcher has already completed its start.
        """
        try:
            while True:
                reason = await self._incarnation(ctx, made, started)
                made = None
                started = False
                if ctx._handshake is not None:
                    # It ended before on_start returned: tell whoever waits to start it.
                    ctx._start_error = reason.error or ActorError(
                        f"actor {ctx.path!r} stopped before its on_start returned ({reason})"
                    )
                    handshake, ctx._handshake = ctx._handshake, None
                    self._parking.wake(handshake)
                if self._after_exit(ctx, reason) != _RESTART:
                    return
                await self._backoff_wait(ctx)
                if ctx._final:
                    self._emit("stopped", ctx, StopReason.SHUTDOWN, False)
                    return
                ctx.restart_count += 1
                ctx._begin_incarnation()
        except BaseException as exc:
            # Not a crash we handle: a cancellation from outside the tree (raised on),
            # or an interrupt that no code path below caught (the whole tree stops, see
            # _interrupted). Whoever awaits the reply to the current message learns so
            # now rather than at its timeout.
            current, ctx._current = ctx._current, None
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            if current is not None:
                if cancelled:
                    error: BaseException = MailboxClosed(
                        ctx.path, "its task was cancelled before it replied"
                    )
                else:
                    error = ActorCrashed(ctx.path, exc)
                    error.__cause__ = exc
                current.fail(error)
            if cancelled or isinstance(exc, Exception):
                raise
            self._interrupted(exc)
        finally:
            ctx._runner_alive = False
            if ctx._handshake is not None:
                ctx._start_error = ActorError(f"actor {ctx.path!r}: runner cancelled before start")
                self._parking.wake(ctx._handshake)
                ctx._handshake = None
            if ctx._runner_done is not None:
                ctx._runner_done.set()

    async def _incarnation(self, ctx: ActorContext, made: object, started: bool) -> StopReason:
        """Run one incarnation of ``ctx`` to its end and return why it ended.

        An idle actor waits for mail outside any cancel scope of ours (a stop request
        wakes it), so an idle child costs no scope; each busy stretch (on_start, a run
        of messages, on_stop) runs in its own scope, which a shutdown timeout or a
        crashed ``ctx.start_soon`` task cancels.
        """
        if made is None:
            try:
                made = ctx.spec.factory()
            except Exception as exc:
                return StopReason.crashed(exc)
        if isinstance(made, Supervisor):
            return await self._run_nested(ctx, made)
        if not isinstance(made, Actor):
            return StopReason.crashed(
                TypeError(
                    f"child {ctx.path!r}: factory returned {made!r}; it must return a new "
                    f"Actor or a new Supervisor"
                )
            )
        actor = made
        actor.ctx = ctx
        ctx._actor = actor
        reason: StopReason | None = None
        interrupt: BaseException | None = None
        if not started and type(actor).on_start is not Actor.on_start:
            # (Skipped when not overridden: a scope per spawn is measurable at 10^5.)
            with anyio.CancelScope() as scope:
                ctx._scope = scope
                ctx._busy = True
                if ctx._forced or ctx._crash is not None:
                    scope.cancel()
                try:
                    await actor.on_start()
                except Exception as exc:
                    reason = StopReason.crashed(exc)
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                    interrupt = exc
                ctx._busy = False
            ctx._scope = None
            if interrupt is not None:
                reason = await self._until_shut_down(ctx, interrupt)
            if reason is None and scope.cancelled_caught:
                reason = _requested(ctx) if ctx._crash is None else StopReason.crashed(ctx._crash)
            if reason is not None:
                # on_start did not complete: no on_stop (as OTP skips terminate after init).
                ctx._request_stop(reason.kind)
                await self._drain_background(ctx, reason)
                ctx._actor = None
                return reason
        if not started:
            self._on_started(ctx)

        # Serve one message at a time until a stop is requested or something crashes.
        # Until its first message an actor waits outside any scope of ours (a stop
        # request wakes it): a started-but-unused child costs no cancel scope. The
        # first message enters the scope that a shutdown timeout or a crashed
        # ctx.start_soon task cancels; it lasts for the rest of the incarnation, so a
        # message costs no scope either.
        mailbox = ctx._mailbox
        parking = mailbox.parking
        while not (ctx.stopping or ctx._crash is not None or mailbox._items):
            waiter = mailbox.park()
            try:
                await parking.wait(waiter)
            finally:
                mailbox.unpark(waiter)
        if not (ctx.stopping or ctx._crash is not None):
            receive = actor.receive
            with anyio.CancelScope() as scope:
                ctx._scope = scope
                ctx._busy = True
                while not (ctx.stopping or ctx._crash is not None):
                    item = mailbox.take()
                    if item is EMPTY:
                        waiter = mailbox.park()
                        try:
                            await parking.wait(waiter)
                        finally:
                            mailbox.unpark(waiter)
                    elif type(item) is AskEnvelope:
                        ctx._current = item
                        try:
                            value = await receive(item.message)
                        except Exception as exc:
                            ctx._current = None
                            crashed = ActorCrashed(ctx.path, exc)
                            crashed.__cause__ = exc
                            item.fail(crashed)
                            reason = StopReason.crashed(exc)
                            break
                        except BaseException as exc:
                            if isinstance(exc, anyio.get_cancelled_exc_class()):
                                raise
                            ctx._current = None
                            crashed = ActorCrashed(ctx.path, exc)
                            crashed.__cause__ = exc
                            item.fail(crashed)
                            interrupt = exc
                            break
                        ctx._current = None
                        item.reply(value)
                    else:
                        try:
                            await receive(item)
                        except Exception as exc:
                            reason = StopReason.crashed(exc)
                            break
                        except BaseException as exc:
                            if isinstance(exc, anyio.get_cancelled_exc_class()):
                                raise
                            interrupt = exc
                            break
                ctx._busy = False
            ctx._scope = None
            if interrupt is not None:
                reason = await self._until_shut_down(ctx, interrupt)
        if reason is None:
            # Stop requested, shutdown timeout expired, or a ctx.start_soon task crashed.
            reason = StopReason.crashed(ctx._crash) if ctx._crash is not None else _requested(ctx)

        # Stop: on_stop, then the incarnation's tasks.
        ctx._request_stop(reason.kind)
        if reason.is_crash:
            ctx._cancel_background()
        if type(actor).on_stop is not Actor.on_stop:
            with anyio.CancelScope() as scope:
                ctx._scope = scope
                if ctx._forced:
                    scope.cancel()
                await self._call_on_stop(ctx, actor, reason)
            ctx._scope = None
        await self._drain_background(ctx, reason)
        if ctx._crash is not None and not reason.is_crash:
            reason = StopReason.crashed(ctx._crash)
        current, ctx._current = ctx._current, None
        if current is not None:
            # The message being handled when the incarnation was cancelled.
            if ctx._crash is not None:
                error: BaseException = ActorCrashed(ctx.path, ctx._crash)
                error.__cause__ = ctx._crash
            else:
                error = MailboxClosed(ctx.path, f"it stopped ({reason}) before replying")
            current.fail(error)
        ctx._actor = None
        return reason

    async def _call_on_stop(self, ctx: ActorContext, actor: Actor, reason: StopReason) -> None:
        try:
            await actor.on_stop(reason)
        except Exception:
            logger.exception("%s: on_stop(%s) raised; ignored", ctx.path, reason)
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            self._interrupted(exc)  # the stop goes on; the tree stops after it

    # ---- interrupts ----------------------------------------------------------------

    def _root(self) -> Supervisor:
        sup = self
        while sup._parent is not None:
            sup = sup._parent
        return sup

    def _interrupted(self, exc: BaseException) -> None:
        """An actor's code raised ``exc``, a BaseException that is no cancellation
        (KeyboardInterrupt, SystemExit): the whole tree stops, and ``exc`` leaves it.

        Not a crash: nothing restarts from now on (see _after_exit). The root's body is
        cancelled, so its ``__aexit__`` shuts the tree down in reverse start order (each
        actor's on_stop with reason shutdown) and then raises ``exc`` itself. The first
        interrupt wins; a later one is logged.
        """
        root = self._root()
        if root._interrupt is not None:
            if exc is not root._interrupt:
                logger.warning(
                    "%s: %r raised while the tree was already stopping for %r",
                    self._path,
                    exc,
                    root._interrupt,
                )
            return
        root._interrupt = exc
        logger.warning("%s: %r raised by an actor; stopping the whole tree", self._path, exc)
        if root._state not in ("new", "stopped"):
            root._outer.cancel_scope.cancel()

    async def _until_shut_down(self, ctx: ActorContext, exc: BaseException) -> StopReason:
        """``ctx``'s on_start or receive raised the interrupt ``exc``: stop the tree,
        and wait here until its shutdown comes to ``ctx`` (reverse start order), so that
        the child's stop, too, comes in its turn."""
        self._interrupted(exc)
        with anyio.CancelScope() as scope:
            ctx._scope = scope
            if ctx._forced:
                scope.cancel()
            await ctx.wait_stopping()
        ctx._scope = None
        return StopReason.SHUTDOWN

    async def _drain_background(self, ctx: ActorContext, reason: StopReason) -> None:
        """Give the incarnation's tasks the shutdown timeout (none after a crash), then cancel."""
        if ctx._bg_n == 0:
            return
        ctx._bg_idle = idle = anyio.Event()
        if reason.is_crash or ctx._forced:
            ctx._cancel_background()
        else:
            with anyio.move_on_after(ctx.spec.shutdown):
                await idle.wait()
            if ctx._bg_n:
                logger.warning(
                    "%s: tasks still running %gs after the stop began; cancelling them",
                    ctx.path,
                    ctx.spec.shutdown,
                )
                ctx._cancel_background()
        if ctx._bg_n:
            await idle.wait()

    async def _run_nested(self, ctx: ActorContext, sup: Supervisor) -> StopReason:
        """Run a child that is a supervisor: ``async with`` it until asked to stop."""
        if sup._state != "new" or sup._parent is not None:
            return StopReason.crashed(
                ActorError(
                    f"child {ctx.path!r}: factory returned a Supervisor that was already used; "
                    f"it must return a new one at every (re)start"
                )
            )
        sup._parent = self
        sup._path = ctx.path
        ctx._nested = sup
        ctx._mailbox.close(f"{ctx.path!r} is a supervisor, which has no mailbox")
        reason: StopReason | None = None
        with anyio.CancelScope() as scope:
            ctx._scope = scope
            if ctx._forced:
                scope.cancel()
            try:
                async with sup:
                    self._on_started(ctx)
                    if not ctx.stopping:
                        if ctx._stop_event is None:
                            ctx._stop_event = anyio.Event()
                        await ctx._stop_event.wait()
                reason = _requested(ctx)
            except Exception as exc:
                reason = StopReason.crashed(exc)
        ctx._scope = None
        if reason is None:
            reason = _requested(ctx)
        ctx._request_stop(reason.kind)
        return reason

    # ---- deciding what happens after an exit -------------------------------------

    def _after_exit(self, ctx: ActorContext, reason: StopReason) -> int:
        """Apply the restart type, the per-child limit, intensity and strategy."""
        crashed = reason.is_crash
        kind: LifecycleKind = "crashed" if crashed else "stopped"
        if ctx._final:  # stop_child, supervisor shutdown or escalation: the stopper forgets it
            if crashed or not ctx._initial:  # no "stopped" for what never "started"
                self._emit(kind, ctx, reason, False)
            return _EXIT
        if ctx._held:  # stopped by a sibling's group restart, which will restart it
            self._emit(kind, ctx, reason, ctx.spec.restart != "temporary")
            return _EXIT
        if ctx._initial:  # never started: its starter reports the error and forgets it
            self._emit(kind, ctx, reason, False)
            return _EXIT
        if crashed:
            logger.warning("%s crashed: %r", ctx.path, reason.error, exc_info=reason.error)
        if self._state != "running" or self._root()._interrupt is not None:
            self._forget(ctx, f"it {kind} while its supervisor was stopping")
            self._emit(kind, ctx, reason, False)
            return _EXIT
        restart = ctx.spec.restart
        if crashed and restart == "transient" and ctx._nested is not None:
            # A nested supervisor that exceeded its intensity exits as OTP's does, with
            # reason shutdown, which a transient child is not restarted for.
            crashed = reason.error is not ctx._nested._failure
        if restart == "temporary" or (restart == "transient" and not crashed):
            self._forget(ctx, f"it {kind} ({reason}) and is {restart}")
            self._emit(kind, ctx, reason, False)
            return _EXIT
        now = self._parking.now()
        spec = ctx.spec
        if spec.max_restarts is not None:
            if ctx._restarts is None:
                ctx._restarts = deque()
            if _over_limit(ctx._restarts, now, spec.within, spec.max_restarts):
                logger.error(
                    "%s: more than %d restarts within %gs; giving it up (last: %s)",
                    ctx.path,
                    spec.max_restarts,
                    spec.within,
                    reason,
                )
                self._forget(
                    ctx,
                    f"it was given up after more than {spec.max_restarts} restarts within "
                    f"{spec.within:g}s",
                )
                self._emit(kind, ctx, reason, False)
                return _EXIT
        if self._intensity is not None and _over_limit(
            self._restarts, now, self._period, self._intensity
        ):
            self._fail(ctx, reason)
            self._emit(kind, ctx, reason, False)
            return _EXIT
        ctx._state = "restarting"
        self._emit(kind, ctx, reason, True)
        if self._strategy == "one_for_one":
            return _RESTART
        ctx._pending_group = True
        self._spawn_task(self._group_restart, ctx, name=f"{self._path}:restart:{spec.id}")
        return _EXIT

    def _delay(self, ctx: ActorContext) -> float:
        policy = ctx.spec.backoff or self._backoff
        if self._parking.now() - ctx._started_at >= policy.healthy_after:
            ctx._backoff_n = 0
        delay = policy.delay(ctx._backoff_n, self._random.random())
        ctx._backoff_n += 1
        return delay

    async def _backoff_wait(self, ctx: ActorContext) -> None:
        """Wait before restarting ``ctx`` (one_for_one); a stop request cuts it short."""
        ctx.stopping = False
        ctx._stop_event = None
        delay = self._delay(ctx)
        if delay <= 0:
            return
        ctx._stop_event = event = anyio.Event()
        with anyio.move_on_after(delay):
            await event.wait()

    async def _group_restart(self, ctx: ActorContext) -> None:
        """one_for_all / rest_for_one: stop the affected children in reverse, restart in order."""
        if self._group_lock is None:
            self._group_lock = anyio.Lock()
        async with self._group_lock:
            if not ctx._pending_group or self._state != "running":
                return
            if self._children.get(ctx.id) is not ctx:
                return
            order = list(self._children.values())
            affected = order if self._strategy == "one_for_all" else order[order.index(ctx) :]
            for child in affected:
                # A sibling that crashed on its own meanwhile is restarted by this round.
                child._pending_group = False
            for child in reversed(affected):
                if child is ctx:
                    continue
                if child._runner_alive or child._dormant:
                    await self._terminate(child, hold=True)
                if child._state != "stopped":
                    child._state = "restarting"
                if child.spec.restart == "temporary":
                    self._forget(child, "a sibling's restart stopped it; temporary: not restarted")
            delay = self._delay(ctx)
            if delay > 0:
                if self._closing_event is None:
                    self._closing_event = anyio.Event()
                with anyio.move_on_after(delay):
                    await self._closing_event.wait()
            for child in affected:
                if self._state != "running":
                    return
                if self._children.get(child.id) is not child or child._final:
                    continue
                if child._runner_alive or child._dormant:
                    continue
                child.restart_count += 1
                # A shutdown stops this child itself (see _shutdown): its on_start may
                # never return, and this round holds the lock the shutdown waits for.
                self._group_launching = child
                try:
                    error = await self._launch(child)
                except BaseException as exc:
                    if isinstance(exc, (Exception, anyio.get_cancelled_exc_class())):
                        raise
                    self._interrupted(exc)  # its on_start: the tree stops, no more starts
                    return
                finally:
                    self._group_launching = None
                if error is not None and child._pending_group:
                    # Its failure started a new round, which restarts the rest.
                    return
                # Otherwise it was given up (per-child limit) or stopped (stop_child,
                # shutdown, escalation): the others still need restarting, unless the
                # supervisor is no longer running (checked at the top of the loop).

    def _fail(self, ctx: ActorContext, reason: StopReason) -> None:
        """Intensity exceeded because of ``ctx``: the supervisor fails, now and once.

        Decided here, synchronously, by the exit that went over the limit: from now on
        the state is ``failed``, so another child exiting in the same instant is just
        forgotten (it cannot fail the supervisor a second time or replace the cause),
        and ``start_child`` is refused. Stopping the children, the ``escalated`` event
        and cancelling the body follow in :meth:`_escalate`.
        """
        assert self._intensity is not None
        if self._failure is not None:
            return
        error = RestartIntensityExceeded(
            self._path, ctx.id, self._intensity, self._period, reason.error
        )
        error.__cause__ = reason.error
        self._failure = error
        self._state = "failed"
        logger.error("%s", error)
        self._forget(ctx, "its supervisor exceeded its restart intensity")
        self._spawn_task(self._escalate, ctx, error, name=f"{self._path}:fail")

    async def _escalate(self, ctx: ActorContext, error: RestartIntensityExceeded) -> None:
        """Stop every child in reverse order, report the escalation, cancel the body."""
        with anyio.CancelScope(shield=True):
            await self._shutdown()
        self._emit("escalated", ctx, StopReason.crashed(error), False)
        self._outer.cancel_scope.cancel()  # cancels the body of async with

    # ---- stopping ------------------------------------------------------------------

    async def _terminate(
        self, ctx: ActorContext, *, final: bool = False, hold: bool = False, brutal: bool = False
    ) -> None:
        """Stop the current incarnation of ``ctx``: gracefully within its timeout, then cancel."""
        if final:
            ctx._final = True
        if hold:
            ctx._held = True
        if ctx._dormant:
            await self._stop_dormant(ctx, brutal or self._brutal)
            return
        ctx._request_stop("shutdown")
        if not ctx._runner_alive:
            if final and ctx._state != "stopped" and not ctx._initial:
                self._emit("stopped", ctx, StopReason.SHUTDOWN, False)
            return
        done = ctx._runner_done
        if done is None:
            done = ctx._runner_done = anyio.Event()
        if not (brutal or self._brutal):
            timeout = ctx.spec.shutdown
            with anyio.move_on_after(timeout) as grace:
                self._graces.add(grace)
                try:
                    await done.wait()
                finally:
                    self._graces.discard(grace)
            if not ctx._runner_alive:
                return
            if anyio.current_time() >= grace.deadline:
                logger.warning("%s did not stop within %gs; cancelling it", ctx.path, timeout)
            else:  # cut short by an ancestor whose own shutdown deadline came first
                logger.warning(
                    "%s was still stopping when its supervisor's shutdown deadline passed; "
                    "cancelling it",
                    ctx.path,
                )
        ctx._force()
        await done.wait()

    async def _stop_dormant(self, ctx: ActorContext, brutal: bool) -> None:
        """End the incarnation of a dormant child here: run its on_stop, if any.

        The child has no task, so this one stands in for its runner: on_stop runs in
        the child's context, within the child's shutdown timeout (it is cancelled
        after it, or at once when ``brutal``), and a concurrent stop waits for it.
        """
        ctx._dormant = False
        ctx._mailbox.dormant = False
        context, ctx._context = ctx._context, None
        actor, ctx._actor = ctx._actor, None
        ctx._request_stop("shutdown")
        if actor is not None and type(actor).on_stop is not Actor.on_stop:
            assert context is not None
            ctx._runner_alive = True
            ctx._runner_done = None
            try:
                with anyio.CancelScope() as scope:
                    ctx._scope = scope
                    self._graces.add(scope)
                    if brutal:
                        scope.cancel()
                    else:
                        scope.deadline = anyio.current_time() + ctx.spec.shutdown
                    await InContext(context, self._call_on_stop(ctx, actor, StopReason.SHUTDOWN))
            finally:
                self._graces.discard(scope)
                ctx._scope = None
                self._stand_in_done(ctx)
        self._after_exit(ctx, StopReason.SHUTDOWN)

    def _hurry(self) -> None:
        """Our parent's shutdown timeout for us expired: cancel children at once from now on."""
        self._brutal = True
        for grace in tuple(self._graces):
            grace.cancel()

    def _forget(self, ctx: ActorContext, detail: str) -> None:
        """Remove ``ctx`` for good: it leaves the registry and its mailbox closes."""
        if self._children.get(ctx.spec.id) is ctx:
            del self._children[ctx.spec.id]
        ctx._state = "stopped"
        ctx._mailbox.close(detail)

    async def _shutdown(self) -> None:
        """Stop every child for good, in reverse start order (once; later callers wait)."""
        if self._shutdown_done is not None:
            await self._shutdown_done.wait()
            return
        self._shutdown_done = done = anyio.Event()
        if self._state == "running":
            self._state = "stopping"
        if self._closing_event is not None:
            self._closing_event.set()
        if self._group_lock is None:
            self._group_lock = anyio.Lock()
        try:
            launching = self._group_launching
            if launching is not None:
                # A group restart holds the lock while this child's on_start runs,
                # which may never return: stop it first, like any child (gracefully
                # within its shutdown timeout, then cancelled). The restart then sees
                # that we are no longer running and lets go of the lock.
                await self._terminate(launching, final=True)
                self._forget(launching, "its supervisor stopped")
            async with self._group_lock:
                while self._children:
                    for ctx in reversed(list(self._children.values())):
                        await self._terminate(ctx, final=True)
                        self._forget(ctx, "its supervisor stopped")
        finally:
            done.set()

    # ---- events --------------------------------------------------------------------

    def _emit(
        self,
        kind: LifecycleKind,
        ctx: ActorContext,
        reason: StopReason | None,
        will_restart: bool,
    ) -> None:
        event: LifecycleEvent | None = None
        sup: Supervisor | None = self
        while sup is not None:
            if sup._observers:
                if event is None:
                    event = LifecycleEvent(
                        kind, self._path, ctx.spec.id, reason, ctx.restart_count, will_restart
                    )
                for fn in tuple(sup._observers):
                    try:
                        fn(event)
                    except Exception:
                        logger.exception("%s: lifecycle observer %r raised; ignored", sup.path, fn)
            sup = sup._parent
