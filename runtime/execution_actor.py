"""Each execution is an actor under the runtime's supervisor.

An execution actor exists only while there is something to do: driving the engine, or
recording a signal. A suspended execution has no actor, no task and no state in memory
(its state is its log); the runtime starts an actor again when a signal arrives.

The actor's own task handles its mailbox (signals, one at a time, each acknowledged once
durable); the engine runs in a task of its own so a signal, a cancellation above all,
is handled while a tool is running. If anything in here raises, the actor crashes and
its supervisor restarts it: the new incarnation replays the log and carries on, which
is exactly what happens after the process dies.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from perdure.actors import Actor, StopReason
from perdure.agent import Agent
from perdure.engine import Engine
from perdure.events import BudgetInherited, BudgetRaised, ExecutionCancelled, SignalIgnored
from perdure.journal import Journal
from perdure.log import ConflictError
from perdure.signals import canonical_name, translate
from perdure.state import TERMINAL
from perdure.timers import DEADLINE, deadline_reason

if TYPE_CHECKING:
    from perdure.runtime import Runtime

__all__ = ["Deliver", "ExecutionActor"]

log = logging.getLogger("perdure.runtime")


@dataclass(frozen=True, slots=True)
class Deliver:
    """Command: record the inbox signal ``seq`` on this execution, then act on it."""

    seq: int
    name: str
    payload: Any
    by: str


class ExecutionActor(Actor):
    """Replays one execution, drives it while it can run, and records its signals."""

    def __init__(
        self, runtime: Runtime, execution_id: str, agent: Agent | None, drive: bool
    ) -> None:
        self.runtime = runtime
        self.execution_id = execution_id
        self.agent = agent
        self.want_drive = drive
        self.journal: Journal | None = None
        self.driving = False
        self._drive_scope: anyio.CancelScope | None = None
        self._drive_done: anyio.Event | None = None
        self.stop_requested = False
        self.stopped = anyio.Event()

    async def on_start(self) -> None:
        self.journal = await Journal.open(self.runtime.log, self.execution_id)
        self.runtime._actor_started(self.execution_id, self)
        state = self.journal.state
        if state.status == "running" and self.want_drive:
            # Started to drive, but the slot may have gone while it started: a start
            # that waited for the previous incarnation to stop saw that one's stop give
            # the slot back. Without one it waits in the queue like any other.
            if self.runtime._try_acquire(self.execution_id):
                self._start_drive()
            else:
                self._stop()
                await self.runtime._enqueue(self.execution_id)
        elif state.status != "running" and self.want_drive:
            # Started to drive but there is nothing to do: it settled meanwhile, and
            # whoever settled it fired the callbacks. Only the slot goes back.
            self.runtime._release(self.execution_id)
            self._stop()

    async def on_stop(self, reason: StopReason) -> None:
        self.stopped.set()
        self.runtime._actor_stopped(self.execution_id, self, reason)

    def _stop(self) -> None:
        # Hibernate: the actor (and its task) goes away; the log is the state.
        self.stop_requested = True
        self.ctx.stop()

    def drive_now(self) -> None:
        """Start driving if idle and runnable (the runtime just gave this execution a slot)."""
        journal = self.journal
        if (
            not self.driving
            and not self.stop_requested
            and self.agent is not None
            and journal is not None
            and journal.state.status == "running"
        ):
            self._start_drive()

    async def receive(self, message: object) -> object:
        if isinstance(message, Deliver):
            await self._deliver(message)
            return self.journal.state.status if self.journal else None
        raise TypeError(f"execution actor {self.execution_id!r} got {message!r}")

    async def _deliver(self, message: Deliver) -> None:
        journal = self.journal
        assert journal is not None
        state = journal.state
        if message.seq and message.seq <= state.last_signal_seq:
            return  # delivered before (the inbox cursor lags the executions by design)
        if canonical_name(message.name) == "cancel" and state.status not in (
            "completed",
            "cancelled",
        ):
            await self._cancel(message)
            return
        definition = self.agent.definition() if self.agent is not None else None
        before, before_reason = state.status, state.suspend_reason
        try:
            events = translate(
                state, message.name, message.payload, message.by, message.seq, definition
            )
        except Exception as exc:
            # A payload it cannot use (a budget with a bad limit, say) would fail the
            # same way on every delivery: turn it down, on the record, with the reason.
            events = [
                SignalIgnored(
                    message.name,
                    f"cannot apply it: {type(exc).__name__}: {exc}",
                    message.by,
                    message.seq,
                )
            ]
        for event in events:
            journal.stage(event)
            if isinstance(event, SignalIgnored):
                log.warning(
                    "execution %s: signal %r from %s ignored: %s",
                    self.execution_id,
                    message.name,
                    message.by,
                    event.reason,
                )
        await journal.flush()
        if any(isinstance(e, BudgetRaised | BudgetInherited) for e in events):
            self.runtime._budget_changed(self.execution_id, state)
        if self.driving:
            return
        if state.status == "running":
            if self.agent is None:
                log.warning(
                    "execution %s can run again but its agent %r is not registered; it "
                    "resumes once the agent is registered",
                    self.execution_id,
                    state.agent,
                )
                self.runtime._settled(self.execution_id, state)
                self._stop()
            elif not self.runtime._recovered.is_set():
                # A signal from the backlog at open: a later one may be a cancel, so
                # nothing runs until all of them are in; recovery then drives it.
                return
            elif self.runtime._try_acquire(self.execution_id):
                self._start_drive()
            else:
                # Stop first: once queued, a slot may free at any await, and the queue
                # must then start a fresh actor (it waits for this one to stop), not
                # make this one drive an instant before it stops.
                self._stop()
                await self.runtime._enqueue(self.execution_id)
        else:
            # Still suspended, but maybe for something else now (an approval granted,
            # then the tool budget blocks the call): that is a suspension to report.
            if (
                before != state.status
                or state.status != "suspended"
                or state.suspend_reason != before_reason
            ):
                self.runtime._settled(self.execution_id, state)
            self._stop()

    async def _cancel(self, message: Deliver) -> None:
        journal = self.journal
        assert journal is not None
        if self.driving and self._drive_scope is not None and self._drive_done is not None:
            self._drive_scope.cancel()
            await self._drive_done.wait()
        payload = message.payload if isinstance(message.payload, Mapping) else {}
        cancelled = ExecutionCancelled(str(payload.get("reason") or ""), message.by, message.seq)
        for attempt in range(3):
            if journal.broken:
                # An append was cut short by the cancellation: whether it was written is
                # only known to the log, so start again from the log.
                journal = self.journal = await Journal.open(self.runtime.log, self.execution_id)
            if journal.state.status in TERMINAL:
                break  # that append finished the execution after all; nothing to cancel
            journal.stage(cancelled)
            try:
                await journal.flush()
            except ConflictError:
                # The append cut short was taken by the store and committed after the
                # log was read above (a taken append is written whatever happens to its
                # caller): read the log again. Only that one append can be in flight.
                if attempt == 2:
                    raise
                continue
            break
        # Settled here in every case: the engine, cancelled, did not (it may have
        # completed the execution in that last append).
        self.runtime._settled(self.execution_id, journal.state)
        self._stop()

    def _start_drive(self) -> None:
        self.driving = True
        self._drive_done = anyio.Event()
        self.ctx.start_soon(self._drive, name=f"perdure-exec-{self.execution_id}")

    async def _drive(self) -> None:
        journal = self.journal
        assert journal is not None and self.agent is not None
        state = journal.state
        overdue = False
        if state.deadline is not None:
            # Again each time it runs: a failed execution resumed keeps its deadline.
            self.runtime._timers.schedule(self.execution_id, state.deadline, DEADLINE)
            # Resumed past it (at open, or a failed one resumed by hand): no step runs.
            overdue = self.runtime._wall_clock() >= state.deadline
        engine = Engine(
            self.agent,
            journal,
            self.runtime._services,
            sink_for=functools.partial(self.runtime._sink_for, self.execution_id),
        )
        ctx = self.ctx
        try:
            with anyio.CancelScope() as scope:
                self._drive_scope = scope
                if overdue:
                    assert state.deadline is not None
                    journal.stage(ExecutionCancelled(deadline_reason(state.deadline), DEADLINE))
                    await journal.flush()
                while not ctx.stopping and not overdue:
                    await engine.run(lambda: ctx.stopping)
                    # A signal handled while the engine was suspending can make the
                    # execution runnable again: go round instead of hibernating.
                    if state.status != "running":
                        break
        finally:
            self.driving = False
            self._drive_scope = None
            if self._drive_done is not None:
                self._drive_done.set()
        if scope.cancelled_caught:
            return  # cancelled by a Cancel signal; _cancel records and settles
        if ctx.stopping and state.status == "running":
            return  # runtime shutdown: stays "running" in the index, resumes at next start
        # (Settled during a shutdown, too: an execution whose last step was in flight
        # when the close began completes, suspends or fails, and its callbacks run.)
        self.runtime._settled(self.execution_id, state)
        self._stop()
