"""A hypothesis state machine that crashes random children and checks OTP semantics.

The machine drives one live supervisor (random strategy, intensity and children with
random restart types, per-child limits and kinds, some of which fail a later
``on_start``) through a blocking portal, one event loop per test case, on asyncio and
on trio. After every step it compares the supervisor with a model of OTP's rules:
which children exist, in which order, how often each was restarted, whether the
supervisor has failed, and the journal of every factory call, ``on_start`` and
``on_stop`` in order (so stops in reverse start order, restarts in start order, and
what a start failing in the middle of a restart leads to).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from perdure.actors import ActorCrashed, ActorError, ChildSpec, RestartIntensityExceeded, Supervisor
from tests.actors.probes import NO_BACKOFF, Journal, probe

RESTART_TYPES = st.sampled_from(["permanent", "transient", "temporary"])
LIMITS = st.one_of(st.none(), st.integers(min_value=0, max_value=2))
# Actor kinds: with on_start and on_stop, with neither, with on_start only (all three
# dormant, without a task, until their first message), with a task started in
# on_start (which gets its runner task at once), and two whose second or third
# on_start (a restart) raises.
KIND = st.sampled_from(["probe", "quiet", "start-only", "with-task", "fails-2nd", "fails-3rd"])
HAS_ON_START = {"probe", "start-only", "with-task", "fails-2nd", "fails-3rd"}
HAS_ON_STOP = {"probe", "with-task", "fails-2nd", "fails-3rd"}
FAILING_START = {"fails-2nd": 2, "fails-3rd": 3}  # which on_start raises, counting from 1
FOREVER = 1e9  # a period no test outlives: every restart counts

Entry = tuple[str, str, object]  # a journal entry: ("made"|"start"|"stop", id, detail)


@dataclass
class ModelChild:
    id: str
    restart: str
    max_restarts: int | None
    kind: str = "probe"
    restarts: int = 0  # restarts of any cause (what ChildInfo.restart_count reports)
    own: int = 0  # restarts caused by its own exits (what the per-child limit counts)
    alive: bool = True  # an incarnation has started and not stopped


class Model:
    """OTP's rules (plus our per-child limit) over an ordered list of children.

    Besides the children, it keeps the journal the probes must have written, in order.
    A start that fails (a kind's n-th on_start) is an exit of that child, handled like
    a crash, without on_stop; in a one_for_all/rest_for_one restart, its exit either
    starts a new round (which replaces the rest of the current one), gives it up, or
    fails the supervisor, and otherwise the round goes on with the next child.
    """

    def __init__(self, strategy: str, intensity: int | None) -> None:
        self.strategy = strategy
        self.intensity = intensity
        self.children: list[ModelChild] = []
        self.restarts = 0
        self.failed = False
        self.journal: list[Entry] = []

    # ---- the operations the machine performs ------------------------------------------

    def start(self, child: ModelChild) -> None:
        """A first start (static or start_child); first starts never fail here."""
        self.children.append(child)
        self.journal.append(("made", child.id, None))
        if child.kind in HAS_ON_START:
            self.journal.append(("start", child.id, 0))

    def exit(self, index: int, crashed: bool) -> None:
        """Child ``index`` crashed in receive, or stopped normally (ctx.stop())."""
        child = self.children[index]
        self._stopped(child, "crashed" if crashed else "normal")
        self._exited(child, crashed)

    def stop_child(self, index: int) -> None:
        child = self.children.pop(index)
        self._stopped(child, "shutdown")

    # ---- OTP's rules ----------------------------------------------------------------------

    def _stopped(self, child: ModelChild, kind: str) -> None:
        if child.alive and child.kind in HAS_ON_STOP:
            self.journal.append(("stop", child.id, kind))
        child.alive = False

    def _launch(self, child: ModelChild) -> bool:
        """Start a new incarnation of ``child``; False if its on_start raised."""
        child.restarts += 1
        self.journal.append(("made", child.id, None))
        if child.kind in HAS_ON_START:
            self.journal.append(("start", child.id, child.restarts))
        if FAILING_START.get(child.kind) == child.restarts + 1:
            return False
        child.alive = True
        return True

    def _exited(self, child: ModelChild, crashed: bool) -> str:
        """Decide what follows an exit; say what happened ("gone", "failed", "restarted")."""
        if child.restart == "temporary" or (child.restart == "transient" and not crashed):
            self.children.remove(child)
            return "gone"
        if child.max_restarts is not None:
            if child.own + 1 > child.max_restarts:
                self.children.remove(child)  # given up, without counting against intensity
                return "gone"
            child.own += 1
        self.restarts += 1
        if self.intensity is not None and self.restarts > self.intensity:
            self.failed = True
            self.children.remove(child)
            for other in reversed(self.children):  # stopped in reverse start order
                self._stopped(other, "shutdown")
            self.children = []
            return "failed"
        if self.strategy == "one_for_one":
            if not self._launch(child):
                self._exited(child, crashed=True)
        else:
            self._round(child)
        return "restarted"

    def _round(self, child: ModelChild) -> None:
        """one_for_all / rest_for_one: stop the others in reverse, restart all in order."""
        index = self.children.index(child)
        affected = list(self.children if self.strategy == "one_for_all" else self.children[index:])
        for other in reversed(affected):
            if other is not child:
                self._stopped(other, "shutdown")
                if other.restart == "temporary":
                    self.children.remove(other)
        for other in affected:
            if self.failed:
                return
            if other not in self.children or other.alive:
                continue
            if not self._launch(other) and self._exited(other, crashed=True) == "restarted":
                return  # a new round (already run here) replaced the rest of this one


class SupervisorMachine(RuleBasedStateMachine):
    backend: str = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.portal_cm: Any = None
        self.portal: BlockingPortal | None = None
        self.model: Model | None = None
        self.sup: Supervisor | None = None
        self.journal = Journal()
        self.failure: BaseException | None = None
        self.next_id = 0

    # ---- driving the live supervisor from the test thread --------------------------

    def call(self, fn: Any, *args: Any) -> Any:
        assert self.portal is not None
        return self.portal.call(fn, *args)

    async def host(self, sup: Supervisor, ready: anyio.Event, release: anyio.Event) -> None:
        try:
            async with sup:
                self.sup = sup
                ready.set()
                await release.wait()
        except RestartIntensityExceeded as exc:
            self.failure = exc
        finally:
            ready.set()

    def spec(self, restart: str, max_restarts: int | None, kind: str = "probe") -> ChildSpec:
        id = f"c{self.next_id}"
        self.next_id += 1
        return ChildSpec(
            id,
            probe(id, self.journal, kind=kind),
            restart=restart,
            max_restarts=max_restarts,
            within=FOREVER,  # type: ignore[arg-type]
        )

    @initialize(
        strategy=st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"]),
        intensity=st.one_of(st.none(), st.integers(min_value=0, max_value=6)),
        kinds=st.lists(st.tuples(RESTART_TYPES, LIMITS, KIND), min_size=1, max_size=4),
    )
    def start(
        self, strategy: str, intensity: int | None, kinds: list[tuple[str, int | None, str]]
    ) -> None:
        # asyncio in debug mode, as the anyio_backend fixture runs it.
        options = {"debug": True} if self.backend == "asyncio" else None
        self.portal_cm = start_blocking_portal(self.backend, backend_options=options)
        self.portal = self.portal_cm.__enter__()
        self.model = Model(strategy, intensity)
        specs = []
        for restart, limit, kind in kinds:
            spec = self.spec(restart, limit, kind)
            specs.append(spec)
            self.model.start(ModelChild(spec.id, restart, limit, kind))
        sup = Supervisor(
            strategy=strategy,  # type: ignore[arg-type]
            children=specs,
            intensity=intensity,
            period=FOREVER,
            backoff=NO_BACKOFF,
            name="model",
        )
        self.release = self.call(new_event)
        ready = self.call(new_event)
        self.portal.start_task_soon(self.host, sup, ready, self.release)
        self.call(ready.wait)

    def teardown(self) -> None:
        if self.portal is not None:
            self.portal.call(self.release.set)
            self.portal_cm.__exit__(None, None, None)

    # ---- rules -----------------------------------------------------------------------

    def running(self) -> bool:
        return self.model is not None and not self.model.failed and bool(self.model.children)

    def pick(self, index: int) -> int:
        assert self.model is not None
        return index % len(self.model.children)

    async def crash_child(self, id: str) -> None:
        assert self.sup is not None
        ref = self.sup.ref(id)
        assert ref is not None
        with pytest.raises(ActorCrashed):
            await ref.ask("crash")
        await anyio.wait_all_tasks_blocked()

    async def stop_normally(self, id: str) -> None:
        assert self.sup is not None
        ref = self.sup.ref(id)
        assert ref is not None
        assert await ref.ask("stop") == "stopping"
        await anyio.wait_all_tasks_blocked()

    @precondition(lambda self: self.running())
    @rule(index=st.integers(min_value=0))
    def crash(self, index: int) -> None:
        assert self.model is not None
        i = self.pick(index)
        self.call(self.crash_child, self.model.children[i].id)
        self.model.exit(i, crashed=True)

    @precondition(lambda self: self.running())
    @rule(index=st.integers(min_value=0))
    def stop(self, index: int) -> None:
        assert self.model is not None
        i = self.pick(index)
        self.call(self.stop_normally, self.model.children[i].id)
        self.model.exit(i, crashed=False)

    @precondition(lambda self: self.model is not None and not self.model.failed)
    @rule(restart=RESTART_TYPES, limit=LIMITS, kind=KIND)
    def start_child(self, restart: str, limit: int | None, kind: str) -> None:
        assert self.model is not None and self.sup is not None
        spec = self.spec(restart, limit, kind)
        self.call(self.sup.start_child, spec)
        self.model.start(ModelChild(spec.id, restart, limit, kind))

    @precondition(lambda self: self.model is not None and self.model.failed)
    @rule()
    def start_child_after_failure(self) -> None:
        assert self.sup is not None
        with pytest.raises(ActorError, match="is failed"):
            self.call(self.sup.start_child, self.spec("permanent", None))

    @precondition(lambda self: self.running())
    @rule(index=st.integers(min_value=0))
    def stop_child(self, index: int) -> None:
        assert self.model is not None and self.sup is not None
        i = self.pick(index)
        self.call(self.sup.stop_child, self.model.children[i].id)
        self.model.stop_child(i)

    # ---- the check -------------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        if self.model is None or self.sup is None:
            return
        # Every factory call, on_start and on_stop, in order: stops in reverse start
        # order, restarts in start order, and what a failing start led to.
        hooks = [e for e in self.journal.entries if e[0] in ("made", "start", "stop")]
        assert hooks == self.model.journal
        if self.model.failed:
            assert isinstance(self.failure, RestartIntensityExceeded)
            assert self.sup.state == "failed" and self.sup.children() == []
            return
        assert self.failure is None and self.sup.state == "running"
        live = self.sup.children()
        assert [c.id for c in live] == [c.id for c in self.model.children]
        assert [c.restart_count for c in live] == [c.restarts for c in self.model.children]
        assert all(c.state == "running" for c in live)
        for child in self.model.children:
            assert self.journal.made(child.id) == child.restarts + 1


async def new_event() -> anyio.Event:
    return anyio.Event()


def machine_for(backend: str) -> type[SupervisorMachine]:
    return type(f"SupervisorMachine_{backend}", (SupervisorMachine,), {"backend": backend})


_settings = settings(
    max_examples=30,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestSupervisorModelAsyncio = machine_for("asyncio").TestCase
TestSupervisorModelAsyncio.settings = _settings
TestSupervisorModelTrio = machine_for("trio").TestCase
TestSupervisorModelTrio.settings = _settings
