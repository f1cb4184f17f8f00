"""perdure.actors: anyio actors with bounded mailboxes, supervised by an OTP-style tree.

Generic: this layer knows nothing of LLMs or of the log. Works on asyncio and trio.
"""

from perdure.actors.actor import Actor, StopReason
from perdure.actors.context import ActorContext
from perdure.actors.errors import (
    ActorCrashed,
    ActorError,
    AskTimeout,
    MailboxClosed,
    RestartIntensityExceeded,
)
from perdure.actors.ref import ActorRef
from perdure.actors.spec import Backoff, ChildInfo, ChildSpec, LifecycleEvent
from perdure.actors.supervisor import Supervisor

__all__ = [
    "Actor",
    "ActorContext",
    "ActorCrashed",
    "ActorError",
    "ActorRef",
    "AskTimeout",
    "Backoff",
    "ChildInfo",
    "ChildSpec",
    "LifecycleEvent",
    "MailboxClosed",
    "RestartIntensityExceeded",
    "StopReason",
    "Supervisor",
]
