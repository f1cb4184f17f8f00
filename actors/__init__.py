"""perdure.actors: anyio actors with bounded mailboxes, supervised by an OTP-style tree.

Generic: this layer knows nothing of LLMs or of the log. Works on asyncio and trio.

An ``Exception`` raised by an actor's code is a crash: its supervisor restarts it (or
not) as its restart type, limits and strategy say. Any other ``BaseException`` that is
not a cancellation (``KeyboardInterrupt``, ``SystemExit``, a caller's control-flow
exception) is no crash but a request to stop: from an actor's ``on_start``,
``receive``, ``on_stop`` or a ``ctx.start_soon`` task, anywhere in the tree, it stops
the whole tree. Nothing restarts from then on; the root's body is cancelled and the
tree shuts down in reverse start order, each started actor's ``on_stop`` running with
reason ``shutdown`` (the one that raised included, in its turn, unless it raised in
``on_start``); then that very exception leaves the root's ``async with``, not wrapped
in an exception group and never swallowed. An ``ask`` being handled when it was raised
fails at once with ``ActorCrashed`` (its ``__cause__`` is the exception). The same
exception raised in the body of ``async with`` stops the tree the same way.
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
