"""ask/tell at the edges: no time to wait, full mailboxes of dying actors, sibling restarts."""

from __future__ import annotations

import anyio
import pytest

from perdure.actors import (
    Actor,
    ActorRef,
    AskTimeout,
    ChildSpec,
    MailboxClosed,
    Supervisor,
)
from tests.actors.probes import NO_BACKOFF, Boom, settle

pytestmark = pytest.mark.anyio


class Echo(Actor):
    """Replies at once, without ever yielding; journals what it got."""

    def __init__(self, got: list[object]) -> None:
        self.got = got

    async def receive(self, message: object) -> object:
        self.got.append(message)
        return message


@pytest.mark.parametrize("timeout", [0, 0.0, -1.0])
async def test_ask_with_no_time_to_wait_times_out_on_both_backends_but_is_delivered(
    timeout: float,
) -> None:
    # Before: asyncio always got the reply, trio got it at random (whichever task it ran
    # first) and refused a negative timeout with trio's ValueError.
    got: list[object] = []
    async with Supervisor() as sup:
        ref = await sup.start_child(ChildSpec("echo", lambda: Echo(got)))
        for i in range(20):
            with pytest.raises(AskTimeout):
                await ref.ask(i, timeout=timeout)
        assert await ref.ask("last", timeout=None) == "last"
    assert got == [*range(20), "last"]  # each was queued, and handled in order


async def test_ask_with_no_time_to_wait_on_a_full_mailbox_is_not_delivered() -> None:
    gate = anyio.Event()
    got: list[object] = []

    class Blocked(Actor):
        async def receive(self, message: object) -> object:
            await gate.wait()
            got.append(message)
            return message

    async with Supervisor() as sup:
        ref = await sup.start_child(ChildSpec("b", Blocked, mailbox_size=1))
        await ref.tell("busy")  # being handled
        await anyio.wait_all_tasks_blocked()
        await ref.tell("queued")  # fills the mailbox
        with pytest.raises(AskTimeout):
            await ref.ask("dropped", timeout=0)
        assert sup.ref("b") is ref and ref._mailbox.waiting_senders == 0
        gate.set()
        assert await ref.ask("after", timeout=None) == "after"
    assert got == ["busy", "queued", "after"]


@pytest.mark.parametrize("restart", ["temporary", "transient"])
async def test_senders_blocked_on_a_full_mailbox_are_released_when_the_actor_dies_for_good(
    restart: str,
) -> None:
    gate = anyio.Event()

    class Crasher(Actor):
        async def receive(self, message: object) -> object:
            if message == "crash-later":
                await gate.wait()
                raise Boom("crash with senders waiting")
            return message

    outcomes: list[BaseException] = []

    async def send(ref: ActorRef, how: str) -> None:
        try:
            if how == "tell":
                await ref.tell(how)
            else:
                await ref.ask(how, timeout=None)
        except MailboxClosed as exc:
            outcomes.append(exc)

    async with Supervisor(backoff=NO_BACKOFF) as sup:
        ref = await sup.start_child(
            ChildSpec("c", Crasher, restart=restart, mailbox_size=1)  # type: ignore[arg-type]
        )
        await ref.tell("crash-later")
        await anyio.wait_all_tasks_blocked()
        await ref.tell("queued")  # the mailbox is full from here on
        async with anyio.create_task_group() as tg:
            for how in ("tell", "ask", "tell", "ask"):
                tg.start_soon(send, ref, how)
            await anyio.wait_all_tasks_blocked()
            assert ref._mailbox.waiting_senders == 4
            gate.set()  # crashes; temporary: removed, transient after a crash: restarted
        if restart == "temporary":
            assert len(outcomes) == 4 and not ref.alive
            assert all("mailbox closed" in str(e) for e in outcomes)
        else:
            assert outcomes == [] and ref.alive
            assert await ref.ask("next", timeout=None) == "next"


async def test_an_ask_being_handled_when_a_sibling_restart_cancels_the_actor_fails_at_once() -> (
    None
):
    # one_for_all: a crashes; b is busy with an ask and ignores the stop request until
    # its shutdown timeout (0) cancels it. Its asker learns at once; the ask queued
    # behind it is handled by b's next incarnation.
    class Crasher(Actor):
        async def receive(self, message: object) -> object:
            raise Boom("a crashes")

    class Stubborn(Actor):
        async def receive(self, message: object) -> object:
            if message == "hang":
                await anyio.sleep_forever()
            return (message, self.ctx.restart_count)

    outcomes: dict[str, object] = {}

    async def ask(ref: ActorRef, message: str) -> None:
        try:
            outcomes[message] = await ref.ask(message, timeout=None)
        except MailboxClosed as exc:
            outcomes[message] = exc

    async with Supervisor(
        strategy="one_for_all",
        backoff=NO_BACKOFF,
        children=[ChildSpec("a", Crasher), ChildSpec("b", Stubborn, shutdown=0)],
    ) as sup:
        a, b = sup.ref("a"), sup.ref("b")
        assert a is not None and b is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, b, "hang")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(ask, b, "queued")
            await anyio.wait_all_tasks_blocked()
            await a.tell("crash")
        await settle()
        assert isinstance(outcomes["hang"], MailboxClosed)
        assert "before replying" in str(outcomes["hang"])
        assert outcomes["queued"] == ("queued", 1)
        assert [c.restart_count for c in sup.children()] == [1, 1]
