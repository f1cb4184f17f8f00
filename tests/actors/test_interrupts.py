"""KeyboardInterrupt and SystemExit raised by an actor's code stop the whole tree.

They are no crash to restart from: the tree shuts down in reverse start order, every
started actor's ``on_stop`` runs with reason ``shutdown``, and the very exception
raised leaves the root's ``async with`` (not wrapped in a group, not swallowed).

Each test runs its own event loop (on both backends, from the ``anyio_backend``
fixture) inside a guard: on asyncio an interrupt that escapes a task leaves the event
loop at once, and it would otherwise stop pytest itself instead of failing the test.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from perdure.actors import Actor, ChildSpec, StopReason, Supervisor
from perdure.actors.supervisor import Strategy
from tests.actors.probes import NO_BACKOFF, Boom, Journal


class Interruptible(Actor):
    """Journals its lifecycle; ``("raise", exc)`` raises ``exc`` in receive,
    ``("raise-in-task", exc)`` in a task of its own (``ctx.start_soon``)."""

    def __init__(
        self,
        id: str,
        journal: Journal,
        at_restart: BaseException | None = None,
        at_stop: BaseException | None = None,
    ) -> None:
        self.id = id
        self.journal = journal
        self.at_restart = at_restart
        self.at_stop = at_stop

    async def on_start(self) -> None:
        self.journal.entries.append(("start", self.id, self.ctx.restart_count))
        if self.at_restart is not None and self.ctx.restart_count:
            raise self.at_restart

    async def receive(self, message: object) -> object:
        if message == "crash":
            raise Boom(f"{self.id} told to crash")
        assert isinstance(message, tuple)
        kind, exc = message
        if kind == "raise":
            raise exc
        assert kind == "raise-in-task"

        async def boom() -> None:
            raise exc

        self.ctx.start_soon(boom)
        return None

    async def on_stop(self, reason: StopReason) -> None:
        self.journal.entries.append(("stop", self.id, reason.kind))
        if self.at_stop is not None:
            raise self.at_stop


def child(id: str, journal: Journal) -> ChildSpec:
    return ChildSpec(id, lambda: Interruptible(id, journal))


def run(anyio_backend: tuple[str, dict[str, Any]], body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` in a fresh event loop; fail (not abort pytest) if anything escapes it."""
    name, options = anyio_backend
    try:
        anyio.run(body, backend=name, backend_options=options)
    except Exception:
        raise  # a failed assertion of the body
    except BaseException as exc:  # the point: no interrupt may leave the loop
        pytest.fail(f"{exc!r} escaped the event loop instead of the tree's async with")


async def raised_by(tree: Callable[[], Awaitable[None]]) -> BaseException | None:
    """What leaves ``tree()``."""
    try:
        await tree()
    except BaseException as exc:
        return exc
    return None


@pytest.mark.parametrize("make", [KeyboardInterrupt, lambda: SystemExit(3)], ids=["ki", "exit"])
@pytest.mark.parametrize("where", ["raise", "raise-in-task"])
def test_an_interrupt_in_an_actor_stops_the_tree_in_reverse_order_and_propagates(
    anyio_backend: tuple[str, dict[str, Any]], make: Callable[[], BaseException], where: str
) -> None:
    journal = Journal()
    exc = make()
    states: list[str] = []

    async def tree() -> None:
        children = [child(i, journal) for i in ("a", "b", "c")]
        async with Supervisor(children=children, backoff=NO_BACKOFF) as sup:
            states.append(sup.state)
            ref = sup.ref("b")
            assert ref is not None
            await ref.tell((where, exc))
            await anyio.sleep_forever()

    async def body() -> None:
        with anyio.fail_after(10):
            assert await raised_by(tree) is exc  # itself: no group, ActorCrashed, Cancelled

    run(anyio_backend, body)
    assert journal.hooks() == [
        ("start", "a", 0),
        ("start", "b", 0),
        ("start", "c", 0),
        ("stop", "c", "shutdown"),
        ("stop", "b", "shutdown"),
        ("stop", "a", "shutdown"),
    ]  # and b was not restarted


def test_an_interrupt_deep_in_the_tree_stops_all_of_it_in_reverse_start_order(
    anyio_backend: tuple[str, dict[str, Any]],
) -> None:
    journal = Journal()
    exc = KeyboardInterrupt()

    def sub() -> Supervisor:
        return Supervisor(name="sub", children=[child("x", journal), child("y", journal)])

    async def tree() -> None:
        children = [child("a", journal), ChildSpec("sub", sub), child("c", journal)]
        async with Supervisor(children=children, backoff=NO_BACKOFF) as sup:
            nested = sup.child_supervisor("sub")
            assert nested is not None
            ref = nested.ref("x")
            assert ref is not None
            await ref.tell(("raise", exc))
            await anyio.sleep_forever()

    async def body() -> None:
        with anyio.fail_after(10):
            assert await raised_by(tree) is exc

    run(anyio_backend, body)
    assert [e for e in journal.hooks() if e[0] == "stop"] == [
        ("stop", "c", "shutdown"),
        ("stop", "y", "shutdown"),
        ("stop", "x", "shutdown"),
        ("stop", "a", "shutdown"),
    ]
    assert journal.starts("x") == 1


def test_an_interrupt_in_the_body_stops_the_tree_and_propagates_unchanged(
    anyio_backend: tuple[str, dict[str, Any]],
) -> None:
    journal = Journal()
    exc = KeyboardInterrupt()

    async def tree() -> None:
        async with Supervisor(children=[child("a", journal), child("b", journal)]):
            raise exc

    async def body() -> None:
        assert await raised_by(tree) is exc

    run(anyio_backend, body)
    assert [e for e in journal.hooks() if e[0] == "stop"] == [
        ("stop", "b", "shutdown"),
        ("stop", "a", "shutdown"),
    ]


@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all"])
def test_an_interrupt_from_a_restarts_on_start_stops_the_tree_without_more_restarts(
    anyio_backend: tuple[str, dict[str, Any]], strategy: Strategy
) -> None:
    journal = Journal()
    exc = SystemExit("bye")

    async def tree() -> None:
        children = [
            child("a", journal),
            ChildSpec("b", lambda: Interruptible("b", journal, at_restart=exc)),
            child("c", journal),
        ]
        async with Supervisor(strategy=strategy, children=children, backoff=NO_BACKOFF) as sup:
            ref = sup.ref("b")
            assert ref is not None
            await ref.tell("crash")  # its restart raises exc in on_start
            await anyio.sleep_forever()

    async def body() -> None:
        with anyio.fail_after(10):
            assert await raised_by(tree) is exc

    run(anyio_backend, body)
    hooks = journal.hooks()
    after = hooks[hooks.index(("start", "b", 1)) + 1 :]
    # b's on_start did not complete: no on_stop for it; the rest stop in reverse order.
    if strategy == "one_for_one":
        assert after == [("stop", "c", "shutdown"), ("stop", "a", "shutdown")]
    else:  # a was restarted before b, c never again
        assert after == [("stop", "a", "shutdown")]
        assert journal.starts("c") == 1


def test_an_interrupt_from_on_stop_stops_the_tree_instead_of_restarting(
    anyio_backend: tuple[str, dict[str, Any]],
) -> None:
    journal = Journal()
    exc = KeyboardInterrupt()

    async def tree() -> None:
        children = [
            child("a", journal),
            ChildSpec("b", lambda: Interruptible("b", journal, at_stop=exc)),
            child("c", journal),
        ]
        async with Supervisor(children=children, backoff=NO_BACKOFF) as sup:
            ref = sup.ref("b")
            assert ref is not None
            await ref.tell("crash")  # its on_stop (for the crash) raises exc
            await anyio.sleep_forever()

    async def body() -> None:
        with anyio.fail_after(10):
            assert await raised_by(tree) is exc

    run(anyio_backend, body)
    assert [e for e in journal.hooks() if e[0] == "stop"] == [
        ("stop", "b", "crashed"),
        ("stop", "c", "shutdown"),
        ("stop", "a", "shutdown"),
    ]
    assert journal.starts("b") == 1
