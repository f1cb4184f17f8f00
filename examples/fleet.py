"""A fleet: a thousand agents at once, with lifecycle callbacks and a concurrency cap.

    python examples/fleet.py [DATA_DIR] [--count 1000] [--max-concurrency 200]

Every execution looks up an order and refunds it; refunds above $100 need a person's
approval, so about a tenth of the fleet suspends. The script approves those (as an
operator would with 'perdure approve'), the suspended executions auto-resume, and the
callbacks tally what happened.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from typing import Any

import anyio

from perdure import Agent, Result, Runtime, tool
from perdure.providers import LLMRequest, Scripted


@tool
def lookup_order(order: int) -> dict:
    """Find an order."""
    return {"order": order, "amount": 150.0 if order % 10 == 0 else 20.0}


@tool(requires_confirmation=True)
def refund_large(order: int, amount: float) -> str:
    """Refund more than $100 (a person approves first)."""
    return f"refunded {amount} on order {order}"


@tool
def refund(order: int, amount: float) -> str:
    """Refund up to $100."""
    return f"refunded {amount} on order {order}"


def script(request: LLMRequest) -> Any:
    messages = request.messages
    last = messages[len(messages) - 1]
    if last.role == "user":
        return Scripted.call("lookup_order", order=int(last.content.split()[-1]))
    if last.name == "lookup_order":
        order = int(messages[len(messages) - 3].content.split()[-1])
        amount = 150.0 if order % 10 == 0 else 20.0
        name = "refund_large" if amount > 100 else "refund"
        return Scripted.call(name, order=order, amount=amount)
    return f"Done: {last.content}."


agent = Agent(
    "refunds",
    instructions="Look the order up, then refund it.",
    tools=[lookup_order, refund, refund_large],
    llm=Scripted(script, record=False),
)


async def main(data_dir: str, count: int, max_concurrency: int) -> None:
    tally: Counter[str] = Counter()
    # Registered at open, so executions a previous run left unfinished resume too.
    async with Runtime(data_dir, agents=[agent], max_concurrency=max_concurrency) as rt:

        @rt.on_complete
        def completed(result: Result) -> None:
            tally["completed"] += 1

        @rt.on_suspend
        def suspended(result: Result, reason: Any) -> None:
            tally[f"suspended for {reason.kind}"] += 1

        @rt.on_fail
        def failed(result: Result, error: Any) -> None:
            tally["failed"] += 1

        started = time.perf_counter()
        handles = [await rt.spawn(agent, f"Refund order {n}") for n in range(count)]
        results = [await h.result() for h in handles]
        settled = time.perf_counter() - started
        waiting = [r for r in results if r.is_suspended]
        print(f"{count} executions settled in {settled:.2f}s: {dict(tally)}")
        print(f"{len(waiting)} wait for approval; approving them all...")
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for r in waiting:
                tg.start_soon(rt.approve, r.execution_id, r.suspend_reason.confirmation_id)  # type: ignore[union-attr]
        for r in waiting:
            await rt.wait(r.execution_id)
        print(f"approved and completed in {time.perf_counter() - started:.2f}s: {dict(tally)}")
        done = await rt.executions(status="completed", agent="refunds")
        print(f"the index lists {len(done)} completed executions of 'refunds'")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", nargs="?", default=None)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--max-concurrency", type=int, default=200)
    args = parser.parse_args()
    anyio.run(
        main,
        args.data_dir or tempfile.mkdtemp(prefix="perdure-fleet-"),
        args.count,
        args.max_concurrency,
    )
