"""Actors on their own: tell, ask, mailboxes, lifecycle hooks, context tasks."""

from __future__ import annotations

import logging

import anyio
import pytest

from perdure.actors import (
    Actor,
    ActorCrashed,
    ActorError,
    AskTimeout,
    ChildSpec,
    MailboxClosed,
    StopReason,
    Supervisor,
)
from tests.actors.probes import NO_BACKOFF, Boom, Journal, Recorder, probe, settle

pytestmark = pytest.mark.anyio


async def test_tell_and_ask_reach_the_actor_in_order() -> None:
    journal = Journal()
    async with Supervisor(children=[ChildSpec("p", probe("p", journal))]) as sup:
        ref = sup.ref("p")
        assert ref is not None
        for i in range(5):
            await ref.tell(i)
        assert await ref.ask(("echo", "hello")) == "hello"
        assert journal.of("got") == [("p", i) for i in range(5)]
        assert ref.id == "p" and ref.path == "supervisor/p"


async def test_ask_times_out_while_the_actor_is_busy() -> None:
    gate = anyio.Event()
    async with Supervisor(children=[ChildSpec("p", probe("p", Journal()))]) as sup:
        ref = sup.ref("p")
        assert ref is not None
        await ref.tell(("block", gate))
        with pytest.raises(AskTimeout) as caught:
            await ref.ask(("echo", 1), timeout=0.01)
        assert caught.value.actor == "supervisor/p"
        assert isinstance(caught.value, TimeoutError)
        gate.set()
        # The timed-out message is still handled; later asks get their own replies.
        assert await ref.ask(("echo", 2)) == 2


async def test_ask_times_out_while_waiting_for_room_in_a_full_mailbox() -> None:
    journal = Journal()
    gate = anyio.Event()
    async with Supervisor(children=[ChildSpec("p", probe("p", journal), mailbox_size=1)]) as sup:
        ref = sup.ref("p")
        assert ref is not None
        await ref.tell(("block", gate))
        await anyio.wait_all_tasks_blocked()
        await ref.tell("queued")  # the mailbox (size 1) is full
        with pytest.raises(AskTimeout):
            await ref.ask("never sent", timeout=0.01)
        gate.set()
        assert await ref.ask(("echo", "after")) == "after"
        # It timed out before there was room: it was never put in the mailbox.
        assert journal.of("got") == [("p", "queued")]


async def test_ask_to_a_crashing_actor_raises_actor_crashed_with_the_cause() -> None:
    journal = Journal()
    spec = ChildSpec("p", probe("p", journal))
    async with Supervisor(children=[spec], backoff=NO_BACKOFF) as sup:
        ref = sup.ref("p")
        assert ref is not None
        with pytest.raises(ActorCrashed) as caught:
            await ref.ask("crash")
        assert isinstance(caught.value.__cause__, Boom)
        assert caught.value.error is caught.value.__cause__
        # The same ref reaches the next incarnation.
        assert await ref.ask("after") == 1
        assert journal.of("start") == [("p", 0), ("p", 1)]


async def test_full_mailbox_blocks_the_sender_until_the_actor_drains() -> None:
    journal = Journal()
    gate = anyio.Event()
    sent = []
    async with Supervisor(children=[ChildSpec("p", probe("p", journal), mailbox_size=2)]) as sup:
        ref = sup.ref("p")
        assert ref is not None
        await ref.tell(("block", gate))  # taken by the actor, which now blocks
        await anyio.wait_all_tasks_blocked()
        await ref.tell("m1")
        await ref.tell("m2")  # the mailbox (size 2) is now full
        with pytest.raises(anyio.WouldBlock):
            ref.tell_nowait("nope")

        async def sender() -> None:
            await ref.tell("m3")
            sent.append("m3")

        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            await anyio.wait_all_tasks_blocked()
            assert sent == []  # blocked: backpressure
            gate.set()
        assert sent == ["m3"]
        await ref.ask(("echo", None))
        assert journal.of("got") == [("p", "m1"), ("p", "m2"), ("p", "m3")]


async def test_blocked_senders_are_served_in_fifo_order_and_cancel_cleanly() -> None:
    journal = Journal()
    gate = anyio.Event()
    async with Supervisor(children=[ChildSpec("p", probe("p", journal), mailbox_size=1)]) as sup:
        ref = sup.ref("p")
        assert ref is not None
        await ref.tell(("block", gate))
        await anyio.wait_all_tasks_blocked()
        await ref.tell("first")  # fills the mailbox
        doomed = anyio.CancelScope()

        async def cancelled_sender() -> None:
            with doomed:
                await ref.tell("cancelled")

        async with anyio.create_task_group() as tg:
            tg.start_soon(ref.tell, "second")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(cancelled_sender)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(ref.tell, "third")
            await anyio.wait_all_tasks_blocked()
            doomed.cancel()
            await anyio.wait_all_tasks_blocked()
            gate.set()
        await ref.ask(("echo", None))
        assert journal.of("got") == [("p", "first"), ("p", "second"), ("p", "third")]


async def test_messages_sent_during_a_restart_reach_the_next_incarnation() -> None:
    restart_gate = anyio.Event()
    seen: list[tuple[int, object]] = []

    class SlowRestart(Actor):
        async def on_start(self) -> None:
            if self.ctx.restart_count == 1:
                await restart_gate.wait()

        async def receive(self, message: object) -> object:
            if message == "crash":
                raise Boom("crash")
            seen.append((self.ctx.restart_count, message))
            return None

    async with Supervisor(children=[ChildSpec("s", SlowRestart)], backoff=NO_BACKOFF) as sup:
        ref = sup.ref("s")
        assert ref is not None
        await ref.tell("before")
        await ref.tell("crash")
        await settle()
        assert sup.children()[0].state == "starting"  # blocked in on_start
        await ref.tell("during-1")
        await ref.tell("during-2")
        restart_gate.set()
        await ref.ask("after")
        assert seen == [(0, "before"), (1, "during-1"), (1, "during-2"), (1, "after")]
        assert ref.alive


async def test_a_child_gone_for_good_closes_its_mailbox() -> None:
    journal = Journal()
    gate = anyio.Event()
    async with Supervisor() as sup:
        ref = await sup.start_child(ChildSpec("p", probe("p", journal), mailbox_size=1))
        await ref.tell(("block", gate))
        await anyio.wait_all_tasks_blocked()
        await ref.tell("queued")
        outcomes: list[object] = []

        async def blocked_asker() -> None:
            try:
                await ref.ask(("echo", 1))
            except MailboxClosed as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked_asker)  # blocked: the mailbox is full
            await anyio.wait_all_tasks_blocked()
            async with anyio.create_task_group() as stopper:
                stopper.start_soon(sup.stop_child, "p")
                await anyio.wait_all_tasks_blocked()
                gate.set()
        assert len(outcomes) == 1 and isinstance(outcomes[0], MailboxClosed)
        assert not ref.alive
        assert sup.ref("p") is None
        with pytest.raises(MailboxClosed, match="stop_child"):
            await ref.tell("late")
        with pytest.raises(MailboxClosed):
            await ref.ask("late")
        with pytest.raises(MailboxClosed):
            ref.tell_nowait("late")
        # The queued tell was dropped, not handled by anyone.
        assert journal.of("got") == []


async def test_queued_asks_fail_when_a_transient_actor_stops_normally() -> None:
    gate = anyio.Event()

    class StopsAfterGate(Actor):
        async def receive(self, message: object) -> object:
            if message == "wait-then-stop":
                await gate.wait()
                self.ctx.stop()
            return message

    async with Supervisor() as sup:
        ref = await sup.start_child(ChildSpec("t", StopsAfterGate, restart="transient"))
        await ref.tell("wait-then-stop")
        await anyio.wait_all_tasks_blocked()
        errors: list[BaseException] = []

        async def asker() -> None:
            try:
                await ref.ask("never answered")
            except MailboxClosed as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(asker)
            await anyio.wait_all_tasks_blocked()
            gate.set()
        assert len(errors) == 1
        assert not ref.alive


async def test_on_stop_gets_the_reason_and_its_errors_are_logged_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reasons: list[StopReason] = []

    class Fragile(Actor):
        async def receive(self, message: object) -> object:
            if message == "crash":
                raise Boom("crash")
            self.ctx.stop()
            return None

        async def on_stop(self, reason: StopReason) -> None:
            reasons.append(reason)
            raise RuntimeError("on_stop broke")

    caplog.set_level(logging.ERROR, logger="perdure.actors")
    async with Supervisor(backoff=NO_BACKOFF) as sup:
        ref = await sup.start_child(ChildSpec("f", Fragile))
        with pytest.raises(ActorCrashed):
            await ref.ask("crash")
        await settle()
        await ref.ask("stop")  # permanent: restarted after a normal stop too
        await settle()
        assert ref.alive and sup.children()[0].restart_count == 2
    assert [r.kind for r in reasons] == ["crashed", "normal", "shutdown"]
    assert isinstance(reasons[0].error, Boom) and reasons[0].is_crash
    logged = [r for r in caplog.records if "on_stop(" in r.getMessage()]
    assert len(logged) == 3  # each time, with its traceback
    assert all(r.exc_info and str(r.exc_info[1]) == "on_stop broke" for r in logged)


async def test_start_soon_task_crash_crashes_the_actor() -> None:
    started = anyio.Event()
    fail = anyio.Event()
    incarnations: list[int] = []

    class WithTask(Actor):
        async def on_start(self) -> None:
            incarnations.append(self.ctx.restart_count)
            if self.ctx.restart_count == 0:
                self.ctx.start_soon(self.worker)

        async def worker(self) -> None:
            started.set()
            await fail.wait()
            raise Boom("background failure")

        async def receive(self, message: object) -> object:
            return self.ctx.restart_count

    async with Supervisor(backoff=NO_BACKOFF) as sup:
        recorder = Recorder(sup)
        ref = await sup.start_child(ChildSpec("w", WithTask))
        await started.wait()
        fail.set()
        await settle()
        assert incarnations == [0, 1]
        crash = [e for e in recorder.events if e.kind == "crashed"]
        assert len(crash) == 1 and isinstance(crash[0].error, Boom) and crash[0].will_restart
        assert await ref.ask("x") == 1


async def test_start_soon_task_crash_interrupts_the_current_message() -> None:
    fail = anyio.Event()

    class Busy(Actor):
        async def receive(self, message: object) -> object:
            if message == "spawn":
                self.ctx.start_soon(self.worker)
                return None
            await anyio.sleep_forever()
            return None

        async def worker(self) -> None:
            await fail.wait()
            raise Boom("background failure")

    async with Supervisor(backoff=NO_BACKOFF) as sup:
        ref = await sup.start_child(ChildSpec("b", Busy, restart="temporary"))
        await ref.ask("spawn")
        async with anyio.create_task_group() as tg:

            async def asker() -> None:
                with pytest.raises(ActorCrashed) as caught:
                    await ref.ask("hang", timeout=None)
                assert isinstance(caught.value.__cause__, Boom)

            tg.start_soon(asker)
            await anyio.wait_all_tasks_blocked()
            fail.set()
        assert not ref.alive  # temporary: removed after its crash


async def test_start_soon_tasks_are_given_time_to_finish_when_the_actor_stops() -> None:
    # Event-driven, so nothing depends on how fast a loaded machine schedules the task;
    # the exact timeout, and the cancellation after it, are checked on virtual time in
    # test_backoff.py.
    saw_stopping = anyio.Event()
    finish = anyio.Event()
    log: list[str] = []

    class Graceful(Actor):
        async def on_start(self) -> None:
            self.ctx.start_soon(self.polite, name="polite")

        async def polite(self) -> None:
            await self.ctx.wait_stopping()
            saw_stopping.set()
            await finish.wait()
            log.append("polite finished")

        async def receive(self, message: object) -> object:
            return None

    async with Supervisor() as sup:
        await sup.start_child(ChildSpec("g", Graceful, shutdown=3600))
        stopped = anyio.Event()

        async def stop() -> None:
            await sup.stop_child("g")
            stopped.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop)
            await saw_stopping.wait()
            await anyio.wait_all_tasks_blocked()
            assert not stopped.is_set()  # the stop waits for the task
            finish.set()
        assert log == ["polite finished"]
        assert sup.ref("g") is None


async def test_start_soon_tasks_still_running_after_the_shutdown_timeout_are_cancelled() -> None:
    log: list[str] = []

    class Stubborn(Actor):
        async def on_start(self) -> None:
            self.ctx.start_soon(self.stubborn, name="stubborn")

        async def stubborn(self) -> None:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                log.append(f"stubborn cancelled, stopping={self.ctx.stopping}")
                raise

        async def receive(self, message: object) -> object:
            return None

    async with Supervisor() as sup:
        await sup.start_child(ChildSpec("s", Stubborn, shutdown=0.01))
        await anyio.wait_all_tasks_blocked()
        await sup.stop_child("s")
        assert log == ["stubborn cancelled, stopping=True"]


async def test_start_soon_outside_an_incarnation_is_an_error() -> None:
    contexts = []

    class Keeps(Actor):
        async def receive(self, message: object) -> object:
            contexts.append(self.ctx)
            return None

    async with Supervisor() as sup:
        ref = await sup.start_child(ChildSpec("k", Keeps))
        await ref.ask(None)
        await sup.stop_child("k")
    with pytest.raises(ActorError, match="outside a live incarnation"):
        contexts[0].start_soon(anyio.sleep, 0)


async def test_cancelling_an_asker_does_not_disturb_the_actor() -> None:
    gate = anyio.Event()
    journal = Journal()
    async with Supervisor(children=[ChildSpec("p", probe("p", journal))]) as sup:
        ref = sup.ref("p")
        assert ref is not None
        await ref.tell(("block", gate))
        with anyio.move_on_after(0.01) as scope:
            await ref.ask(("echo", 1), timeout=None)
        assert scope.cancelled_caught
        gate.set()
        assert await ref.ask(("echo", 2)) == 2
        assert ref.alive and sup.children()[0].restart_count == 0


async def test_receive_not_overridden_crashes_with_a_clear_error() -> None:
    async with Supervisor() as sup:
        ref = await sup.start_child(ChildSpec("bare", Actor, restart="temporary"))
        with pytest.raises(ActorCrashed) as caught:
            await ref.ask("hi")
        assert isinstance(caught.value.__cause__, NotImplementedError)
