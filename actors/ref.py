"""ActorRef: the restart-stable address of a supervised actor."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio
from anyio.lowlevel import checkpoint

from perdure.actors.errors import AskTimeout
from perdure.actors.mailbox import AskEnvelope, Mailbox

if TYPE_CHECKING:
    from perdure.actors.context import ActorContext

__all__ = ["ActorRef"]


class ActorRef:
    """The address of a supervised child; it stays valid across the child's restarts.

    The mailbox behind a ref belongs to the child, not to one incarnation: messages
    sent while the actor restarts wait (up to the mailbox size, then senders wait too)
    and are handled by the next incarnation. The message being handled when the actor
    crashed is not redelivered; its asker gets :class:`ActorCrashed`. Once the child
    is gone for good (stopped, given up, removed), queued asks fail and every
    ``tell``/``ask`` raises :class:`MailboxClosed`.
    """

    __slots__ = ("_ctx", "_mailbox", "id", "path")

    def __init__(self, ctx: ActorContext, mailbox: Mailbox, id: str, path: str) -> None:
        self._ctx = ctx
        self._mailbox = mailbox
        self.id = id
        """The child id, unique within its supervisor."""
        self.path = path
        """The child's path in the tree (``root/executions/order-1``), for logs."""

    def __repr__(self) -> str:
        state = "alive" if self.alive else "gone"
        return f"<ActorRef {self.path!r} {state}>"

    @property
    def alive(self) -> bool:
        """True while the child exists (running, starting or restarting)."""
        return self._ctx._state != "stopped"

    async def tell(self, message: object) -> None:
        """Send ``message`` without waiting for it to be handled.

        Waits while the mailbox is full (backpressure). Raises :class:`MailboxClosed`
        if the child is gone for good.
        """
        await checkpoint()
        await self._mailbox.put(message)

    def tell_nowait(self, message: object) -> None:
        """Send ``message`` now, or raise ``anyio.WouldBlock`` if the mailbox is full."""
        self._mailbox.put_nowait(message)

    async def ask(self, message: object, timeout: float | None = 5.0) -> object:
        """Send ``message`` and return what the actor's ``receive`` returns for it.

        Raises :class:`AskTimeout` if no reply came within ``timeout`` seconds (the
        wait for room in a full mailbox counts; a ``timeout`` <= 0 always raises it,
        after queueing the message if there is room), :class:`ActorCrashed` (with the
        error as ``__cause__``) if ``receive`` raised while handling this message,
        and :class:`MailboxClosed` if the child is gone or stopped before replying.
        """
        mailbox = self._mailbox
        parking = mailbox.parking
        envelope = AskEnvelope(message, parking)
        try:
            mailbox.put_nowait(envelope)
        except anyio.WouldBlock:
            # Full: wait for room and for the reply under one deadline.
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                await mailbox.put(envelope)
                await parking.wait(envelope.waiter)
        else:
            if timeout is None:
                await parking.wait(envelope.waiter)
            elif timeout > 0:
                await parking.wait_for(envelope.waiter, timeout)
            else:
                # No time to wait (as anyio.fail_after(0)): the message is queued, but a
                # reply never counts, whichever task the backend happens to run first
                # (trio would also refuse a negative timeout outright).
                await checkpoint()
                raise AskTimeout(self.path, timeout)
        if not envelope.done:
            raise AskTimeout(self.path, math.inf if timeout is None else timeout)
        return envelope.outcome()
