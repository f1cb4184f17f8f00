"""Test actors that record what happens to them, and an observer that records events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from perdure.actors import Actor, Backoff, LifecycleEvent, StopReason, Supervisor

NO_BACKOFF = Backoff(initial=0.0, multiplier=1.0, max=0.0, jitter=0.0)
"""Restart at once: with it, ``anyio.wait_all_tasks_blocked()`` means "settled"."""


class Boom(Exception):
    """The error test actors crash with."""


@dataclass
class Journal:
    """What every Probe did, in order: ("start"|"stop"|"got", id, detail)."""

    entries: list[tuple[str, str, object]] = field(default_factory=list)

    def starts(self, id: str) -> int:
        """How many times ``id``'s on_start ran."""
        return sum(1 for kind, who, _ in self.entries if kind == "start" and who == id)

    def hooks(self) -> list[tuple[str, str, object]]:
        """The on_start/on_stop entries only, in order."""
        return [e for e in self.entries if e[0] in ("start", "stop")]

    def made(self, id: str) -> int:
        """How many times ``id``'s factory ran (one per incarnation)."""
        return sum(1 for kind, who, _ in self.entries if kind == "made" and who == id)

    def of(self, kind: str) -> list[tuple[str, object]]:
        """The (id, detail) of every entry of ``kind``, in order."""
        return [(who, detail) for k, who, detail in self.entries if k == kind]


class Probe(Actor):
    """Echoes, crashes, stops or blocks on command, and journals its lifecycle.

    Messages: ``("echo", x)`` replies x; ``"crash"`` raises Boom; ``"stop"`` calls
    ctx.stop(); ``("block", event)`` waits for the event; anything else is journaled
    as ("got", id, message) and replied to with the restart count.
    """

    def __init__(self, id: str, journal: Journal) -> None:
        self.id = id
        self.journal = journal

    async def on_start(self) -> None:
        self.journal.entries.append(("start", self.id, self.ctx.restart_count))

    async def receive(self, message: object) -> object:
        if message == "crash":
            raise Boom(f"{self.id} told to crash")
        if message == "stop":
            self.ctx.stop()
            return "stopping"
        if isinstance(message, tuple) and message[0] == "echo":
            return message[1]
        if isinstance(message, tuple) and message[0] == "block":
            await message[1].wait()
            return "unblocked"
        self.journal.entries.append(("got", self.id, message))
        return self.ctx.restart_count

    async def on_stop(self, reason: StopReason) -> None:
        self.journal.entries.append(("stop", self.id, reason.kind))


class Quiet(Actor):
    """Like Probe, but with no on_start/on_stop: a child that starts dormant (no task)."""

    def __init__(self, id: str, journal: Journal) -> None:
        self.id = id
        self.journal = journal

    receive = Probe.receive


class StartOnly(Quiet):
    """Like Probe, with on_start but no on_stop: it starts, then goes dormant."""

    on_start = Probe.on_start


class WithTask(Probe):
    """Like Probe, and on_start starts a task that runs until the incarnation stops.

    Having a task, it gets its runner at once instead of starting dormant.
    """

    async def on_start(self) -> None:
        await super().on_start()
        self.ctx.start_soon(self.ctx.wait_stopping)


class FailsSecondStart(Probe):
    """Like Probe, but its second on_start (its first restart) raises Boom after journaling."""

    fail_at = 2  # which on_start fails, counting from 1 (restart_count + 1)

    async def on_start(self) -> None:
        await super().on_start()
        if self.ctx.restart_count + 1 == self.fail_at:
            raise Boom(f"{self.id}: on_start number {self.fail_at} fails")


class FailsThirdStart(FailsSecondStart):
    """Like FailsSecondStart, but it is the third on_start (the second restart) that fails."""

    fail_at = 3


@dataclass
class Hang:
    """What a HangsOnRestart child hangs on: ``gate``; ``entered`` is set once it hangs."""

    gate: anyio.Event = field(default_factory=anyio.Event)
    entered: anyio.Event = field(default_factory=anyio.Event)
    log: list[str] = field(default_factory=list)


class HangsOnRestart(Actor):
    """Starts at once the first time; every later on_start waits for ``hang.gate``.

    It ignores stop requests, so a stop can only end that on_start by cancelling it.
    Replies to any message with it, and crashes on "crash".
    """

    def __init__(self, hang: Hang) -> None:
        self.hang = hang

    async def on_start(self) -> None:
        if self.ctx.restart_count:
            self.hang.log.append("hanging")
            self.hang.entered.set()
            try:
                await self.hang.gate.wait()
            except anyio.get_cancelled_exc_class():
                self.hang.log.append("cancelled")
                raise

    async def receive(self, message: object) -> object:
        if message == "crash":
            raise Boom("crash")
        return message


KINDS: dict[str, type[Actor]] = {
    "probe": Probe,
    "quiet": Quiet,
    "start-only": StartOnly,
    "with-task": WithTask,
    "fails-2nd": FailsSecondStart,
    "fails-3rd": FailsThirdStart,
}


def probe(
    id: str, journal: Journal, *, quiet: bool = False, kind: str | None = None
) -> Callable[[], Actor]:
    """A ChildSpec factory making Probes (or ``kind``) named ``id``; journals ("made", id)."""
    cls = KINDS[kind if kind is not None else "quiet" if quiet else "probe"]

    def make() -> Actor:
        journal.entries.append(("made", id, None))
        return cls(id, journal)  # type: ignore[call-arg]

    return make


class Recorder:
    """A lifecycle observer that keeps every event."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.events: list[LifecycleEvent] = []
        self.unsubscribe = supervisor.observe(self.events.append)

    def kinds(self, child: str | None = None) -> list[str]:
        """The kinds of events seen (for ``child`` only, if given), in order."""
        return [e.kind for e in self.events if child is None or e.child == child]


async def settle() -> None:
    """Let every restart in flight finish (all tasks blocked; needs NO_BACKOFF)."""
    await anyio.wait_all_tasks_blocked()
