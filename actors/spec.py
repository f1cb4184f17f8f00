"""Plain data for supervision: child specs, restart backoff, lifecycle events, child info."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from perdure.actors.actor import StopReason

if TYPE_CHECKING:
    from perdure.actors.actor import Actor
    from perdure.actors.supervisor import Supervisor

__all__ = [
    "Backoff",
    "ChildInfo",
    "ChildSpec",
    "ChildState",
    "LifecycleEvent",
    "LifecycleKind",
    "RestartType",
]

RestartType = Literal["permanent", "transient", "temporary"]
LifecycleKind = Literal["started", "stopped", "crashed", "restarted", "escalated"]
ChildState = Literal["starting", "running", "restarting", "stopping", "stopped"]

_RESTART_TYPES = ("permanent", "transient", "temporary")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential, jittered, bounded delay before a crashed child is restarted.

    The n-th consecutive restart of a child (n = 0, 1, ...) waits
    ``min(max, initial * multiplier**n)``, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` and capped at ``max`` again. A child whose last
    incarnation ran for at least ``reset_after`` seconds (default: ``max``) counts as
    healthy: its next restart starts over at ``initial``.
    """

    initial: float = 0.01
    multiplier: float = 2.0
    max: float = 5.0
    jitter: float = 0.2
    reset_after: float | None = None

    def __post_init__(self) -> None:
        if not (self.initial >= 0 and math.isfinite(self.initial)):
            raise ValueError(f"Backoff.initial must be a finite number >= 0, got {self.initial}")
        if not self.multiplier >= 1:
            raise ValueError(f"Backoff.multiplier must be >= 1, got {self.multiplier}")
        if not self.max >= self.initial:
            raise ValueError(f"Backoff.max ({self.max}) must be >= initial ({self.initial})")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"Backoff.jitter must be within [0, 1], got {self.jitter}")
        if self.reset_after is not None and not self.reset_after >= 0:
            raise ValueError(f"Backoff.reset_after must be >= 0, got {self.reset_after}")

    @property
    def healthy_after(self) -> float:
        """Seconds an incarnation must run before the delay resets (``reset_after`` or ``max``)."""
        return self.max if self.reset_after is None else self.reset_after

    def delay(self, attempt: int, rand: float = 0.5) -> float:
        """The delay before consecutive restart number ``attempt`` (0-based).

        ``rand`` is a uniform sample in [0, 1); 0.5 gives the un-jittered delay.
        """
        try:
            base = min(self.max, self.initial * self.multiplier**attempt)
        except OverflowError:
            base = self.max
        jittered = base * (1.0 + self.jitter * (2.0 * rand - 1.0))
        return min(self.max, max(0.0, jittered))


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How a supervisor starts, restarts and stops one child.

    ``factory`` is called at every (re)start and returns a fresh :class:`Actor` or a
    fresh :class:`Supervisor` (which then supervises its own children as a subtree).
    ``restart``: ``permanent`` children are always restarted, ``transient`` ones only
    after a crash, ``temporary`` ones never. A nested supervisor that exceeded its
    intensity ends as OTP's does, with reason shutdown: a ``transient`` one is then
    removed, not restarted (a ``permanent`` one is). ``shutdown`` is the graceful-stop timeout
    in seconds, after which the child is cancelled (use ``math.inf`` for a nested
    supervisor, as OTP recommends). ``max_restarts``/``within`` is a per-child limit
    (Akka's ``restart.withLimit``): a child restarted more than ``max_restarts`` times
    within ``within`` seconds is given up — stopped for good with its last reason and
    removed — without counting against, or escalating through, the supervisor's
    intensity. ``backoff`` overrides the supervisor's restart backoff for this child.
    """

    id: str
    factory: Callable[[], Actor | Supervisor]
    restart: RestartType = "permanent"
    shutdown: float = 5.0
    mailbox_size: int = 64
    max_restarts: int | None = None
    within: float = 60.0
    backoff: Backoff | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or "/" in self.id:
            raise ValueError(f"ChildSpec.id must be a non-empty str without '/', got {self.id!r}")
        if self.restart not in _RESTART_TYPES:
            raise ValueError(
                f"child {self.id!r}: restart must be one of {_RESTART_TYPES}, got {self.restart!r}"
            )
        if not self.shutdown >= 0:
            raise ValueError(f"child {self.id!r}: shutdown must be >= 0, got {self.shutdown}")
        if not (isinstance(self.mailbox_size, int) and self.mailbox_size >= 1):
            raise ValueError(
                f"child {self.id!r}: mailbox_size must be an int >= 1, got {self.mailbox_size!r}"
            )
        if self.max_restarts is not None and not self.max_restarts >= 0:
            raise ValueError(
                f"child {self.id!r}: max_restarts must be None or >= 0, got {self.max_restarts}"
            )
        if not self.within > 0:
            raise ValueError(f"child {self.id!r}: within must be > 0, got {self.within}")


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """Something that happened to a supervised child, as seen by its supervisor.

    ``kind``: ``started`` (first start, after ``on_start`` returned), ``restarted``
    (a later start), ``stopped`` (ended normally or was shut down), ``crashed``
    (ended with an error), ``escalated`` (the supervisor exceeded its restart
    intensity because of ``child``; ``reason.error`` is the
    :class:`RestartIntensityExceeded`). ``will_restart`` tells "crashed, will
    restart" from "crashed, given up": when it is False after ``stopped``/``crashed``
    the child is gone for good. ``supervisor`` is the path of the supervisor that owns
    ``child``; events reach the observers of that supervisor and of its ancestors.
    """

    kind: LifecycleKind
    supervisor: str
    child: str
    reason: StopReason | None
    restart_count: int
    will_restart: bool

    @property
    def path(self) -> str:
        """The child's path (``supervisor/child``)."""
        return f"{self.supervisor}/{self.child}"

    @property
    def error(self) -> BaseException | None:
        """The exception behind a crash or an escalation, else None."""
        return None if self.reason is None else self.reason.error


@dataclass(frozen=True, slots=True)
class ChildInfo:
    """A snapshot of one child, as listed by :meth:`Supervisor.children`."""

    id: str
    path: str
    state: ChildState
    restart_count: int
    is_supervisor: bool
