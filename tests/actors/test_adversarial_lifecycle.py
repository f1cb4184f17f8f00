"""Starting and stopping children at the edges: cancelled callers, reused ids,
a stop during a restart, and tens of thousands of cycles leaving nothing behind.
"""

from __future__ import annotations

import anyio
import pytest
from anyio.lowlevel import checkpoint

from perdure.actors import (
    Actor,
    ActorError,
    ChildSpec,
    MailboxClosed,
    StopReason,
    Supervisor,
)
from tests.actors.probes import NO_BACKOFF, Hang, HangsOnRestart, Journal, Probe, Recorder, settle

pytestmark = pytest.mark.anyio


async def test_stop_child_finishes_even_when_its_caller_is_cancelled_and_the_cancel_goes_on() -> (
    None
):
    entered = anyio.Event()
    release = anyio.Event()
    log: list[str] = []

    class SlowStop(Actor):
        async def receive(self, message: object) -> object:
            return message

        async def on_stop(self, reason: StopReason) -> None:
            entered.set()
            await release.wait()
            log.append(f"on_stop done ({reason.kind})")

    async with Supervisor() as sup:
        recorder = Recorder(sup)
        ref = await sup.start_child(ChildSpec("s", SlowStop, shutdown=3600))
        await ref.ask("wake")  # a runner task, not a dormant stop
        scopes: list[anyio.CancelScope] = []

        async def stopper() -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await sup.stop_child("s")
                log.append("stop_child returned")
                await checkpoint()
                log.append("went on after a checkpoint")  # must not happen
            log.append(f"cancelled_caught={scope.cancelled_caught}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(stopper)
            await entered.wait()
            scopes[0].cancel()
            await anyio.wait_all_tasks_blocked()
            assert log == []  # still stopping: the cancellation did not cut it short
            release.set()
        assert log == [
            "on_stop done (shutdown)",
            "stop_child returned",
            "cancelled_caught=True",
        ]
        assert sup.ref("s") is None and not ref.alive
        assert recorder.kinds() == ["started", "stopped"]


async def test_cancelling_start_child_of_a_nested_supervisor_mid_start_leaves_nothing() -> None:
    entered = anyio.Event()
    log: list[str] = []

    class SlowStart(Actor):
        async def on_start(self) -> None:
            entered.set()
            try:
                await anyio.sleep_forever()
            finally:
                log.append("grandchild on_start ended")

        async def receive(self, message: object) -> object:
            return message

    def nested() -> Supervisor:
        return Supervisor(
            children=[
                ChildSpec("first", lambda: Probe("first", Journal())),
                ChildSpec("slow", SlowStart),
            ]
        )

    async with Supervisor() as sup:
        recorder = Recorder(sup)
        tasks = len(anyio.get_running_tasks())
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sup.start_child, ChildSpec("mid", nested))
                await entered.wait()
                scope.cancel()
        assert scope.cancelled_caught
        assert log == ["grandchild on_start ended"]
        assert sup.count_children() == 0 and sup.ref("mid") is None
        assert len(anyio.get_running_tasks()) == tasks
        # first started and stopped inside mid; mid itself never started
        assert [(e.path, e.kind) for e in recorder.events] == [
            ("supervisor/mid/first", "started"),
            ("supervisor/mid/first", "stopped"),
        ]


async def test_an_id_is_taken_until_its_stop_completes_then_free_for_a_fresh_child() -> None:
    entered = anyio.Event()
    release = anyio.Event()

    class SlowStop(Actor):
        async def receive(self, message: object) -> object:
            return ("old", message)

        async def on_stop(self, reason: StopReason) -> None:
            entered.set()
            await release.wait()

    class Fresh(Actor):
        async def receive(self, message: object) -> object:
            return ("new", message)

    async with Supervisor() as sup:
        old = await sup.start_child(ChildSpec("x", SlowStop))
        async with anyio.create_task_group() as tg:
            tg.start_soon(sup.stop_child, "x")
            await entered.wait()
            with pytest.raises(ActorError, match="already has a child 'x'"):
                await sup.start_child(ChildSpec("x", Fresh))
            release.set()
        new = await sup.start_child(ChildSpec("x", Fresh))
        assert new is not old and sup.ref("x") is new
        assert await new.ask(1) == ("new", 1)
        with pytest.raises(MailboxClosed):
            await old.tell(2)  # the old ref never reaches the new child
        assert not old.alive and new.alive


async def test_stop_child_during_a_one_for_one_restarts_hanging_on_start() -> None:
    hang = Hang()
    async with Supervisor(backoff=NO_BACKOFF) as sup:
        recorder = Recorder(sup)
        ref = await sup.start_child(ChildSpec("h", lambda: HangsOnRestart(hang), shutdown=0))
        assert await ref.ask("hi") == "hi"
        await ref.tell("crash")
        await hang.entered.wait()  # its runner is restarting it, stuck in on_start
        assert [c.state for c in sup.children()] == ["starting"]
        with anyio.fail_after(60):  # a regression hangs here; 0 s expected
            await sup.stop_child("h")
        await settle()
        assert hang.log == ["hanging", "cancelled"]
        assert sup.count_children() == 0 and not ref.alive
        # It never restarted, and observers learn it is gone for good.
        assert recorder.kinds() == ["started", "crashed", "stopped"]
        assert [e.will_restart for e in recorder.events[1:]] == [True, False]
        with pytest.raises(MailboxClosed):
            await ref.tell("x")
