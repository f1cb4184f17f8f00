"""The live path of one execution: call the model, gate and run tools, record everything.

The loop is ``plan(state)`` → act → record, until the plan says to stop. Every effect is
preceded by the record that allows it and followed by the record of its outcome:

- an LLM step appends the model's answer together with the start (``tool.started``,
  carrying the idempotency key) of every call it admits, in ONE batch;
- each tool call then appends its outcome (``tool.completed``) as soon as it finishes;
  concurrent siblings coalesce into shared appends.

So a durable tool step costs two ordered appends, and nothing here grows with the
length of the conversation: requests are built over the live message list without
copying it, and a request's fingerprint is computed once per agent definition.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import anyio

from perdure.agent import Agent, ContractViolation
from perdure.context import ChildCharge, SuspendExecution, ToolContext, _current
from perdure.drift import describe_changes, diff_definitions
from perdure.errors import ToolError
from perdure.events import (
    ApprovalRequested,
    DelegationCharged,
    DriftAccepted,
    DriftDetected,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionSuspended,
    LLMCompleted,
    SignalAwaited,
    ToolCompleted,
    ToolStarted,
)
from perdure.journal import Journal
from perdure.providers.errors import (
    MalformedResponseError,
    ProviderError,
    RetryableProviderError,
)
from perdure.providers.fallback import Fallback
from perdure.providers.retry import RetryPolicy
from perdure.providers.streams import MAX_ARGUMENT_DEPTH, closing
from perdure.providers.types import (
    LLMRequest,
    LLMResponse,
    Message,
    ResponseCompleted,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from perdure.state import Call, CallLLM, Fail, Idle, Run, Suspend, plan
from perdure.tools import Tool, closed_awaitable, fresh_arguments

__all__ = ["Conversation", "Engine", "EngineServices", "plain_value"]

log = logging.getLogger("perdure.engine")


class EngineServices(Protocol):
    """What the engine needs from the runtime around it."""

    def cost(self, model: str, response: LLMResponse) -> float | None:
        """Dollars for one response, or None if the model's price is unknown."""
        ...

    def step_done(self, state: Any, step: Mapping[str, Any]) -> None:
        """A step's outcome is durable (fires ``on_step`` callbacks)."""
        ...

    async def delegate(self, ctx: ToolContext, agent: Agent, task: str) -> Any:
        """Run ``agent`` on ``task`` as a child execution (see DelegateTool)."""
        ...

    async def run_in_thread(self, fn: Callable[[], Any]) -> Any:
        """Run a sync tool call in one of the runtime's worker threads."""
        ...

    def wall_clock(self) -> float:
        """The runtime's wall clock, seconds since the epoch (timers and expiries)."""
        ...


class Conversation(Sequence[Message]):
    """The messages of a request: the system message, then the live conversation.

    A view, not a copy: building a request is O(1) however long the conversation is.
    """

    __slots__ = ("_messages", "_system")

    def __init__(self, system: Message | None, messages: list[Message]) -> None:
        self._system = system
        self._messages = messages

    def __len__(self) -> int:
        return len(self._messages) + (self._system is not None)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self)[index]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(index)
        if self._system is not None:
            return self._system if index == 0 else self._messages[index - 1]
        return self._messages[index]

    def __iter__(self) -> Iterator[Message]:
        if self._system is not None:
            yield self._system
        yield from self._messages


#: How deeply a tool's result may nest. The log's CBOR decoder reads at most 400 levels,
#: and a result is read back inside its record and, later, inside the messages that
#: carry it; the same bound as a model's tool-call arguments keeps it far from that.
MAX_RESULT_DEPTH = MAX_ARGUMENT_DEPTH


def plain_value(value: Any, where: str = "result", depth: int = 0) -> Any:
    """``value`` as plain data the log can record (dataclasses and tuples converted).

    Raises TypeError naming the offending part when something cannot be recorded
    (including a value nested more than :data:`MAX_RESULT_DEPTH` containers deep).
    """
    if value is None or isinstance(value, str | int | float | bool | bytes):
        return value
    if depth >= MAX_RESULT_DEPTH:
        raise TypeError(
            f"{where}: nested more than {MAX_RESULT_DEPTH} containers deep, which the log "
            f"would not read back; return a flatter value (or a JSON string)"
        )
    depth += 1
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict key {k!r} is not a str")
            out[k] = plain_value(v, f"{where}.{k}", depth)
        return out
    if isinstance(value, list | tuple):
        return [plain_value(v, f"{where}[{i}]", depth) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_value(dataclasses.asdict(value), where, depth - 1)
    raise TypeError(
        f"{where}: a {type(value).__name__} cannot be recorded in the log; return str, "
        f"numbers, bools, None, lists, dicts or dataclasses of those"
    )


_NO_RESPONSE = object()


def _drifted_step(state: Any, changes: Sequence[Mapping[str, Any]]) -> tuple[int, str | None]:
    """The first step that would run under the changed definition, and its tool.

    An unfinished call of a changed tool (it would run, or run again, under the new
    code, description or schema); else the next model call, whose request no longer
    matches the recorded one.
    """
    changed = {c.get("tool") for c in changes if c.get("what") == "tool"}
    for call in state.calls:
        if call.status != "done" and call.tool in changed:
            return call.step, call.tool
    return state.step + 1, None


def _retry_policy(llm: Any) -> RetryPolicy | None:
    """The retry policy that bounds re-asking ``llm`` after a broken stream, if any."""
    policy = getattr(llm, "retry", None)
    if isinstance(policy, RetryPolicy):
        return policy
    for member in getattr(llm, "providers", ()):  # a Fallback: its primary's policy
        policy = getattr(member, "retry", None)
        if isinstance(policy, RetryPolicy):
            return policy
    return None


def _fallback_rest(llm: Any) -> Fallback | None:
    """The members of a Fallback after its first, as a chain; None if there are none."""
    if isinstance(llm, Fallback) and len(llm.providers) > 1:
        return Fallback(llm.providers[1:], name=llm.name)
    return None


def _kind(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": str(exc)}


StreamSink = Callable[[StreamEvent | dict[str, Any]], None]


class Engine:
    """Drives one execution from its journal until it finishes, suspends or is stopped."""

    def __init__(
        self,
        agent: Agent,
        journal: Journal,
        services: EngineServices,
        *,
        sink_for: Callable[[], StreamSink | None] = lambda: None,
    ) -> None:
        self.agent = agent
        self.journal = journal
        self.services = services
        # Looked up per LLM step and per event, never kept: a consumer may start
        # streaming an execution that is already running (recovery started it first).
        self.sink_for = sink_for
        self._system = Message("system", agent.instructions) if agent.instructions else None

    @property
    def state(self) -> Any:
        """The execution state (owned by the journal)."""
        return self.journal.state

    async def run(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Drive until ``plan`` says stop, or ``stopping()`` turns true between steps."""
        if not await self._check_drift():
            return
        state = self.journal.state
        while not stopping():
            action = plan(state)
            if isinstance(action, CallLLM):
                await self._llm_step()
            elif isinstance(action, Run):
                await self._run_calls(action)
            elif isinstance(action, Suspend):
                if state.status != "suspended" or state.suspend_reason != action.reason:
                    self.journal.stage(ExecutionSuspended(action.reason))
                    await self.journal.flush()
                return
            elif isinstance(action, Fail):
                self.journal.stage(
                    ExecutionFailed(
                        action.kind,
                        {"type": "MaxStepsExceeded", "message": action.message},
                        state.step,
                    )
                )
                await self.journal.flush()
                return
            elif isinstance(action, Idle):
                return

    # -- drift --------------------------------------------------------------------------

    async def _check_drift(self) -> bool:
        """Compare the recorded definition with the agent's; apply the policy."""
        state = self.journal.state
        current = self.agent.definition()
        if state.definition == current:
            return True
        changes = diff_definitions(state.definition, current)
        if not changes:
            return True
        if state.usage.llm_calls == 0 and not state.calls:
            # Nothing was recorded under the old definition yet: nothing to drift from.
            self.journal.stage(DriftAccepted(current, by="runtime"))
            await self.journal.flush()
            return True
        policy = self.agent.drift
        step, tool = _drifted_step(state, changes)
        summary = describe_changes(changes)
        if policy in ("accept", "warn"):
            if policy == "warn":
                log.warning(
                    "execution %s step %d: agent %r changed since its log was written (%s); "
                    "continuing under drift policy 'warn'",
                    state.execution_id,
                    step,
                    self.agent.name,
                    summary,
                )
            action = "accepted" if policy == "accept" else "warned"
            self.journal.stage(DriftDetected(step, changes, action))
            self.journal.stage(DriftAccepted(current, by=f"policy:{policy}"))
            await self.journal.flush()
            return True
        self.journal.stage(
            DriftDetected(step, changes, "failed" if policy == "fail" else "suspended")
        )
        where = f"step {step} (tool {tool!r})" if tool else f"step {step} (the next LLM call)"
        message = (
            f"execution {state.execution_id!r} {where}: agent {self.agent.name!r} changed "
            f"since its log was written: {summary}"
        )
        if policy == "fail":
            self.journal.stage(
                ExecutionFailed("drift", {"type": "DriftError", "message": message}, step)
            )
        else:
            reason = {"kind": "drift", "step": step, "changes": changes, "message": message}
            if tool:
                reason["tool"] = tool
            self.journal.stage(ExecutionSuspended(reason))
        await self.journal.flush()
        log.warning("%s; policy %r", message, policy)
        return False

    # -- the model ------------------------------------------------------------------------

    async def _llm_step(self) -> None:
        state = self.journal.state
        agent = self.agent
        request = LLMRequest(
            model=agent.model,
            messages=Conversation(self._system, state.messages),
            tools=agent.tool_specs,
            params=agent.params,
        )
        llm = agent.llm
        if llm is None:
            raise RuntimeError(f"agent {agent.name!r} has no llm")
        started = time.perf_counter()
        try:
            response = await self._ask(llm, request)
        except ProviderError as exc:
            await self._fail_llm(exc, getattr(exc, "provider", None) or llm.name)
            return
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            # A custom provider raising something else is still the provider's failure,
            # not an engine crash: surface it on the execution at once.
            await self._fail_llm(exc, getattr(llm, "name", "llm"))
            return
        latency_ms = (time.perf_counter() - started) * 1000.0
        step = state.step + 1
        cost = self.services.cost(response.model or request.model, response)
        self.journal.stage(
            LLMCompleted(step, response.to_dict(), agent.request_fingerprint, cost, latency_ms)
        )
        if not response.message.tool_calls:
            self.journal.stage(ExecutionCompleted(response.message.content))
            del request, response
            await self.journal.flush()
            self._step_done({"step": step, "kind": "llm", "final": True})
            return
        action = plan(state)
        to_run = self._admit(action.admit) if isinstance(action, Run) else []
        # Nothing below needs them: freed now, not parked with the append (a fleet's
        # garbage collector scans every object that waits).
        del request, response, action
        await self.journal.flush()
        self._step_done({"step": step, "kind": "llm", "tool_calls": len(state.calls)})
        await self._run_started(to_run)

    async def _ask(self, llm: Any, request: LLMRequest) -> LLMResponse:
        if self.sink_for() is None:
            return self._checked(llm, await llm.complete(request))
        # Someone is watching: stream. A stream cut after some of it was shown cannot
        # be resumed where it stopped, so the whole call is made again (the consumer is
        # told to discard what it saw), as often as the provider's retry policy allows.
        policy = _retry_policy(llm)
        attempt = 1
        while True:
            shown = False
            response: Any = _NO_RESPONSE
            bad: Any = _NO_RESPONSE
            try:
                async with closing(llm.stream(request)) as events:
                    async for event in events:
                        if isinstance(event, ResponseCompleted):
                            response = event.response
                        elif isinstance(event, TextDelta | ToolCallDelta):
                            shown = True
                            sink = self.sink_for()
                            if sink is not None:
                                sink(event)
                        else:
                            bad = event
                            break
            except RetryableProviderError as err:
                if policy is None or not shown:
                    raise  # nothing was shown: the provider's own retries were the retries
                failure = err
            else:
                if bad is not _NO_RESPONSE:
                    raise self._malformed(llm, f"its stream yielded {_kind(bad)}, not an event")
                if response is _NO_RESPONSE:
                    raise self._malformed(llm, "its stream ended without a ResponseCompleted")
                return self._checked(llm, response)
            delay = policy.delay_for(failure, attempt)
            state = self.journal.state
            if delay is None:
                # A chain's member that keeps breaking mid-stream has had its retries:
                # the next member serves, as it would for a call nobody watched (which
                # falls back inside Fallback.complete).
                rest = _fallback_rest(llm)
                if rest is None:
                    raise failure
                llm, policy, attempt, delay = rest, _retry_policy(rest), 1, 0.0
                log.warning(
                    "execution %s step %d: the stream kept breaking after part of the "
                    "answer was streamed (%s); handing the call to the next provider, %r",
                    state.execution_id,
                    state.step + 1,
                    failure,
                    getattr(rest.providers[0], "name", "?"),
                )
            else:
                attempt += 1
                log.info(
                    "execution %s step %d: the stream broke after part of the answer was "
                    "streamed (%s); asking again (attempt %d/%d) in %.2f s",
                    state.execution_id,
                    state.step + 1,
                    failure,
                    attempt,
                    policy.max_attempts,
                    delay,
                )
            sink = self.sink_for()
            if sink is not None:
                sink(
                    {
                        "event": "retrying",
                        "step": state.step + 1,
                        "attempt": attempt,
                        "delay": delay,
                        "error": str(failure),
                    }
                )
            if policy is not None:
                await policy.sleep(delay)

    def _checked(self, llm: Any, response: Any) -> LLMResponse:
        """``response`` if it is an LLMResponse the log can record, else a typed error.

        A custom provider's garbage must fail the execution here, where it is the
        provider's fault, not crash the engine further on (which would restart the
        actor and ask the provider again, once per restart).
        """
        if not isinstance(response, LLMResponse):
            raise self._malformed(llm, f"it returned {_kind(response)}, not an LLMResponse")
        message = response.message
        if not isinstance(message, Message) or not isinstance(message.content, str):
            raise self._malformed(llm, "its response's message is not a Message with text")
        for call in message.tool_calls:
            if not (
                isinstance(call, ToolCall)
                and isinstance(call.id, str)
                and isinstance(call.name, str)
                and isinstance(call.arguments, dict | str)
            ):
                raise self._malformed(llm, f"its response holds a bad tool call: {call!r:.200}")
        if not isinstance(response.usage, Usage) or not isinstance(response.model, str):
            raise self._malformed(llm, "its response's usage or model is of the wrong type")
        return response

    def _malformed(self, llm: Any, what: str) -> MalformedResponseError:
        state = self.journal.state
        name = getattr(llm, "name", None) or type(llm).__name__
        err = MalformedResponseError(
            f"execution {state.execution_id!r} step {state.step + 1}: {what}",
            provider=name,
            model=self.agent.model or getattr(llm, "model", "") or "",
        )
        err.hint = (
            "fix the provider: complete() must return a perdure.providers.LLMResponse and "
            "stream() yield TextDelta/ToolCallDelta then one ResponseCompleted; then "
            f"'perdure resume {state.execution_id}'"
        )
        return err

    async def _fail_llm(self, exc: BaseException, provider: str) -> None:
        state = self.journal.state
        if isinstance(exc, ProviderError) and not exc.provider:
            exc.provider = provider  # a custom provider's own error may not say whose
        error = _error(exc)
        # The provider layer knows nothing of executions: say here which one and where.
        where = f"execution {state.execution_id!r} step {state.step + 1}"
        if where not in error["message"]:
            error["message"] = f"{where}: {error['message']}"
        error["provider"] = provider
        for attr in ("model", "status"):
            value = getattr(exc, attr, None)
            if value is not None:
                error[attr] = value
        # The text, not the exception: a handler that keeps records (a MemoryHandler,
        # pytest's capture) would keep its traceback, and with it this whole engine.
        log.warning(
            "execution %s step %d: LLM call failed: %s",
            state.execution_id,
            state.step + 1,
            str(exc),
        )
        self.journal.stage(ExecutionFailed("llm", error, state.step + 1))
        await self.journal.flush()

    # -- tools --------------------------------------------------------------------------

    def _admit(self, calls: Sequence[Call]) -> list[Call]:
        """Run the gates on calls that never started; stage their records.

        Gates, in order: the tool exists; the arguments fit its schema; every contract
        passes (else ``contract`` approval); the tool needs no confirmation (else
        ``approval``). Calls that pass get ``tool.started`` and are returned to be run.
        """
        agent = self.agent
        to_run: list[Call] = []
        for call in calls:
            tool = agent.tools.get(call.tool)
            if tool is None:
                known = ", ".join(agent.tools) or "none"
                self._unknown_tool(call, f"there is no tool named {call.tool!r}; tools: {known}")
                continue
            if call.status == "planned":
                try:
                    arguments = tool.check_arguments(call.arguments)
                except ToolError as exc:
                    self.journal.stage(ToolCompleted(call.step, "error", error=_error(exc)))
                    continue
                blocked = self._contract_block(tool, arguments)
                if blocked is not None:
                    name, message = blocked
                    self.journal.stage(
                        ApprovalRequested(
                            call.step,
                            _confirmation_id(),
                            tool.name,
                            arguments,
                            "contract",
                            contract=name,
                            message=message,
                            expires=self._approval_expiry(tool),
                        )
                    )
                    continue
                why = tool.confirmation_needed(arguments)
                if why is not None:
                    self.journal.stage(
                        ApprovalRequested(
                            call.step,
                            _confirmation_id(),
                            tool.name,
                            arguments,
                            "approval",
                            message=why,
                            expires=self._approval_expiry(tool),
                        )
                    )
                    continue
            self._stage_start(call, tool, attempt=1)
            to_run.append(call)
        return to_run

    def _approval_expiry(self, tool: Tool) -> float | None:
        """When a call of ``tool`` that starts to wait for a decision now is rejected."""
        timeout = tool.approval_timeout
        if timeout is None:
            timeout = self.agent.approval_timeout
        if timeout is None:
            return None
        return self.services.wall_clock() + timeout

    def _unknown_tool(self, call: Call, message: str) -> None:
        """Record that ``call`` names no tool of the agent (the model is told)."""
        error = {"type": "UnknownTool", "message": message}
        self.journal.stage(ToolCompleted(call.step, "error", error=error))

    def _contract_block(self, tool: Tool, arguments: Mapping[str, Any]) -> tuple[str, str] | None:
        for name, check in self.agent.contracts.items():
            try:
                # A copy: the arguments are recorded, a contract must not change them.
                verdict = check(tool.name, dict(fresh_arguments(arguments)))
            except ContractViolation as exc:
                return name, str(exc) or f"contract {name!r} refused the call"
            except Exception as exc:
                # A bug in the contract, not a verdict: the call is still blocked (a
                # check that cannot run must not let the call through), and the operator
                # is told it is the contract that broke.
                return name, (
                    f"contract {name!r} raised {type(exc).__name__}: {exc} (a bug in the "
                    f"contract, not a violation; fix it, then approve or reject this call)"
                )
            if closed_awaitable(verdict):
                return name, (
                    f"contract {name!r} returned an awaitable; contracts are plain functions "
                    f"(def, not async def), so its check did not run"
                )
            if verdict is False:
                return name, f"contract {name!r} refused the call"
        return None

    def _stage_start(self, call: Call, tool: Tool, attempt: int) -> None:
        state = self.journal.state
        key = call.key or f"{state.execution_id}:{call.step}:{state.run_id}"
        self.journal.stage(
            ToolStarted(
                step=call.step,
                turn=call.turn,
                index=call.index,
                call_id=call.call_id,
                tool=call.tool,
                arguments=call.arguments,
                key=key,
                fingerprint=tool.fingerprint_digest,
                idempotent=tool.idempotent,
                attempt=attempt,
            )
        )

    async def _run_calls(self, action: Run) -> None:
        to_run = self._admit(action.admit)
        for call in action.rerun:
            tool = self.agent.tools.get(call.tool)
            if tool is None:
                # It started and has no outcome: the model must not take "no such
                # tool" to mean that nothing happened.
                self._unknown_tool(
                    call,
                    f"tool {call.tool!r} no longer exists in agent {self.agent.name!r}; "
                    f"its call was interrupted after it started (idempotency key "
                    f"{call.key}), so it may have taken effect",
                )
                continue
            self._stage_start(call, tool, attempt=call.attempts + 1)
            to_run.append(call)
        await self.journal.flush()
        await self._run_started(to_run)

    async def _run_started(self, calls: list[Call]) -> None:
        if not calls:
            return
        if len(calls) == 1:
            await self._run_one(calls[0])
            return
        # Each call is its own durable step keyed by its position; one failing never
        # cancels its siblings (every error is caught and recorded in _run_one).
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(self._run_one, call)

    async def _run_one(self, call: Call) -> None:
        # The call runs in a frame of its own, gone before the outcome's append is
        # awaited: what only the call needed (its context, the context-variable token)
        # is then freed, not parked with the append (a fleet's garbage collector scans
        # every object that waits).
        outcome = await self._call(call)
        if outcome is None:
            return  # it waits for a signal (recorded)
        status, output, error, latency_ms, charge = outcome
        if charge is not None:
            # In the outcome's batch: charged with the child's result, exactly once.
            self.journal.stage(DelegationCharged(call.step, charge.child, dict(charge.usage)))
        self.journal.stage(ToolCompleted(call.step, status, output, error, latency_ms))
        await self.journal.flush()
        self._step_done({"step": call.step, "kind": "tool", "tool": call.tool, "status": status})

    async def _call(
        self, call: Call
    ) -> tuple[str, Any, dict[str, Any] | None, float, ChildCharge | None] | None:
        """Run one tool call: its status, output, error, latency and, for a delegation,
        what the child used (None: it waits)."""
        state = self.journal.state
        tool = self.agent.tools[call.tool]
        ctx = ToolContext(
            execution_id=state.execution_id,
            step=call.step,
            tool=call.tool,
            idempotency_key=call.key or "",
            attempt=call.attempts,
            signals=state.signals,
            services=self.services,
        )
        token = _current.set(ctx)
        started = time.perf_counter()
        status, output, error = "ok", None, None
        charge: ChildCharge | None = None
        try:
            value = await self._invoke(tool, call.arguments)
            if type(value) is ChildCharge:
                charge, value = value, value.value
            output = plain_value(value)  # on a TypeError the output stays None
        except SuspendExecution as suspend:
            self.journal.stage(
                SignalAwaited(
                    call.step, suspend.kind, suspend.detail.get("name", ""), suspend.detail
                )
            )
            await self.journal.flush()
            return None
        except anyio.get_cancelled_exc_class():
            raise
        except TimeoutError:
            status, error = (
                "error",
                {
                    "type": "TimeoutError",
                    "message": f"tool {tool.name!r} did not finish within {tool.timeout}s",
                },
            )
        except Exception as exc:
            status, error = "error", _error(exc)
            found = getattr(exc, "charge", None)
            charge = found if type(found) is ChildCharge else None
        except SystemExit as exc:
            # A tool calling sys.exit() (a CLI's main() wrapped as a tool, say) failed;
            # it must not stop the runtime or cancel its siblings. KeyboardInterrupt is
            # left alone: it is the person at the terminal stopping the process (the call
            # is then in doubt, as after any crash).
            status, error = (
                "error",
                {
                    "type": "SystemExit",
                    "message": f"tool {tool.name!r} called sys.exit({exc.code!r}); a tool "
                    f"should return a result or raise an exception",
                },
            )
        finally:
            _current.reset(token)
        return status, output, error, (time.perf_counter() - started) * 1000.0, charge

    async def _invoke(self, tool: Tool, arguments: Any) -> Any:
        attempts = tool.retries + 1
        delay = tool.retry_delay
        ctx = _current.get()
        for attempt in range(1, attempts + 1):
            if ctx is not None:
                # Each attempt asks for its timers afresh: the same names every time.
                ctx.timers[0] = 0
            try:
                run_in_thread = self.services.run_in_thread
                if tool.timeout is None:
                    return await tool.invoke(arguments, run_in_thread)
                with anyio.fail_after(tool.timeout):
                    return await tool.invoke(arguments, run_in_thread)
            except (ToolError, anyio.get_cancelled_exc_class(), SuspendExecution):
                raise
            except Exception:
                if attempt == attempts:
                    raise
            await anyio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _step_done(self, step: Mapping[str, Any]) -> None:
        self.services.step_done(self.journal.state, step)
        sink = self.sink_for()
        if sink is not None:
            sink({"event": "step", **step})


def _confirmation_id() -> str:
    return "c-" + secrets.token_hex(4)
