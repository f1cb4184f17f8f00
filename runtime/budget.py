"""Budgets (limits on what an execution may spend) and usage (what it has spent)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Budget", "ExecutionUsage"]


@dataclass(frozen=True, slots=True)
class Budget:
    """Limits checked before every LLM call (and before each tool call for tool limits).

    ``None`` means unlimited. When a limit is reached the execution suspends with reason
    ``budget``; ``rt.resume(execution_id, budget=Budget(...))`` raises it durably.
    """

    max_dollars: float | None = None
    max_llm_calls: int | None = None
    max_tool_calls: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_dollars", "max_llm_calls", "max_tool_calls", "max_tokens"):
            value = getattr(self, name)
            if value is None:
                continue
            # NaN compares false with everything: as a limit it would never be reached,
            # an unlimited budget that looks like a limit. A bool is an int to Python
            # but never a limit anyone meant.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(
                    f"Budget.{name} must be a number or None, got {type(value).__name__} {value!r}"
                )
            if math.isnan(value) or value < 0:
                raise ValueError(f"Budget.{name} must be >= 0 or None, got {value}")

    def exhausted(self, usage: ExecutionUsage) -> tuple[str, float, float] | None:
        """The first limit ``usage`` has reached, as (limit name, limit, used), or None."""
        for name, limit, used in self._checks(usage):
            if limit is not None and used >= limit:
                return name, limit, used
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the log (unset limits omitted)."""
        return {k: v for k in _FIELDS if (v := getattr(self, k)) is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Budget | None:
        """Inverse of :meth:`to_dict`; None stays None."""
        if data is None:
            return None
        return cls(**{k: data[k] for k in _FIELDS if k in data})

    def raised(self, other: Budget) -> Budget:
        """This budget with every limit ``other`` sets replaced by ``other``'s."""
        return replace(self, **other.to_dict())

    def tighter(self, other: Budget | None) -> Budget:
        """Per limit, the lower of this budget's and ``other``'s (unset is unlimited)."""
        if other is None:
            return self
        merged = {}
        for name in _FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            merged[name] = theirs if mine is None else mine if theirs is None else min(mine, theirs)
        return Budget(**merged)

    def left(self, usage: ExecutionUsage) -> Budget:
        """What is left of each limit once ``usage`` is spent (never below zero)."""
        return Budget(
            **{
                name: max(limit - used, 0 * limit)  # 0 or 0.0, as the limit is
                for name, limit, used in self._checks(usage)
                if limit is not None
            }
        )

    def _checks(self, usage: ExecutionUsage) -> tuple[tuple[str, Any, Any], ...]:
        # (limit name, limit, used), in the order exhaustion is reported
        return (
            ("max_llm_calls", self.max_llm_calls, usage.llm_calls),
            ("max_tokens", self.max_tokens, usage.total_tokens),
            ("max_dollars", self.max_dollars, usage.dollars),
            ("max_tool_calls", self.max_tool_calls, usage.tool_calls),
        )


_FIELDS = ("max_dollars", "max_llm_calls", "max_tool_calls", "max_tokens")


@dataclass(slots=True)
class ExecutionUsage:
    """What an execution has used so far: calls, tokens and dollars.

    ``by_model`` breaks LLM usage down by ``"provider/model"`` that actually served each
    call (a fallback chain shows which member answered).
    """

    llm_calls: int = 0
    tool_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    dollars: float = 0.0
    by_model: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def add_llm_call(
        self, provider: str, model: str, input_tokens: int, output_tokens: int, dollars: float
    ) -> None:
        """Count one LLM call."""
        self.llm_calls += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.dollars += dollars
        key = model_key(provider, model)
        entry = self.by_model.get(key)
        if entry is None:
            entry = self.by_model[key] = {"calls": 0, "tokens": 0, "dollars": 0.0}
        entry["calls"] += 1
        entry["tokens"] += input_tokens + output_tokens
        entry["dollars"] += dollars

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for the index, the CLI and JSON output)."""
        return {
            "llm_calls": self.llm_calls,
            "tool_calls": self.tool_calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "dollars": round(self.dollars, 6),
            "by_model": {k: dict(v) for k, v in self.by_model.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecutionUsage:
        """Inverse of :meth:`to_dict`."""
        return cls(
            llm_calls=data.get("llm_calls", 0),
            tool_calls=data.get("tool_calls", 0),
            input_tokens=data.get("input_tokens", 0),
            output_tokens=data.get("output_tokens", 0),
            dollars=data.get("dollars", 0.0),
            by_model={k: dict(v) for k, v in data.get("by_model", {}).items()},
        )

    def add(self, other: ExecutionUsage) -> None:
        """Count everything ``other`` used as used here too (a child's usage, say)."""
        self.llm_calls += other.llm_calls
        self.tool_calls += other.tool_calls
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.dollars += other.dollars
        for key, theirs in other.by_model.items():
            entry = self.by_model.setdefault(key, {"calls": 0, "tokens": 0, "dollars": 0.0})
            for field_name in ("calls", "tokens", "dollars"):
                entry[field_name] += theirs.get(field_name, 0)

    def plus(self, other: ExecutionUsage | None) -> ExecutionUsage:
        """This usage and ``other``'s together, as a new object (``self`` if None)."""
        if other is None:
            return self
        total = replace(self, by_model={k: dict(v) for k, v in self.by_model.items()})
        total.add(other)
        return total


def model_key(provider: str, model: str) -> str:
    """The ``by_model`` key of an LLM call: ``"provider/model"``, or the model alone."""
    return f"{provider}/{model}" if provider else model
