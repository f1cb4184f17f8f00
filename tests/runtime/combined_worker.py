"""A Runtime in its own process driving a scenario that combines features; it SIGKILLs
itself at a chosen point, for the combined crash matrix (test_combined_crashes.py).

    python -m tests.runtime.combined_worker DATA_DIR LEDGER SCENARIO CRASH

CRASH is ``none`` or ``<where>:<n>``, firing once in this process, with where one of
- ``write``: right after the n-th write this process made to the log became durable
  (an append to any stream, the inbox's included, a meta update or a trim): every
  record boundary of the scenario is a crash point;
- ``tool-before`` / ``tool-after``: inside the n-th side-effecting tool call this
  process makes, before / after its effect reached LEDGER;
- ``llm``: inside the n-th model call this process makes;
- ``spawned``: (scenario c) right after the n-th ``spawn`` of the driver returned.

LEDGER is an append-only file (O_APPEND, fsync'd) that the tools use as a payment API
would: every invocation appends ``attempt<TAB>key<TAB>name<TAB>args``; the effect
(``effect<TAB>key<TAB>name<TAB>args``) is appended only the first time a key is seen,
later invocations under that key return what the first one did. Scenarios (scripted
models, priced so that dollars are counted):
- ``a``: parent ``a-1`` (``max_llm_calls=3``) delegates to a child whose tool needs an
  approval (the worker approves it); the child's two model calls use up the parent's
  budget, which the worker raises to 10 with ``rt.resume``; then one turn of two
  concurrent calls, ``pay`` declared ``idempotent=False`` (an in-doubt call is resolved
  ``retry``: the ledger deduplicates it) and ``log_entry``; then the answer.
- ``b``: ``b-1`` sleeps an hour durably (the runtime's wall clock is this process's own
  clock, ``$PERDURE_TEST_CLOCK_OFFSET`` seconds ahead of time.time(), which the worker
  moves past the deadline), then waits for signal ``paid:o-1`` (timeout ten minutes).
  Once it waits, the worker prints ``{"waiting": ...}`` and exits (below), for the test
  to send the signal through the CLI while no process owns the dir. Beside it, ``b-2``
  makes a call, then waits for a signal that never comes; once ``b-1`` is done, the
  worker cancels ``b-2``, suspended all along. And ``b-3`` asks to call ``order``, whose
  approval times out after half an hour: nobody decides it; once ``b-2`` is cancelled,
  the worker moves its clock past the expiry (if the nap's move did not already) and
  the call is rejected by the timer, the model told, and ``b-3`` answers.
- ``c``: ``max_concurrency=2`` and six executions spawned in order, each one call.
- ``d``: ``d-1`` (``max_llm_calls=8``) delegates to ``quick`` (two model calls) and
  ``slow`` (four) in one turn: of the 7 calls left, ``quick`` is handed 4 and ``slow``
  3, so ``slow`` runs into its share unless ``quick`` finished first; either way it is
  handed what ``quick`` left (5) and finishes, and ``d-1`` answers with its last call.

With ``$PERDURE_TEST_DRIVE=cli``, the worker sends none of the approvals, raises,
resolves or cancels itself: it prints ``{"waiting": [CLI arguments]}`` and exits, and
the test runs that ``perdure`` command while no process owns the dir.

When every execution is finished the worker prints ``{"results": ..., "index": ...,
"writes": n}`` and exits 0. The event loop is ``$PERDURE_TEST_BACKEND`` (asyncio by
default, or trio).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from perdure import (
    Agent,
    Budget,
    InvalidSignalError,
    Result,
    Runtime,
    current_idempotency_key,
    sleep,
    tool,
    wait_for_signal,
)
from perdure.log import LmdbLog
from perdure.providers import LLMRequest, Price, Pricing, Scripted

_lock = threading.Lock()
_counts = {"write": 0, "tool": 0, "llm": 0, "spawned": 0}
CRASH: tuple[str, int] = ("none", 0)
LEDGER = ""
BACKEND = os.environ.get("PERDURE_TEST_BACKEND", "asyncio")
BY_CLI = os.environ.get("PERDURE_TEST_DRIVE") == "cli"


class Operator(Exception):
    """Raised by a scenario that needs the operator's CLI command ``args`` to go on."""


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _count(kind: str) -> int:
    with _lock:
        _counts[kind] += 1
        return _counts[kind]


def _ledger_line(*fields: str) -> None:
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, ("\t".join(fields) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def effect(name: str, /, **args: Any) -> str:
    """The side effect of a tool, deduplicated by idempotency key as a payment API does."""
    key = current_idempotency_key()
    n = _count("tool")
    if ("tool-before", n) == CRASH:
        die()
    encoded = json.dumps(args, sort_keys=True)
    with _lock:
        _ledger_line("attempt", key, name, encoded)
        with open(LEDGER) as books:  # the attempt line was just written: it exists
            seen = any(line.startswith(f"effect\t{key}\t") for line in books)
        if not seen:
            _ledger_line("effect", key, name, encoded)
    if ("tool-after", n) == CRASH:
        die()
    return f"{name}({encoded}) ok"


def _count_writes() -> None:
    """Count this process's durable writes to the log; SIGKILL right after the n-th if
    CRASH says so. (The reference run reports how many it made.)"""
    for method in ("append", "set_meta", "trim", "delete_streams"):

        def counting(original: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def write(self: Any, *args: Any, **kwargs: Any) -> Any:
                out = await original(self, *args, **kwargs)
                if ("write", _count("write")) == CRASH:
                    die()
                return out

            return write

        setattr(LmdbLog, method, counting(getattr(LmdbLog, method)))


def turn_of(request: LLMRequest) -> int:
    return sum(1 for m in request.messages if m.role == "assistant")


def answer(request: LLMRequest) -> str:
    return "done: " + " | ".join(m.content for m in request.messages if m.role == "tool")


def scripted(*turns: Any) -> Scripted:
    """A model that answers turn k with ``turns[k]``, then with what the tools returned."""

    def script(request: LLMRequest) -> Any:
        if ("llm", _count("llm")) == CRASH:
            die()
        turn = turn_of(request)
        return turns[turn] if turn < len(turns) else answer(request)

    return Scripted(script, record=False)


def snapshot(r: Result) -> dict[str, Any]:
    return {
        "status": r.status,
        "output": r.output,
        "error": dict(r.error) if r.error else None,
        "steps": r.steps,
        "usage": r.usage.to_dict(),
        "delegated_usage": r.delegated_usage.to_dict(),
        # byte for byte: the messages as the model is given them, ids included
        "transcript": json.dumps([m.to_dict() for m in r.transcript], sort_keys=True),
    }


async def approve(rt: Runtime, eid: str, cid: str) -> None:
    try:
        await rt.approve(eid, cid, by="worker")
    except InvalidSignalError:
        pass  # decided already, by a run before this one


# -- a: delegation, a child's approval, a budget raise, two concurrent calls ----------------


@tool(requires_confirmation=True)
def sign(doc: str) -> str:
    """Sign a document (needs approval)."""
    return effect("sign", doc=doc)


@tool(idempotent=False)
def pay(amount: float) -> str:
    """Pay (declared not idempotent: an interrupted call is in doubt)."""
    return effect("pay", amount=amount)


@tool
async def log_entry(text: str) -> str:
    """Write a log entry (async, on the event loop)."""
    await anyio.sleep(0)
    return effect("log_entry", text=text)


signer = Agent("signer", tools=[sign], llm=scripted(Scripted.call("sign", doc="nda")))
boss = Agent(
    "boss",
    tools=[pay, log_entry],
    agents=[signer],
    llm=scripted(
        Scripted.call("delegate_to_signer", task="sign the nda"),
        [Scripted.call("pay", amount=5.0), Scripted.call("log_entry", text="paid 5")],
    ),
    budget=Budget(max_llm_calls=3),
)
A = ["a-1", "a-1/2"]


async def moved_on(rt: Runtime, eid: str, before: Result) -> None:
    """Wait until ``eid`` is no longer where ``before`` saw it (each append may move it)."""
    with anyio.fail_after(30):
        while True:
            seen = await rt.log.last_seq(f"exec/{eid}")  # before the read: none is missed
            now = await rt.result(eid)
            if (now.status, now.suspend_reason) != (before.status, before.suspend_reason):
                return
            await rt.log.wait_for_append(f"exec/{eid}", after=seen)


async def scenario_a(rt: Runtime) -> list[str]:
    await rt.spawn(boss, "get it signed, then pay", execution_id="a-1")
    while True:
        r = await rt.wait("a-1")
        if not r.is_suspended:
            return A
        reason = r.suspend_reason
        assert reason is not None
        if reason.kind == "budget":
            if BY_CLI:
                raise Operator("resume", "a-1", "--max-llm-calls", "10")
            try:
                await rt.resume("a-1", budget=Budget(max_llm_calls=10), wait=False, by="worker")
            except InvalidSignalError:
                pass  # raised already
        elif reason.kind == "unknown_outcome":
            if BY_CLI:
                raise Operator("resolve", "a-1", "--retry")
            await rt.resolve("a-1", retry=True, by="worker")
        elif reason.kind == "child":
            child = await rt.wait("a-1/2")
            if child.is_suspended:
                assert child.suspend_reason is not None
                assert child.suspend_reason.kind == "approval", child.suspend_reason
                cid = child.suspend_reason.confirmation_id
                if BY_CLI:
                    raise Operator("approve", "a-1/2", cid)
                await approve(rt, "a-1/2", cid)
                await moved_on(rt, "a-1/2", child)
                continue
        else:
            raise AssertionError(f"a-1 suspended unexpectedly: {reason.to_dict()}")
        await moved_on(rt, "a-1", r)


# -- b: a durable sleep, a signal sent while no process runs, a cancel -----------------------


class Clock:
    """This process's wall clock, which the driver moves on past a timer's deadline."""

    def __init__(self) -> None:
        # a run may start "later" (past a deadline set by an earlier one) without waiting
        self.offset = float(os.environ.get("PERDURE_TEST_CLOCK_OFFSET", "0"))

    def __call__(self) -> float:
        return time.time() + self.offset

    def move_past(self, until: float) -> None:
        self.offset = max(self.offset, until + 1.0 - time.time())


@tool
def nap() -> str:
    """Sleep an hour, durably."""
    sleep(3600)
    return "rested"


@tool
def settle(order: str) -> str:
    """Wait for the payment of an order, then book it."""
    paid = wait_for_signal(f"paid:{order}", timeout=600)
    return effect("settle", order=order, ref=paid["ref"])


@tool
def prepare(item: str) -> str:
    """Prepare an item."""
    return effect("prepare", item=item)


@tool
def hold(item: str) -> str:
    """Wait for a release that never comes."""
    wait_for_signal(f"release:{item}")
    return effect("hold", item=item)


napper = Agent(
    "napper",
    tools=[nap, settle],
    llm=scripted(Scripted.call("nap"), Scripted.call("settle", order="o-1")),
)
holder = Agent(
    "holder",
    tools=[prepare, hold],
    llm=scripted(Scripted.call("prepare", item="box"), Scripted.call("hold", item="box")),
)


@tool(requires_confirmation=True, approval_timeout=1800)
def order(item: str) -> str:
    """Order an item (a person must agree within half an hour)."""
    return effect("order", item=item)


asker = Agent("asker", tools=[order], llm=scripted(Scripted.call("order", item="crate")))
B = ["b-1", "b-2", "b-3"]


async def scenario_b(rt: Runtime, clock: Clock) -> list[str]:
    await rt.spawn(napper, "nap, then settle o-1", execution_id="b-1")
    await rt.spawn(holder, "prepare and hold the box", execution_id="b-2")
    await rt.spawn(asker, "order a crate", execution_id="b-3")
    while True:
        r = await rt.wait("b-1")
        if not r.is_suspended:
            break
        reason = r.suspend_reason
        assert reason is not None
        if reason.kind == "timer":
            clock.move_past(reason.until)
            rt._timers.poke()
            await moved_on(rt, "b-1", r)  # the timer fires through the inbox
        elif reason.kind == "signal" and reason.name == "paid:o-1":
            # always sent while no process owns the dir
            raise Operator("signal", "b-1", "paid:o-1", '{"ref": "p-1"}')
        else:
            raise AssertionError(f"b-1 suspended unexpectedly: {reason.to_dict()}")
    # b-2 has waited all along (across the restarts too): cancel it now
    r2 = await rt.wait("b-2")
    if r2.is_suspended:
        assert r2.suspend_reason is not None and r2.suspend_reason.kind == "signal", r2
        if BY_CLI:
            raise Operator("cancel", "b-2", "--reason", "no longer needed")
        await rt.cancel("b-2", "no longer needed", by="worker")
        await rt.wait("b-2", until="finished")
    # b-3's approval was never decided: past its expiry, the timer rejects it
    r3 = await rt.wait("b-3")
    if r3.is_suspended:
        reason = r3.suspend_reason
        assert reason is not None and reason.kind == "approval" and reason.until, r3
        clock.move_past(reason.until)
        rt._timers.poke()
        await rt.wait("b-3", until="finished")
    return B


# -- c: max_concurrency=2, six queued ------------------------------------------------------


@tool
def job(name: str) -> str:
    """One unit of work."""
    return effect("job", name=name)


def job_script(request: LLMRequest) -> Any:
    if ("llm", _count("llm")) == CRASH:
        die()
    if turn_of(request) == 0:
        return Scripted.call("job", name=request.messages[-1].content)
    return answer(request)


queued = Agent("queued", tools=[job], llm=Scripted(job_script, record=False))
C = [f"c-{n}" for n in range(6)]


async def scenario_c(rt: Runtime) -> list[str]:
    for eid in C:
        await rt.spawn(queued, eid, execution_id=eid)
        if ("spawned", _count("spawned")) == CRASH:
            die()
    for eid in C:
        await rt.wait(eid, until="finished")
    return C


# -- d: two children delegated in one turn share their parent's budget -----------------------

quick = Agent("quick", tools=[job], llm=scripted(Scripted.call("job", name="quick")))
slow = Agent(
    "slow", tools=[job], llm=scripted(*(Scripted.call("job", name=f"slow-{n}") for n in range(3)))
)
fan = Agent(
    "fan",
    agents=[quick, slow],
    llm=scripted(
        [
            Scripted.call("delegate_to_quick", task="one job"),
            Scripted.call("delegate_to_slow", task="three jobs"),
        ]
    ),
    budget=Budget(max_llm_calls=8),
)
D = ["d-1", "d-1/2", "d-1/3"]


async def scenario_d(rt: Runtime) -> list[str]:
    await rt.spawn(fan, "fan out", execution_id="d-1")
    await rt.wait("d-1", until="finished")
    return D


AGENTS = {"a": [boss], "b": [napper, holder, asker], "c": [queued], "d": [fan]}


async def main_async(data_dir: str, scenario: str) -> None:
    clock = Clock()
    rt = Runtime(
        data_dir,
        agents=AGENTS[scenario],
        max_concurrency=2 if scenario == "c" else None,
        pricing=Pricing.default().with_prices({"scripted": Price(1.25, 2.5)}),
        shutdown_timeout=1.0,
    )
    rt._wall_clock = clock
    async with rt:
        try:
            with anyio.fail_after(60):
                if scenario == "a":
                    ids = await scenario_a(rt)
                elif scenario == "b":
                    ids = await scenario_b(rt, clock)
                elif scenario == "c":
                    ids = await scenario_c(rt)
                else:
                    ids = await scenario_d(rt)
        except Operator as needed:
            print(json.dumps({"waiting": needed.args, "writes": _counts["write"]}), flush=True)
            return
        results = {eid: snapshot(await rt.result(eid)) for eid in ids}
        index = {}
        for info in await rt.executions():
            row = info.to_dict()
            for moving in ("created_at", "updated_at", "wakes_at"):
                row.pop(moving, None)
            index[info.execution_id] = row
    print(json.dumps({"results": results, "index": index, "writes": _counts["write"]}), flush=True)


def main() -> None:
    global CRASH, LEDGER
    data_dir, LEDGER, scenario, crash = sys.argv[1:5]
    if crash != "none":
        where, n = crash.split(":")
        CRASH = (where, int(n))
    _count_writes()
    anyio.run(main_async, data_dir, scenario, backend=BACKEND)


if __name__ == "__main__":
    main()
