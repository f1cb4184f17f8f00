"""Agents: instructions, tools, a model, limits, contracts and sub-agents."""

from __future__ import annotations

import datetime
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from perdure.budget import Budget
from perdure.errors import AgentDefinitionError
from perdure.fingerprint import digest, short, short_json
from perdure.providers.types import Provider, ToolSpec
from perdure.state import DELEGATE_PREFIX
from perdure.timers import timeout_seconds
from perdure.tools import Tool

__all__ = ["Agent", "Contract", "ContractViolation", "DriftPolicy"]

DriftPolicy = Literal["suspend", "fail", "warn", "accept"]
_DRIFT_POLICIES = ("suspend", "fail", "warn", "accept")
_AGENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class ContractViolation(Exception):
    """Raise from a contract to block a tool call; the message is shown to the operator."""


Contract = Callable[[str, Mapping[str, Any]], Any]


class Agent:
    """An agent definition: what it is told, what it may call, and how it is held to account.

    - ``instructions``: the system prompt.
    - ``tools``: :class:`~perdure.tools.Tool` objects (``@tool``) or plain functions.
    - ``llm`` / ``model``: the provider and, optionally, the model to ask it for
      (default: the provider's own model).
    - ``max_steps``: the most LLM calls one execution may make; beyond it, it fails.
    - ``budget``: default spending limits for each execution (a spawn's own budget
      replaces it as a whole). Per execution: when this agent runs as a sub-agent, its
      child executions are held to this budget, and their spend is not the parent's.
    - ``drift``: what to do when an execution resumes under a changed definition:
      ``"suspend"`` (default: wait for an operator), ``"fail"``, ``"warn"`` (log and
      continue), ``"accept"`` (record and continue).
    - ``agents``: sub-agents this agent may delegate to; each becomes a tool
      ``delegate_to_<name>(task)`` whose call runs the sub-agent as a durable child
      execution while this one hibernates.
    - ``params``: sampling parameters passed to the provider (temperature, ...).
    - ``execution_timeout``: seconds (or a ``timedelta``) each execution may take, time
      queued or suspended included, before it is cancelled; a spawn may give its own
      (see :meth:`Runtime.spawn`). Default: none.
    - ``approval_timeout``: how long a call of any of its tools may wait for a person's
      decision (a confirmation, or a contract override) before it is rejected and the
      model told; a tool's own ``@tool(approval_timeout=...)`` takes precedence.
      Default: none (a decision is waited for for ever).
    """

    def __init__(
        self,
        name: str,
        instructions: str = "",
        tools: Iterable[Tool | Callable[..., Any]] = (),
        llm: Provider | None = None,
        model: str | None = None,
        *,
        max_steps: int = 50,
        budget: Budget | None = None,
        drift: DriftPolicy = "suspend",
        agents: Sequence[Agent] = (),
        params: Mapping[str, Any] | None = None,
        description: str | None = None,
        execution_timeout: float | datetime.timedelta | None = None,
        approval_timeout: float | datetime.timedelta | None = None,
    ) -> None:
        if not _AGENT_NAME.match(name):
            raise AgentDefinitionError(
                f"agent name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting "
                f"with a letter, digit or '_'"
            )
        if drift not in _DRIFT_POLICIES:
            raise AgentDefinitionError(
                f"agent {name!r}: drift policy must be one of {', '.join(_DRIFT_POLICIES)}, "
                f"got {drift!r}"
            )
        if max_steps < 1:
            raise AgentDefinitionError(f"agent {name!r}: max_steps must be >= 1")
        self.name = name
        self.instructions = instructions
        self.llm = llm
        self._model = model
        self.max_steps = max_steps
        self.budget = budget
        try:
            #: Default of ``Runtime.spawn(execution_timeout=...)``; not part of the
            #: definition (changing it is not drift: a deadline is fixed at spawn).
            self.execution_timeout = timeout_seconds(execution_timeout, "execution_timeout")
            #: For calls whose tool sets none; fixed per call when it starts to wait.
            self.approval_timeout = timeout_seconds(approval_timeout, "approval_timeout")
        except (TypeError, ValueError) as exc:
            raise AgentDefinitionError(f"agent {name!r}: {exc}") from None
        self.drift: DriftPolicy = drift
        self.params: dict[str, Any] = dict(params or {})
        self.description = description or (instructions.split("\n")[0][:200] or name)
        self.agents: tuple[Agent, ...] = tuple(agents)
        self.contracts: dict[str, Contract] = {}
        self.tools: dict[str, Tool] = {}
        for t in tools:
            self._add_tool(t if isinstance(t, Tool) else Tool(t))
        for sub in self.agents:
            self._add_tool(DelegateTool(sub))

    def _add_tool(self, t: Tool) -> None:
        if t.name.startswith(DELEGATE_PREFIX) and not isinstance(t, DelegateTool):
            # The runtime tells delegations apart by this prefix (a turn's budget is
            # shared among its delegate calls): a tool of the user's under it would
            # take a share of the children's budget.
            raise AgentDefinitionError(
                f"agent {self.name!r}: tool {t.name!r}: names starting with "
                f"{DELEGATE_PREFIX!r} are reserved for the tools that hand work to the "
                f"agents in agents=[...]; rename the tool"
            )
        if t.name in self.tools:
            raise AgentDefinitionError(f"agent {self.name!r}: two tools are named {t.name!r}")
        self.tools[t.name] = t

    def __repr__(self) -> str:
        return f"Agent({self.name!r})"

    @property
    def model(self) -> str:
        """The model requests ask for: the agent's own, else the provider's default."""
        if self._model:
            return self._model
        if self.llm is not None:
            return self.llm.model
        return ""

    def contract(self, name: str) -> Callable[[Contract], Contract]:
        """Register a check run before every tool call: ``fn(tool_name, arguments)``.

        A plain function (not ``async def``). Raise ``ContractViolation`` or return
        ``False`` to block the call (any other exception blocks it too, reported as a bug
        in the contract): the execution suspends with reason ``contract`` until an operator approves
        (an override, recorded with who and why) or rejects it (returned to the model).
        """
        if name in self.contracts:
            raise AgentDefinitionError(f"agent {self.name!r}: two contracts named {name!r}")

        def register(fn: Contract) -> Contract:
            if inspect.iscoroutinefunction(fn):
                # Called from the step that admits tool calls, which does not await: an
                # async contract's body would never run.
                raise AgentDefinitionError(
                    f"agent {self.name!r}: contract {name!r} is an async function; a "
                    f"contract must be a plain function (def, not async def)"
                )
            self.contracts[name] = fn
            return fn

        return register

    @functools.cached_property
    def tool_specs(self) -> tuple[ToolSpec, ...]:
        """What the model is told about the tools, in definition order."""
        return tuple(t.spec() for t in self.tools.values())

    def definition(self) -> dict[str, Any]:
        """The fingerprint recorded when an execution starts (and when drift is accepted).

        Digests of the instructions, model, parameters and every tool's description,
        schema and code, plus short texts (instructions, descriptions, schemas as JSON)
        so that a drift report can show before and after.
        """
        return {
            "instructions": digest(self.instructions),
            "instructions_text": short(self.instructions),
            "model": self.model,
            "params": digest(self.params),
            "params_text": short_json(self.params),
            "tools": {
                name: {
                    **t.fingerprint,
                    "description_text": short(t.description),
                    "schema_text": t.schema_text,
                }
                for name, t in self.tools.items()
            },
        }

    @functools.cached_property
    def request_fingerprint(self) -> str:
        """The digest every LLM request of this agent carries.

        It covers what the agent definition contributes to a request (instructions,
        model, tools, parameters); the conversation itself comes from the log, so it is
        the same on replay by construction and is not hashed (which would cost O(n) per
        step).
        """
        return digest(
            [self.instructions, self.model, [t.to_dict() for t in self.tool_specs], self.params]
        )


class DelegateTool(Tool):
    """A tool that runs a sub-agent as a durable child execution and returns its output."""

    __slots__ = ("agent",)

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        super().__init__(
            _delegate,
            name=f"{DELEGATE_PREFIX}{agent.name}"[:64],
            description=(
                f"Hand a task to the {agent.name!r} agent and get its answer. {agent.description}"
            ).strip(),
            parameters={
                "type": "object",
                "properties": {
                    "task": {"type": "string", "description": "What the agent should do."}
                },
                "required": ["task"],
                "additionalProperties": False,
            },
        )

    async def invoke(self, arguments: Mapping[str, Any], run_in_thread: Any = None) -> Any:
        """Start (or find) the child execution; suspend until it finishes."""
        from perdure.context import current_tool_context

        ctx = current_tool_context()
        return await ctx.services.delegate(ctx, self.agent, arguments["task"])


async def _delegate(task: str) -> str:
    """Placeholder body: the engine routes delegate calls to the runtime."""
    raise NotImplementedError
