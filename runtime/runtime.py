"""The Runtime: owns a data dir, runs executions as supervised actors, routes signals.

``async with Runtime("./data") as rt`` (services, under asyncio or trio) or
``with Runtime("./data") as rt`` (scripts: the event loop runs in a background thread
and every method is a plain blocking call; see :class:`~perdure.sync.SyncRuntime`).

The supervisor tree::

    root (one_for_one)
    ├── inbox            the signal pump (permanent)
    └── executions       (one_for_one, dynamic children, no tree-wide intensity)
        ├── order-123    one actor per execution that has something to do
        └── ...

Each execution child is ``transient`` with a per-child restart limit: an unexpected
crash replays the log and carries on; repeated crashes give up on that execution alone
(recorded as failed with the cause) without touching any other.
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import logging
import math
import os
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote, unquote

import anyio
import anyio.abc

from perdure.actors import ChildSpec, LifecycleEvent, Supervisor
from perdure.agent import Agent
from perdure.budget import Budget
from perdure.context import ChildCharge, SuspendExecution, ToolContext
from perdure.errors import (
    AgentDefinitionError,
    ExecutionNotFoundError,
    InvalidExecutionIdError,
    InvalidSignalError,
    PromptMismatchError,
    RuntimeClosedError,
    ToolError,
    UnknownAgentError,
)
from perdure.events import (
    INBOX_STREAM,
    RUNTIME_STREAM,
    ExecutionFailed,
    ExecutionStarted,
    SignalSent,
    decode,
    encode,
    execution_stream,
    record_types,
)
from perdure.execution_actor import Deliver, ExecutionActor
from perdure.fingerprint import digest
from perdure.inbox import InboxPump
from perdure.journal import Journal, earliest_timer, load_state
from perdure.log import ConflictError, EventLog
from perdure.log.codec import meta_value_key
from perdure.log.protocol import ANY, Durability
from perdure.providers.pricing import Price, Pricing
from perdure.providers.types import LLMResponse
from perdure.result import ExecutionInfo, Result, SuspendReason
from perdure.retention import (
    FINISHED,
    batches,
    check_statuses,
    cutoff,
    eligible_trees,
    still_eligible,
)
from perdure.signals import (
    SignalStatus,
    canonical_name,
    in_doubt_problem,
    precheck,
    resume_problem,
)
from perdure.state import TERMINAL, ExecutionState, budget_grant, delegate_steps, limit_origin
from perdure.status import (
    STATUSES,
    blocked_descendant,
    confirmation_owner,
    describe,
    owner_phrase,
    pending_signals,
)
from perdure.timers import (
    APPROVAL_EXPIRED,
    APPROVAL_TIMEOUT_BY,
    APPROVAL_TIMER,
    DEADLINE,
    Timer,
    TimerService,
    deadline_reason,
    decider,
    timeout_seconds,
)
from perdure.tool_threads import ToolThreads

__all__ = ["ExecutionHandle", "Runtime"]

log = logging.getLogger("perdure.runtime")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=/~-]*$")
_MAX_ID = 255
#: How many ids (``parent/step``, then ``parent/step~1`` ...) a child may try.
_MAX_CHILD_VARIANTS = 16
_SETTLED = ("completed", "failed", "cancelled", "suspended")
_FINISHED = ("completed", "failed", "cancelled")

Callback = Callable[..., Any]


def _check_id(execution_id: str) -> str:
    if not isinstance(execution_id, str) or not execution_id:
        raise InvalidExecutionIdError("an execution id must be a non-empty string")
    if len(execution_id) > _MAX_ID or not _ID.match(execution_id):
        shown = execution_id if len(execution_id) <= 80 else execution_id[:77] + "..."
        raise InvalidExecutionIdError(
            f"execution id {shown!r} is not accepted: use 1-{_MAX_ID} characters from "
            f"letters, digits and . _ : @ + = / ~ -, starting with a letter or digit",
            execution_id,
        )
    return execution_id


@dataclass(frozen=True, slots=True)
class ExecutionHandle:
    """A spawned execution: its id, and a way to wait for it."""

    execution_id: str
    runtime: Runtime

    async def result(self) -> Result:
        """Wait until the execution completes, suspends or fails; return its Result."""
        return await self.runtime.wait(self.execution_id)


class _Services:
    """What the engine asks of the runtime (kept apart so the engine sees only this)."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._unpriced: set[str] = set()
        self._unmetered: set[str] = set()

    def cost(self, model: str, response: LLMResponse) -> float | None:
        cost = self._rt.pricing.cost(model, response.usage)
        if cost is None and model not in self._unpriced:
            self._unpriced.add(model)
            log.warning(
                "no price known for model %r: its dollars are not counted in usage or "
                "budgets; pass Runtime(pricing=Pricing.default().with_prices({...}))",
                model,
            )
        elif cost == 0.0 and response.usage.total_tokens == 0 and model not in self._unmetered:
            price = self._rt.pricing.price(model)
            if price is not None and (price.input_per_million or price.output_per_million):
                # A priced model that reports no tokens (an OpenAI-compatible server that
                # omits usage, say) costs $0 here: a max_dollars or max_tokens budget
                # would never be reached. Said once per model, loudly.
                self._unmetered.add(model)
                log.warning(
                    "model %r answered without reporting token usage: its calls count as "
                    "0 tokens and $0, so max_dollars and max_tokens budgets cannot stop "
                    "them (max_llm_calls still does); make the provider report usage",
                    model,
                )
        return cost

    def step_done(self, state: ExecutionState, step: Mapping[str, Any]) -> None:
        self._rt._fire("step", state, dict(step))

    async def delegate(self, ctx: ToolContext, agent: Agent, task: str) -> Any:
        return await self._rt._delegate(ctx, agent, task)

    async def run_in_thread(self, fn: Callable[[], Any]) -> Any:
        return await self._rt._tool_threads.run(fn)

    def wall_clock(self) -> float:
        """Seconds since the epoch, by the runtime's clock (timers' deadlines use it)."""
        return self._rt._wall_clock()


def _not_found(log: EventLog, execution_id: str) -> ExecutionNotFoundError:
    """The error for an id this data dir has no execution under, saying what to check."""
    where = getattr(log, "path", None)
    place = f"data dir {str(where)!r}" if where else "this runtime's log"
    return ExecutionNotFoundError(
        f"no execution {execution_id!r} in {place}; check the id (rt.executions() or "
        f"'perdure status' lists them) and that this is the data dir it ran in",
        execution_id,
    )


def _orphan_cancel(parent: str, reason: str) -> dict[str, str]:
    """The cancel payload for a child whose parent was cancelled."""
    why = f"its parent {parent!r} was cancelled"
    return {"reason": f"{why}: {reason}" if reason else why}


#: How many generations up a child's start looks for a cancelled ancestor.
_MAX_ANCESTORS = 32

#: Appends of a crashed execution's failure tried before giving up (each after a re-read).
_RECORD_CRASH_TRIES = 5


class Runtime:
    """A durable runtime over one data dir. See the module docstring.

    - ``path``: the data dir (an LMDB environment is created in it). Ignored if ``log``
      is given (e.g. ``MemoryLog`` for unit tests).
    - ``durability``: ``"fsync"`` (default: a step is on disk before the next begins) or
      ``"process"`` (survives a process crash, not a power loss; much faster).
    - ``agents``: agents to register at once (their interrupted executions resume).
    - ``max_concurrency``: at most this many executions run at once; the rest wait in a
      durable queue and start in order as slots free.
    - ``pricing``: dollars per model (default ``Pricing.default()``).
    - ``max_restarts`` / ``restart_within``: how many unexpected crashes of one
      execution's engine are retried (replaying its log) before it is failed.
    - ``max_tool_threads``: worker threads for sync tools (more calls wait their turn).
    - ``shutdown_timeout``: at close, how long each running execution may take to reach
      its next step boundary before it is cancelled (it resumes at the next start
      either way), and then how long async lifecycle callbacks still running (those of
      executions that settled during the close, too) may take before they are
      cancelled. Leaving ``with``/``async with`` by ``KeyboardInterrupt`` (Ctrl-C)
      does not wait: running executions are cancelled at once.
    - ``backend``: the event loop the sync facade (``with Runtime(...)``) runs.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = "./perdure-data",
        *,
        durability: Durability = "fsync",
        log: EventLog | None = None,
        agents: Iterable[Agent] = (),
        max_concurrency: int | None = None,
        pricing: Pricing | None = None,
        shutdown_timeout: float = 10.0,
        max_restarts: int = 3,
        restart_within: float = 60.0,
        max_tool_threads: int = 40,
        backend: Literal["asyncio", "trio"] = "asyncio",
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1 or None")
        self.path = None if path is None else os.fspath(path)
        self.durability: Durability = durability
        self._given_log = log
        self.log: EventLog = log  # type: ignore[assignment]  # set in __aenter__
        # Scripted runs are free unless a test prices its model on purpose.
        self.pricing = (
            pricing
            if pricing is not None
            else Pricing.default().with_prices({"scripted": Price(0.0, 0.0)})
        )
        self.max_concurrency = max_concurrency
        self.shutdown_timeout = shutdown_timeout
        self.max_restarts = max_restarts
        self.restart_within = restart_within
        self.backend = backend
        self._agents: dict[str, Agent] = {}
        self._agents_dirty = False
        self._publishing = False
        self._services = _Services(self)
        self._tool_threads = ToolThreads(max_tool_threads)
        self._callbacks: dict[str, list[Callback]] = {
            k: [] for k in ("complete", "suspend", "fail", "cancel", "step")
        }
        self._open = False
        #: When this runtime opened the log (see _rewake_if_finished).
        self._opened_at = math.inf
        self._root: Supervisor | None = None
        self._executions: Supervisor | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        # Where async lifecycle callbacks run: entered before the supervisor tree and left
        # after it, so executions that settle while the close stops the tree still get
        # their callbacks (the close waits for them, within shutdown_timeout).
        self._callback_tg: anyio.abc.TaskGroup | None = None
        self._live: dict[str, ExecutionActor] = {}
        # Executions a purge is deleting, each with the event set when it is done:
        # nothing may start an actor for them (its first append would recreate the
        # stream).
        self._purging: dict[str, anyio.Event] = {}
        self._starting: dict[str, anyio.Event] = {}
        self._slots: set[str] = set()
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._draining = False
        self._recovered = anyio.Event()  # set once recovery at open has run
        self._backlog = anyio.Event()  # set once the inbox backlog at open was delivered
        # Set once the work at open that answers depend on is done (see _caught_up), or
        # when the runtime closes; _open_failed says if that work raised.
        self._ready = anyio.Event()
        self._open_failed: BaseException | None = None
        self._waiters: dict[str, list[anyio.Event]] = {}
        # Per execution, the sinks of the streams reading it (several may; see stream).
        self._sinks: dict[str, list[Callable[[Any], None]]] = {}
        # The inbox pump's progress (see perdure.inbox), for rt.signal to wait on.
        self._inbox_cursor = 0
        self._inbox_done: set[int] = set()  # through (taken or refused) beyond the cursor
        # Every inbox signal up to it is through, but those of held executions: it
        # moves on while one is held, the cursor does not (see _inbox_moved).
        self._inbox_past = 0
        self._inbox_held: set[str] = set()  # executions whose signals wait for a retry
        self._inbox_held_seqs: set[int] = set()  # their signals
        self._inbox_waiters: dict[int, anyio.Event] = {}
        self._inbox_booked = anyio.Event()  # set (and replaced) when the pump writes its books
        # Hand-downs of budget shares in flight (see _start_rehand), for perdure.testing to
        # wait out: a child suspended on its share may be about to be handed more.
        self._rehands = 0
        self._rehands_done = anyio.Event()  # set (and replaced) when the last one ends
        self._rehand_seq = 0  # the inbox seq of the latest share they posted
        self._sync: Any = None
        #: The wall clock timers are set and fired by (seconds since the epoch). A test
        #: may replace it to move time on, then ``_timers.poke()`` to make it noticed.
        self._wall_clock: Callable[[], float] = time.time
        self._timers = self._new_timers()
        for agent in agents:
            self.register(agent)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        if self._open:
            raise RuntimeError("this Runtime is already open")
        # Opened again after a close: the work at open is to be done again.
        self._recovered, self._backlog, self._ready = anyio.Event(), anyio.Event(), anyio.Event()
        self._open_failed = None
        self._rehands = self._rehand_seq = 0  # a close cancels those in flight uncounted
        # Who runs and who waits is read from the index again (recovery), as at a first
        # open: a queue kept from the last open would go ahead of what was running then.
        self._slots.clear()
        self._queue.clear()
        self._queued.clear()
        self._draining = False
        self._timers = self._new_timers()  # what an earlier open knew is read again
        if self._given_log is not None:
            self.log = self._given_log
        else:
            if self.path is None:
                raise ValueError("Runtime needs a data dir path or a log")
            from perdure.log import LmdbLog

            self.log = await LmdbLog.open(
                self.path, types=record_types(), durability=self.durability
            )
        try:
            callbacks = anyio.create_task_group()
            await callbacks.__aenter__()
            self._callback_tg = callbacks
            root = Supervisor(strategy="one_for_one", intensity=5, period=10.0, name="perdure")
            await root.__aenter__()  # cleans up after itself if it fails: no __aexit__ then
            self._root = root
            self._executions = Supervisor(strategy="one_for_one", intensity=None, name="executions")
            await self._root.start_child(
                ChildSpec(
                    "executions",
                    lambda: self._executions,
                    restart="permanent",
                    shutdown=self.shutdown_timeout + 1.0,
                )
            )
            self._executions.observe(self._on_lifecycle)
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
            self._open = True
            self._opened_at = time.time()
            # Recovery (resuming interrupted executions, delivering signals sent while no
            # runtime owned the dir) starts once the caller has the runtime: callbacks it
            # registers right after opening see every recovered execution settle.
            self._tg.start_soon(self._recover_then_pump)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Ctrl-C means stop now: every execution is durable (it resumes at the next
        # start), so none is given its graceful shutdown timeout.
        await self._close(now=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))

    async def _close(self, *, now: bool = False) -> None:
        self._open = False
        self._ready.set()  # whoever waits for the work at open hears that it is closed
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()
        for event in self._inbox_waiters.values():
            event.set()
        # A stream being read ends now, not when its execution settles: the close stops
        # that execution without settling it (it resumes at the next start).
        for sinks in list(self._sinks.values()):
            for sink in list(sinks):
                sink(_CLOSED)
        try:
            try:
                if self._tg is not None:
                    tg, self._tg = self._tg, None
                    tg.cancel_scope.cancel()
                    # Raises what a task of it raised (the work at open, say) ...
                    await tg.__aexit__(None, None, None)
            finally:
                # ... and the supervisor tree is shut down all the same ...
                try:
                    if self._root is not None:
                        root, self._root = self._root, None
                        if now:
                            root.hurry()
                        await root.__aexit__(None, None, None)
                finally:
                    # ... and then the callbacks of what settled meanwhile are awaited.
                    if self._callback_tg is not None:
                        callbacks, self._callback_tg = self._callback_tg, None
                        wait = 0.0 if now else self.shutdown_timeout
                        callbacks.cancel_scope.deadline = anyio.current_time() + wait
                        await callbacks.__aexit__(None, None, None)
        finally:
            # A closed pool takes no calls; a fresh one (no threads until used) serves
            # this Runtime if it is opened again.
            tool_threads = self._tool_threads
            self._tool_threads = ToolThreads(tool_threads.max_threads)
            tool_threads.close()
            if self._given_log is None and self.log is not None:
                await self.log.aclose()

    def __enter__(self) -> Any:
        from perdure.sync import SyncRuntime

        if self._open or self._sync is not None:
            raise RuntimeError("this Runtime is already open: use the one 'with' you have")
        # Kept only once open: a refused second 'with' must not replace the open one,
        # whose __exit__ would then close nothing (its loop thread and dir lock leaked).
        sync = SyncRuntime(self)
        entered = sync.__enter__()
        self._sync = sync
        return entered

    def __exit__(self, *exc_info: Any) -> None:
        sync, self._sync = self._sync, None
        sync.__exit__(*exc_info)

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeClosedError(
                "the Runtime is not open: use it inside 'async with Runtime(...)' or "
                "'with Runtime(...)'"
            )

    async def _caught_up(self) -> None:
        """Wait until the signals sent while no runtime ran are delivered and recovery
        has scheduled what it resumes (not until those executions finish).

        Every call whose answer depends on an execution's state waits for this first:
        an answer from before that backlog would be stale (an approval already given, a
        budget already raised). It costs one event check once open is done.
        """
        self._require_open()
        if not self._ready.is_set():
            await self._ready.wait()
            self._require_open()
        if self._open_failed is not None:
            error = self._open_failed
            where = repr(self.path) if self.path else "its log"
            raise RuntimeClosedError(
                f"the Runtime could not finish opening {where}: "
                f"delivering the signals sent while no runtime ran, or resuming the "
                f"interrupted executions, raised {type(error).__name__}: {error}. Close "
                f"it, check the data dir with 'perdure health', then open it again"
            ) from error

    # -- agents ---------------------------------------------------------------------------

    def register(self, agent: Agent) -> None:
        """Make ``agent`` (and its sub-agents) runnable; its interrupted executions resume.

        Registering a different agent object under a name already registered replaces it
        (that is how a deploy brings new code); drift detection then compares the new
        definition against each execution's log. Executions that start from then on use
        it; those running go on with the one they started with.
        """
        todo = [agent]
        while todo:
            a = todo.pop()
            if self._agents.get(a.name) is a:
                continue
            new = a.name not in self._agents
            self._agents[a.name] = a
            todo.extend(a.agents)
            if new and self._open and self._tg is not None:
                # Only a name not known before can have executions left alone for want
                # of it; a service that builds its Agent per request (spawn registers
                # it) must not have every spawn list that agent's running executions.
                self._tg.start_soon(self._recover_agent, a.name)
                self._publish_agents()

    def _publish_agents(self) -> None:
        """Write the registered agents' names to the index (one writer at a time)."""
        self._agents_dirty = True
        if not self._publishing and self._tg is not None:
            self._publishing = True
            self._tg.start_soon(self._publish_agents_now)

    async def _publish_agents_now(self) -> None:
        try:
            while self._agents_dirty:
                self._agents_dirty = False
                meta = {"kind": "runtime", "pid": os.getpid(), "agents": sorted(self._agents)}
                await self.log.append(RUNTIME_STREAM, [], expect=ANY, meta=meta)
        except Exception:
            # Only what the CLI says about waiting executions depends on it.
            log.exception("could not record the registered agents in the index")
        finally:
            self._publishing = False

    def agent(self, name: str) -> Agent:
        """The registered agent called ``name``."""
        try:
            return self._agents[name]
        except KeyError:
            raise UnknownAgentError(
                f"no agent named {name!r} is registered; call rt.register(agent) first"
            ) from None

    # -- callbacks ------------------------------------------------------------------------

    def on_complete(self, fn: Callback) -> Callback:
        """Call ``fn(result)`` (sync or async) each time an execution completes."""
        self._callbacks["complete"].append(fn)
        return fn

    def on_suspend(self, fn: Callback) -> Callback:
        """Call ``fn(result, reason)`` each time an execution suspends."""
        self._callbacks["suspend"].append(fn)
        return fn

    def on_fail(self, fn: Callback) -> Callback:
        """Call ``fn(result, error)`` each time an execution fails."""
        self._callbacks["fail"].append(fn)
        return fn

    def on_cancel(self, fn: Callback) -> Callback:
        """Call ``fn(result)`` each time an execution is cancelled."""
        self._callbacks["cancel"].append(fn)
        return fn

    def on_step(self, fn: Callback) -> Callback:
        """Call ``fn(execution_id, step)`` after each durable step (LLM or tool)."""
        self._callbacks["step"].append(fn)
        return fn

    def _fire(self, kind: str, state: ExecutionState, extra: Any = None) -> None:
        callbacks = self._callbacks[kind]
        if not callbacks:
            return
        if kind == "step":
            args: tuple[Any, ...] = (state.execution_id, extra)
        else:
            result = Result.from_state(state)
            if kind == "suspend":
                args = (result, result.suspend_reason)
            elif kind == "fail":
                args = (result, result.error)
            else:
                args = (result,)
        tg = self._callback_tg
        for fn in callbacks:
            if inspect.iscoroutinefunction(fn):
                if tg is not None:
                    tg.start_soon(self._run_callback, fn, args, state.execution_id, kind)
                continue
            try:
                outcome = fn(*args)
                if inspect.isawaitable(outcome) and tg is not None:
                    tg.start_soon(self._await_callback, outcome, state.execution_id, kind)
            except Exception:
                log.exception(
                    "execution %s: on_%s callback %r raised", state.execution_id, kind, fn
                )

    async def _run_callback(self, fn: Callback, args: tuple[Any, ...], eid: str, kind: str) -> None:
        try:
            await fn(*args)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            log.exception("execution %s: on_%s callback %r raised", eid, kind, fn)

    async def _await_callback(self, awaitable: Awaitable[Any], eid: str, kind: str) -> None:
        try:
            await awaitable
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            log.exception("execution %s: on_%s callback raised", eid, kind)

    # -- spawning ---------------------------------------------------------------------------

    async def spawn(
        self,
        agent: Agent | str,
        prompt: str,
        *,
        execution_id: str | None = None,
        budget: Budget | None = None,
        metadata: Mapping[str, Any] | None = None,
        execution_timeout: float | datetime.timedelta | None = None,
        _parent: Mapping[str, Any] | None = None,
    ) -> ExecutionHandle:
        """Start an execution; returns once its first record is durable.

        ``budget`` replaces the agent's budget for this execution, as a whole.
        ``execution_timeout`` (seconds or a ``timedelta``; default the agent's) bounds
        the whole execution, time queued or suspended included: if it has not finished
        by then, it is cancelled (``cancelled_by == "deadline"``), its children with it.
        The deadline is fixed here, in the start record: it survives restarts, and a
        deadline that passed while no runtime ran cancels the execution at the next open.

        An existing ``execution_id`` with the same prompt resumes that execution (or
        returns it, if it is finished); with a different prompt it is an error. For an
        existing id this first waits until the signals sent while no runtime ran are
        delivered (see :meth:`wait_recovered`), so it resumes what they left.
        """
        self._require_open()
        if isinstance(agent, Agent):
            self.register(agent)
            definition_agent = agent
        else:
            definition_agent = self.agent(agent)
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        eid = _check_id(execution_id) if execution_id is not None else uuid.uuid4().hex
        if definition_agent.llm is None:
            raise AgentDefinitionError(f"agent {definition_agent.name!r} has no llm to call")
        await self._not_purging(eid)
        existing = await self.log.stream_info(execution_stream(eid))
        if existing is not None:
            await self._caught_up()
            await self._check_same(eid, definition_agent, prompt, budget, metadata)
            # As it is now that the backlog is in (a resume may have made it runnable).
            existing = await self.log.stream_info(execution_stream(eid))
            assert existing is not None
            if (
                existing.meta.get("status") in ("running", "queued")
                and self._undriven(eid)
                and eid not in self._queued
            ):
                await self._schedule(eid)
            return ExecutionHandle(eid, self)
        effective = budget if budget is not None else definition_agent.budget
        timeout = timeout_seconds(execution_timeout, "execution_timeout")
        if timeout is None:
            timeout = definition_agent.execution_timeout
        deadline = self._wall_clock() + timeout if timeout is not None else None
        started = ExecutionStarted(
            execution_id=eid,
            agent=definition_agent.name,
            prompt=prompt,
            run_id=uuid.uuid4().hex[:8],
            definition=definition_agent.definition(),
            max_steps=definition_agent.max_steps,
            budget=effective.to_dict() if effective else None,
            parent=dict(_parent) if _parent else None,
            metadata=dict(metadata or {}),
            deadline=deadline,
        )
        journal = Journal(self.log, ExecutionState(), eid)
        journal.stage(started)
        if self.max_concurrency is not None:
            # Slots go first come, first served: the executions a crash interrupted
            # (and those queued before it) came before this one, so recovery schedules
            # them first.
            await self._caught_up()
        # A concurrent spawn of the same id may hold the slot already: the loser of
        # the append below must not give back a slot that is the winner's.
        took_slot = eid not in self._slots
        has_slot = self._try_acquire(eid)
        took_slot = took_slot and has_slot
        if not has_slot:
            journal.override_meta(status="queued")
        if started.parent:
            journal.override_meta(parent=started.parent["execution_id"])
        try:
            await journal.flush()
        except ConflictError:
            # Spawned concurrently under the same id: that one won; this is the same
            # execution if the prompt matches.
            if took_slot:
                self._release(eid)
            await self._check_same(eid, definition_agent, prompt, budget, metadata)
            return ExecutionHandle(eid, self)
        except BaseException:
            if took_slot:
                self._release(eid)
            raise
        if deadline is not None:
            self._timers.schedule(eid, deadline, DEADLINE)
        if has_slot:
            await self._start_actor(eid, drive=True)
        else:
            self._push_queue(eid)
        return ExecutionHandle(eid, self)

    async def _check_same(
        self,
        eid: str,
        agent: Agent,
        prompt: str,
        budget: Budget | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Refuse a spawn of an existing id that asks for something else than it holds.

        The prompt and agent always count; a budget or metadata only when this spawn
        gives one (an agent's own budget may change with a deploy: that is not a
        different spawn). The budget compared is the one the execution was spawned
        with, not one raised since, so repeating the original spawn still resumes it.
        """
        first = None
        async for record in self.log.read(execution_stream(eid)):
            first = decode(record)
            break
        if not isinstance(first, ExecutionStarted):
            raise ExecutionNotFoundError(f"execution {eid!r} has no start record", eid)
        if first.prompt != prompt:
            raise PromptMismatchError(
                f"execution {eid!r} already exists with prompt {_clip(first.prompt)!r}; it "
                f"was spawned again with prompt {_clip(prompt)!r}. Use a new execution id, "
                f"or pass the original prompt to resume it",
                eid,
            )
        if first.agent != agent.name:
            raise PromptMismatchError(
                f"execution {eid!r} belongs to agent {first.agent!r}, not {agent.name!r}", eid
            )
        if budget is not None and budget.to_dict() != (first.budget or {}):
            raise PromptMismatchError(
                f"execution {eid!r} already exists with budget {first.budget or 'none'}; it "
                f"was spawned again with budget {budget.to_dict()}. Use a new execution id, "
                f"or raise its budget with rt.resume({eid!r}, budget=...) (perdure resume)",
                eid,
            )
        # compared as the log records them (a tuple reads back as a list)
        same = metadata is None or meta_value_key(dict(metadata)) == meta_value_key(first.metadata)
        if not same:
            raise PromptMismatchError(
                f"execution {eid!r} already exists with metadata {_clip(repr(first.metadata))}; "
                f"it was spawned again with metadata {_clip(repr(dict(metadata)))}. Use a new "
                f"execution id, or pass the original metadata to resume it",
                eid,
            )

    async def run(
        self,
        agent: Agent | str,
        prompt: str,
        *,
        execution_id: str | None = None,
        budget: Budget | None = None,
        metadata: Mapping[str, Any] | None = None,
        execution_timeout: float | datetime.timedelta | None = None,
    ) -> Result:
        """Spawn, then wait until the execution completes, suspends or fails.

        The Result is settled: its status is completed, suspended, failed or cancelled,
        never running or queued (see :meth:`wait`). For ``execution_timeout`` see
        :meth:`spawn`.
        """
        handle = await self.spawn(
            agent,
            prompt,
            execution_id=execution_id,
            budget=budget,
            metadata=metadata,
            execution_timeout=execution_timeout,
        )
        return await self.wait(handle.execution_id)

    # -- scheduling -------------------------------------------------------------------------

    def _try_acquire(self, eid: str) -> bool:
        if eid in self._slots:
            return True
        if self._queue:
            return False  # first come, first served: nobody overtakes the queue
        if self.max_concurrency is None or len(self._slots) < self.max_concurrency:
            self._slots.add(eid)
            return True
        return False

    def _release(self, eid: str) -> None:
        if eid in self._slots:
            self._slots.discard(eid)
            self._start_queued()

    def _push_queue(self, eid: str) -> None:
        if eid not in self._queued:
            self._queued.add(eid)
            self._queue.append(eid)
        # A slot may have freed while this one was being queued (the spawn's append
        # awaited), after the last drain ended: nobody else would start it.
        self._start_queued()

    async def _enqueue(self, eid: str) -> None:
        """An execution that can run but has no slot waits in the queue (no task)."""
        # The index says so before the queue can start it: written after, "queued"
        # could land on top of the appends of its run, and stay there.
        await self.log.set_meta(execution_stream(eid), {"status": "queued"})
        self._push_queue(eid)

    def _start_queued(self) -> None:
        if self.max_concurrency is not None and len(self._slots) >= self.max_concurrency:
            return  # no slot: the next release drains
        if self._queue and not self._draining and self._tg is not None and self._open:
            self._draining = True
            self._tg.start_soon(self._drain_queue)

    async def _drain_queue(self) -> None:
        # One task admits queued executions, one after another, so they start in the
        # order they were queued whatever the event loop's scheduling order.
        try:
            while self._queue and self._open:
                if self.max_concurrency is not None and len(self._slots) >= self.max_concurrency:
                    return
                eid = self._queue.popleft()
                if eid not in self._queued:
                    continue  # settled while it waited (cancelled, say): nothing to start
                self._queued.discard(eid)
                self._slots.add(eid)
                await self._start_actor(eid, True)
        finally:
            self._draining = False

    def _undriven(self, eid: str) -> bool:
        """No actor is there to drive ``eid``: none, or one that is stopping (one that
        took a signal while its agent was not registered stops; _start_actor then
        starts a fresh one)."""
        actor = self._live.get(eid)
        return actor is None or actor.stop_requested

    async def _schedule(self, eid: str) -> None:
        if self._try_acquire(eid):
            await self._start_actor(eid, drive=True)
        else:
            await self._enqueue(eid)

    async def _start_actor(self, eid: str, drive: bool) -> Any:
        """The ref of the execution's actor, starting one if there is none."""
        assert self._executions is not None
        key = _child_key(eid)
        while True:
            # Checked again after every wait below, with no await between the last
            # check and the claim of _starting that a purge respects.
            await self._not_purging(eid)
            ref = self._executions.ref(key)
            if ref is not None:
                actor = self._live.get(eid)
                if actor is not None and actor.stop_requested:
                    await actor.stopped.wait()  # hibernating: start a fresh one below
                    continue
                if not drive or actor is None or actor.driving:
                    return ref
                actor.drive_now()
                return ref
            pending = self._starting.get(eid)
            if pending is None:
                break
            await pending.wait()
        # Claimed before the first await: a concurrent start (a second spawn, a signal,
        # recovery) must wait for this one, not pass the check above while this one
        # reads the index and then start the same child again (a store whose reads
        # yield, as a networked one does, makes that window real).
        done = self._starting[eid] = anyio.Event()
        try:
            meta = await self.log.stream_info(execution_stream(eid))
            if meta is None:
                # No such execution (purged, say): an actor would record a signal as
                # the first record of a stream of that name, recreating it half-made.
                self._release(eid)
                return None
            agent = self._agents.get(meta.meta.get("agent", ""))
            if drive and agent is None:
                self._release(eid)
                return None
            if drive and meta is not None and await self._cancelled_ancestor(meta.meta):
                # A child queued for a slot that its cancelled parent (or theirs) gave
                # back: the cancel cascade is on its way (or, after a crash, comes at the
                # next open); until it lands the child must not run anything.
                self._release(eid)
                return None
            spec = ChildSpec(
                key,
                # To drive even if the slot went while this start waited (the stop of
                # the incarnation before gives it back): the actor takes one again or
                # queues, or finds the execution settled and stops.
                lambda: ExecutionActor(self, eid, agent, drive=drive or eid in self._slots),
                restart="transient",
                shutdown=self.shutdown_timeout,
                max_restarts=self.max_restarts,
                within=self.restart_within,
                mailbox_size=16,
            )
            return await self._executions.start_child(spec)
        except BaseException:
            self._release(eid)
            raise
        finally:
            del self._starting[eid]
            done.set()

    # -- actor callbacks ----------------------------------------------------------------------

    def _actor_started(self, eid: str, actor: ExecutionActor) -> None:
        self._live[eid] = actor

    def _actor_stopped(self, eid: str, actor: ExecutionActor, reason: Any) -> None:
        if self._live.get(eid) is actor:
            del self._live[eid]

    def _on_lifecycle(self, event: LifecycleEvent) -> None:
        if event.kind not in ("stopped", "crashed") or event.will_restart:
            return
        eid = _execution_id(event.child)
        if event.kind == "crashed" and eid in self._starting:
            # It never started (its on_start raised): whoever was starting it gets the
            # error and decides; the execution itself did not crash.
            return
        self._release(eid)
        error = event.reason.error if event.reason is not None else None
        if event.kind == "crashed" and error is not None and self._tg is not None and self._open:
            self._tg.start_soon(self._record_crash, eid, error)

    async def _record_crash(self, eid: str, error: BaseException) -> None:
        """The engine crashed more often than allowed: fail the execution, with the cause."""
        stream = execution_stream(eid)
        failed = encode(
            ExecutionFailed(
                "crash",
                {
                    "type": type(error).__name__,
                    "message": f"{error} (the execution crashed {self.max_restarts + 1} times "
                    f"within {self.restart_within:g}s; fix the cause, then "
                    f"'perdure resume {eid}')",
                },
            )
        )
        try:
            for attempt in range(1, _RECORD_CRASH_TRIES + 1):
                state = await load_state(self.log, eid)
                if state.status != "running":
                    break  # it settled before it crashed (or a signal settled it since)
                try:
                    await self.log.append(
                        stream, [failed], expect=state.seq, meta={"status": "failed"}
                    )
                except ConflictError:
                    # A signal was recorded meanwhile (delivery appends to the stream):
                    # read again, so the failure lands after it and nothing is lost.
                    if attempt == _RECORD_CRASH_TRIES:
                        raise
                    continue
                state = await load_state(self.log, eid)
                log.error("execution %s failed after repeated crashes: %r", eid, error)
                break
        except Exception:
            log.exception("execution %s: could not record its failure", eid)
            return
        self._settled(eid, state)

    def _settled(self, eid: str, state: ExecutionState) -> None:
        """The execution stopped running (completed, suspended, failed or cancelled)."""
        if state.status == "running":
            return
        self._release(eid)
        if eid in self._queued:  # settled while it waited (cancelled): it must not start
            self._queued.discard(eid)
            self._queue.remove(eid)
        for event in self._waiters.pop(eid, ()):
            event.set()
        status = state.status
        kind = {"completed": "complete", "suspended": "suspend", "failed": "fail"}.get(
            status, "cancel" if status == "cancelled" else None
        )
        if kind is not None:
            self._fire(kind, state)
        sinks = self._sinks.get(eid)
        if sinks:
            result = Result.from_state(state)
            for sink in list(sinks):
                sink(result)
        parent = state.parent
        if parent and status in ("completed", "failed", "cancelled") and self._tg is not None:
            payload = _outcome_payload(state)
            self._tg.start_soon(self._post_child_outcome, parent["execution_id"], eid, payload)
        if status == "suspended" and self._tg is not None:
            waited = _waiting_on(state.suspend_reason)
            if waited:
                self._tg.start_soon(self._rewake_if_finished, eid, waited)
                if state.limits is not None and self._open:
                    # A sibling may have just finished with part of its share unused.
                    self._start_rehand(self._rebalance, waited)
            reason = state.suspend_reason or {}
            if reason.get("kind") == "budget" and reason.get("parent") and self._open:
                # On a limit it inherited: a raise above may not have come down to it
                # (it ran, or waited for an approval, when a crash cut the hand-down).
                self._start_rehand(self._rehand_if_owed, eid)
        if status == "cancelled" and self._tg is not None:
            self._tg.start_soon(self._cancel_children, eid, state.cancel_reason or "")
        # The index entry written with this suspension carries the same timer (see
        # journal.index_meta), which is what the timer is checked against when due.
        timer = earliest_timer(state.suspend_reason) if status == "suspended" else None
        keep = [] if timer is None else [(timer[0], eid, timer[1])]
        if state.deadline is not None and status not in _FINISHED:
            keep.append((state.deadline, eid, DEADLINE))  # its execution timeout, still on
        # Any other timer of it no longer applies (its signal came first, it finished,
        # it was cancelled): dropped now, not kept until its deadline.
        self._timers.forget(eid, keep=keep)
        if timer is not None and self._open:
            self._timers.schedule(eid, *timer)

    async def _post_child_outcome(self, parent: str, child: str, payload: Any) -> None:
        try:
            await self._post(parent, f"child:{child}", payload, "runtime")
        except Exception:
            # The next open posts it again (see _rewake_parents): logged, not fatal.
            log.exception(
                "execution %s: could not tell its parent %s that it %s; the parent is "
                "woken when a runtime next opens the data dir",
                child,
                parent,
                payload.get("status"),
            )

    async def _rewake_if_finished(self, parent: str, children: list[str]) -> None:
        """``parent`` suspended waiting for these children: post the outcome of any that
        finished before this runtime opened. That child's own post may have been lost in
        a crash while the parent ran (an open re-posts only to parents suspended then),
        and the parent would wait for it for ever. A child that finished since, this
        runtime posted itself (:meth:`_settled`): not posted twice."""
        try:
            for child_id in children:
                info = await self.log.stream_info(execution_stream(child_id))
                if (
                    info is not None
                    and info.meta.get("status") in _FINISHED
                    and info.updated_at < self._opened_at
                ):
                    payload = _outcome_payload(await load_state(self.log, child_id))
                    await self._post(parent, f"child:{child_id}", payload, "runtime")
        except Exception:
            log.exception(
                "execution %s: could not check whether the children it waits for have "
                "finished; it is woken when a runtime next opens the data dir",
                parent,
            )

    async def _cancel_children(self, parent: str, reason: str) -> None:
        """Cancel the unfinished children of a cancelled execution (theirs follow in turn).

        Nobody is left to take their results, and a child waiting for an approval must
        not run its tool once approved. A crash before these cancels are posted is made
        good at the next open (see :meth:`_orphaned`).
        """
        await self._post_to_children(
            parent,
            "cancel",
            _orphan_cancel(parent, reason),
            "was cancelled, but cancelling its children failed; they are cancelled when a "
            "runtime next opens the data dir",
        )

    async def _post_to_children(
        self,
        parent: str,
        name: str,
        payload: Mapping[str, Any] | Callable[[str], Mapping[str, Any]],
        failed: str,
    ) -> None:
        """Post signal ``name`` to every unfinished child of ``parent``, as the runtime
        (``payload``, or ``payload(child id)`` for each its own).

        A failure is logged, never raised: ``failed`` says what went wrong and what the
        next open makes good.
        """
        try:
            for prefix in _children_prefixes(parent):
                async for info in self.log.streams(prefix=execution_stream(prefix)):
                    meta = info.meta
                    if meta.get("parent") == parent and meta.get("status") not in _FINISHED:
                        child = info.stream[len("exec/") :]
                        data = payload(child) if callable(payload) else payload
                        await self._post(child, name, data, "runtime")
        except Exception:
            log.exception("execution %s %s", parent, failed)

    async def _cancel_if_orphaned(self, eid: str, meta: Mapping[str, Any]) -> bool:
        """At open: cancel this unfinished execution if its parent was cancelled.

        True if it was (a cancel is posted; it must not be resumed meanwhile).
        """
        parent = meta.get("parent")
        if not parent:
            return False
        info = await self.log.stream_info(execution_stream(parent))
        if info is None or info.meta.get("status") != "cancelled":
            return False
        await self._post(eid, "cancel", _orphan_cancel(parent, ""), "runtime")
        return True

    async def _cancelled_ancestor(self, meta: Mapping[str, Any]) -> str | None:
        """The nearest cancelled ancestor of the execution whose index entry is
        ``meta``, or None (one index read per generation; none for a top-level one)."""
        for _ in range(_MAX_ANCESTORS):
            parent = meta.get("parent")
            if not parent:
                return None
            info = await self.log.stream_info(execution_stream(str(parent)))
            if info is None:
                return None
            if info.meta.get("status") == "cancelled":
                return str(parent)
            meta = info.meta
        return None

    # -- waiting and reading ----------------------------------------------------------------

    async def wait(
        self, execution_id: str, *, until: Literal["settled", "finished"] = "settled"
    ) -> Result:
        """Wait for an execution and return its Result.

        ``until="settled"`` (default) returns as soon as it is not running or queued:
        completed, failed, cancelled, or suspended. ``until="finished"`` keeps waiting
        through suspensions until it is completed, failed or cancelled (use it for a
        parent whose children, approvals or signals will resume it).

        The Result returned always satisfies ``until``: its status is the one that was
        judged, read once (a status read, then a second read for the Result, could see
        the execution resumed in between and return it "running"). It first waits for
        the signals sent while no runtime ran (see :meth:`wait_recovered`), so it is
        never the state from before them: a suspension they decided is not returned.
        """
        await self._caught_up()
        if until == "settled":
            unsettled: tuple[str, ...] = ("running", "queued")
        else:
            unsettled = ("running", "queued", "suspended")
        while True:
            # Register before reading, so a settle in between is not missed; and
            # unregister when not waiting after all (no entry outlives its waiter).
            event = anyio.Event()
            waiters = self._waiters.setdefault(execution_id, [])
            waiters.append(event)
            try:
                result = await self.result(execution_id)
                if result.status not in unsettled:
                    return result
                await event.wait()
            finally:
                if not event.is_set():
                    waiters.remove(event)
                    if not waiters and self._waiters.get(execution_id) is waiters:
                        del self._waiters[execution_id]
            self._require_open()

    async def result(self, execution_id: str) -> Result:
        """The execution's Result as of now (replays its log if it is not in memory).

        "Now" is after the signals sent while no runtime ran are delivered (see
        :meth:`wait_recovered`); only what is durable is reported.
        """
        await self._caught_up()
        await self._not_purging(execution_id)
        actor = self._live.get(execution_id)
        if actor is not None and actor.journal is not None:
            journal = actor.journal
            try:
                await journal.settle()  # report only what is on disk
            except RuntimeError:
                pass  # a broken journal: its actor is crashing; read the log instead
            else:
                return await self._with_children(Result.from_state(journal.state))
        info = await self.log.stream_info(execution_stream(execution_id))
        if info is None:
            raise _not_found(self.log, execution_id)
        state = await load_state(self.log, execution_id)
        status = info.meta.get("status")
        return await self._with_children(
            Result.from_state(state, "queued" if status == "queued" else None)
        )

    async def _with_children(self, result: Result) -> Result:
        """``result`` with each child it waits on described as of now (status, reason)."""
        reason = result.suspend_reason
        ids = _waiting_on(reason.details) if reason is not None else []
        if reason is None or not ids:
            return result
        now: dict[str, dict[str, Any]] = {}
        agents = frozenset(self._agents)  # a child of an agent not registered says so
        for child_id in ids:
            info = await self.log.stream_info(execution_stream(child_id))
            meta = info.meta if info is not None else {}
            now[child_id] = {
                "execution_id": child_id,
                "status": meta.get("status"),
                "status_text": describe(meta, owned=True, agents=agents)
                if info is not None
                else "not started yet",
                "reason": meta.get("reason"),
                "confirmations": list(meta.get("confirmations") or ()),
            }
            deepest = await blocked_descendant(self.log, meta)
            if deepest is not None:
                # A grandchild's approval holds up the whole chain: name it here, so
                # the parent's reason says whom to approve.
                did, dmeta = deepest
                text = describe(dmeta, owned=True, agents=agents)
                now[child_id]["status_text"] += f"; waits for {did}: {text}"
                now[child_id]["blocked_at"] = {
                    "execution_id": did,
                    "status": dmeta.get("status"),
                    "status_text": text,
                    "reason": dmeta.get("reason"),
                    "confirmations": list(dmeta.get("confirmations") or ()),
                }

        def described(blocker: Mapping[str, Any]) -> dict[str, Any]:
            child = now.get(blocker.get("child_id", "")) if blocker.get("kind") == "child" else None
            return {**blocker, "child": child} if child is not None else dict(blocker)

        details = described(reason.details)
        if "pending" in details:
            details["pending"] = [described(b) for b in details["pending"]]
        return dataclasses.replace(result, suspend_reason=SuspendReason(reason.kind, details))

    async def state(self, execution_id: str) -> ExecutionState:
        """The full replayed state of an execution (a copy if it is live), as of after
        the signals sent while no runtime ran (see :meth:`wait_recovered`)."""
        await self._caught_up()
        await self._not_purging(execution_id)
        if await self.log.stream_info(execution_stream(execution_id)) is None:
            raise _not_found(self.log, execution_id)
        return await load_state(self.log, execution_id)

    async def executions(
        self, status: str | None = None, agent: str | None = None
    ) -> list[ExecutionInfo]:
        """Executions from the index (no replay), optionally filtered; as of after the
        signals sent while no runtime ran (see :meth:`wait_recovered`)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
        await self._caught_up()
        where: dict[str, Any] = {"kind": "execution"}
        if status is not None:
            where["status"] = status
        if agent is not None:
            where["agent"] = agent
        out = []
        async for info in self.log.streams(prefix="exec/", where=where):
            out.append(
                ExecutionInfo.from_index(
                    info.stream[len("exec/") :], info.meta, info.created_at, info.updated_at
                )
            )
        return out

    # -- retention ----------------------------------------------------------------------------

    async def purge(
        self,
        older_than: float | datetime.timedelta,
        *,
        statuses: Iterable[str] = FINISHED,
        dry_run: bool = False,
    ) -> list[str]:
        """Delete finished executions last updated more than ``older_than`` ago.

        ``older_than`` is seconds or a ``timedelta`` (0: every finished execution).
        Only a root execution (one with no parent) whose status is in ``statuses`` is
        chosen, and only when every execution of its delegation tree is finished
        (completed, failed or cancelled) and last updated before the cutoff; then the
        whole tree is deleted in one atomic delete. Never an execution that is running,
        suspended or queued, nor one with a live actor or a signal waiting for it in
        the inbox: its tree waits for a later purge. Returns the ids deleted, each root
        before its descendants (``dry_run=True``: the ids that would be, deleting
        nothing).

        A purged id is unknown afterwards: ``result``, ``signal`` and the rest raise
        ``ExecutionNotFoundError``, a signal already in the inbox for it is refused
        when delivered, and ``spawn`` under the id starts a new execution. The data
        dir's disk space is reused for new records, not returned to the filesystem.
        """
        self._require_open()
        chosen = check_statuses(statuses)
        cut = cutoff(older_than, time.time())
        await self._caught_up()
        trees = await eligible_trees(self.log, cut, chosen)
        # A finished execution's actor stops a moment after it settles: wait for
        # those, or a purge right after rt.run would find its execution still busy.
        with anyio.move_on_after(self.shutdown_timeout):
            for tree in trees:
                for eid in tree.members:
                    actor = self._live.get(eid)
                    if actor is not None and actor.stop_requested:
                        await actor.stopped.wait()
        waiting = await pending_signals(self.log) if trees else {}
        # Read and claimed with no await in between: an actor starting later waits
        # for the purge (see _start_actor), and finds the stream gone.
        busy = (
            self._live.keys()
            | self._starting.keys()
            | self._slots
            | self._queued
            | self._purging.keys()
            | self._inbox_held
            | waiting.keys()
        )
        trees = [t for t in trees if busy.isdisjoint(t.members)]
        if dry_run or not trees:
            return [eid for tree in trees for eid in tree.members]
        claimed = [eid for tree in trees for eid in tree.members]
        done = anyio.Event()
        self._purging.update(dict.fromkeys(claimed, done))
        try:
            # A failed execution resumed (or updated) since the listing keeps its tree.
            trees = await still_eligible(self.log, trees, cut)
            purged: list[str] = []
            for batch in batches(trees):
                try:
                    # Shielded: a delete the writer took commits whatever happens to its
                    # caller, and the claim must hold until it has.
                    with anyio.CancelScope(shield=True):
                        await self.log.delete_streams([execution_stream(eid) for eid in batch])
                except Exception as exc:
                    if purged:
                        _note_partial_purge(exc, purged, batch)
                    raise
                purged += batch
                await anyio.lowlevel.checkpoint_if_cancelled()
        finally:
            for eid in claimed:
                del self._purging[eid]
            done.set()
        if purged:
            log.info("purged %d finished executions updated before %s", len(purged), cut)
        return purged

    async def _not_purging(self, eid: str) -> None:
        """Wait while a purge is deleting ``eid`` (then it is gone, or kept)."""
        while (done := self._purging.get(eid)) is not None:
            await done.wait()

    # -- signals ------------------------------------------------------------------------------

    async def signal(
        self, execution_id: str, name: str, payload: Any = None, *, by: str = "api"
    ) -> SignalStatus:
        """Send a durable signal; returns once the execution has recorded it, or once it
        is known that it cannot yet.

        Built-in names: ``approve``/``approval``, ``reject``/``rejection``, ``budget``,
        ``cancel``, ``resolve``, ``resume``, ``accept_drift``. Any other name is a user
        signal, handed to tools waiting in ``wait_for_signal(name)``. A suspended
        execution that the signal unblocks resumes by itself (auto-resume).

        The signal is durable (in the inbox) before anything else happens. Returns
        ``"delivered"`` once the execution took it (or turned it down, on the record).
        If delivering it fails (the log, the execution's actor), or an earlier signal
        for the same execution failed to deliver, it is *held*: it stays in the inbox
        and is retried with backoff, in order, logged each time, and this returns
        ``"held"`` at once rather than wait for the retries. ``"pending"``: the runtime
        closed first; the signal is delivered when a runtime next opens the data dir.

        It is checked against the execution as it is after the signals sent while no
        runtime ran (see :meth:`wait_recovered`): approving a call they decided already
        is refused, not sent twice.
        """
        await self._caught_up()
        await self._not_purging(execution_id)
        info = await self.log.stream_info(execution_stream(execution_id))
        if info is None:
            raise _not_found(self.log, execution_id)
        meta = info.meta
        problem = precheck(
            execution_id,
            str(meta.get("status")),
            list(meta.get("confirmations", ())),
            name,
            payload if isinstance(payload, Mapping) else {},
            usage=meta,
        )
        if problem is not None:
            if canonical_name(name) in ("approve", "reject") and isinstance(payload, Mapping):
                problem = await self._why_not_pending(
                    execution_id,
                    str(meta.get("status")),
                    payload.get("confirmation_id"),
                    problem,
                    canonical_name(name),
                )
            raise InvalidSignalError(problem, execution_id)
        if canonical_name(name) == "resume":
            problem = await resume_problem(self.log, execution_id, meta)
            if problem is not None:
                raise InvalidSignalError(problem, execution_id)
        seq = await self._post(execution_id, name, payload, by)
        return await self._delivered(seq)

    async def _why_not_pending(
        self, eid: str, status: str, cid: Any, problem: str, kind: str = "approve"
    ) -> str:
        """Say more than "not pending" when the log knows more: who decided it already,
        or which descendant execution it belongs to, at any depth (read only on this
        error path). ``kind`` is ``approve`` or ``reject``: the call to suggest."""
        if not isinstance(cid, str) or not cid:
            return problem
        decided = None
        async for record in self.log.read(execution_stream(eid)):
            if (
                record.type in ("approval.granted", "approval.rejected")
                and record.payload.get("confirmation_id") == cid
            ):
                decided = record
        if decided is not None:
            p = decided.payload
            verb = "rejected" if decided.type == "approval.rejected" else "approved"
            if p.get("override"):
                verb = "overridden"
            now = f"; the execution is {status}" if status in _FINISHED else ""
            return (
                f"confirmation {cid!r} of execution {eid!r} was already {verb} by "
                f"{decider(p.get('by'))} (seq {decided.seq}){now}; a confirmation is "
                f"decided once, so nothing was sent"
            )
        chain = await confirmation_owner(self.log, eid, cid)
        if chain is None:
            return problem
        owner = chain[-1]
        where = owner_phrase(eid, chain)
        call = (
            f"rt.reject({owner!r}, {cid!r}, reason)"
            if kind == "reject"
            else f"rt.approve({owner!r}, {cid!r})"
        )
        return f"confirmation {cid!r} belongs to {where}; decide it there: {call}; nothing was sent"

    async def _post(self, target: str, name: str, payload: Any, by: str) -> int:
        record = encode(SignalSent(target, name, payload, by))
        return await self.log.append(INBOX_STREAM, [record], expect=ANY)

    async def _delivered(self, seq: int) -> SignalStatus:
        """Wait until inbox signal ``seq`` is through or held (see perdure.inbox)."""
        if not self._inbox_is_through(seq) and seq not in self._inbox_held_seqs:
            event = self._inbox_waiters[seq] = anyio.Event()
            try:
                await event.wait()
            finally:
                del self._inbox_waiters[seq]
        if self._inbox_is_through(seq):
            return "delivered"
        return "held" if seq in self._inbox_held_seqs else "pending"

    def _inbox_is_through(self, seq: int) -> bool:
        """Inbox signal ``seq`` is through: taken, turned down or refused."""
        if seq <= self._inbox_cursor or seq in self._inbox_done:
            return True
        return seq <= self._inbox_past and seq not in self._inbox_held_seqs

    def _inbox_reset(self, cursor: int) -> None:
        """A (new) pump starts at ``cursor``: what an earlier one held is tried again."""
        self._inbox_cursor = self._inbox_past = cursor
        self._inbox_done.clear()
        self._inbox_held.clear()
        self._inbox_held_seqs.clear()

    def _inbox_through(self, seq: int) -> None:
        """The pump got inbox signal ``seq`` through: taken, turned down or refused."""
        self._inbox_held_seqs.discard(seq)
        if seq > self._inbox_past:  # (at or below it, through once not held)
            self._inbox_done.add(seq)
        event = self._inbox_waiters.get(seq)
        if event is not None:
            event.set()

    def _inbox_holding(self, seqs: Iterable[int]) -> None:
        """The pump holds these inbox signals for a retry (see perdure.inbox)."""
        for seq in seqs:
            self._inbox_held_seqs.add(seq)
            event = self._inbox_waiters.get(seq)
            if event is not None:
                event.set()

    def _inbox_moved(self, cursor: int, through: int) -> None:
        """The pump's cursor (every inbox signal up to it is through) and its
        ``through`` (every one up to it but those of held executions)."""
        self._inbox_cursor = max(self._inbox_cursor, cursor)
        if through > self._inbox_past:
            # Forgotten here, known through by _inbox_past: while one execution's
            # signals are held, the cursor stays behind them, and the signals others
            # took meanwhile would otherwise pile up here until it is delivered.
            self._inbox_past = through
            self._inbox_done = {s for s in self._inbox_done if s > through}

    def _backlog_delivered(self) -> None:
        self._backlog.set()

    async def _deliver(self, target: str, seq: int, signal: SignalSent) -> None:
        """Hand one inbox signal to its execution (starting an actor if needed)."""
        info = await self.log.stream_info(execution_stream(target))
        if info is None:
            log.warning(
                "signal %r (inbox seq %d) refused: there is no execution %r in this data dir",
                signal.name,
                seq,
                target,
            )
            return
        if int(info.meta.get("signal_seq", 0)) >= seq:
            return
        if info.meta.get("status") in TERMINAL:
            log.info(
                "signal %r to execution %s ignored: it is %s",
                signal.name,
                target,
                info.meta.get("status"),
            )
            return
        from perdure.actors import MailboxClosed

        for _ in range(10):
            ref = await self._start_actor(target, drive=False)
            if ref is None:
                log.warning(
                    "signal %r (inbox seq %d) refused: execution %r was purged before it "
                    "could take it",
                    signal.name,
                    seq,
                    target,
                )
                return
            try:
                await ref.ask(Deliver(seq, signal.name, signal.payload, signal.by), timeout=None)
                return
            except MailboxClosed:
                continue  # the actor stopped between lookup and ask: start a fresh one
        # The inbox pump keeps the signal and tries again later.
        raise RuntimeError(
            f"execution {target}: signal {signal.name!r} (inbox seq {seq}) found no actor "
            f"to take it after 10 tries"
        )

    async def approve(
        self, execution_id: str, confirmation_id: str, note: str | None = None, *, by: str = "api"
    ) -> SignalStatus:
        """Approve a pending tool call (or override a contract); it runs, exactly once.

        ``note`` is recorded with the approval, and ``by`` says who gave it. A contract
        override is always recorded with a reason: without a note it reads
        ``"no note given"``. Returns what :meth:`signal` returns.
        """
        return await self.signal(
            execution_id, "approve", {"confirmation_id": confirmation_id, "note": note}, by=by
        )

    async def reject(
        self, execution_id: str, confirmation_id: str, reason: str, *, by: str = "api"
    ) -> SignalStatus:
        """Reject a pending tool call; the model is told, as that call's result.

        Returns what :meth:`signal` returns.
        """
        return await self.signal(
            execution_id, "reject", {"confirmation_id": confirmation_id, "reason": reason}, by=by
        )

    async def cancel(self, execution_id: str, reason: str = "", *, by: str = "api") -> SignalStatus:
        """Cancel for good: a running execution stops at once (its running tool too).

        Its unfinished child executions (delegations) are cancelled with it, and theirs.
        Returns what :meth:`signal` returns.
        """
        return await self.signal(execution_id, "cancel", {"reason": reason}, by=by)

    async def resolve(
        self,
        execution_id: str,
        *,
        retry: bool = False,
        complete: Any = None,
        fail: str | None = None,
        by: str = "api",
    ) -> SignalStatus:
        """Decide an in-doubt, non-idempotent tool call (reason ``unknown_outcome``).

        Exactly one of: ``retry=True`` (run it again, same idempotency key),
        ``complete=<result>`` (record this result as its outcome), ``fail="why"``
        (record a failure, returned to the model).
        """
        chosen = [retry, complete is not None, fail is not None]
        if sum(bool(c) for c in chosen) != 1:
            raise ValueError("resolve needs exactly one of retry=True, complete=..., fail=...")
        if retry:
            payload: dict[str, Any] = {"action": "retry"}
        elif complete is not None:
            payload = {"action": "complete", "output": complete}
        else:
            payload = {"action": "fail", "reason": fail}
        problem = in_doubt_problem(execution_id, await self.state(execution_id))
        if problem is not None:  # else it would be recorded as ignored, and "delivered"
            raise InvalidSignalError(problem, execution_id)
        return await self.signal(execution_id, "resolve", payload, by=by)

    async def resume(
        self,
        execution_id: str,
        *,
        budget: Budget | None = None,
        accept_drift: bool = False,
        wait: bool = True,
        by: str = "api",
    ) -> Result | None:
        """Resume an execution, optionally raising its budget or accepting drift.

        Raising the budget or accepting drift is recorded durably; a failed execution (or
        one suspended for drift) is retried from its log. Then, unless ``wait=False``,
        waits for the execution to complete, suspend or fail.
        """
        await self._caught_up()
        if budget is not None:
            await self.signal(execution_id, "budget", {"budget": budget.to_dict()}, by=by)
        if accept_drift:
            await self.signal(execution_id, "accept_drift", {}, by=by)
        info = await self.log.stream_info(execution_stream(execution_id))
        if info is None:
            raise _not_found(self.log, execution_id)
        status, reason = info.meta.get("status"), info.meta.get("reason")
        if status == "failed" or (status == "suspended" and reason == "drift"):
            await self.signal(execution_id, "resume", {}, by=by)
        elif (
            status in ("running", "queued")
            and self._undriven(execution_id)
            and execution_id not in self._queued
        ):
            await self._schedule(execution_id)
        return await self.wait(execution_id) if wait else None

    # -- delegation ---------------------------------------------------------------------------

    async def _delegate(self, ctx: ToolContext, agent: Agent, task: str) -> Any:
        parent = ctx.execution_id
        # The child's id is derived from the parent's id and step, so a restarted parent
        # finds the same child. A user may have spawned an execution under that id
        # (ids may contain "/"): one that is not this parent's child is never taken for
        # it; the child then takes the next free "~N" variant (the same one on replay,
        # since the squatter stays where it is).
        for n in range(_MAX_CHILD_VARIANTS):
            child = _child_id(parent, ctx.step, n)
            signal = f"child:{child}"
            if signal in ctx.signals:
                return _child_outcome(child, ctx.signals[signal])
            info = await self.log.stream_info(execution_stream(child))
            if info is None:
                link: dict[str, Any] = {"execution_id": parent, "step": ctx.step}
                grant = budget_grant(await self._live_state(parent), ctx.step)
                if grant is not None:
                    # What the parent has left now bounds the child (and its own
                    # children); recorded in the child's start, so replay agrees.
                    link.update(grant)
                try:
                    await self.spawn(agent, task, execution_id=child, _parent=link)
                except PromptMismatchError:
                    continue  # spawned under this id meanwhile, by someone else
                info = await self.log.stream_info(execution_stream(child))
                assert info is not None
            if info.meta.get("parent") != parent:
                log.warning(
                    "execution %s step %d: execution %r exists and is not its child (it "
                    "was spawned by someone else); the child gets another id",
                    parent,
                    ctx.step,
                    child,
                )
                continue
            if info.meta.get("status") in ("completed", "failed", "cancelled"):
                return _child_outcome(child, _outcome_payload(await load_state(self.log, child)))
            raise SuspendExecution(
                "child", {"name": signal, "child_id": child, "agent": agent.name}
            )
        raise ToolError(
            f"execution {parent!r} step {ctx.step}: every id for its child execution "
            f"({_child_id(parent, ctx.step, 0)!r} and {_MAX_CHILD_VARIANTS - 1} variants) is "
            f"taken by executions that are not its children; do not spawn executions under "
            f"ids of the form '{parent}/<step>'"
        )

    async def _live_state(self, eid: str) -> ExecutionState:
        """The state of ``eid`` as its running actor holds it (else replayed from the log)."""
        actor = self._live.get(eid)
        if actor is not None and actor.journal is not None and not actor.journal.broken:
            return actor.journal.state
        return await load_state(self.log, eid)

    def _budget_changed(self, eid: str, state: ExecutionState) -> None:
        """``eid``'s budget changed (raised, or handed down anew): hand what it has left
        down to its unfinished children, which may be suspended on what they inherited.

        Taken from ``state`` now, before anything else can change it. A crash before the
        children have it is made good at the next open (see :meth:`_rehand_budget`).
        """
        none = {"budget": {}, "origins": {}}
        grant = budget_grant(state) or none
        # Children of the current turn's delegate calls get their share (see budget_grant).
        shares = {step: budget_grant(state, step) or none for step in delegate_steps(state)}
        if self._tg is not None and self._open:
            self._tg.start_soon(self._hand_down_budget, eid, grant, shares)

    async def _hand_down_budget(
        self, parent: str, grant: Mapping[str, Any], shares: Mapping[int, Mapping[str, Any]]
    ) -> None:
        def payload(child: str) -> Mapping[str, Any]:
            return {**shares.get(_child_step(parent, child), grant), "parent": parent}

        await self._post_to_children(
            parent,
            "parent_budget",
            payload,
            "changed its budget, but handing it down to its children failed; they get it "
            "when a runtime next opens the data dir",
        )

    async def _rehand_budget(self, eid: str, meta: Mapping[str, Any]) -> None:
        """At open: a child suspended on a limit an ancestor handed down gets more if an
        ancestor now has more to hand (a raise whose hand-down a crash cut short)."""
        if meta.get("parent") and meta.get("reason") == "budget":
            await self._rehand_owed(eid)

    async def _rehand_owed(self, eid: str) -> None:
        """``eid`` is suspended on a limit it inherited: if a raise above it never came
        all the way down, hand it down again from where it stopped.

        A raise goes down one generation at a time, each hand-down posted once the one
        above has recorded its own; a crash can cut that chain at any generation, and a
        child that was not suspended on its budget then (running, or waiting for an
        approval) is not looked at by the next open. So this goes up from ``eid`` to
        the first execution whose parent can hand it more than it holds, and posts the
        parent's grant there: the usual hand-down takes it the rest of the way.
        """
        child = await load_state(self.log, eid)
        reason = child.suspend_reason or {}
        limit = str(reason.get("limit") or "")
        if child.status != "suspended" or reason.get("kind") != "budget" or not limit:
            return
        for _ in range(_MAX_ANCESTORS):
            if not child.parent or limit_origin(child, limit) == child.execution_id:
                return  # its own limit: nothing above holds it back
            now = getattr(child.inherited, limit, None) if child.inherited is not None else None
            if now is None:
                return
            parent_id = str(child.parent["execution_id"])
            parent = await load_state(self.log, parent_id)
            step = child.parent.get("step")
            grant = budget_grant(parent, step if isinstance(step, int) else None)
            if parent.status in TERMINAL or grant is None:
                return
            offered = grant["budget"].get(limit)
            if offered is None or offered > now:
                seq = await self._post(
                    child.execution_id, "parent_budget", {**grant, "parent": parent_id}, "runtime"
                )
                self._rehand_seq = max(self._rehand_seq, seq)
                return
            child = parent

    def _start_rehand(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Start a hand-down check (``_rebalance``, ``_rehand_if_owed``), counted from
        now, not from when its task first runs (see _rehands_settled)."""
        assert self._tg is not None
        self._rehands += 1
        self._tg.start_soon(self._rehanding, fn, *args)

    async def _rehanding(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        finally:
            self._rehands -= 1
            if not self._rehands:
                self._rehands_done.set()
                self._rehands_done = anyio.Event()

    async def _rehands_settled(self) -> None:
        """Wait until no hand-down check runs and the shares they posted are delivered
        (for perdure.testing: a child suspended on its share may be handed more)."""
        while self._rehands:
            await self._rehands_done.wait()
        if self._rehand_seq:
            await self._delivered(self._rehand_seq)

    async def _rebalance(self, children: Sequence[str]) -> None:
        """Children suspended on a share of their parent's budget get a new one: the
        parent settled on them (one of their siblings finished, say: what it left
        unused is shared by those still running; see budget_grant)."""
        for child in children:
            try:
                info = await self.log.stream_info(execution_stream(child))
            except Exception:
                # Checked again when it next suspends, or at the next open.
                log.exception("execution %s: could not read its index entry", child)
                continue
            meta = info.meta if info is not None else {}
            if meta.get("status") == "suspended" and meta.get("reason") == "budget":
                await self._rehand_if_owed(child)

    async def _rehand_if_owed(self, eid: str) -> None:
        """:meth:`_rehand_owed` for a child that just suspended on what it inherited."""
        try:
            await self._rehand_owed(eid)
        except Exception:
            log.exception(
                "execution %s: could not check whether a raise above it is owed to it; "
                "it is checked again when a runtime next opens the data dir",
                eid,
            )

    # -- recovery -----------------------------------------------------------------------------

    async def _recover_then_pump(self) -> None:
        try:
            self._publish_agents()
            await self._recover_at_open()
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:
            self._open_failed = exc
            log.exception(
                "the runtime could not finish opening %s; its calls now raise: close it, "
                "check the data dir with 'perdure health', then open it again",
                self.path or "its log",
            )
            raise
        finally:
            self._ready.set()

    async def _recover_at_open(self) -> None:
        # The inbox first: a signal sent while no runtime ran (a cancel above all) must
        # reach its execution before recovery lets that execution run again.
        assert self._root is not None
        await self._root.start_child(
            ChildSpec("inbox", lambda: InboxPump(self), restart="permanent", shutdown=1.0)
        )
        await self._backlog.wait()
        await self._recover()
        self._recovered.set()
        # Recovery scheduled the timers in the index (see _rewake_parents), after the
        # backlog: a timer signal already in the inbox was delivered by then.
        if self._tg is None:
            # Closed while recovery's last await returned: the close has cancelled this
            # task, and the cancellation only lands at its next checkpoint.
            return
        self._tg.start_soon(self._timers.run)
        # A signal that came in while recovery ran may have made an execution runnable
        # after recovery looked at it; its actor waits, idle, for this.
        for eid, actor in list(self._live.items()):
            state = actor.journal.state if actor.journal is not None else None
            idle = not actor.driving and not actor.stop_requested and actor.agent is not None
            held = eid in self._inbox_held
            if idle and not held and state is not None and state.status == "running":
                await self._resume_at_open(eid)

    # -- timers -------------------------------------------------------------------------------

    def _new_timers(self) -> TimerService:
        # The clock is looked up at each call: a test replaces _wall_clock after open.
        return TimerService(lambda: self._wall_clock(), self._fire_timers)

    async def _fire_timers(self, timers: Iterable[Timer]) -> list[Timer]:
        """Post the signal of each due timer whose execution still waits for it, in one
        append (thousands may be overdue at open); the ones that could not be posted."""
        records = []
        failed: list[Timer] = []
        for until, eid, name in timers:
            try:
                info = await self.log.stream_info(execution_stream(eid))
            except Exception:
                log.exception("execution %s: could not read its index entry to fire %r", eid, name)
                failed.append((until, eid, name))
                continue
            if name == DEADLINE:
                if info is None or info.meta.get("status") in _FINISHED:
                    continue
                if info.meta.get("deadline") != until:
                    continue  # purged, and spawned again under the same id
                cancel = SignalSent(eid, "cancel", {"reason": deadline_reason(until)}, DEADLINE)
                records.append((until, eid, name, encode(cancel)))
                continue
            # Dropped when the execution finished (a late signal would be ignored anyway),
            # was purged, runs (it is scheduled again if it suspends on the timer), or no
            # longer waits for this timer (fired early by hand).
            if info is None or info.meta.get("status") != "suspended":
                continue
            current = info.meta.get("timer")
            if not current or current[1] != name:
                continue
            if name.startswith(APPROVAL_TIMER):
                # The call is rejected as rt.reject would; a decision that came first
                # makes this signal.ignored on delivery (the timer checked above is only
                # as fresh as the index).
                cid = name[len(APPROVAL_TIMER) :]
                payload = {"confirmation_id": cid, "reason": APPROVAL_EXPIRED}
                signal = SignalSent(eid, "reject", payload, APPROVAL_TIMEOUT_BY)
            else:
                signal = SignalSent(eid, name, {"until": until}, "timer")
            records.append((until, eid, name, encode(signal)))
        if records:
            try:
                # As _post does, all at once: durable in the inbox, the execution resumes
                # by the ordinary signal path.
                await self.log.append(INBOX_STREAM, [r[3] for r in records], expect=ANY)
            except Exception:
                log.exception(
                    "could not post %d due timer signal(s) to the inbox; tried again shortly",
                    len(records),
                )
                failed += [r[:3] for r in records]
        return failed

    async def wait_recovered(self) -> None:
        """Wait until the work done at open has run: the signals sent while no runtime
        ran are delivered, interrupted executions are resumed (or queued), and parents
        whose children finished meanwhile are woken. ``open`` returns before that.

        Every call whose answer depends on an execution's state (``run``, ``wait``,
        ``result``, ``spawn`` of an existing id, ``executions``, the signals,
        ``stream``) waits for this by itself; it does not wait for the resumed
        executions to finish.
        """
        await self._caught_up()

    async def _recover(self) -> None:
        """At open: resume running and queued executions; re-wake parents of finished
        children; cancel the unfinished children of cancelled parents."""
        waiting: dict[str, list[str]] = {}
        found: list[tuple[float, str]] = []
        for status in ("running", "queued"):
            async for info in self.log.streams(prefix="exec/", where={"status": status}):
                eid = info.stream[len("exec/") :]
                agent = info.meta.get("agent", "")
                if info.meta.get("deadline") is not None:
                    self._timers.schedule(eid, info.meta["deadline"], DEADLINE)
                if await self._cancel_if_orphaned(eid, info.meta):
                    continue
                if agent in self._agents:
                    found.append((info.created_at, eid))
                else:
                    waiting.setdefault(agent, []).append(eid)
        for _, eid in sorted(found):
            # Not those already driven or queued (spawned again since open), nor those
            # whose signals wait for a retry: they start once those are delivered.
            actor = self._live.get(eid)
            if actor is not None and actor.driving:
                continue
            if eid not in self._queued and eid not in self._inbox_held:
                await self._resume_at_open(eid)
        for agent, ids in waiting.items():
            shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
            log.warning(
                "%d interrupted execution(s) of agent %r are left alone until it is "
                "registered (rt.register): %s",
                len(ids),
                agent,
                shown,
            )
        await self._rewake_parents()

    async def _resume_at_open(self, eid: str) -> None:
        try:
            await self._schedule(eid)
        except Exception:
            # One execution that cannot start must not stop the others from resuming.
            log.exception(
                "execution %s could not be resumed at open; it is left as it is: fix the "
                "cause, then 'perdure resume %s' or restart the runtime",
                eid,
                eid,
            )

    async def _rewake_parents(self) -> None:
        """Post the outcome of every finished child its suspended parent still waits for
        (and cancel suspended children of cancelled parents); schedule every suspended
        execution's timer.

        A child's outcome is posted to its parent after the child settles; a crash in
        between loses the post, so each open posts it again for every child a suspended
        parent still waits on (delivery ignores a repeat). Timers are read here, in the
        same listing, from the index alone (a fleet may have thousands asleep).
        """
        async for info in self.log.streams(prefix="exec/", where={"status": "suspended"}):
            parent = info.stream[len("exec/") :]
            timer = info.meta.get("timer")
            if timer:
                # Whatever happens below: a timer that no longer applies when due is
                # dropped then (see _fire_timers).
                self._timers.schedule(parent, timer[0], timer[1])
            if info.meta.get("deadline") is not None:
                self._timers.schedule(parent, info.meta["deadline"], DEADLINE)
            if await self._cancel_if_orphaned(parent, info.meta):
                continue  # a child whose own parent is gone: nothing to wake it for
            if parent in self._inbox_held:
                continue  # its signals wait for a retry; the child's outcome may be there
            await self._rehand_budget(parent, info.meta)
            children = info.meta.get("waiting_on")
            if children is None:
                if info.meta.get("reason") != "child":
                    continue
                # An index entry written before "waiting_on" existed: ask the state.
                children = _waiting_on((await load_state(self.log, parent)).suspend_reason)
            for child_id in children:
                child = await self.log.stream_info(execution_stream(child_id))
                if child is None or child.meta.get("status") not in _FINISHED:
                    continue
                payload = _outcome_payload(await load_state(self.log, child_id))
                await self._post(parent, f"child:{child_id}", payload, "runtime")

    async def _recover_agent(self, name: str) -> None:
        """An agent was registered on an open runtime: resume its interrupted executions."""
        await self._recovered.wait()  # the backlog first (see _recover_then_pump)
        found: list[tuple[float, str]] = []
        for status in ("running", "queued"):
            async for info in self.log.streams(
                prefix="exec/", where={"status": status, "agent": name}
            ):
                found.append((info.created_at, info.stream[len("exec/") :]))
        for _, eid in sorted(found):
            if self._undriven(eid) and eid not in self._queued and eid not in self._starting:
                await self._schedule(eid)

    # -- streaming ----------------------------------------------------------------------------

    def _sink_for(self, eid: str) -> Callable[[Any], None] | None:
        sinks = self._sinks.get(eid)
        if not sinks:
            return None
        if len(sinks) == 1:
            return sinks[0]

        def fan_out(item: Any) -> None:
            for sink in list(sinks):
                sink(item)

        return fan_out

    async def stream(
        self,
        agent: Agent | str,
        prompt: str,
        *,
        execution_id: str | None = None,
        budget: Budget | None = None,
        execution_timeout: float | datetime.timedelta | None = None,
    ) -> AsyncIterator[Any]:
        """Run an execution and yield what happens as it happens.

        Yields ``TextDelta`` / ``ToolCallDelta`` pieces of model output while it streams,
        a ``{"event": "step", ...}`` dict after each durable step, and finally the
        :class:`Result`. The completed message, not the pieces, is what is recorded, so
        a crash mid-stream re-runs only that model call; replaying a completed
        execution streams nothing and calls nothing.

        If a stream breaks after some of its pieces were yielded (a dropped connection),
        the model call is made again from the start, within the provider's retry
        policy (then, for a ``Fallback``, by its next member): a ``{"event": "retrying",
        "step": N, "attempt": A, "delay": S, "error": "..."}`` dict says so, and the
        pieces of step N yielded before it are void.
        Streaming an execution that is already running yields its pieces from its next
        model call on; several streams may read one execution, each getting everything
        from when it joined to the end. Like :meth:`run`, it first waits for the signals
        sent while no runtime ran (see :meth:`wait_recovered`).

        Closing the runtime (from another task) while the stream is read ends it at once
        with :class:`RuntimeClosedError` naming the execution, which stays durable and
        resumes at the next start.
        """
        self._require_open()
        eid = _check_id(execution_id) if execution_id is not None else uuid.uuid4().hex
        send, receive = anyio.create_memory_object_stream[Any](math.inf)
        sent = 0

        def sink(item: Any) -> None:
            nonlocal sent
            if item is _CLOSED:
                send.close()
                return
            sent += 1
            try:
                send.send_nowait(item)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
            if isinstance(item, Result):
                send.close()

        # The sink goes in first, so a settle from here on reaches it (recovery may
        # drive this execution while the backlog wait below is on); live or replay is
        # decided from the state BEFORE spawning: a fresh execution may well have
        # finished by the time spawn returns, and its deltas are waiting in the sink.
        self._sinks.setdefault(eid, []).append(sink)
        try:
            await self._caught_up()
            before = await self.log.stream_info(execution_stream(eid))
            await self.spawn(
                agent, prompt, execution_id=eid, budget=budget, execution_timeout=execution_timeout
            )
            settled = before is not None and before.meta.get("status") not in ("running", "queued")
            if settled and not sent:
                yield await self.result(eid)  # settled already: replay streams nothing
                return
            last: Any = None
            async with receive:
                async for last in receive:
                    yield last
            if not isinstance(last, Result):
                where = f"the data dir {self.path!r}" if self.path else "its log"
                raise RuntimeClosedError(
                    f"the Runtime was closed while execution {eid!r} was being streamed; "
                    f"the execution is durable and resumes at the next start of a Runtime "
                    f"on {where} (stream or wait for it there)"
                )
        finally:
            sinks = self._sinks.get(eid)
            if sinks is not None:
                sinks.remove(sink)
                if not sinks:
                    del self._sinks[eid]
            send.close()


#: Sent to each stream's sink when the runtime closes (see :meth:`Runtime.stream`).
_CLOSED = object()


def _child_key(execution_id: str) -> str:
    # Supervisor child ids are path segments; execution ids may contain "/".
    return quote(execution_id, safe="")


def _child_id(parent: str, step: int, variant: int) -> str:
    """The id of ``parent``'s child execution for the call at ``step`` (see _delegate)."""
    suffix = f"/{step}" if variant == 0 else f"/{step}~{variant}"
    if len(parent) + len(suffix) > _MAX_ID:
        return f"{parent[:200]}~{digest(parent)}{suffix}"
    return parent + suffix


def _child_step(parent: str, child: str) -> int | None:
    """The step of ``parent``'s call that ``child`` (an id from :func:`_child_id`) runs."""
    for prefix in _children_prefixes(parent):
        if child.startswith(prefix):
            step = child[len(prefix) :].split("~", 1)[0]
            return int(step) if step.isdigit() else None
    return None


def _children_prefixes(parent: str) -> tuple[str, ...]:
    """The id prefixes ``parent``'s children have: its own id, and the shortened form
    :func:`_child_id` gives children whose id would be too long."""
    own = parent + "/"
    if len(parent) <= 200:
        return (own,)  # "parent/<step>" fits in _MAX_ID for any step a run reaches
    return own, f"{parent[:200]}~{digest(parent)}/"


def _execution_id(child_key: str) -> str:
    return unquote(child_key)


def _outcome_payload(state: ExecutionState) -> dict[str, Any]:
    """What a finished child tells its parent (the signal ``child:<id>``).

    ``usage`` is what the child used, its own children's included: the parent is
    charged it when it takes the outcome.
    """
    payload = {
        "status": state.status,
        "output": state.output,
        "error": state.error,
        "usage": state.total_usage.to_dict(),
    }
    if state.status == "cancelled":
        # A cancel has no error: without its reason the parent's model hears nothing.
        payload["reason"] = state.cancel_reason or ""
    return payload


def _child_outcome(child: str, payload: Mapping[str, Any]) -> Any:
    status = payload.get("status")
    usage = payload.get("usage")  # absent in outcomes recorded before tree budgets
    if status == "completed":
        output = payload.get("output")
        return ChildCharge(output, child, usage) if isinstance(usage, Mapping) else output
    error = payload.get("error") or {}
    if status == "cancelled":
        why = payload.get("reason")
        detail = f"cancelled: {why}" if why else "cancelled (no reason given)"
    else:
        detail = f"{status}: {error.get('message', 'no detail')}"
    failure = ToolError(f"delegated execution {child!r} {detail}")
    if isinstance(usage, Mapping):
        failure.charge = ChildCharge(None, child, usage)  # type: ignore[attr-defined]
    raise failure


def _waiting_on(reason: Mapping[str, Any] | None) -> list[str]:
    """The child executions a suspension reason waits for."""
    if not reason:
        return []
    blockers = reason.get("pending") or (reason,)
    return [str(b["child_id"]) for b in blockers if b.get("kind") == "child" and b.get("child_id")]


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _note_partial_purge(exc: Exception, purged: list[str], failed: list[str]) -> None:
    """Say on ``exc`` (and in the log) what a purge deleted before it failed: the caller
    gets no return value, and those ids are gone."""
    note = (
        f"purge: deleted {len(purged)} of the executions it chose before this failure "
        f"({_clip_ids(purged)}); the {len(failed)} in the delete that failed are intact (each "
        f"delete is atomic): fix the cause and run the purge again to delete them"
    )
    exc.add_note(note)
    log.error("%s (%s: %s)", note, type(exc).__name__, exc)


def _clip_ids(ids: list[str], shown: int = 5) -> str:
    text = ", ".join(repr(i) for i in ids[:shown])
    return text + (f" and {len(ids) - shown} more" if len(ids) > shown else "")
