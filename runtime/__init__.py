"""perdure: a durable, actor-based multi-agent LLM runtime on an event-sourced log.

Every LLM call and tool call an agent makes is a durable step, appended to the log
before the next step begins; a restarted Runtime carries each unfinished execution on
from where it stopped, never running a completed step again.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from perdure.agent import Agent as Agent
from perdure.agent import ContractViolation as ContractViolation
from perdure.budget import Budget as Budget
from perdure.budget import ExecutionUsage as ExecutionUsage
from perdure.context import current_execution_id as current_execution_id
from perdure.context import current_idempotency_key as current_idempotency_key
from perdure.context import current_step as current_step
from perdure.context import sleep as sleep
from perdure.context import sleep_until as sleep_until
from perdure.context import wait_for_signal as wait_for_signal
from perdure.drift import Replayer as Replayer
from perdure.drift import ReplayReport as ReplayReport
from perdure.errors import AgentDefinitionError as AgentDefinitionError
from perdure.errors import DriftError as DriftError
from perdure.errors import ExecutionError as ExecutionError
from perdure.errors import ExecutionNotFoundError as ExecutionNotFoundError
from perdure.errors import InvalidExecutionIdError as InvalidExecutionIdError
from perdure.errors import InvalidSignalError as InvalidSignalError
from perdure.errors import PerdureError as PerdureError
from perdure.errors import PromptMismatchError as PromptMismatchError
from perdure.errors import RuntimeClosedError as RuntimeClosedError
from perdure.errors import SignalTimeout as SignalTimeout
from perdure.errors import ToolArgumentsError as ToolArgumentsError
from perdure.errors import ToolError as ToolError
from perdure.errors import UnknownAgentError as UnknownAgentError
from perdure.events import record_types as record_types
from perdure.result import ExecutionInfo as ExecutionInfo
from perdure.result import Result as Result
from perdure.result import SuspendReason as SuspendReason
from perdure.runtime import ExecutionHandle as ExecutionHandle
from perdure.runtime import Runtime as Runtime
from perdure.tools import Tool as Tool
from perdure.tools import tool as tool

try:
    __version__ = _version("perdure")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Agent",
    "AgentDefinitionError",
    "Budget",
    "ContractViolation",
    "DriftError",
    "ExecutionError",
    "ExecutionHandle",
    "ExecutionInfo",
    "ExecutionNotFoundError",
    "ExecutionUsage",
    "InvalidExecutionIdError",
    "InvalidSignalError",
    "PerdureError",
    "PromptMismatchError",
    "ReplayReport",
    "Replayer",
    "Result",
    "Runtime",
    "RuntimeClosedError",
    "SignalTimeout",
    "SuspendReason",
    "Tool",
    "ToolArgumentsError",
    "ToolError",
    "UnknownAgentError",
    "current_execution_id",
    "current_idempotency_key",
    "current_step",
    "record_types",
    "sleep",
    "sleep_until",
    "tool",
    "wait_for_signal",
]
