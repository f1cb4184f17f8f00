"""perdure: a durable, actor-based multi-agent LLM runtime on an event-sourced log."""

from perdure.errors import PerdureError as PerdureError

__all__ = ["PerdureError"]
