"""A Runtime in its own process, for tests that need a process boundary.

    python -m tests.runtime.signal_worker DATA_DIR MODE [CRASH]

The event loop is ``$PERDURE_TEST_BACKEND`` (``asyncio`` by default, or ``trio``).
``PERDURE_CRASHED=1`` / ``PERDURE_RESTARTED=1`` mark a run after a SIGKILL (the crash
points are then disarmed). Side effects (tool runs, model turns) are appended to
``$PERDURE_SIDE_FILE``, one fsync'd line each, so the test can count them.

Modes:
- ``approval``: runs an execution of ``banker`` (a tool that requires confirmation) with
  id ``x-1`` until it suspends, prints ``{"event": "suspended", "cid": ...}``, then keeps
  owning the data dir; when the execution completes (after a signal from another
  process) prints ``{"event": "completed", "at": <time>, "output": ...}`` and exits.
- ``delegate``: runs a ``manager`` that delegates to ``researcher`` (execution
  ``p-1``); CRASH ``child-tool`` SIGKILLs the process inside the child's tool,
  ``parent-after-child`` SIGKILLs it right after the child completed; prints the final
  result of ``p-1`` as JSON when it finishes.
- ``delegate-approval``: a ``director`` (execution ``LONG_PARENT``, an id so long that
  its child's id is shortened with a digest) asks for an approval and delegates to
  ``clerk`` in one turn; the clerk needs an approval of its own. The first run prints
  ``{"event": "suspended", "parent_cid", "child_id", "child_cid"}`` once both wait, and
  SIGKILLs itself as soon as the child completes (before the parent hears of it).
  A restarted run prints ``{"event": "recovered"}`` once recovery has run, then the
  parent's final result.
- a *flow*: ``reject``, ``approve``, ``contract``, ``budget`` or ``cancel`` runs one
  execution (see ``FLOWS``) and prints ``{"event": "ready"}`` once recovery has run,
  then ``suspended`` (kind, cid), ``tool-started``, ``cancelled`` as they happen, and
  ``{"event": "finished", ...}`` (status, output, tool results, usage) once it is
  completed, failed or cancelled, then exits 0. After a restart, ``approve`` also
  registers callbacks that raise (sync and async) and, once its execution finished,
  runs one more execution to show the runtime still works (``{"event": "alive"}``).
  CRASH ``budget-step`` SIGKILLs the ``budget`` flow inside its fourth tool call. The
  first run of ``cancel`` keeps owning the dir after its execution finished.

Every line on stdout is one JSON object, flushed at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import anyio

from perdure import Agent, Budget, ContractViolation, Result, Runtime, tool
from perdure.providers import LLMRequest, Scripted

CRASH = sys.argv[3] if len(sys.argv) > 3 else "none"
SIDE = os.environ.get("PERDURE_SIDE_FILE", "")
AFTER_CRASH = bool(os.environ.get("PERDURE_CRASHED") or os.environ.get("PERDURE_RESTARTED"))
BACKEND = os.environ.get("PERDURE_TEST_BACKEND", "asyncio")

#: A parent id long enough that its children's ids are shortened (``...~digest/step``).
LONG_PARENT = "dir-" + "x" * 250


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def side(line: str) -> None:
    if SIDE:
        with open(SIDE, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def turn_of(request: LLMRequest) -> int:
    return sum(1 for m in request.messages if m.role == "assistant")


@tool("transfer", requires_confirmation=True)
def transfer(amount: float) -> str:
    side(f"transfer {amount}")
    return f"moved {amount}"


banker = Agent(
    "banker", tools=[transfer], llm=Scripted([Scripted.call("transfer", amount=5.0), "done"])
)


@tool
def lookup(topic: str) -> str:
    side(f"lookup {topic}")
    if CRASH == "child-tool" and not AFTER_CRASH:
        die()
    return f"facts about {topic}"


researcher = Agent(
    "researcher",
    tools=[lookup],
    llm=Scripted([Scripted.call("lookup", topic="paris"), "Paris: 2.1M people."]),
    description="Finds facts.",
)
manager = Agent(
    "manager",
    llm=Scripted(
        [Scripted.call("delegate_to_researcher", task="population of Paris?"), "Report: done."]
    ),
    agents=[researcher],
)


# -- delegate-approval ----------------------------------------------------------------------


@tool("file_claim", requires_confirmation=True)
def file_claim(amount: float) -> str:
    side(f"file_claim {amount}")
    return f"filed {amount}"


@tool("sign_off", requires_confirmation=True)
def sign_off(plan: str) -> str:
    side(f"sign_off {plan}")
    return f"signed {plan}"


clerk = Agent(
    "clerk",
    tools=[file_claim],
    llm=Scripted([Scripted.call("file_claim", amount=12.5), "Claim filed."]),
    description="Files claims.",
)
director = Agent(
    "director",
    tools=[sign_off],
    llm=Scripted(
        [
            [
                Scripted.call("sign_off", plan="q3"),
                Scripted.call("delegate_to_clerk", task="file the claim"),
            ],
            "Director: all done.",
        ]
    ),
    agents=[clerk],
)


# -- flows ----------------------------------------------------------------------------------


@tool("pay", requires_confirmation=True)
def pay(amount: float) -> str:
    side(f"pay {amount}")
    return f"paid {amount}"


def pay_script(request: LLMRequest) -> Any:
    turn = turn_of(request)
    side(f"llm {turn}")
    if turn == 0:
        return Scripted.call("pay", amount=5.0)
    seen = request.messages[-1].content
    side(f"saw {seen}")
    return f"model saw: {seen}"


payer = Agent("payer", tools=[pay], llm=Scripted(pay_script))


@tool
def charge(amount: float) -> str:
    side(f"charge {amount}")
    return "charged"


shop = Agent("shop", tools=[charge], llm=Scripted([Scripted.call("charge", amount=900.0), "done"]))


@shop.contract("max-charge")
def max_charge(tool_name: str, args: dict[str, Any]) -> None:
    if tool_name == "charge" and args["amount"] > 500:
        raise ContractViolation(f"charge of {args['amount']} exceeds 500")


@tool
def step(n: int) -> int:
    side(f"step {n}")
    if n == 3 and CRASH == "budget-step" and not AFTER_CRASH:
        die()
    return n


def budget_script(request: LLMRequest) -> Any:
    turn = turn_of(request)
    side(f"llm {turn}")
    return Scripted.call("step", n=turn) if turn < 5 else "done"


budgeted = Agent(
    "budgeted", tools=[step], llm=Scripted(budget_script), budget=Budget(max_llm_calls=2)
)


@tool
async def long_job() -> str:
    side("long_job started")
    emit(event="tool-started")
    await anyio.sleep_forever()
    return "unreachable"


longrunner = Agent("longrunner", tools=[long_job], llm=Scripted([Scripted.call("long_job"), "x"]))
greeter = Agent("greeter", llm=Scripted(["hello"]))

#: flow -> (agent, execution id, prompt)
FLOWS: dict[str, tuple[Agent, str, str]] = {
    "reject": (payer, "rej-1", "pay 5"),
    "approve": (payer, "app-1", "pay 5"),
    "contract": (shop, "k-1", "charge 900"),
    "budget": (budgeted, "b-1", "go"),
    "cancel": (longrunner, "c-1", "go"),
}


def finished(r: Result) -> None:
    emit(
        event="finished",
        status=r.status,
        output=r.output,
        tools=[m.content for m in r.transcript if m.role == "tool"],
        llm_calls=r.usage.llm_calls,
        tool_calls=r.usage.tool_calls,
    )


async def flow(data_dir: str, name: str) -> None:
    agent, eid, prompt = FLOWS[name]
    agents = [agent, greeter]
    async with Runtime(data_dir, agents=agents, durability="process", shutdown_timeout=1.0) as rt:

        @rt.on_suspend
        def suspended(result: Result, reason: Any) -> None:
            if result.execution_id == eid:
                emit(event="suspended", kind=reason.kind, cid=reason.confirmation_id)

        @rt.on_cancel
        def cancelled(result: Result) -> None:
            emit(event="cancelled", id=result.execution_id)

        if name == "approve" and AFTER_CRASH:

            @rt.on_complete
            def raises(result: Result) -> None:
                raise RuntimeError("sync callback bug")

            @rt.on_complete
            async def raises_too(result: Result) -> None:
                await anyio.sleep(0)
                raise ValueError("async callback bug")

        await rt.wait_recovered()
        emit(event="ready")
        await rt.spawn(agent, prompt, execution_id=eid)
        r = await rt.wait(eid, until="finished")
        if name == "approve" and AFTER_CRASH:
            after = await rt.run(greeter, "hi", execution_id="after-1")
            emit(event="alive", status=after.status)
        finished(r)
        if name == "cancel" and not AFTER_CRASH:
            await anyio.sleep_forever()  # still owning the dir when the test kills it


async def approval(data_dir: str) -> None:
    async with Runtime(data_dir, agents=[banker]) as rt:
        done = anyio.Event()

        @rt.on_complete
        def completed(result: Result) -> None:
            if result.execution_id == "x-1":
                emit(event="completed", at=time.time(), output=result.output)
                done.set()

        r = await rt.run(banker, "move 5", execution_id="x-1")
        if r.is_suspended and not os.environ.get("PERDURE_RESTARTED"):
            emit(event="suspended", cid=r.suspend_reason.confirmation_id)  # type: ignore[union-attr]
            await done.wait()
        else:
            # after a restart, an approval sent while no runtime ran is delivered by the
            # recovery that starts as the runtime opens
            r = await rt.wait("x-1", until="finished")
            emit(event="completed", at=time.time(), output=r.output)


async def delegate(data_dir: str) -> None:
    async with Runtime(data_dir, agents=[manager]) as rt:

        @rt.on_complete
        def completed(result: Result) -> None:
            crash_now = CRASH == "parent-after-child" and not AFTER_CRASH
            if result.execution_id == "p-1/2" and crash_now:
                die()

        await rt.spawn(manager, "research paris", execution_id="p-1")
        r = await rt.wait("p-1", until="finished")
        emit(
            event="finished",
            status=r.status,
            output=r.output,
            tools=[m.content for m in r.transcript if m.role == "tool"],
        )


async def delegate_approval(data_dir: str) -> None:
    async with Runtime(data_dir, agents=[director], durability="process") as rt:

        @rt.on_complete
        def completed(result: Result) -> None:
            # Killed after the child's completion is durable, before its parent is told.
            if result.agent == "clerk" and not AFTER_CRASH:
                die()

        if AFTER_CRASH:
            await rt.wait_recovered()
            emit(event="recovered")
        else:
            r = await rt.run(director, "file and sign", execution_id=LONG_PARENT)
            assert r.suspend_reason is not None
            blockers = {b["kind"]: b for b in r.suspend_reason.pending}
            child_id = blockers["child"]["child_id"]
            child = await rt.wait(child_id)
            assert child.suspend_reason is not None
            emit(
                event="suspended",
                parent_cid=blockers["approval"]["confirmation_id"],
                child_id=child_id,
                child_cid=child.suspend_reason.confirmation_id,
            )
        r = await rt.wait(LONG_PARENT, until="finished")
        finished(r)


def main() -> None:
    data_dir, mode = sys.argv[1], sys.argv[2]
    if mode in FLOWS:
        anyio.run(flow, data_dir, mode, backend=BACKEND)
        return
    modes = {"approval": approval, "delegate": delegate, "delegate-approval": delegate_approval}
    anyio.run(modes[mode], data_dir, backend=BACKEND)


if __name__ == "__main__":
    main()
