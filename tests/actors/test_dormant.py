"""Children without on_start/on_stop start dormant: no task until something wakes them.

Everything observable must be as for a child with a task: messages, stops, restarts,
group restarts, context variables, ctx.start_soon.
"""

from __future__ import annotations

import contextvars

import anyio
import pytest

from perdure.actors import Actor, ActorCrashed, ChildSpec, StopReason, Supervisor
from tests.actors.probes import NO_BACKOFF, Journal, Quiet, Recorder, probe, settle

pytestmark = pytest.mark.anyio

who = contextvars.ContextVar("who", default="nobody")


class Hookless(Actor):
    async def receive(self, message: object) -> object:
        if message == "who":
            return who.get()
        if message == "crash":
            raise RuntimeError("crash")
        return message


def tasks() -> int:
    return len(anyio.get_running_tasks())


async def test_a_hookless_child_has_no_task_until_its_first_message() -> None:
    async with Supervisor() as sup:
        await anyio.wait_all_tasks_blocked()
        before = tasks()
        refs = [await sup.start_child(ChildSpec(f"h{i}", Hookless)) for i in range(50)]
        await anyio.wait_all_tasks_blocked()
        assert tasks() == before
        assert [c.state for c in sup.children()] == ["running"] * 50
        assert await refs[7].ask("hi") == "hi"
        assert tasks() == before + 1
        await refs[7].tell("again")  # awake now: no second task
        await refs[7].ask("sync")
        assert tasks() == before + 1


async def test_a_dormant_child_runs_in_its_starters_context_not_its_first_senders() -> None:
    async with Supervisor() as sup:
        token = who.set("starter")
        dormant = await sup.start_child(ChildSpec("d", Hookless))
        who.reset(token)

        class Hooked(Hookless):
            async def on_start(self) -> None:
                pass

        token = who.set("starter")
        eager = await sup.start_child(ChildSpec("e", Hooked))
        who.reset(token)
        who.set("sender")
        assert await dormant.ask("who") == "starter"
        assert await eager.ask("who") == "starter"


async def test_dormant_children_stop_in_reverse_order_with_events() -> None:
    journal = Journal()
    async with Supervisor() as sup:
        recorder = Recorder(sup)
        for i in range(3):
            await sup.start_child(ChildSpec(f"q{i}", probe(f"q{i}", journal, quiet=True)))
        q1 = sup.ref("q1")
        assert q1 is not None
        await sup.stop_child("q1")
        assert not q1.alive
    assert [(e.kind, e.child, e.will_restart) for e in recorder.events] == [
        ("started", "q0", False),
        ("started", "q1", False),
        ("started", "q2", False),
        ("stopped", "q1", False),
        ("stopped", "q2", False),
        ("stopped", "q0", False),
    ]


@pytest.mark.parametrize("strategy", ["one_for_all", "rest_for_one"])
async def test_group_restart_over_dormant_siblings(strategy: str) -> None:
    journal = Journal()
    children = [
        ChildSpec("a", probe("a", journal, quiet=True)),
        ChildSpec("b", probe("b", journal)),  # hooked: has a task
        ChildSpec("c", probe("c", journal, quiet=True)),
    ]
    async with Supervisor(strategy=strategy, children=children, backoff=NO_BACKOFF) as sup:  # type: ignore[arg-type]
        recorder = Recorder(sup)
        b = sup.ref("b")
        assert b is not None
        with pytest.raises(ActorCrashed):
            await b.ask("crash")
        await settle()
        restarted = {"one_for_all": ["a", "b", "c"], "rest_for_one": ["b", "c"]}[strategy]
        assert [e.child for e in recorder.events if e.kind == "restarted"] == restarted
        stopped = [(e.child, e.will_restart) for e in recorder.events if e.kind == "stopped"]
        assert stopped == [(i, True) for i in reversed(restarted) if i != "b"]
        assert [journal.made(i) for i in "abc"] == [2 if i in restarted else 1 for i in "abc"]
        c = sup.ref("c")
        assert c is not None and await c.ask(("echo", 5)) == 5


async def test_messages_to_a_dormant_child_held_by_a_group_restart_wait_for_it() -> None:
    journal = Journal()
    gate = anyio.Event()

    class SlowRestart(Actor):
        async def on_start(self) -> None:
            if self.ctx.restart_count:
                await gate.wait()

        async def receive(self, message: object) -> object:
            if message == "crash":
                raise RuntimeError("crash")
            return message

    children = [ChildSpec("slow", SlowRestart), ChildSpec("q", probe("q", journal, quiet=True))]
    async with Supervisor(strategy="one_for_all", children=children, backoff=NO_BACKOFF) as sup:
        slow, q = sup.ref("slow"), sup.ref("q")
        assert slow is not None and q is not None
        await slow.tell("crash")
        await settle()  # slow blocks in on_start; q is stopped, waiting for its turn
        assert [c.state for c in sup.children()] == ["starting", "restarting"]
        await q.tell("held-1")
        await q.tell("held-2")
        gate.set()
        assert await q.ask("after") == 1
        assert journal.of("got") == [("q", "held-1"), ("q", "held-2"), ("q", "after")]


async def test_ctx_stop_and_start_soon_wake_a_dormant_child() -> None:
    made: list[Quiet] = []
    journal = Journal()

    def factory() -> Quiet:
        actor = Quiet("q", journal)
        made.append(actor)
        return actor

    ran = anyio.Event()
    async with Supervisor(backoff=NO_BACKOFF) as sup:
        ref = await sup.start_child(ChildSpec("q", factory))

        async def mark() -> None:
            ran.set()

        made[0].ctx.start_soon(mark)
        await ran.wait()
        made[0].ctx.stop()  # permanent: a normal stop restarts it
        await settle()
        assert len(made) == 2 and ref.alive
        transient = await sup.start_child(ChildSpec("t", factory, restart="transient"))
        made[2].ctx.stop()  # transient: a normal stop removes it
        await settle()
        assert not transient.alive and sup.ref("t") is None


async def test_a_woken_child_that_crashes_is_restarted_in_its_runner_task_not_dormant() -> None:
    async with Supervisor(backoff=NO_BACKOFF) as sup:
        await anyio.wait_all_tasks_blocked()
        before = tasks()
        ref = await sup.start_child(ChildSpec("h", Hookless))
        assert tasks() == before  # dormant until its first message
        with pytest.raises(ActorCrashed):
            await ref.ask("crash")
        await settle()
        # The runner loops into the next incarnation: the child keeps its one task
        # (it does not go dormant again, nor get a second task), and answers as before.
        assert tasks() == before + 1
        assert sup.children()[0].restart_count == 1
        assert await ref.ask(1) == 1
        assert tasks() == before + 1


async def test_on_start_sets_context_variables_for_the_child_not_for_the_caller() -> None:
    class Setter(Actor):
        async def on_start(self) -> None:
            who.set(f"set by {self.ctx.id}")
            await anyio.sleep(0)  # across a real suspension too

        async def receive(self, message: object) -> object:
            return who.get()

    async with Supervisor() as sup:
        who.set("caller")
        ref = await sup.start_child(ChildSpec("s", Setter))
        assert who.get() == "caller"
        assert await ref.ask(None) == "set by s"


async def test_a_child_cannot_stop_itself_through_its_supervisor_from_any_of_its_code() -> None:
    errors: list[str] = []

    class SelfStopper(Actor):
        async def on_start(self) -> None:
            try:
                await self.ctx.supervisor.stop_child(self.ctx.id)
            except Exception as exc:
                errors.append(f"on_start: {type(exc).__name__}")
            self.ctx.start_soon(self.task)

        async def task(self) -> None:
            try:
                await self.ctx.supervisor.stop_child(self.ctx.id)
            except Exception as exc:
                errors.append(f"task: {type(exc).__name__}")

        async def receive(self, message: object) -> object:
            return None

    async with Supervisor() as sup:
        await sup.start_child(ChildSpec("me", SelfStopper))
        await anyio.wait_all_tasks_blocked()
        assert errors == ["on_start: ActorError", "task: ActorError"]
        assert sup.count_children() == 1


async def test_a_dormant_childs_on_stop_runs_in_its_context_within_its_timeout() -> None:
    log: list[str] = []

    class SlowToStop(Actor):
        async def on_start(self) -> None:
            who.set("the child")

        async def receive(self, message: object) -> object:
            return None

        async def on_stop(self, reason: StopReason) -> None:
            log.append(f"on_stop {reason.kind} as {who.get()}")
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                log.append("on_stop cancelled")
                raise

    async with Supervisor() as sup:
        await anyio.wait_all_tasks_blocked()
        before = tasks()
        await sup.start_child(ChildSpec("s", SlowToStop, shutdown=0.01))
        assert tasks() == before  # dormant, although it has hooks
        who.set("the stopper")
        await sup.stop_child("s")
    assert log == ["on_stop shutdown as the child", "on_stop cancelled"]
