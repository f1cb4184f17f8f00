"""Soak benchmark: one Runtime, a hundred thousand executions, nothing that grows.

    python bench/soak_bench.py [--quick] [--json FILE] [--count N] [--batches B]
                               [--backend asyncio|trio] [--durability process|fsync]

A service embeds one Runtime for months. This pushes COUNT executions (100,000; 5,000
with ``--quick``) through a single open Runtime, in BATCHES batches, WORKERS at a
time, cycling through the paths a service sees: completed, a tool that fails, a
provider that fails, an approval granted, a suspended execution cancelled, a signal
waited for with a week-long durable timeout (the signal comes first), a stream read
to its end, and a delegation to a child agent. After each batch the finished
executions are purged (``rt.purge(0)``), as a service with retention would, so the
data dir itself stays bounded.

After each batch it prints, without tracemalloc (it would slow every allocation):
the process's RSS (``/proc/self/statm``) and its anonymous part (the heap; the rest
is file pages of LMDB's map), the number of objects the garbage collector tracks,
the sizes of the runtime's per-execution containers (actors, waiters, stream sinks,
slots, queue, timers, supervisor children) and the tasks alive, and the batch's
throughput. Growth would show as RSS or objects rising batch after batch, and as
time per execution rising. The summary gives, last batch over first (batch 0, a
warm-up, is left out of both), the ratio of RSS growth per execution and of time per
execution: about 1 or below for growth that stops, well above 1 for a leak.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import print_machine, print_table, rss_kb, rss_parts_kb, write_json
from perdure import Agent, Result, Runtime, tool, wait_for_signal
from perdure.providers import Scripted, TerminalProviderError

#: How many executions are in flight at once (each a task driving one execution).
WORKERS = 64
#: The durable timeout of the signal path: far beyond the run, so a deadline kept
#: for an execution that got its signal would pile up in the timer heap.
WAIT_TIMEOUT = 7 * 86_400.0


def scripted(*replies: Any) -> Scripted:
    return Scripted(list(replies), record=False)


@tool
def work(n: int) -> int:
    """A no-op step."""
    return n


@tool
def explode() -> str:
    """A tool that fails (recorded, and told to the model)."""
    raise RuntimeError("the tool broke")


@tool("transfer", requires_confirmation=True)
def transfer(amount: float) -> str:
    """A step a person approves."""
    return f"moved {amount}"


@tool
def await_go() -> Any:
    """Waits for the signal "go", with a durable week-long timeout."""
    return wait_for_signal("go", timeout=WAIT_TIMEOUT)


def make_agents() -> dict[str, Agent]:
    child = Agent("soak-child", llm=scripted("an answer"))
    agents = [
        Agent("soak-plain", tools=[work], llm=scripted(Scripted.call("work", n=1), "done")),
        Agent("soak-tool-fails", tools=[explode], llm=scripted(Scripted.call("explode"), "ok")),
        Agent("soak-llm-fails", llm=scripted(TerminalProviderError("the model is down"))),
        Agent(
            "soak-approval",
            tools=[transfer],
            llm=scripted(Scripted.call("transfer", amount=5.0), "done"),
        ),
        Agent("soak-signal", tools=[await_go], llm=scripted(Scripted.call("await_go"), "done")),
        Agent(
            "soak-manager",
            llm=scripted(Scripted.call("delegate_to_soak-child", task="ask"), "done"),
            agents=[child],
        ),
    ]
    return {a.name: a for a in agents}


Path_ = Callable[[Runtime, dict[str, Agent], str], Awaitable[str]]


async def completes(rt: Runtime, agents: dict[str, Agent], eid: str) -> str:
    return (await rt.run(agents["soak-plain"], "go", execution_id=eid)).status


async def tool_fails(rt: Runtime, agents: dict[str, Agent], eid: str) -> str:
    return (await rt.run(agents["soak-tool-fails"], "go", execution_id=eid)).status


async def llm_fails(rt: Runtime, agents: dict[str, Agent], eid: str) -> str:
    return (await rt.run(agents["soak-llm-fails"], "go", execution_id=eid)).status


async def approved(rt: Runtime, agents: dict[str, Agent], eid: str) -> str:
    r = await rt.run(agents["soak-approval"], "go", execution_id=eid)
    assert r.suspend_reason is not None
    await rt.approve(eid, r.suspend_reason.confirmation_id)
    return (await rt.wait(eid)).status


async def cancelled(rt: Runtime, agents: dict[str, Agent], eid: str) -> str:
    await rt.run(agents["soak-approval"], "go", execution_id=eid)
    await rt.cancel(eid, "soak")
    return (await rt.wait(eid)).status


async def signalled(rt: Runtime, agents: dict[str, Agent], eid: str) -> str:
    await rt.run(agents["soak-signal"], "go", execution_id=eid)
    await rt.signal(eid, "go", {"ok": True})
    return (await rt.wait(eid)).status


async def streamed(rt: Runtime, agents: dict[str, Agent], eid: str) -> str:
    items = [item async for item in rt.stream(agents["soak-plain"], "go", execution_id=eid)]
    assert isinstance(items[-1], Result)
    return items[-1].status


async def delegated(rt: Runtime, agents: dict[str, Agent], eid: str) -> str:
    await rt.spawn(agents["soak-manager"], "go", execution_id=eid)
    return (await rt.wait(eid, until="finished")).status


PATHS: list[tuple[str, Path_, str]] = [
    ("complete", completes, "completed"),
    ("tool fails", tool_fails, "completed"),
    ("provider fails", llm_fails, "failed"),
    ("approved", approved, "completed"),
    ("cancelled", cancelled, "cancelled"),
    ("signal", signalled, "completed"),
    ("stream", streamed, "completed"),
    ("delegate", delegated, "completed"),
]


def containers(rt: Runtime) -> int:
    """Entries in the runtime's per-execution containers (0 when idle)."""
    assert rt._executions is not None
    return (
        len(rt._live)
        + len(rt._waiters)
        + len(rt._sinks)
        + len(rt._slots)
        + len(rt._queue)
        + len(rt._starting)
        + len(rt._inbox_done)
        + len(rt._inbox_waiters)
        + len(rt._timers._heap)
        + len(rt._executions._children)
    )


async def settle(rt: Runtime) -> None:
    """Let the actors of the batch's last executions stop (they do so a moment after
    they settle), so a batch's figures are not its last executions in flight."""
    for actor in list(rt._live.values()):
        await actor.stopped.wait()


async def run_batch(rt: Runtime, agents: dict[str, Agent], tag: str, n: int) -> list[str]:
    """Run ``n`` executions, WORKERS at a time; what did not end as expected."""
    ids = iter(range(n))
    failures: list[str] = []

    async def worker() -> None:
        for i in ids:
            name, path, expected = PATHS[i % len(PATHS)]
            status = await path(rt, agents, f"{tag}-{i}")
            if status != expected:
                failures.append(f"{name}: {status}")

    async with anyio.create_task_group() as tg:
        for _ in range(WORKERS):
            tg.start_soon(worker)
    return failures


async def soak(
    count: int, batches: int, durability: str, data_dir: str
) -> tuple[list[dict[str, float]], dict[str, float]]:
    agents = make_agents()
    size = count // batches
    rows: list[dict[str, float]] = []
    async with Runtime(
        data_dir, durability=durability, agents=agents.values(), shutdown_timeout=5.0
    ) as rt:  # type: ignore[arg-type]
        await rt.wait_recovered()
        done = 0
        for batch in range(batches + 1):  # batch 0: the warm-up
            n = size if batch else min(size, 2000)
            started = time.perf_counter()
            failures = await run_batch(rt, agents, f"b{batch}", n)
            elapsed = time.perf_counter() - started
            await settle(rt)
            purged = len(await rt.purge(0))
            await settle(rt)
            if failures:
                raise SystemExit(f"batch {batch}: {len(failures)} unexpected: {failures[:5]}")
            done += n if batch else 0
            parts = rss_parts_kb()
            rows.append(
                {
                    "batch": batch,
                    "executions": done,
                    "exec_per_s": n / elapsed,
                    "us_per_exec": elapsed / n * 1e6,
                    "rss_mb": rss_kb() / 1024,
                    "anon_mb": parts.get("RssAnon", 0) / 1024,
                    "gc_objects": len(gc.get_objects()),
                    "containers": containers(rt),
                    "tasks": len(anyio.get_running_tasks()),
                    "purged": purged,
                }
            )
            print_row(rows[-1], first=batch == 0)
        log_stats = await rt.log.stats()
    return rows, {k: v for k, v in log_stats.items() if isinstance(v, int | float)}


COLUMNS = [
    ("batch", "batch"),
    ("executions", "executions"),
    ("exec/s", "exec_per_s"),
    ("us/exec", "us_per_exec"),
    ("RSS MB", "rss_mb"),
    ("heap MB", "anon_mb"),
    ("GC objects", "gc_objects"),
    ("containers", "containers"),
    ("tasks", "tasks"),
    ("purged", "purged"),
]


def print_row(row: dict[str, float], first: bool) -> None:
    """One batch's line as soon as it is measured (a long soak shows its progress)."""
    cells = []
    for header, key in COLUMNS:
        value = row[key]
        text = f"{value:,.1f}" if isinstance(value, float) else f"{int(value):,}"
        cells.append(text.rjust(max(len(header), 10)))
    if first:
        print("  ".join(h.rjust(max(len(h), 10)) for h, _ in COLUMNS))
    print("  ".join(cells), flush=True)


def summarise(rows: list[dict[str, float]], size: int) -> dict[str, float]:
    """Ratios last batch / first counted batch (batch 1; batch 0 is the warm-up)."""
    first, last = rows[1], rows[-1]
    before_first, before_last = rows[0], rows[-2]
    grow_first = (first["rss_mb"] - before_first["rss_mb"]) * 1024 / size
    grow_last = (last["rss_mb"] - before_last["rss_mb"]) * 1024 / size
    heap_first = (first["anon_mb"] - before_first["anon_mb"]) * 1024 / size
    heap_last = (last["anon_mb"] - before_last["anon_mb"]) * 1024 / size
    counted = rows[1:]
    total_growth = (last["rss_mb"] - before_first["rss_mb"]) * 1024
    return {
        "executions": last["executions"],
        "batches": len(counted),
        "batch_size": size,
        "first_batch_us_per_exec": first["us_per_exec"],
        "last_batch_us_per_exec": last["us_per_exec"],
        "time_per_exec_ratio": last["us_per_exec"] / first["us_per_exec"],
        "first_batch_rss_kb_per_exec": grow_first,
        "last_batch_rss_kb_per_exec": grow_last,
        # A batch whose RSS did not grow (or shrank) has ratio <= 0: growth stopped.
        "rss_growth_per_exec_ratio": grow_last / grow_first if grow_first > 0 else float("nan"),
        "first_batch_heap_kb_per_exec": heap_first,
        "last_batch_heap_kb_per_exec": heap_last,
        "rss_growth_bytes_per_exec_overall": total_growth * 1024 / last["executions"],
        "rss_first_mb": first["rss_mb"],
        "rss_last_mb": last["rss_mb"],
        "gc_objects_first": first["gc_objects"],
        "gc_objects_last": last["gc_objects"],
        "containers_last": last["containers"],
        "tasks_first": first["tasks"],
        "tasks_last": last["tasks"],
        "mean_exec_per_s": sum(r["exec_per_s"] for r in counted) / len(counted),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 executions")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--count", type=int, default=None, help="executions (default 100,000)")
    parser.add_argument("--batches", type=int, default=None, help="batches (default 20; 5 quick)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--durability", choices=["process", "fsync"], default="process")
    args = parser.parse_args()
    # A line per failed execution (the provider-failure path) would bury the table.
    logging.getLogger("perdure").setLevel(logging.ERROR)
    count = args.count or (5_000 if args.quick else 100_000)
    batches = args.batches or (5 if args.quick else 20)
    size = count // batches
    print_machine(
        {
            "backend": args.backend,
            "durability": args.durability,
            "executions": f"{size * batches:,} in {batches} batches of {size:,} "
            f"(+ a warm-up batch 0), {WORKERS} at once, purged after each batch",
            "paths": ", ".join(name for name, _, _ in PATHS),
        }
    )
    with tempfile.TemporaryDirectory() as d:
        rows, log_stats = anyio.run(
            soak,
            size * batches,
            batches,
            args.durability,
            os.path.join(d, "data"),
            backend=args.backend,
        )
    figures = summarise(rows, size)
    print()
    print_table(
        ["measure", "first batch", "last batch", "last / first"],
        [
            [
                "time per execution (us)",
                figures["first_batch_us_per_exec"],
                figures["last_batch_us_per_exec"],
                figures["time_per_exec_ratio"],
            ],
            [
                "RSS growth per execution (KB)",
                figures["first_batch_rss_kb_per_exec"],
                figures["last_batch_rss_kb_per_exec"],
                figures["rss_growth_per_exec_ratio"],
            ],
            [
                "  of which heap (KB)",
                figures["first_batch_heap_kb_per_exec"],
                figures["last_batch_heap_kb_per_exec"],
                "",
            ],
            ["RSS (MB)", figures["rss_first_mb"], figures["rss_last_mb"], ""],
            ["GC objects", figures["gc_objects_first"], figures["gc_objects_last"], ""],
            ["tasks", figures["tasks_first"], figures["tasks_last"], ""],
        ],
    )
    print(
        f"\noverall: RSS grew {figures['rss_growth_bytes_per_exec_overall']:.1f} bytes per "
        f"execution from the end of the warm-up to the end; per-execution containers "
        f"hold {figures['containers_last']:.0f} entries at the end (0 when idle)"
    )
    if args.json:
        write_json(args.json, {**figures, **{f"log_{k}": v for k, v in log_stats.items()}})


if __name__ == "__main__":
    cli()
