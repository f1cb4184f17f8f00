"""The actor layer's error vocabulary: every error names the actor or supervisor it is about."""

from __future__ import annotations

from perdure.errors import PerdureError

__all__ = [
    "ActorCrashed",
    "ActorError",
    "AskTimeout",
    "MailboxClosed",
    "RestartIntensityExceeded",
]


class ActorError(PerdureError):
    """Base class of every error raised by :mod:`perdure.actors`."""


class MailboxClosed(ActorError):
    """The actor is gone for good (or never had a mailbox): nothing can be sent to it.

    Raised by ``tell``/``ask`` on a ref whose child was stopped for good, by a sender
    blocked on a full mailbox when that happens, and by ``ask`` when the actor stopped
    while handling the message without replying.
    """

    def __init__(self, actor: str, detail: str) -> None:
        self.actor = actor
        self.detail = detail
        super().__init__(f"actor {actor!r}: mailbox closed ({detail}); {_NEXT_STEP}")


_NEXT_STEP = "the message was not handled — look the child up again or start a new one"


class AskTimeout(ActorError, TimeoutError):
    """No reply to an ``ask`` arrived within its timeout.

    The message may still be handled later (it stays in the mailbox); its reply is
    then dropped.
    """

    def __init__(self, actor: str, timeout: float) -> None:
        self.actor = actor
        self.timeout = timeout
        super().__init__(
            f"actor {actor!r}: no reply within {timeout:g}s; the message may still be "
            f"handled later — raise the timeout or check that the actor is not blocked"
        )


class ActorCrashed(ActorError):
    """The actor crashed while handling this message (or while starting).

    ``__cause__`` (and :attr:`error`) is the exception that crashed it. What happens
    next is its supervisor's decision (restart or give up).
    """

    def __init__(self, actor: str, error: BaseException, *, during: str = "receive") -> None:
        self.actor = actor
        self.error = error
        self.during = during
        super().__init__(
            f"actor {actor!r} crashed in {during}: {type(error).__name__}: {error}; "
            f"its supervisor decides whether it restarts — see the cause for the bug"
        )


class RestartIntensityExceeded(ActorError):
    """A supervisor saw more restarts than its intensity allows within its period.

    It has stopped all its children (in reverse start order) and fails to its parent;
    at the root it is raised out of ``async with``. ``__cause__`` (and :attr:`error`)
    is the last crash, or ``None`` when the last exit was a normal stop of a
    permanent child.
    """

    def __init__(
        self,
        supervisor: str,
        child: str,
        intensity: int,
        period: float,
        error: BaseException | None,
    ) -> None:
        self.supervisor = supervisor
        self.child = child
        self.intensity = intensity
        self.period = period
        self.error = error
        what = f"{type(error).__name__}: {error}" if error is not None else "a normal stop"
        super().__init__(
            f"supervisor {supervisor!r}: more than {intensity} restarts within {period:g}s "
            f"(last: child {child!r}, {what}); all its children were stopped — fix the "
            f"crash, or raise intensity/period or use a per-child limit (ChildSpec.max_restarts)"
        )
