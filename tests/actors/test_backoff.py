"""Restart backoff, restart intensity and timeouts over time, on trio's virtual clock.

``MockClock(autojump_threshold=0)`` jumps to the next deadline as soon as every task
is blocked, so minutes of backoff pass instantly and every delay is exact.
"""

from __future__ import annotations

import itertools
import time

import anyio
import pytest
from trio.testing import MockClock

from perdure.actors import (
    Actor,
    ActorCrashed,
    ActorRef,
    Backoff,
    ChildSpec,
    RestartIntensityExceeded,
    Supervisor,
)
from tests.actors.probes import NO_BACKOFF, Boom, Hang, HangsOnRestart

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    """Trio with a virtual clock that jumps whenever all tasks are blocked."""
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Flaky(Actor):
    """Starts fine the first time; crashes on "crash"; later starts fail ``fails`` times."""

    def __init__(self, log: list[float], fails: int) -> None:
        self.log = log
        self.fails = fails

    async def on_start(self) -> None:
        self.log.append(anyio.current_time())
        if 1 <= self.ctx.restart_count <= self.fails:
            raise Boom(f"start {self.ctx.restart_count}")

    async def receive(self, message: object) -> object:
        if message == "crash":
            raise Boom("crash")
        return self.ctx.restart_count


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


async def crash(ref: ActorRef) -> None:
    with pytest.raises(ActorCrashed):
        await ref.ask("crash", timeout=None)


async def test_delays_grow_exponentially_up_to_the_bound_with_no_real_sleeping() -> None:
    log: list[float] = []
    backoff = Backoff(initial=1.0, multiplier=2.0, max=20.0, jitter=0.0)
    wall = time.perf_counter()
    async with Supervisor(backoff=backoff, intensity=None) as sup:
        ref = await sup.start_child(ChildSpec("f", lambda: Flaky(log, fails=7)))
        crashed_at = anyio.current_time()
        await crash(ref)
        # Messages wait in the mailbox through the whole restart storm.
        assert await ref.ask("n", timeout=None) == 8
    assert gaps([crashed_at, *log[1:]]) == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0, 20.0]
    assert time.perf_counter() - wall < 5.0  # 91 virtual seconds, next to no real ones


async def test_jittered_delays_stay_within_their_bounds() -> None:
    log: list[float] = []
    backoff = Backoff(initial=1.0, multiplier=2.0, max=10.0, jitter=0.5)
    async with Supervisor(backoff=backoff, intensity=None) as sup:
        ref = await sup.start_child(ChildSpec("f", lambda: Flaky(log, fails=9)))
        crashed_at = anyio.current_time()
        await crash(ref)
        await ref.ask("n", timeout=None)
    delays = gaps([crashed_at, *log[1:]])
    assert len(delays) == 10
    ratios = []
    for attempt, delay in enumerate(delays):
        base = min(10.0, 2.0**attempt)
        assert base * 0.5 - 1e-6 <= delay <= min(10.0, base * 1.5) + 1e-6
        if base * 1.5 <= 10.0:  # never capped: any jitter shows
            ratios.append(delay / base)
    assert max(gaps(log[1:])) <= 10.0 + 1e-6
    # Ignoring the jitter would give each uncapped delay exactly its base (ratio 1),
    # and a constant factor would give one ratio: a jittered delay is neither (the
    # chance that a uniform draw lands within 1e-6 of either is negligible).
    assert len(ratios) == 3
    assert all(abs(ratio - 1.0) > 1e-6 for ratio in ratios)
    assert len({round(ratio, 6) for ratio in ratios}) == len(ratios)


async def test_a_healthy_run_resets_the_delay() -> None:
    waits: list[float] = []
    backoff = Backoff(initial=1.0, multiplier=2.0, max=8.0, jitter=0.0, reset_after=60.0)
    async with Supervisor(backoff=backoff, intensity=None) as sup:
        ref = await sup.start_child(ChildSpec("f", lambda: Flaky([], fails=0)))

        async def crash_and_time_the_restart() -> None:
            before = anyio.current_time()
            await crash(ref)
            await ref.ask("n", timeout=None)
            waits.append(round(anyio.current_time() - before, 6))

        for _ in range(3):  # quick crashes: the delay doubles
            await crash_and_time_the_restart()
        await anyio.sleep(61.0)  # a healthy stretch longer than reset_after
        await crash_and_time_the_restart()
    assert waits == [1.0, 2.0, 4.0, 1.0]


async def test_a_child_in_backoff_does_not_hold_up_its_siblings() -> None:
    log: list[float] = []
    backoff = Backoff(initial=3600.0, multiplier=1.0, max=3600.0, jitter=0.0)

    class Echo(Actor):
        async def receive(self, message: object) -> object:
            return message

    async with Supervisor(backoff=backoff, intensity=None) as sup:
        slow = await sup.start_child(ChildSpec("slow", lambda: Flaky(log, fails=0)))
        echo = await sup.start_child(ChildSpec("echo", Echo))
        t0 = anyio.current_time()
        await crash(slow)
        assert [c.state for c in sup.children()] == ["restarting", "running"]
        for i in range(10):
            assert await echo.ask(i, timeout=None) == i
        assert anyio.current_time() == t0  # no time passed: nothing waited on the backoff
        more = await sup.start_child(ChildSpec("more", Echo))
        assert await more.ask("x") == "x"
        await sup.stop_child("slow")  # a stop request cuts the backoff short
        assert anyio.current_time() == t0 and not slow.alive


async def test_group_restart_waits_for_the_crashed_childs_backoff() -> None:
    log: list[float] = []
    backoff = Backoff(initial=5.0, multiplier=2.0, max=60.0, jitter=0.0)

    class Echo(Actor):
        async def on_start(self) -> None:
            log.append(anyio.current_time())

        async def receive(self, message: object) -> object:
            return message

    async with Supervisor(strategy="one_for_all", backoff=backoff, intensity=None) as sup:
        flaky = await sup.start_child(ChildSpec("f", lambda: Flaky([], fails=0)))
        echo = await sup.start_child(ChildSpec("e", Echo))
        t0 = anyio.current_time()
        await crash(flaky)
        await anyio.sleep(30.0)  # virtual: the group restart happens at t0 + 5
        assert [c.restart_count for c in sup.children()] == [1, 1]
        await crash(flaky)
        await anyio.sleep(30.0)  # at t0 + 30 + 10: the crashed child's delay doubled
        assert await echo.ask("back", timeout=None) == "back"
    assert [round(t - t0, 6) for t in log[1:]] == [5.0, 40.0]


async def test_restarts_older_than_the_period_do_not_count() -> None:
    log: list[float] = []
    no_wait = Backoff(initial=0.0, multiplier=1.0, max=0.0, jitter=0.0)
    async with Supervisor(intensity=2, period=10.0, backoff=no_wait) as sup:
        ref = await sup.start_child(ChildSpec("f", lambda: Flaky(log, fails=0)))
        for _ in range(6):  # 6 restarts, but never more than 2 within 10 s
            await crash(ref)
            await ref.ask("n", timeout=None)
            await anyio.sleep(6.0)
        assert sup.state == "running"
    with pytest.raises(RestartIntensityExceeded) as caught:
        async with Supervisor(intensity=2, period=10.0, backoff=no_wait) as sup:
            ref = await sup.start_child(ChildSpec("f", lambda: Flaky(log, fails=0)))
            for _ in range(3):
                await crash(ref)
                await ref.ask("n", timeout=None)
                await anyio.sleep(4.0)  # the third lands within 10 s of the first
    assert caught.value.period == 10.0


async def test_ask_timeout_on_virtual_time() -> None:
    gate = anyio.Event()

    class Slow(Actor):
        async def receive(self, message: object) -> object:
            await gate.wait()
            return message

    async with Supervisor() as sup:
        ref = await sup.start_child(ChildSpec("s", Slow))
        t0 = anyio.current_time()
        with pytest.raises(Exception, match="no reply within 30s"):
            await ref.ask("x", timeout=30.0)
        assert anyio.current_time() - t0 == pytest.approx(30.0)
        gate.set()


# ---- shutdown timeouts -----------------------------------------------------------------


async def test_start_soon_tasks_get_exactly_the_shutdown_timeout_then_are_cancelled() -> None:
    log: list[tuple[str, float]] = []

    class Graceful(Actor):
        async def on_start(self) -> None:
            self.ctx.start_soon(self.polite)
            self.ctx.start_soon(self.stubborn)

        async def polite(self) -> None:
            await self.ctx.wait_stopping()
            await anyio.sleep(10.0)  # finishes within the timeout
            log.append(("polite finished", anyio.current_time()))

        async def stubborn(self) -> None:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                log.append(("stubborn cancelled", anyio.current_time()))
                raise

        async def receive(self, message: object) -> object:
            return None

    async with Supervisor() as sup:
        await sup.start_child(ChildSpec("g", Graceful, shutdown=30.0))
        t0 = anyio.current_time()
        await sup.stop_child("g")
        stopped_after = anyio.current_time() - t0
    assert [(what, round(t - t0, 6)) for what, t in log] == [
        ("polite finished", 10.0),
        ("stubborn cancelled", 30.0),
    ]
    assert stopped_after == pytest.approx(30.0)


async def test_a_parents_timeout_for_a_nested_supervisor_cuts_its_childrens_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[float] = []

    class Stuck(Actor):
        async def receive(self, message: object) -> object:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                log.append(anyio.current_time())
                raise
            return None

    def middle() -> Supervisor:
        return Supervisor(children=[ChildSpec("stuck", Stuck, shutdown=600.0)])

    async with Supervisor(children=[ChildSpec("mid", middle, shutdown=5.0)]) as root:
        mid = root.child_supervisor("mid")
        assert mid is not None
        stuck = mid.ref("stuck")
        assert stuck is not None
        await stuck.tell("hang")
        await anyio.wait_all_tasks_blocked()
        t0 = anyio.current_time()
    assert [round(t - t0, 6) for t in log] == [5.0]  # the parent's 5 s, not the child's 600
    assert anyio.current_time() - t0 == pytest.approx(5.0)
    warnings = [r.getMessage() for r in caplog.records if "stuck" in r.getMessage()]
    # the warning says the stop was cut short, not that the child's own 600 s ran out
    assert any("shutdown deadline passed" in w for w in warnings), warnings
    assert not any("within 600s" in w for w in warnings), warnings


# ---- shutdown during a group restart ---------------------------------------------------


async def leave_during_a_stuck_group_restart(root_shutdown: float | None) -> tuple[float, Hang]:
    """Leave a supervisor (nested in a root if ``root_shutdown``) whose one_for_all restart
    hangs in child h's on_start (h's shutdown timeout: 30 s); return how long leaving took.

    A regression that never ends the on_start is caught by a virtual hour's watchdog,
    which then opens the gate so that the test fails instead of hanging.
    """
    hang = Hang()
    left = anyio.Event()
    took: list[float] = []

    def group() -> Supervisor:
        return Supervisor(
            strategy="one_for_all",
            children=[
                ChildSpec("a", lambda: Flaky([], fails=0)),
                ChildSpec("h", lambda: HangsOnRestart(hang), shutdown=30.0),
            ],
            backoff=NO_BACKOFF,
        )

    async def crash_then_cancel(sup: Supervisor | None, outer: anyio.CancelScope) -> float:
        assert sup is not None
        ref = sup.ref("a")
        assert ref is not None
        await crash(ref)
        await hang.entered.wait()  # the restart round is stuck in h's on_start
        outer.cancel()
        return anyio.current_time()

    async def scenario() -> None:
        with anyio.CancelScope() as outer:
            if root_shutdown is None:
                async with group() as sup:
                    t0 = await crash_then_cancel(sup, outer)
                    await anyio.sleep_forever()
            else:
                root = Supervisor(children=[ChildSpec("mid", group, shutdown=root_shutdown)])
                async with root:
                    t0 = await crash_then_cancel(root.child_supervisor("mid"), outer)
                    await anyio.sleep_forever()
        assert outer.cancelled_caught  # the cancellation was not swallowed
        took.append(anyio.current_time() - t0)
        left.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(scenario)
        with anyio.move_on_after(3600.0):
            await left.wait()
        hang.gate.set()
    return took[0], hang


async def test_leaving_while_a_group_restart_hangs_in_on_start_takes_its_shutdown_timeout() -> None:
    took, hang = await leave_during_a_stuck_group_restart(None)
    assert took == pytest.approx(30.0)  # graceful for h's 30 s, then cancelled
    assert hang.log == ["hanging", "cancelled"]


async def test_a_parents_timeout_cuts_short_a_nested_group_restart_hanging_in_on_start() -> None:
    took, hang = await leave_during_a_stuck_group_restart(5.0)
    assert took == pytest.approx(5.0)  # the parent's 5 s for the subtree, not h's 30
    assert hang.log == ["hanging", "cancelled"]
    took, hang = await leave_during_a_stuck_group_restart(float("inf"))
    assert took == pytest.approx(30.0)
    assert hang.log == ["hanging", "cancelled"]
