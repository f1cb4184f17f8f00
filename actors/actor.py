"""The actor behaviour users subclass, and the reason an incarnation stopped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from perdure.actors.context import ActorContext

__all__ = ["Actor", "StopKind", "StopReason"]

StopKind = Literal["normal", "shutdown", "crashed"]


@dataclass(frozen=True, slots=True)
class StopReason:
    """Why an actor incarnation stopped: ``normal``, ``shutdown`` or ``crashed``.

    ``normal``: the actor asked to stop (``ctx.stop()``). ``shutdown``: its supervisor
    stopped it (``stop_child``, a sibling's restart, or the supervisor stopping).
    ``crashed``: ``on_start``/``receive`` or a task from ``ctx.start_soon`` raised;
    :attr:`error` is that exception.
    """

    kind: StopKind
    error: BaseException | None = None

    NORMAL: ClassVar[StopReason]
    SHUTDOWN: ClassVar[StopReason]

    @classmethod
    def crashed(cls, error: BaseException) -> StopReason:
        """The reason for an incarnation that died of ``error``."""
        return cls("crashed", error)

    @property
    def is_crash(self) -> bool:
        """True when the incarnation crashed (rather than stopped normally or was shut down)."""
        return self.kind == "crashed"

    def __str__(self) -> str:
        if self.error is None:
            return self.kind
        return f"crashed ({type(self.error).__name__}: {self.error})"


StopReason.NORMAL = StopReason("normal")
StopReason.SHUTDOWN = StopReason("shutdown")


class Actor:
    """An async behaviour with a mailbox; subclass it and override what you need.

    A supervisor calls the child spec's factory at every (re)start, sets :attr:`ctx`,
    awaits :meth:`on_start`, then calls :meth:`receive` with one message at a time
    (never concurrently) until the incarnation stops, and finally awaits
    :meth:`on_stop`. The mailbox and the :class:`~perdure.actors.ActorRef` outlive
    incarnations: messages sent while the actor restarts wait for the next one.

    All of an actor's code runs in its own contextvars context (a copy of its
    starter's), though not always in the same task: a first ``on_start`` runs in the
    task that starts the child, and an ``on_stop`` before any message in the task that
    stops it; messages are handled by the child's own task, created at the first one.
    """

    # Only the base attribute is slotted: subclasses without __slots__ still get a
    # __dict__, and subclasses that declare __slots__ stay lean (10^5 idle actors).
    __slots__ = ("ctx",)

    ctx: ActorContext

    async def on_start(self) -> None:
        """Run at every (re)start, before the first message; raising here is a crash."""

    async def receive(self, message: object) -> object:
        """Handle one message; the return value is the reply to an ``ask``.

        Raising crashes the actor: an ``ask`` being handled gets
        :class:`~perdure.actors.ActorCrashed`, and the supervisor decides what next.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not override Actor.receive; it received {message!r}"
        )

    async def on_stop(self, reason: StopReason) -> None:
        """Run once when an incarnation that started ends; errors here are logged, not fatal."""
