"""Drift: what changed in an agent since an execution's log was written.

``diff_definitions`` compares a recorded definition (``Agent.definition()`` as it was
when the execution started, or when drift was last accepted) with the current one and
names every change: instructions, model, parameters, and per tool its description,
schema or code, or its addition or removal. Short values are shown before and after.

``Replayer`` is the check a team runs before deploying (Temporal's replayer is the
model): it replays recorded histories against the current agent definitions without
calling any model or tool and reports every step whose fingerprint no longer matches,
and every recorded tool call whose arguments the current schema would refuse.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from perdure.agent import Agent
from perdure.errors import ToolArgumentsError
from perdure.events import (
    DriftAccepted,
    Event,
    ExecutionStarted,
    LLMCompleted,
    ToolStarted,
)
from perdure.state import ExecutionState, apply

__all__ = ["ReplayReport", "Replayer", "describe_changes", "diff_definitions"]


def diff_definitions(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every difference between two ``Agent.definition()`` dicts, as report items."""
    changes: list[dict[str, Any]] = []
    if before.get("instructions") != after.get("instructions"):
        changes.append(
            {
                "what": "instructions",
                "before": before.get("instructions_text") or before.get("instructions"),
                "after": after.get("instructions_text") or after.get("instructions"),
            }
        )
    if before.get("model") != after.get("model"):
        changes.append(
            {"what": "model", "before": before.get("model"), "after": after.get("model")}
        )
    if before.get("params") != after.get("params"):
        # The parameters as JSON when short (recorded since params_text exists), else
        # their digests.
        changes.append(
            {
                "what": "params",
                "before": before.get("params_text") or before.get("params"),
                "after": after.get("params_text") or after.get("params"),
            }
        )
    old_tools: Mapping[str, Any] = before.get("tools", {})
    new_tools: Mapping[str, Any] = after.get("tools", {})
    for name in old_tools:
        if name not in new_tools:
            changes.append({"what": "tool", "tool": name, "field": "removed"})
    for name, new in new_tools.items():
        old = old_tools.get(name)
        if old is None:
            changes.append({"what": "tool", "tool": name, "field": "added"})
            continue
        for key in ("description", "schema", "code"):
            if old.get(key) != new.get(key):
                item: dict[str, Any] = {"what": "tool", "tool": name, "field": key}
                if key in ("description", "schema"):
                    # The text (a schema as JSON) when it was short enough to keep,
                    # else the digest.
                    item["before"] = old.get(f"{key}_text") or old.get(key)
                    item["after"] = new.get(f"{key}_text") or new.get(key)
                else:
                    item["before"] = old.get(key)
                    item["after"] = new.get(key)
                changes.append(item)
    return changes


def describe_changes(changes: Iterable[Mapping[str, Any]]) -> str:
    """One human line per change."""
    lines = []
    for c in changes:
        what = c["what"]
        subject = f"tool {c['tool']!r} {c['field']}" if what == "tool" else what
        if "before" in c:
            lines.append(f"{subject}: {c['before']!r} -> {c['after']!r}")
        else:
            lines.append(subject)
    return "; ".join(lines)


@dataclass(slots=True)
class ReplayReport:
    """The outcome of replaying one execution against the current code."""

    execution_id: str
    agent: str
    steps: int
    status: str
    drift: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True if replay found no drift and no error."""
        return not self.drift and self.error is None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "execution_id": self.execution_id,
            "agent": self.agent,
            "steps": self.steps,
            "status": self.status,
            "ok": self.ok,
            "drift": self.drift,
            "error": self.error,
        }


class Replayer:
    """Replay recorded histories against current agent definitions; call nothing."""

    def __init__(self, agents: Sequence[Agent]) -> None:
        self._agents = {a.name: a for a in agents}

    def replay(self, events: Iterable[Event]) -> ReplayReport:
        """Check one execution's events; never raises for drift (it is reported)."""
        state = ExecutionState()
        agent: Agent | None = None
        current: dict[str, Any] | None = None
        baseline: dict[str, Any] = {}
        drift: list[dict[str, Any]] = []
        error: str | None = None
        for event in events:
            try:
                apply(state, event)
            except Exception as exc:  # a history this code cannot fold is drift too
                error = f"cannot apply {type(event).__name__}: {exc}"
                break
            if isinstance(event, ExecutionStarted):
                agent = self._agents.get(event.agent)
                if agent is None:
                    error = f"agent {event.agent!r} is not among the agents given to replay"
                    break
                current = agent.definition()
                baseline = event.definition
            elif isinstance(event, DriftAccepted):
                baseline = event.definition
            elif isinstance(event, LLMCompleted) and agent is not None and current is not None:
                if event.fingerprint != agent.request_fingerprint:
                    # The runtime decides drift from the definition, which lists tools by
                    # name: tools reordered (the request's digest changes) are not drift
                    # there, so they are not here either.
                    changes = [
                        c
                        for c in diff_definitions(baseline, current)
                        if c.get("field") != "code"  # a tool's code is not in a request
                    ]
                    if changes:
                        drift.append(
                            {
                                "step": event.step,
                                "kind": "llm",
                                "recorded": event.fingerprint,
                                "current": agent.request_fingerprint,
                                "changes": changes,
                            }
                        )
            elif isinstance(event, ToolStarted) and agent is not None and current is not None:
                drift.extend(_tool_drift(agent, event, diff_definitions(baseline, current)))
        return ReplayReport(
            execution_id=state.execution_id,
            agent=state.agent,
            steps=state.step,
            status=state.status,
            drift=drift,
            error=error,
        )


def _tool_drift(
    agent: Agent, event: ToolStarted, changes: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    tool = agent.tools.get(event.tool)
    if tool is None:
        return [
            {
                "step": event.step,
                "kind": "tool",
                "tool": event.tool,
                "changes": [{"what": "tool", "tool": event.tool, "field": "removed"}],
            }
        ]
    out: list[dict[str, Any]] = []
    if event.fingerprint != tool.fingerprint_digest:
        out.append(
            {
                "step": event.step,
                "kind": "tool",
                "tool": event.tool,
                "recorded": event.fingerprint,
                "current": tool.fingerprint_digest,
                "changes": [c for c in changes if c.get("tool") == event.tool],
            }
        )
    try:
        tool.check_arguments(event.arguments)
    except ToolArgumentsError as exc:
        out.append(
            {
                "step": event.step,
                "kind": "arguments",
                "tool": event.tool,
                "arguments": event.arguments,
                "error": str(exc),
            }
        )
    return out
