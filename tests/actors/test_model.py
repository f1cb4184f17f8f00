"""A hypothesis state machine that crashes random children and checks OTP semantics.

The machine drives one live supervisor (random strategy, intensity and children with
random restart types and per-child limits) through a blocking portal, one event loop
per test case, on asyncio and on trio. After every step it compares the supervisor
with a model of OTP's rules: which children exist, in which order, how often each
was restarted, and whether the supervisor has failed.
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
# dormant, without a task, until their first message), and with a task started in
# on_start (which gets its runner task at once).
KIND = st.sampled_from(["probe", "quiet", "start-only", "with-task"])
FOREVER = 1e9  # a period no test outlives: every restart counts


@dataclass
class ModelChild:
    id: str
    restart: str
    max_restarts: int | None
    restarts: int = 0  # restarts of any cause (what ChildInfo.restart_count reports)
    own: int = 0  # restarts caused by its own exits (what the per-child limit counts)


class Model:
    """OTP's rules (plus our per-child limit) over an ordered list of children."""

    def __init__(self, strategy: str, intensity: int | None) -> None:
        self.strategy = strategy
        self.intensity = intensity
        self.children: list[ModelChild] = []
        self.restarts = 0
        self.failed = False

    def exit(self, index: int, crashed: bool) -> None:
        child = self.children[index]
        if child.restart == "temporary" or (child.restart == "transient" and not crashed):
            del self.children[index]
            return
        if child.max_restarts is not None:
            if child.own + 1 > child.max_restarts:
                del self.children[index]  # given up, without counting against intensity
                return
            child.own += 1
        self.restarts += 1
        if self.intensity is not None and self.restarts > self.intensity:
            self.failed = True
            self.children = []
            return
        if self.strategy == "one_for_one":
            affected = [child]
        elif self.strategy == "one_for_all":
            affected = list(self.children)
        else:
            affected = self.children[index:]
        for other in affected:
            if other is not child and other.restart == "temporary":
                self.children.remove(other)
            else:
                other.restarts += 1


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
            self.model.children.append(ModelChild(spec.id, restart, limit))
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
        self.model.children.append(ModelChild(spec.id, restart, limit))

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
        del self.model.children[i]

    # ---- the check -------------------------------------------------------------------

    @invariant()
    def matches_the_model(self) -> None:
        if self.model is None or self.sup is None:
            return
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
