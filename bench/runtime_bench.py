"""Runtime benchmark: the cost of a durable step, a fleet, growth and replay.

    python bench/runtime_bench.py [--quick] [--json FILE] [--backend asyncio|trio]
                                  [--fleet-only [--runs N]] [--tool-threads N]

Every figure is measured in this one run, beside its baseline, so compare ratios:

- step:   one agent, N steps each calling a no-op sync tool, Scripted model, fsync
          durability; beside the raw fsync'd append latency of the log (one writer),
          the same agent on an in-memory log, and the same loop with no durability at
          all (model call, tool call in a worker thread, conversation in a list).
- fleet:  1000 concurrent executions x 20 tool steps, fsync; beside the log's own
          group-commit throughput (1000 concurrent writers, one record per append);
          again with an async tool, and again with the GC thresholds an application
          running a fleet would set (``TUNED_GC_THRESHOLD``; README, "Tuning a fleet").
- growth: one execution of 10,000 steps ("process" durability so fsync noise does not
          drown the CPU cost we look for): microseconds and bytes per step around steps
          10, 1,000 and 10,000.
- replay: wall time to rebuild the state of that completed 10,000-step execution.

``--fleet-only`` runs the fleet rows alone (sync, async and GC-tuned, alternating,
``--runs`` times each, medians kept): for A/B comparisons on a noisy machine.
``--tool-threads N`` gives the fleet's Runtime ``max_tool_threads=N``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from bench.machine import print_machine, print_table, write_json
from perdure import Agent, Runtime, tool
from perdure.events import execution_stream, record_types
from perdure.journal import load_state
from perdure.log import LmdbLog, MemoryLog, NewRecord, RecordTypes
from perdure.providers import LLMRequest, Message, Scripted, ToolCall

PAYLOAD = {"data": "x" * 280}


@tool
def noop(i: int) -> int:
    """Do nothing, quickly (a sync tool: each call runs in a worker thread)."""
    return i


@tool
async def anoop(i: int) -> int:
    """Do nothing, quickly (an async tool: no thread)."""
    return i


def stepping_agent(steps: int, name: str = "bench", tool_name: str = "noop") -> Agent:
    """An agent whose model calls ``noop`` ``steps`` times, then answers.

    The script is O(1) per call (it looks at the last message only) and its tool calls
    are built once, so the model costs next to nothing and the runtime is what we time.
    """
    calls = [ToolCall(f"call_{i}", tool_name, {"i": i}) for i in range(steps + 1)]

    def script(request: LLMRequest) -> Any:
        messages = request.messages
        last = messages[len(messages) - 1]
        n = int(last.content) + 1 if last.role == "tool" else 0
        return calls[n] if n < steps else "done"

    return Agent(name, tools=[noop, anoop], llm=Scripted(script, record=False), max_steps=steps + 5)


async def raw_append_us(n: int) -> float:
    """Mean latency of one fsync'd append of one ~300-byte record, one writer."""
    with tempfile.TemporaryDirectory() as d:
        log = await LmdbLog.open(d, types=RecordTypes({"t": 1}), durability="fsync")
        seq, lat = 0, []
        for _ in range(n):
            t = time.perf_counter()
            seq = await log.append("s", [NewRecord("t", PAYLOAD)], expect=seq)
            lat.append(time.perf_counter() - t)
        await log.aclose()
    return statistics.fmean(lat) * 1e6


async def runtime_step_us(steps: int, **runtime_kwargs: Any) -> float:
    """Mean microseconds per tool step of one execution through a Runtime."""
    with tempfile.TemporaryDirectory() as d:
        async with Runtime(d, **runtime_kwargs) as rt:
            t = time.perf_counter()
            r = await rt.run(stepping_agent(steps), "go")
            elapsed = time.perf_counter() - t
            assert r.status == "completed" and r.usage.tool_calls == steps, r
    return elapsed / steps * 1e6


async def nondurable_step_us(steps: int) -> float:
    """The same agent loop with no log at all: model, tool in a thread, a list."""
    agent = stepping_agent(steps)
    llm = agent.llm
    assert llm is not None
    tool_ = agent.tools["noop"]
    messages: list[Message] = [Message("user", "go")]
    t = time.perf_counter()
    while True:
        request = LLMRequest(agent.model, messages, agent.tool_specs)
        response = await llm.complete(request)
        messages.append(response.message)
        if not response.message.tool_calls:
            break
        for call in response.message.tool_calls:
            out = await tool_.invoke(call.arguments)  # type: ignore[arg-type]
            messages.append(Message("tool", str(out), tool_call_id=call.id, name=call.name))
    return (time.perf_counter() - t) / steps * 1e6


#: The application-level GC setting the "GC tuned" fleet row runs with (see README,
#: "Tuning a fleet"): Python's default first threshold (700 allocations) makes a fleet
#: rescan its ~35,000 in-flight objects (frames, payloads, pending appends) hundreds of
#: times a second, and that scanning is a third of the fleet's CPU.
TUNED_GC_THRESHOLD = (50_000, 20, 100)


async def fleet(
    executions: int,
    steps: int,
    tool_name: str = "noop",
    tool_threads: int | None = None,
    gc_threshold: tuple[int, int, int] | None = None,
) -> dict[str, float]:
    """Many concurrent executions, fsync durability (``gc_threshold``: set for the run)."""
    before = gc.get_threshold()
    if gc_threshold is not None:
        gc.set_threshold(*gc_threshold)
    try:
        return await _fleet(executions, steps, tool_name, tool_threads)
    finally:
        gc.set_threshold(*before)


async def _fleet(
    executions: int, steps: int, tool_name: str, tool_threads: int | None
) -> dict[str, float]:
    agent = stepping_agent(steps, "fleet", tool_name)
    kwargs: dict[str, Any] = {} if tool_threads is None else {"max_tool_threads": tool_threads}
    with tempfile.TemporaryDirectory() as d:
        async with Runtime(d, durability="fsync", **kwargs) as rt:
            handles: list[Any] = []

            async def spawn() -> None:
                handles.append(await rt.spawn(agent, "go"))

            t = time.perf_counter()
            async with anyio.create_task_group() as tg:  # a fleet arrives all at once
                for _ in range(executions):
                    tg.start_soon(spawn)
            for h in handles:
                r = await h.result()
                assert r.status == "completed", r
            elapsed = time.perf_counter() - t
            records = 0
            for h in handles:
                records += await rt.log.last_seq(execution_stream(h.execution_id))
    return {
        "fleet_tool_steps_per_s": executions * steps / elapsed,
        "fleet_records_per_s": records / elapsed,
        "fleet_elapsed_s": elapsed,
    }


async def log_group_commit(writers: int, seconds: float) -> float:
    """Records/s of the log alone: ``writers`` tasks each appending one record at a time."""
    with tempfile.TemporaryDirectory() as d:
        log = await LmdbLog.open(d, types=RecordTypes({"t": 1}), durability="fsync")
        count = 0
        deadline = time.perf_counter() + seconds

        async def writer(i: int) -> None:
            nonlocal count
            seq = 0
            while time.perf_counter() < deadline:
                seq = await log.append(f"w{i}", [NewRecord("t", PAYLOAD)], expect=seq)
                count += 1

        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(writers):
                tg.start_soon(writer, i)
        elapsed = time.perf_counter() - t
        await log.aclose()
    return count / elapsed


async def one_long_execution(steps: int) -> dict[str, float]:
    """Per-step time and bytes at three points of one long execution; then replay it.

    The replay is repeated (it reads and writes nothing but memory) and its median kept.
    """
    agent = stepping_agent(steps, "long")
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        async with Runtime(d, durability="process") as rt:

            @rt.on_step
            def stamp(execution_id: str, step: dict[str, Any]) -> None:
                if step["kind"] == "tool":
                    stamps.append(time.perf_counter())

            r = await rt.run(agent, "go", execution_id="long")
            assert r.status == "completed", r
            sizes: dict[int, int] = {}
            # bytes per tool step = the records that step wrote (answer, start, outcome)
            from perdure.log.codec import encode_record

            async for rec in rt.log.read(execution_stream("long")):
                step = rec.payload.get("step") if isinstance(rec.payload, dict) else None
                if step is None:
                    continue
                tool_step = step if rec.type != "llm.completed" else step + 1
                size = len(encode_record(rec.type, rec.version, rec.timestamp, rec.payload))
                sizes[tool_step] = sizes.get(tool_step, 0) + size
            replays = []
            for _ in range(REPLAYS):
                t = time.perf_counter()
                state = await load_state(rt.log, "long")
                replays.append(time.perf_counter() - t)
                assert state.usage.tool_calls == steps
    per_step = [b - a for a, b in itertools.pairwise(stamps)]
    tool_steps = sorted(sizes)  # tool step numbers are 2, 4, 6, ...

    def window(at: int, width: int = 20) -> tuple[float, float]:
        lo = max(0, min(at, len(per_step)) - width)
        times = per_step[lo : lo + width]
        byte_steps = tool_steps[lo : lo + width]
        return statistics.median(times) * 1e6, statistics.fmean(sizes[s] for s in byte_steps)

    t10, b10 = window(10)
    t1k, b1k = window(1000)
    tend, bend = window(steps)
    return {
        "step10_us": t10,
        "step1000_us": t1k,
        "last_us": tend,
        "step10_bytes": b10,
        "step1000_bytes": b1k,
        "last_bytes": bend,
        "replay_s": statistics.median(replays),
    }


#: Replays of the same execution per run (median kept).
REPLAYS = 5


async def growth_and_replay(steps: int, runs: int) -> dict[str, float]:
    """:func:`one_long_execution` ``runs`` times; the median of each figure.

    One step at step 10 happens once per execution, so a single run's window of twenty
    steps is at the mercy of a noisy neighbour; the median over runs is not.
    """
    each = [await one_long_execution(steps) for _ in range(runs)]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in each)

    figures = {f"growth_{key}": med(key) for key in each[0] if key != "replay_s"}
    return {
        "growth_steps": steps,
        "growth_runs": runs,
        **figures,
        "growth_time_ratio_10k_vs_10": figures["growth_last_us"] / figures["growth_step10_us"],
        "growth_bytes_ratio_10k_vs_10": (
            figures["growth_last_bytes"] / figures["growth_step10_bytes"]
        ),
        "replay_steps": steps,
        "replay_s": med("replay_s"),
        "replay_steps_per_s": steps / med("replay_s"),
    }


async def main(quick: bool, tool_threads: int | None = None) -> dict[str, float]:
    steps = 300 if quick else 1000
    figures: dict[str, float] = {}
    # interleave the step measurements so a noisy neighbour hurts them alike
    raws, durables = [], []
    for _ in range(2 if quick else 3):
        raws.append(await raw_append_us(steps))
        durables.append(await runtime_step_us(steps, durability="fsync"))
    figures["raw_append_us"] = statistics.median(raws)
    figures["step_us"] = statistics.median(durables)
    figures["memory_step_us"] = await runtime_step_us(steps, log=MemoryLog(record_types()))
    figures["nondurable_step_us"] = await nondurable_step_us(steps)
    figures["step_vs_raw_append"] = figures["step_us"] / figures["raw_append_us"]
    n_exec, n_steps = (200, 10) if quick else (1000, 20)
    figures.update(await fleet(n_exec, n_steps, tool_threads=tool_threads))
    async_fleet = await fleet(n_exec, n_steps, "anoop", tool_threads)
    figures["fleet_async_tool_steps_per_s"] = async_fleet["fleet_tool_steps_per_s"]
    figures["fleet_async_tool_records_per_s"] = async_fleet["fleet_records_per_s"]
    tuned = await fleet(n_exec, n_steps, tool_threads=tool_threads, gc_threshold=TUNED_GC_THRESHOLD)
    figures["fleet_gc_tuned_tool_steps_per_s"] = tuned["fleet_tool_steps_per_s"]
    figures["fleet_gc_tuned_records_per_s"] = tuned["fleet_records_per_s"]
    figures["fleet_executions"] = n_exec
    figures["fleet_steps_each"] = n_steps
    figures["log_group_commit_records_per_s"] = await log_group_commit(
        n_exec, 3.0 if quick else 5.0
    )
    figures.update(await growth_and_replay(3000 if quick else 10_000, 1 if quick else 3))
    return figures


async def fleet_only(quick: bool, runs: int, tool_threads: int | None) -> dict[str, float]:
    """The fleet rows alone: sync and async no-op tool alternating, medians of ``runs``."""
    n_exec, n_steps = (200, 10) if quick else (1000, 20)
    sync_runs, async_runs, tuned_runs = [], [], []
    for _ in range(runs):
        sync_runs.append(await fleet(n_exec, n_steps, tool_threads=tool_threads))
        async_runs.append(await fleet(n_exec, n_steps, "anoop", tool_threads))
        tuned_runs.append(
            await fleet(n_exec, n_steps, tool_threads=tool_threads, gc_threshold=TUNED_GC_THRESHOLD)
        )

    def med(each: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in each)

    return {
        "fleet_tool_steps_per_s": med(sync_runs, "fleet_tool_steps_per_s"),
        "fleet_records_per_s": med(sync_runs, "fleet_records_per_s"),
        "fleet_async_tool_steps_per_s": med(async_runs, "fleet_tool_steps_per_s"),
        "fleet_async_tool_records_per_s": med(async_runs, "fleet_records_per_s"),
        "fleet_gc_tuned_tool_steps_per_s": med(tuned_runs, "fleet_tool_steps_per_s"),
        "fleet_gc_tuned_records_per_s": med(tuned_runs, "fleet_records_per_s"),
        "fleet_executions": n_exec,
        "fleet_steps_each": n_steps,
        "fleet_runs": runs,
    }


def report_fleet(f: dict[str, float], backend: str) -> None:
    """The table of :func:`fleet_only`."""
    print_table(
        ["measure", "value", "unit", "target", ""],
        [
            [
                f"fleet {f['fleet_executions']:.0f} x {f['fleet_steps_each']:.0f} steps",
                f["fleet_tool_steps_per_s"],
                "tool steps/s",
                ">= 3,000",
                "ok" if f["fleet_tool_steps_per_s"] >= 3000 else "MISSED",
            ],
            [
                "  fsync'd records",
                f["fleet_records_per_s"],
                "records/s",
                ">= 9,000",
                "ok" if f["fleet_records_per_s"] >= 9000 else "MISSED",
            ],
            [
                "  same fleet, async no-op tool",
                f["fleet_async_tool_steps_per_s"],
                "tool steps/s",
                "",
                "",
            ],
            ["  fsync'd records", f["fleet_async_tool_records_per_s"], "records/s", "", ""],
            [
                f"  same fleet, gc.set_threshold{TUNED_GC_THRESHOLD}",
                f["fleet_gc_tuned_tool_steps_per_s"],
                "tool steps/s",
                "",
                "",
            ],
            ["  fsync'd records", f["fleet_gc_tuned_records_per_s"], "records/s", "", ""],
        ],
    )
    print(f"\nbackend {backend}; median of {f['fleet_runs']:.0f} runs each, alternating")


def report(f: dict[str, float], backend: str) -> None:
    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print_table(
        ["measure", "value", "unit", "baseline (same run)", "target", ""],
        [
            [
                "durable tool step (fsync)",
                f["step_us"],
                "us",
                f"raw append {f['raw_append_us']:.0f} us",
                "<= 2.5x raw",
                verdict(f["step_vs_raw_append"] <= 2.5),
            ],
            ["  ratio to raw append", f["step_vs_raw_append"], "x", "", "<= 2.5", ""],
            ["same step on a memory log", f["memory_step_us"], "us", "", "", ""],
            ["same loop, no durability", f["nondurable_step_us"], "us", "", "", ""],
            [
                f"fleet {f['fleet_executions']:.0f} x {f['fleet_steps_each']:.0f} steps",
                f["fleet_tool_steps_per_s"],
                "tool steps/s",
                "",
                ">= 3,000",
                verdict(f["fleet_tool_steps_per_s"] >= 3000),
            ],
            [
                "  fsync'd records",
                f["fleet_records_per_s"],
                "records/s",
                f"log alone {f['log_group_commit_records_per_s']:,.0f}/s",
                ">= 9,000",
                verdict(f["fleet_records_per_s"] >= 9000),
            ],
            [
                "  same fleet, async no-op tool",
                f["fleet_async_tool_steps_per_s"],
                "tool steps/s",
                "no worker-thread hop",
                "",
                "",
            ],
            [
                "  fsync'd records",
                f["fleet_async_tool_records_per_s"],
                "records/s",
                "",
                "",
                "",
            ],
            [
                f"  same fleet, gc.set_threshold{TUNED_GC_THRESHOLD}",
                f["fleet_gc_tuned_tool_steps_per_s"],
                "tool steps/s",
                "application-level GC tuning",
                "",
                "",
            ],
            ["  fsync'd records", f["fleet_gc_tuned_records_per_s"], "records/s", "", "", ""],
            [
                f"growth: time at step {f['growth_steps']:.0f} vs 10",
                f["growth_time_ratio_10k_vs_10"],
                "x",
                f"{f['growth_step10_us']:.0f} -> {f['growth_last_us']:.0f} us",
                "<= 1.2",
                verdict(f["growth_time_ratio_10k_vs_10"] <= 1.2),
            ],
            [
                f"growth: bytes at step {f['growth_steps']:.0f} vs 10",
                f["growth_bytes_ratio_10k_vs_10"],
                "x",
                f"{f['growth_step10_bytes']:.0f} -> {f['growth_last_bytes']:.0f} B",
                "<= 1.2",
                verdict(f["growth_bytes_ratio_10k_vs_10"] <= 1.2),
            ],
            [
                f"replay {f['replay_steps']:.0f} steps",
                f["replay_steps_per_s"],
                "steps/s",
                f"{f['replay_s'] * 1000:.0f} ms",
                ">= 50,000",
                verdict(f["replay_steps_per_s"] >= 50_000),
            ],
        ],
    )
    print(
        f"\nbackend {backend}; growth measured with durability='process', median of "
        f"{f['growth_runs']:.0f} executions; replay: median of {REPLAYS} replays each"
    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller run (well under a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--fleet-only", action="store_true", help="run the fleet rows alone")
    parser.add_argument("--runs", type=int, default=3, help="fleet runs each (--fleet-only)")
    parser.add_argument(
        "--tool-threads", type=int, metavar="N", help="max_tool_threads of the fleet's Runtime"
    )
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    extra = {"backend": args.backend, "mode": mode + (", fleet only" if args.fleet_only else "")}
    if args.tool_threads is not None:
        extra["tool threads"] = str(args.tool_threads)
    print_machine(extra)
    if args.fleet_only:
        figures = anyio.run(
            fleet_only, args.quick, args.runs, args.tool_threads, backend=args.backend
        )
        report_fleet(figures, args.backend)
    else:
        figures = anyio.run(main, args.quick, args.tool_threads, backend=args.backend)
        report(figures, args.backend)
    if args.json:
        write_json(args.json, figures)


if __name__ == "__main__":
    cli()
