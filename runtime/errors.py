"""The root of perdure's exception tree, and the runtime's own errors.

Every layer (``perdure.log``, ``perdure.actors``, ``perdure.providers``) derives its
small error tree from :class:`PerdureError` defined here. This module imports nothing
from perdure, so importing it from a lower layer does not point the dependency graph
back up at the runtime.
"""

from __future__ import annotations

__all__ = [
    "AgentDefinitionError",
    "DriftError",
    "ExecutionError",
    "ExecutionNotFoundError",
    "InvalidExecutionIdError",
    "InvalidSignalError",
    "PerdureError",
    "PromptMismatchError",
    "RuntimeClosedError",
    "SignalTimeout",
    "ToolArgumentsError",
    "ToolError",
    "UnknownAgentError",
]


class PerdureError(Exception):
    """Base class of every error perdure raises on purpose."""


class AgentDefinitionError(PerdureError, ValueError):
    """An agent or tool definition is invalid (bad name, unsupported type hint, ...)."""


class ToolError(PerdureError):
    """Raise from a tool to report a failure to the model in your own words.

    Any exception a tool raises is recorded and returned to the model as an error; this
    one exists so that a tool can fail on purpose without a traceback in the logs.
    """


class ToolArgumentsError(ToolError):
    """Arguments from the model do not match the tool's schema (returned to the model)."""


class SignalTimeout(ToolError):
    """``wait_for_signal(name, timeout=...)``: the timeout came before the signal.

    Raised inside the tool, which may catch it; uncaught, the model is told, as for
    any :class:`ToolError`. ``name`` is the signal waited for, ``timeout`` the seconds.
    """

    def __init__(self, message: str, name: str, timeout: float) -> None:
        super().__init__(message)
        self.name = name
        self.timeout = timeout


class DriftError(PerdureError):
    """The agent definition changed since an execution's log was written.

    ``changes`` lists what changed (instructions, model, which tool and which field).
    """

    def __init__(self, message: str, changes: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.changes = changes or []


class ExecutionError(PerdureError):
    """Base class of errors about one execution; ``execution_id`` names it."""

    def __init__(self, message: str, execution_id: str | None = None) -> None:
        super().__init__(message)
        self.execution_id = execution_id


class InvalidExecutionIdError(ExecutionError, ValueError):
    """An execution id is empty, too long, or contains characters we do not accept."""


class PromptMismatchError(ExecutionError):
    """An existing execution id was spawned again with a different prompt (or agent,
    budget or metadata)."""


class ExecutionNotFoundError(ExecutionError, LookupError):
    """No execution with this id exists in the data dir."""


class UnknownAgentError(ExecutionError, LookupError):
    """An execution names an agent that is not registered with this Runtime."""


class InvalidSignalError(ExecutionError):
    """A signal cannot apply to the execution (no such confirmation, already decided...)."""


class RuntimeClosedError(PerdureError):
    """The Runtime was used outside its ``with`` / ``async with`` block."""
