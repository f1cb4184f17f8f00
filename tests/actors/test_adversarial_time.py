"""Edges in time, on trio's virtual clock: the intensity window's boundary, backoff
against intensity, on_stop past its timeout, leaving during a group restart's backoff.
"""

from __future__ import annotations

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
    StopReason,
    Supervisor,
)
from tests.actors.probes import NO_BACKOFF, Boom, Recorder

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    """Trio with a virtual clock that jumps whenever all tasks are blocked."""
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


class Crashy(Actor):
    """Crashes on "crash"; replies with its restart count otherwise."""

    async def receive(self, message: object) -> object:
        if message == "crash":
            raise Boom("crash")
        return self.ctx.restart_count


async def crash(ref: ActorRef) -> None:
    with pytest.raises(ActorCrashed):
        await ref.ask("crash", timeout=None)


@pytest.mark.parametrize(("gap", "exceeded"), [(10.0, True), (10.000001, False)])
async def test_a_restart_exactly_one_period_after_another_still_counts(
    gap: float, exceeded: bool
) -> None:
    # OTP keeps the restarts R with R >= Now - Period: one exactly a period old counts.
    failed = False
    try:
        async with Supervisor(intensity=1, period=10.0, backoff=NO_BACKOFF) as sup:
            ref = await sup.start_child(ChildSpec("c", Crashy))
            await crash(ref)
            assert await ref.ask("n", timeout=None) == 1
            await anyio.sleep(gap)
            await crash(ref)
            await anyio.wait_all_tasks_blocked()  # an escalation cancels the body here
    except RestartIntensityExceeded:
        failed = True
    assert failed is exceeded


async def test_a_restart_counts_when_the_child_exits_not_when_its_backoff_ends() -> None:
    # Fixed 6 s backoff, intensity 1 per 10 s: crashes at 0 and at 6 (right after the
    # first restart). Counted at exit, [0, 6] is over the limit at 6; counted when the
    # backoff ends, it would be [6, 12], at 12.
    backoff = Backoff(initial=6.0, multiplier=1.0, max=6.0, jitter=0.0)
    failed_at: list[float] = []
    with pytest.raises(RestartIntensityExceeded):
        async with Supervisor(intensity=1, period=10.0, backoff=backoff) as sup:
            sup.observe(
                lambda e: failed_at.append(anyio.current_time()) if e.kind == "escalated" else None
            )
            ref = await sup.start_child(ChildSpec("c", Crashy))
            t0 = anyio.current_time()
            await crash(ref)
            assert await ref.ask("n", timeout=None) == 1
            assert anyio.current_time() - t0 == pytest.approx(6.0)
            await crash(ref)
            await anyio.sleep_forever()
    assert [round(t - t0, 6) for t in failed_at] == [6.0]


async def test_an_on_stop_that_hangs_is_cancelled_at_its_timeout_and_the_rest_still_stop() -> None:
    # A child busy with messages (so it has its runner task, unlike a dormant one)
    # whose on_stop never returns.
    log: list[tuple[str, float]] = []

    class HangsInOnStop(Actor):
        def __init__(self, id: str) -> None:
            self.id = id

        async def receive(self, message: object) -> object:
            return message

        async def on_stop(self, reason: StopReason) -> None:
            log.append((f"{self.id} on_stop", anyio.current_time()))
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                log.append((f"{self.id} cancelled", anyio.current_time()))
                raise

    class Polite(Actor):
        async def receive(self, message: object) -> object:
            return message

        async def on_stop(self, reason: StopReason) -> None:
            log.append(("polite on_stop", anyio.current_time()))

    async with Supervisor(
        children=[
            ChildSpec("polite", Polite),
            ChildSpec("h1", lambda: HangsInOnStop("h1"), shutdown=7.0),
            ChildSpec("h2", lambda: HangsInOnStop("h2"), shutdown=3.0),
        ]
    ) as sup:
        for id in ("polite", "h1", "h2"):
            ref = sup.ref(id)
            assert ref is not None
            assert await ref.ask("wake") == "wake"
        t0 = anyio.current_time()
    assert [(what, round(t - t0, 6)) for what, t in log] == [
        ("h2 on_stop", 0.0),
        ("h2 cancelled", 3.0),
        ("h1 on_stop", 3.0),
        ("h1 cancelled", 10.0),
        ("polite on_stop", 10.0),
    ]


async def test_an_on_stop_that_shields_itself_is_waited_for_and_cancellation_goes_on() -> None:
    # A child that ignores its cancellation (a shielded cleanup) cannot be killed in
    # Python; the supervisor waits for it rather than leave its task behind, and the
    # outer cancellation is still delivered once it is done.
    log: list[float] = []

    class Shielded(Actor):
        async def receive(self, message: object) -> object:
            return message

        async def on_stop(self, reason: StopReason) -> None:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(100.0)
            log.append(anyio.current_time())

    before = len(anyio.get_running_tasks())
    with anyio.CancelScope() as outer:
        async with Supervisor(children=[ChildSpec("s", Shielded, shutdown=1.0)]) as sup:
            ref = sup.ref("s")
            assert ref is not None
            await ref.ask("wake")
            t0 = anyio.current_time()
            outer.cancel()
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert [round(t - t0, 6) for t in log] == [100.0]
    assert len(anyio.get_running_tasks()) == before


@pytest.mark.parametrize("strategy", ["one_for_all", "rest_for_one"])
async def test_leaving_during_a_group_restarts_backoff_does_not_wait_for_it(strategy: str) -> None:
    backoff = Backoff(initial=3600.0, multiplier=1.0, max=3600.0, jitter=0.0)
    with anyio.CancelScope() as outer:
        async with Supervisor(strategy=strategy, backoff=backoff) as sup:  # type: ignore[arg-type]
            recorder = Recorder(sup)
            a = await sup.start_child(ChildSpec("a", Crashy))
            await sup.start_child(ChildSpec("b", Crashy))
            t0 = anyio.current_time()
            await crash(a)
            await anyio.wait_all_tasks_blocked()
            assert [c.state for c in sup.children()] == ["restarting", "restarting"]
            outer.cancel()
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    assert anyio.current_time() == t0  # no virtual second of the hour was waited
    assert "restarted" not in recorder.kinds()
    assert sup.state == "stopped" and sup.count_children() == 0
