"""Crash an agent in your own tests and check that it comes back exactly.

``check_crash_replay(make_agent, prompt, crash_after=[3, 7])`` runs the agent once to the
end (the reference), then runs it again on a fresh in-memory log, crashing the runtime
right after the 3rd durable step, resuming it in a new runtime, crashing after 7 more,
and resuming it to the end. It reports whether the final transcripts are equal and how
many times every tool call actually ran, by idempotency key. With hypothesis::

    from hypothesis import given
    from perdure.testing import check_crash_replay, crash_points

    @given(crash_points(max_step=12))
    def test_my_agent_survives_crashes(points):
        check = anyio.run(check_crash_replay, make_agent, "Book a table", points)
        check.assert_ok()

A crash here is the runtime being torn down mid-flight in-process (every task cancelled
at once, the log kept): what was appended stays, what was not is lost, exactly the
durability boundary a SIGKILL draws. perdure's own suite also kills real processes; this
helper is the fast, in-process version for your agents. ``make_agent`` must build the
same agent each time, with a deterministic model (``Scripted``, or recorded answers);
it is called again for every lifetime, as a restarted process builds its agents anew.
The log ends exactly after the chosen step, on either event loop. When the crashed run
differs, the agent is run once more without a crash, to tell an agent that is not
deterministic at all from one a restart changes.

What it does not explore: the interleavings of executions that could run at once. A
crash point counts steps across the whole delegation tree, so for it to name the same
place on every run the helper runs one execution at a time (``max_concurrency=1``), and
children delegated in the same turn are started in call order: each runs to its end
before the next begins. Your agent's concurrent children are so checked in one order
(the first call's child first), never racing each other; a bug that needs them to race
is not found here (perdure's own suite kills real processes running them at once).
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from perdure.agent import Agent, DelegateTool
from perdure.context import current_idempotency_key
from perdure.events import execution_stream, record_types
from perdure.journal import load_state
from perdure.log import MemoryLog
from perdure.result import Result
from perdure.runtime import Runtime
from perdure.tools import Tool

__all__ = ["ReplayCheck", "check_crash_replay", "crash_points"]


@dataclass(slots=True)
class ReplayCheck:
    """What one crash-and-replay run found."""

    crash_after: list[int]
    reference: Result
    crashed: Result
    #: idempotency key -> how many times the tool body ran (in the crashed run)
    invocations: dict[str, int] = field(default_factory=dict)
    #: idempotency key -> how many attempts the log recorded (``tool.started``)
    attempts: dict[str, int] = field(default_factory=dict)
    crashes_happened: int = 0
    #: a second run with no crash, made only when the crashed run differs: tells an
    #: agent that is not deterministic from one that a restart changes
    control: Result | None = None

    @property
    def same_transcript(self) -> bool:
        """True if the crashed run ended with the reference's status and transcript."""
        return _same(self.reference, self.crashed)

    @property
    def problems(self) -> list[str]:
        """Every way the crashed run differs from what exactly-once promises."""
        out: list[str] = []
        control = self.control
        if control is not None and not _same(self.reference, control):
            out.append(
                "the agent is not deterministic: two runs with no crash at all differ"
                + _first_difference(self.reference.transcript, control.transcript)
                + ". A tool or the model answers from something outside the conversation "
                "(the time, randomness, state kept between runs); this check can only "
                "judge an agent that answers the same to the same conversation"
            )
        elif self._in_doubt() is not None:
            reason = self._in_doubt()
            assert reason is not None
            out.append(
                f"the crashed run suspended with reason unknown_outcome: step "
                f"{reason.get('step')}, tool {reason.get('tool')!r} (idempotent=False), "
                f"was interrupted after it started, so nobody knows if it took effect; "
                f"the runtime leaves that to a person (rt.resolve). If the tool honours "
                f"current_idempotency_key(), declare it idempotent; else this is the "
                f"crash your runbook must cover"
            )
        elif not self.same_transcript:
            out.append(
                f"final state differs: reference {self.reference.status} "
                f"{_clip(self.reference.output)!r}, crashed {self.crashed.status} "
                f"{_clip(self.crashed.output)!r}"
                + _first_difference(self.reference.transcript, self.crashed.transcript)
                + (
                    ". Runs without a crash agree, so a restart changed something: state "
                    "the agent keeps in memory (a counter, a cache, the model's own count "
                    "of its calls) that a new process starts without, or a replay bug"
                    if control is not None
                    else ""
                )
            )
        for key, count in sorted(self.invocations.items()):
            recorded = self.attempts.get(key, 0)
            if recorded == 0:
                out.append(f"tool call {key} ran {count}x but the log never started it")
            elif recorded == 1 and count > 1:
                out.append(f"tool call {key} ran {count}x though it was never interrupted")
            elif count > recorded:
                out.append(f"tool call {key} ran {count}x but only {recorded} attempts began")
        return out

    def _in_doubt(self) -> Any:
        """The crashed run's unknown_outcome suspension, if that is how it ended."""
        reason = self.crashed.suspend_reason
        if self.reference.is_suspended or reason is None or reason.kind != "unknown_outcome":
            return None
        return reason.details

    def assert_ok(self) -> None:
        """Raise AssertionError listing every problem, if there is any."""
        problems = self.problems
        if problems:
            raise AssertionError(
                f"crash/replay check with crashes after steps {self.crash_after} failed:\n- "
                + "\n- ".join(problems)
            )


def crash_points(max_step: int = 20, max_crashes: int = 3) -> Any:
    """A hypothesis strategy: up to ``max_crashes`` step counts in ``1..max_step``.

    A point past the end of the execution crashes nothing (that lifetime finishes the
    run); :attr:`ReplayCheck.crashes_happened` says how many crashes really happened.
    """
    from hypothesis import strategies as st

    return st.lists(st.integers(1, max_step), min_size=1, max_size=max_crashes)


class _Counting:
    """Counts tool-body runs by idempotency key, around an agent's own tools."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def agent(self, agent: Agent) -> Agent:
        clone = Agent(
            agent.name,
            agent.instructions,
            tools=[self._tool(t) for t in agent.tools.values() if not isinstance(t, DelegateTool)],
            llm=agent.llm,
            model=agent._model,
            max_steps=agent.max_steps,
            budget=agent.budget,
            drift=agent.drift,
            agents=[self.agent(a) for a in agent.agents],
            params=agent.params,
            description=agent.description,
            execution_timeout=agent.execution_timeout,
            approval_timeout=agent.approval_timeout,
        )
        clone.contracts.update(agent.contracts)
        return clone

    def _tool(self, t: Tool) -> Tool:
        fn = t.fn
        counts = self.counts
        if inspect.iscoroutinefunction(inspect.unwrap(fn)):

            @functools.wraps(fn)
            async def counted(**kwargs: Any) -> Any:
                counts[current_idempotency_key()] += 1
                return await fn(**kwargs)
        else:

            @functools.wraps(fn)
            def counted(**kwargs: Any) -> Any:  # type: ignore[misc]
                counts[current_idempotency_key()] += 1
                return fn(**kwargs)

        # functools.wraps keeps __wrapped__, so the code fingerprint is the tool's own.
        return Tool(
            counted,
            name=t.name,
            description=t.description,
            requires_confirmation=t.requires_confirmation,
            idempotent=t.idempotent,
            timeout=t.timeout,
            retries=t.retries,
            retry_delay=t.retry_delay,
            parameters=t.parameters,
            approval_timeout=t.approval_timeout,
        )


class _Turnstile:
    """One agent's delegate calls of a turn spawn their children in call order.

    Within one process lifetime: each call waits until the delegate calls before it in
    its turn (those running now, i.e. started and not finished) have started or found
    their child. With one execution running at a time, the children then run in that
    order, whatever order the event loop (trio shuffles) runs the calls' tasks in.
    """

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self._passed: dict[tuple[str, int, int], anyio.Event] = {}

    def passed(self, eid: str, step: int, attempt: int) -> anyio.Event:
        return self._passed.setdefault((eid, step, attempt), anyio.Event())


class _InOrder(DelegateTool):
    """A delegate tool that waits its turn (see :class:`_Turnstile`) before delegating."""

    __slots__ = ("_turnstile",)

    def __init__(self, agent: Agent, turnstile: _Turnstile) -> None:
        super().__init__(agent)
        self._turnstile = turnstile

    async def invoke(self, arguments: Any, run_in_thread: Any = None) -> Any:
        """Wait for the earlier delegate calls of this turn, then delegate."""
        from perdure.context import current_tool_context

        ctx = current_tool_context()
        turnstile = self._turnstile
        for call in _running_calls(ctx):
            if call.step < ctx.step and call.tool in turnstile.names:
                await turnstile.passed(ctx.execution_id, call.step, call.attempts).wait()
        try:
            return await super().invoke(arguments, run_in_thread)
        finally:
            turnstile.passed(ctx.execution_id, ctx.step, ctx.attempt).set()


def _running_calls(ctx: Any) -> list[Any]:
    """The calling execution's tool calls that are running now (its live state)."""
    runtime = getattr(ctx.services, "_rt", None)
    actor = runtime._live.get(ctx.execution_id) if runtime is not None else None
    journal = actor.journal if actor is not None else None
    if journal is None:
        return []
    return [c for c in journal.state.calls if c.status == "started"]


def _fresh(agent: Agent) -> Agent:
    """A prepared copy of ``agent`` (the user's own object is left as it is)."""
    return _prepared(_Counting().agent(agent))


def _prepared(agent: Agent) -> Agent:
    """``agent`` (and its sub-agents, at any depth) delegating in call order."""
    for sub in agent.agents:
        _prepared(sub)
    names = frozenset(n for n, t in agent.tools.items() if isinstance(t, DelegateTool))
    if names:
        turnstile = _Turnstile(names)
        for name in names:
            tool = agent.tools[name]
            assert isinstance(tool, DelegateTool)
            agent.tools[name] = _InOrder(tool.agent, turnstile)
    return agent


async def check_crash_replay(
    make_agent: Callable[[], Agent],
    prompt: str,
    crash_after: Sequence[int] = (),
    *,
    execution_id: str = "replay-check",
    approve: bool = False,
) -> ReplayCheck:
    """Run the reference, then the crashed-and-resumed run; return what they showed.

    ``crash_after[i]`` counts durable steps (each model answer, each tool outcome)
    within the i-th process lifetime, the steps of delegated child executions included.
    With ``approve=True`` pending confirmations are approved as they appear, in the
    execution or any descendant, so agents with ``requires_confirmation`` tools run to
    the end; otherwise a suspension ends the run (and is compared like any final state).
    A suspension on a delegated child is waited through; the child's tool calls are
    counted against the ``tool.started`` attempts in the child's own log. A delegate
    call invoked again when its child's outcome wakes the parent is not a re-run: it is
    not counted as one.
    """
    reference = await _run(
        _fresh(make_agent()), prompt, execution_id, None, approve, _KillableLog(record_types())
    )
    log = _KillableLog(record_types())
    counting = _Counting()
    crashes = 0
    # Each lifetime builds the agent anew, as a restarted process does: what an agent
    # keeps in memory (a model counting its calls) is lost at a crash here too.
    for steps in crash_after:
        agent = _prepared(counting.agent(make_agent()))
        if await _run(agent, prompt, execution_id, steps, approve, log) is None:
            crashes += 1
    agent = _prepared(counting.agent(make_agent()))
    final = await _run(agent, prompt, execution_id, None, approve, log)
    assert final is not None
    attempts: dict[str, int] = {}
    # Delegated children log their own tool calls, in streams below the execution's.
    streams = [execution_stream(execution_id)]
    async for info in log.streams(prefix=execution_stream(execution_id) + "/"):
        streams.append(info.stream)
    for stream in streams:
        async for record in log.read(stream):
            if record.type == "tool.started":
                attempts[record.payload["key"]] = record.payload["attempt"]
    state = await load_state(log, execution_id)
    check = ReplayCheck(
        crash_after=list(crash_after),
        reference=reference,  # type: ignore[arg-type]
        crashed=Result.from_state(state),
        invocations=dict(counting.counts),
        attempts=attempts,
        crashes_happened=crashes,
    )
    if not check.same_transcript:
        check.control = await _run(
            _fresh(make_agent()),
            prompt,
            execution_id,
            None,
            approve,
            _KillableLog(record_types()),
        )
    return check


class _KillableLog(MemoryLog):
    """A memory log a simulated SIGKILL cuts: nothing is appended once ``killed``.

    Tearing the runtime down takes a few scheduling rounds, in which the execution
    would go on writing steps; a crash point would then land a step or two late, at a
    different place from run to run (and from asyncio to trio), and hypothesis would
    call a failing example flaky. The writes wait instead, until the teardown cancels
    them: the log ends exactly after the chosen step, as a killed process's would.
    """

    killed = False

    async def append(self, *args: Any, **kwargs: Any) -> int:
        """See :meth:`MemoryLog.append`; waits for ever once killed."""
        if self.killed:
            await anyio.sleep_forever()
        return await super().append(*args, **kwargs)

    async def set_meta(self, *args: Any, **kwargs: Any) -> None:
        """See :meth:`MemoryLog.set_meta`; waits for ever once killed."""
        if self.killed:
            await anyio.sleep_forever()
        await super().set_meta(*args, **kwargs)

    async def trim(self, *args: Any, **kwargs: Any) -> int:
        """See :meth:`MemoryLog.trim`; waits for ever once killed."""
        if self.killed:
            await anyio.sleep_forever()
        return await super().trim(*args, **kwargs)


async def _run(
    agent: Agent,
    prompt: str,
    execution_id: str,
    crash_after: int | None,
    approve: bool,
    log: _KillableLog,
) -> Result | None:
    """One process lifetime; None if it was crashed before the execution settled."""
    outcome: Result | None = None
    log.killed = False
    with anyio.CancelScope() as crash:
        # One execution at a time: see the module docstring.
        async with Runtime(
            None, log=log, agents=[agent], shutdown_timeout=0.0, max_concurrency=1
        ) as rt:
            steps = 0

            @rt.on_step
            def count(eid: str, step: Any) -> None:
                nonlocal steps
                steps += 1
                if crash_after is not None and steps >= crash_after:
                    log.killed = True  # at once: this step is the last one written
                    crash.cancel()

            settles = _Settles(rt)
            await rt.spawn(agent, prompt, execution_id=execution_id)
            outcome = await _drive(rt, execution_id, approve, settles, set())
    return None if crash.cancelled_caught else outcome


class _Settles:
    """Counts each execution's settles (complete, suspend, fail, cancel) in a runtime.

    A parent whose children have all finished is woken by their outcomes, through the
    inbox, a moment later; :meth:`after` waits for that next settle without polling.
    """

    def __init__(self, rt: Runtime) -> None:
        self.counts: Counter[str] = Counter()
        self._changed = anyio.Event()
        for register in (rt.on_complete, rt.on_suspend, rt.on_fail, rt.on_cancel):
            register(self._settled)

    def _settled(self, result: Result, *_: Any) -> None:
        self.counts[result.execution_id] += 1
        self._changed.set()
        self._changed = anyio.Event()

    async def after(self, eid: str, seen: int) -> None:
        """Return once ``eid`` has settled more than ``seen`` times."""
        while self.counts[eid] <= seen:
            await self._changed.wait()


async def _drive(
    rt: Runtime, eid: str, approve: bool, settles: _Settles, approved: set[str]
) -> Result:
    """Wait until ``eid`` is finished, or suspended on something this helper won't decide.

    A suspension on delegated children is not an end: the children are driven the same
    way (their confirmations approved, with ``approve``), and once they have finished
    the parent, woken by their outcomes, is waited for again.
    """
    while True:
        # Read before the status: a settle after the read below is then never missed.
        seen = settles.counts[eid]
        result = await rt.wait(eid)
        reason = result.suspend_reason
        if not result.is_suspended or reason is None:
            return result
        progress = in_flight = stuck = False
        held: list[tuple[str, Result]] = []  # the suspended children, as they were
        for blocker in reason.pending:
            cid = blocker.get("confirmation_id")
            child = blocker.get("child_id") if blocker.get("kind") == "child" else None
            if approve and cid:
                if cid in approved:
                    in_flight = True  # approved; the execution is taking it
                else:
                    approved.add(cid)
                    await rt.approve(eid, cid, by="perdure.testing")
                    progress = True
            elif child:
                done = await _drive(rt, str(child), approve, settles, approved)
                if done.is_suspended:
                    stuck = True
                    held.append((str(child), done))
                else:
                    in_flight = True  # its outcome is on its way to the parent
            else:
                stuck = True
        if progress:
            continue
        if in_flight:
            # First the finished children's outcomes: taking one may hand what that
            # child left of a shared budget to a sibling suspended on its share.
            await settles.after(eid, seen)
            continue
        if stuck:
            await rt._rehands_settled()
            for child, before in held:
                now = await rt.result(child)
                if (now.status, now.suspend_reason) != (before.status, before.suspend_reason):
                    break  # handed more of its parent's budget: it runs again
            else:
                # What this helper cannot decide (a signal, a budget, an unknown outcome)
                # ends the run, as a suspension does without children.
                return await rt.result(eid)


def _same(a: Result, b: Result) -> bool:
    return a.status == b.status and a.transcript == b.transcript and a.output == b.output


def _clip(text: str | None, n: int = 60) -> str | None:
    if text is None or len(text) <= n:
        return text
    return text[: n - 3] + "..."


def _first_difference(a: Sequence[Any], b: Sequence[Any]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"; first difference at message {i}: {x!r} != {y!r}"
    if len(a) != len(b):
        return f"; transcripts have {len(a)} and {len(b)} messages"
    return ""
