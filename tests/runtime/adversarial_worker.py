"""A Runtime in its own process for the adversarial crash tests; it SIGKILLs itself.

    python -m tests.runtime.adversarial_worker DATA_DIR SIDE_FILE SCENARIO CRASH

CRASH is ``none`` or a comma-separated list of ``<where>:<n>``, each firing once in
this process, with where one of
- ``append``: right after the n-th append of an execution's journal became durable
  (so every record boundary is a crash point: between an approval and the tool's
  start, between a tool's start and its outcome, between a resolve and the re-run...);
- ``tool-before`` / ``tool-after``: inside the n-th tool call this process makes,
  before / after its side effect was written to SIDE_FILE (fsync'd);
- ``child-done``: right after the n-th delegated child's completion became durable,
  before its parent has taken (and been charged) its outcome.
- ``raised`` / ``inherited``: right after the n-th append holding a ``budget.raised`` /
  ``budget.inherited`` record became durable, before it is handed down any further.

Every tool writes ``key<TAB>name<TAB>arg`` to SIDE_FILE; every model call writes
``llm<TAB>agent<TAB>turn<TAB>$PERDURE_RUN`` (which run of the worker asked). Scenarios
(each drives its executions until they finish, then prints one JSON line per execution
and exits 0):
- ``mixed``: one turn of three concurrent calls, the middle one requires confirmation;
  the worker approves every confirmation it sees (``by=worker``).
- ``queue``: ``max_concurrency=1`` and five executions spawned in order.
- ``doubt``: a non-idempotent tool; an in-doubt call is resolved as ``$PERDURE_RESOLVE``
  says (``retry``, ``complete`` or ``fail``; ``stop`` prints the suspension and exits).
- ``delegate``: a parent delegates to a child whose tool requires confirmation; with
  ``$PERDURE_APPROVE=0`` the worker prints the child's suspension and waits to be
  killed, otherwise it approves the child and waits for the parent.
- ``budget``: one turn of three calls under ``max_tool_calls=2``; the worker raises the
  budget once it suspends on it.
- ``charge``: a root under ``max_llm_calls=6`` delegates to two children in turn (two
  LLM calls each); their usage is charged to it, so it stops on its budget before its
  answer; the worker then raises it to 10.
- ``handdown``: a root under ``max_llm_calls=3`` delegates to a middle execution, which
  delegates to a leaf; the leaf stops on the root's limit, and the worker raises the
  root's budget to 20 (unless a run before it did), which must come down two levels.
- ``tree``: under ``max_concurrency=2`` a root delegates twice in one turn; one child
  delegates again, to a grandchild whose tool requires confirmation (the worker approves
  every approval it sees); the other child's tool is blocked by a contract (the worker
  overrides it).

The event loop is ``$PERDURE_TEST_BACKEND`` (asyncio by default, or trio).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

import anyio

import perdure.journal as journal_module
from perdure import Agent, Budget, Result, Runtime, current_idempotency_key, tool
from perdure.providers import LLMRequest, Scripted

_lock = threading.Lock()
_counts: dict[str, int] = {"append": 0, "tool": 0, "child-done": 0, "raised": 0, "inherited": 0}
CRASHES: set[tuple[str, int]] = set()
SIDE = ""
BACKEND = os.environ.get("PERDURE_TEST_BACKEND", "asyncio")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _count(kind: str) -> int:
    with _lock:
        _counts[kind] += 1
        return _counts[kind]


def llm_side(agent: str, turn: int) -> None:
    side("llm", agent, turn, os.environ.get("PERDURE_RUN", "0"))


def side(*fields: Any) -> None:
    with _lock, open(SIDE, "a") as f:
        f.write("\t".join(str(x) for x in fields) + "\n")
        f.flush()
        os.fsync(f.fileno())


def effect(name: str, arg: str) -> str:
    n = _count("tool")
    if ("tool-before", n) in CRASHES:
        die()
    side(current_idempotency_key(), name, arg)
    if ("tool-after", n) in CRASHES:
        die()
    return f"{name}({arg}) ok"


def _crash_after_appends() -> None:
    """SIGKILL right after the n-th journal append of this process is durable."""
    flush = journal_module.Journal.flush

    finished: set[str] = set()

    async def counting_flush(self: Any) -> None:
        before = self.state.seq
        types = {record.type for record in self._staged}
        await flush(self)
        if self.state.seq != before and ("append", _count("append")) in CRASHES:
            die()
        for kind in ("raised", "inherited"):
            written = self.state.seq != before and f"budget.{kind}" in types
            if written and (kind, _count(kind)) in CRASHES:
                die()
        # (staging folds at once: the state says "completed" before the flush already)
        done = self.state.status == "completed" and self.state.parent
        if done and self.state.seq != before and self.stream not in finished:
            finished.add(self.stream)
            if ("child-done", _count("child-done")) in CRASHES:
                die()

    journal_module.Journal.flush = counting_flush  # type: ignore[method-assign]


def turn_of(request: LLMRequest) -> int:
    return sum(1 for m in request.messages if m.role == "assistant")


def answer(request: LLMRequest) -> str:
    return "done: " + " | ".join(m.content for m in request.messages if m.role == "tool")


def emit(r: Result) -> None:
    print(
        json.dumps(
            {
                "id": r.execution_id,
                "status": r.status,
                "output": r.output,
                "reason": r.suspend_reason.to_dict() if r.suspend_reason else None,
                "transcript": [[m.role, m.content, m.name, m.is_error] for m in r.transcript],
            }
        ),
        flush=True,
    )


# -- mixed: an approval among concurrent calls ------------------------------------------------


@tool
def plain_a(x: str) -> str:
    """First concurrent call."""
    return effect("plain_a", x)


@tool(requires_confirmation=True)
def guarded(x: str) -> str:
    """Needs a person's approval."""
    return effect("guarded", x)


@tool
async def plain_b(x: str) -> str:
    """Third concurrent call (async, on the event loop)."""
    await anyio.sleep(0)
    return effect("plain_b", x)


def mixed_script(request: LLMRequest) -> Any:
    turn = turn_of(request)
    llm_side("mixer", turn)
    if turn == 0:
        return [
            Scripted.call("plain_a", x="1"),
            Scripted.call("guarded", x="2"),
            Scripted.call("plain_b", x="3"),
        ]
    return answer(request)


mixer = Agent("mixer", tools=[plain_a, guarded, plain_b], llm=Scripted(mixed_script, record=False))


async def approve_until_done(rt: Runtime, eid: str) -> Result:
    r = await rt.wait(eid)
    while r.is_suspended:
        assert r.suspend_reason is not None
        for blocker in r.suspend_reason.pending:
            assert blocker["kind"] == "approval", blocker
            await rt.approve(eid, blocker["confirmation_id"], by="worker")
        r = await rt.wait(eid)
    return r


async def mixed(rt: Runtime) -> None:
    await rt.spawn(mixer, "go", execution_id="mx-1")
    emit(await approve_until_done(rt, "mx-1"))


# -- queue: max_concurrency=1 -----------------------------------------------------------------


@tool
def job(name: str) -> str:
    """One unit of work."""
    return effect("job", name)


def queue_script(request: LLMRequest) -> Any:
    turn = turn_of(request)
    llm_side(next(m.content for m in request.messages if m.role == "user"), turn)
    if turn == 0:
        return Scripted.call("job", name=request.messages[-1].content)
    return answer(request)


queuer = Agent("queuer", tools=[job], llm=Scripted(queue_script, record=False))
QUEUE = [f"q-{n}" for n in range(5)]


async def queue(rt: Runtime) -> None:
    for eid in QUEUE:
        await rt.spawn(queuer, eid, execution_id=eid)
    for eid in QUEUE:
        emit(await rt.wait(eid))


# -- doubt: a non-idempotent tool in doubt ------------------------------------------------------


@tool(idempotent=False)
def wire(amount: float) -> str:
    """Wire money (no idempotency downstream)."""
    return effect("wire", str(amount))


def doubt_script(request: LLMRequest) -> Any:
    turn = turn_of(request)
    llm_side("wirer", turn)
    if turn == 0:
        return Scripted.call("wire", amount=10.0)
    return answer(request)


wirer = Agent("wirer", tools=[wire], llm=Scripted(doubt_script, record=False))


async def doubt(rt: Runtime) -> None:
    await rt.spawn(wirer, "wire 10", execution_id="w-1")
    r = await rt.wait("w-1")
    action = os.environ.get("PERDURE_RESOLVE", "retry")
    while r.is_suspended:
        assert r.suspend_reason is not None and r.suspend_reason.kind == "unknown_outcome"
        if action == "stop":
            break
        if action == "retry":
            await rt.resolve("w-1", retry=True, by="worker")
        elif action == "complete":
            await rt.resolve("w-1", complete="wired by hand", by="worker")
        else:
            await rt.resolve("w-1", fail="bank says no", by="worker")
        r = await rt.wait("w-1")
    emit(r)


# -- delegate: a child suspended on an approval ---------------------------------------------------


@tool(requires_confirmation=True)
def sign(doc: str) -> str:
    """Sign a document (needs approval)."""
    return effect("sign", doc)


def child_script(request: LLMRequest) -> Any:
    turn = turn_of(request)
    llm_side("signer", turn)
    return Scripted.call("sign", doc="nda") if turn == 0 else answer(request)


def parent_script(request: LLMRequest) -> Any:
    turn = turn_of(request)
    llm_side("boss", turn)
    if turn == 0:
        return Scripted.call("delegate_to_signer", task="sign the nda")
    return answer(request)


signer = Agent("signer", tools=[sign], llm=Scripted(child_script, record=False))
boss = Agent("boss", llm=Scripted(parent_script, record=False), agents=[signer])


async def delegate(rt: Runtime) -> None:
    await rt.spawn(boss, "get it signed", execution_id="d-1")
    await rt.wait("d-1")  # suspended on its child (or finished, after a restart)
    child = await rt.wait("d-1/2")
    if os.environ.get("PERDURE_APPROVE") == "0":
        emit(child)
        await anyio.sleep_forever()  # owning the dir, the child suspended, until killed
    if child.is_suspended:
        assert child.suspend_reason is not None
        await rt.approve("d-1/2", child.suspend_reason.confirmation_id, by="worker")
    emit(await rt.wait("d-1", until="finished"))


# -- budget: a tool budget runs out inside one turn ---------------------------------------------


@tool
def fetch(page: str) -> str:
    """Fetch a page."""
    return effect("fetch", page)


def budget_script(request: LLMRequest) -> Any:
    turn = turn_of(request)
    llm_side("fetcher", turn)
    if turn == 0:
        return [Scripted.call("fetch", page=p) for p in ("a", "b", "c")]
    return answer(request)


fetcher = Agent(
    "fetcher",
    tools=[fetch],
    llm=Scripted(budget_script, record=False),
    budget=Budget(max_tool_calls=2),
)


async def budget(rt: Runtime) -> None:
    await rt.spawn(fetcher, "fetch three", execution_id="bg-1")
    r = await rt.wait("bg-1")
    while r.is_suspended:
        assert r.suspend_reason is not None and r.suspend_reason.kind == "budget"
        await rt.resume("bg-1", budget=Budget(max_tool_calls=10), wait=False, by="worker")
        r = await rt.wait("bg-1")
    emit(r)


# -- tree: two concurrent delegations, one of them two levels deep, under max_concurrency=2 --


@tool(requires_confirmation=True)
def note(text: str) -> str:
    """Write a note (needs approval)."""
    return effect("note", text)


@tool
def file_it(doc: str) -> str:
    """File a document."""
    return effect("file_it", doc)


def _tree_script(agent: str, first: Any) -> Any:
    def script(request: LLMRequest) -> Any:
        turn = turn_of(request)
        llm_side(agent, turn)
        return first if turn == 0 else answer(request)

    return Scripted(script, record=False)


scribe = Agent("scribe", tools=[note], llm=_tree_script("scribe", Scripted.call("note", text="x")))
lead = Agent(
    "lead", llm=_tree_script("lead", Scripted.call("delegate_to_scribe", task="w")), agents=[scribe]
)
clerk = Agent(
    "clerk", tools=[file_it], llm=_tree_script("clerk", Scripted.call("file_it", doc="y"))
)


@clerk.contract("no-filing")
def _no_filing(tool_name: str, arguments: dict[str, Any]) -> None:
    from perdure import ContractViolation

    if tool_name == "file_it":
        raise ContractViolation("filing needs an override")


root = Agent(
    "root",
    llm=_tree_script(
        "root",
        [
            Scripted.call("delegate_to_lead", task="plan"),
            Scripted.call("delegate_to_clerk", task="f"),
        ],
    ),
    agents=[lead, clerk],
)
TREE = ["t-1", "t-1/2", "t-1/3", "t-1/2/2"]


async def tree(rt: Runtime) -> None:
    from perdure import InvalidSignalError

    async def approve(eid: str, cid: str) -> None:
        try:
            await rt.approve(eid, cid, by="worker")
        except InvalidSignalError:
            pass  # approved already (by the callback and the sweep both)

    @rt.on_suspend
    async def on_suspend(r: Result, reason: Any) -> None:
        if reason.kind in ("approval", "contract"):
            await approve(r.execution_id, reason.confirmation_id)

    await rt.spawn(root, "do it", execution_id="t-1")
    # Suspended before this process started (so no callback fires for it): approve now.
    for info in await rt.executions(status="suspended"):
        r = await rt.result(info.execution_id)
        if r.suspend_reason is not None and r.suspend_reason.kind in ("approval", "contract"):
            await approve(info.execution_id, r.suspend_reason.confirmation_id)
    await rt.wait("t-1", until="finished")
    for eid in TREE:
        emit(await rt.result(eid))


# -- charge: children's usage charged to a parent with a budget --------------------------------


def spender_script(request: LLMRequest) -> Any:
    turn = turn_of(request)
    llm_side(next(m.content for m in request.messages if m.role == "user"), turn)
    return Scripted.call("job", name=request.messages[-1].content) if turn == 0 else "spent"


spender = Agent("spender", tools=[job], llm=Scripted(spender_script, record=False))


def payer_script(request: LLMRequest) -> Any:
    turn = turn_of(request)
    llm_side("payer", turn)
    if turn < 2:
        return Scripted.call("delegate_to_spender", task=f"part{turn}")
    return answer(request)


payer = Agent(
    "payer",
    llm=Scripted(payer_script, record=False),
    agents=[spender],
    budget=Budget(max_llm_calls=6),
)


async def charge(rt: Runtime) -> None:
    from perdure import InvalidSignalError

    async def raise_budget() -> None:
        try:
            await rt.resume("ch-1", budget=Budget(max_llm_calls=10), wait=False, by="worker")
        except InvalidSignalError:
            pass  # raised already (by the callback and the sweep both) and finished

    @rt.on_suspend
    async def on_suspend(r: Result, reason: Any) -> None:
        if r.execution_id == "ch-1" and reason.kind == "budget":
            await raise_budget()

    await rt.spawn(payer, "pay", execution_id="ch-1")
    # Suspended before this process started (so no callback fires for it): raise now.
    r = await rt.result("ch-1")
    if r.suspend_reason is not None and r.suspend_reason.kind == "budget":
        await raise_budget()
    await rt.wait("ch-1", until="finished")
    for eid in ("ch-1", "ch-1/2", "ch-1/4"):
        emit(await rt.result(eid))


# -- handdown: a raise on a root handed down two levels ------------------------------------------


def _relay_script(agent: str, delegate_to: str) -> Any:
    def script(request: LLMRequest) -> Any:
        turn = turn_of(request)
        llm_side(agent, turn)
        return Scripted.call(delegate_to, task="go") if turn == 0 else answer(request)

    return Scripted(script, record=False)


def leaf_script(request: LLMRequest) -> Any:
    turn = turn_of(request)
    llm_side("leaf", turn)
    return Scripted.call("job", name=f"leaf{turn}") if turn < 2 else answer(request)


leaf = Agent("leaf", tools=[job], llm=Scripted(leaf_script, record=False))
middle = Agent("middle", llm=_relay_script("middle", "delegate_to_leaf"), agents=[leaf])
top = Agent(
    "top",
    llm=_relay_script("top", "delegate_to_middle"),
    agents=[middle],
    budget=Budget(max_llm_calls=3),
)
HANDDOWN = ["h-1", "h-1/2", "h-1/2/2"]


async def handdown(rt: Runtime) -> None:
    async def raise_once() -> None:
        # A run before this one may have raised it already: its hand-down must reach
        # the leaf without another raise.
        if (await rt.state("h-1")).budget != Budget(max_llm_calls=20):
            await rt.resume("h-1", budget=Budget(max_llm_calls=20), wait=False, by="worker")

    @rt.on_suspend
    async def on_suspend(r: Result, reason: Any) -> None:
        if r.execution_id == "h-1/2/2" and reason.kind == "budget":
            await raise_once()

    await rt.spawn(top, "go", execution_id="h-1")
    # Suspended before this process started (so no callback fires for it): raise now.
    if any(info.execution_id == "h-1/2/2" for info in await rt.executions(status="suspended")):
        await raise_once()
    with anyio.fail_after(30):
        await rt.wait("h-1", until="finished")
    for eid in HANDDOWN:
        emit(await rt.result(eid))


SCENARIOS = {
    "mixed": (mixed, [mixer], None),
    "queue": (queue, [queuer], 1),
    "doubt": (doubt, [wirer], None),
    "delegate": (delegate, [boss], None),
    "budget": (budget, [fetcher], None),
    "tree": (tree, [root], 2),
    "charge": (charge, [payer], None),
    "handdown": (handdown, [top], None),
}


async def main_async(data_dir: str, scenario: str) -> None:
    run, agents, max_concurrency = SCENARIOS[scenario]
    async with Runtime(
        data_dir, agents=agents, max_concurrency=max_concurrency, shutdown_timeout=1.0
    ) as rt:
        await run(rt)


def main() -> None:
    global SIDE
    data_dir, SIDE, scenario, crash = sys.argv[1:5]
    if crash != "none":
        for spec in crash.split(","):
            where, n = spec.split(":")
            CRASHES.add((where, int(n)))
    if any(where in ("append", "child-done", "raised", "inherited") for where, _ in CRASHES):
        _crash_after_appends()
    anyio.run(main_async, data_dir, scenario, backend=BACKEND)


if __name__ == "__main__":
    main()
