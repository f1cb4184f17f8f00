"""A process that runs one agent on a data dir and SIGKILLs itself at a chosen point.

    python -m tests.runtime.crash_worker DATA_DIR SIDE_FILE CRASH [EXECUTION_ID]

CRASH is ``none`` or ``<where>:<n>`` with where one of
- ``llm``: inside the n-th model call this process makes;
- ``tool-before`` / ``tool-after``: inside the n-th tool call, before / after its side
  effect was written to SIDE_FILE (fsync'd);
- ``step``: right after the n-th step outcome of this process became durable;
- ``replay``: while the n-th record is folded by a replay of this process (an actor
  rebuilding an execution's state from its log: recovery at open, or a restart), i.e.
  a crash during recovery itself.

The event loop is asyncio, or trio when ``PERDURE_TEST_BACKEND=trio``. On completion
the worker prints the final Result as one JSON line and exits 0. The agent has four
turns: one call, two concurrent calls, one call, then a final answer built from what
the tools returned, so the transcript depends on every step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

from perdure import Agent, Runtime, current_idempotency_key, tool
from perdure.providers import LLMRequest, Scripted

_lock = threading.Lock()
_counts = {"llm": 0, "tool": 0, "step": 0, "replay": 0}
CRASH_WHERE, CRASH_AT = "none", 0
SIDE_FILE = ""


def _maybe_crash(where: str) -> None:
    with _lock:
        _counts[where] += 1
        n = _counts[where]
    if CRASH_WHERE.startswith(where) and n == CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def _tool_body(name: str, arg: str) -> str:
    key = current_idempotency_key()
    if CRASH_WHERE == "tool-before":
        _maybe_crash("tool")
    with _lock, open(SIDE_FILE, "a") as f:
        f.write(f"{key}\t{name}\t{arg}\n")
        f.flush()
        os.fsync(f.fileno())
    if CRASH_WHERE == "tool-after":
        _maybe_crash("tool")
    return f"{name}({arg}) ok"


@tool
def charge(order: str) -> str:
    """Charge an order."""
    return _tool_body("charge", order)


@tool
def reserve(item: str) -> str:
    """Reserve an item."""
    return _tool_body("reserve", item)


@tool
def notify(who: str) -> str:
    """Notify someone."""
    return _tool_body("notify", who)


def script(request: LLMRequest) -> Any:
    if CRASH_WHERE == "llm":
        _maybe_crash("llm")
    turn = sum(1 for m in request.messages if m.role == "assistant")
    if turn == 0:
        return Scripted.call("charge", order="o-1")
    if turn == 1:
        return [Scripted.call("reserve", item="book"), Scripted.call("reserve", item="pen")]
    if turn == 2:
        return Scripted.call("notify", who="ada")
    results = [m.content for m in request.messages if m.role == "tool"]
    return "done: " + "; ".join(results)


agent = Agent(
    "crashy",
    instructions="Process the order.",
    tools=[charge, reserve, notify],
    llm=Scripted(script, record=False),
)


def _crash_during_replays() -> None:
    """Count the records folded by ``Journal.open`` (a replay), crashing at the n-th."""
    import perdure.journal as journal

    replaying = [0]
    fold = journal.apply_record
    fold_chunk = journal.apply_records
    replay = journal.load_state

    def counting_fold(state: Any, type: str, payload: Any) -> Any:
        if replaying[0]:
            _maybe_crash("replay")
        return fold(state, type, payload)

    def counting_chunk_fold(state: Any, records: Any) -> Any:
        if replaying[0]:
            for _ in records:  # one crash point per record, as if folded one by one
                _maybe_crash("replay")
        return fold_chunk(state, records)

    async def counting_replay(log: Any, execution_id: str) -> Any:
        replaying[0] += 1
        try:
            return await replay(log, execution_id)
        finally:
            replaying[0] -= 1

    journal.apply_record = counting_fold  # type: ignore[assignment]
    journal.apply_records = counting_chunk_fold  # type: ignore[assignment]
    journal.load_state = counting_replay  # type: ignore[assignment]


def main() -> None:
    global CRASH_WHERE, CRASH_AT, SIDE_FILE
    data_dir, SIDE_FILE, crash = sys.argv[1], sys.argv[2], sys.argv[3]
    execution_id = sys.argv[4] if len(sys.argv) > 4 else "order-1"
    if crash != "none":
        CRASH_WHERE, at = crash.split(":")
        CRASH_AT = int(at)
    if CRASH_WHERE == "replay":
        _crash_during_replays()
    backend = os.environ.get("PERDURE_TEST_BACKEND", "asyncio")
    with Runtime(data_dir, agents=[agent], backend=backend) as rt:  # type: ignore[arg-type]

        @rt.on_step
        def between_steps(execution_id: str, step: dict[str, Any]) -> None:
            if CRASH_WHERE == "step":
                _maybe_crash("step")

        r = rt.run(agent, "Process order o-1.", execution_id=execution_id)
        print(
            json.dumps(
                {
                    "status": r.status,
                    "output": r.output,
                    "transcript": [[m.role, m.content, m.name, m.is_error] for m in r.transcript],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
