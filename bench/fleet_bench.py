"""Fleet benchmark: thousands of suspended executions cost (almost) nothing.

    python bench/fleet_bench.py [--quick] [--json FILE] [--count 10000]

Phases, each in a fresh process so memory figures are not polluted:

- suspend: spawn COUNT executions, one after another, that each suspend for an
  approval; time until all are suspended; RSS while they are suspended beside the RSS
  of the same runtime before any of them existed (it has run one execution, so code is
  loaded); then "approve all" (SPAWNERS at once) and time until every one completed.
- prepare: spawn COUNT such executions with SPAWNERS tasks at once, as a fleet script
  would; time until all are suspended.
- restart: a data dir holding COUNT suspended executions is opened by a new process;
  time from opening the Runtime until it has accepted (durably spawned) new work, and
  until that work completed; then its RSS once recovery settled, beside the RSS of
  the same steps on an empty data dir (phase "empty", its own process): what a
  restarted service pays for executions it keeps hibernated.
- signal: a Runtime process owns a data dir with suspended executions; this process
  appends approvals as a client (what 'perdure approve' does), one at a time, and
  measures the time until the owner reports the execution completed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import print_machine, print_table, rss_parts_kb, write_json
from perdure import Agent, Result, Runtime, tool
from perdure.events import INBOX_STREAM, SignalSent, encode, record_types
from perdure.log import ANY, LmdbLog
from perdure.providers import Scripted

HERE = Path(__file__).resolve()
#: How many executions run at once (the rest wait, durably, in the runtime's queue).
CONCURRENCY = 256
#: How many tasks spawn (and later approve) at once.
SPAWNERS = 512


@tool(requires_confirmation=True)
def approve_me(n: int) -> str:
    """A step a person must approve."""
    return f"approved {n}"


def make_agent() -> Agent:
    return Agent(
        "fleet",
        tools=[approve_me],
        llm=Scripted([Scripted.call("approve_me", n=1), "done"], record=False),
    )


async def spawn_suspended(
    rt: Runtime, agent: Agent, count: int, prefix: str, spawners: int = 1
) -> dict[str, str]:
    """Spawn ``count`` executions, wait until each suspends; {execution id: confirmation id}.

    ``spawners`` tasks spawn at once (1: one after another, each spawn waiting for its
    own fsync). Spawning returns once an execution's first record is durable; the
    runtime's ``max_concurrency`` then runs them a few hundred at a time.
    """
    ids = [f"{prefix}{i:06d}" for i in range(count)]
    todo = iter(ids)

    # A fixed set of spawner tasks, not a task per execution: ten thousand parked tasks
    # would leave their memory behind in the allocator and swell the RSS figure.
    async def spawner() -> None:
        for eid in todo:
            await rt.spawn(agent, "go", execution_id=eid)

    async with anyio.create_task_group() as tg:
        for _ in range(spawners):
            tg.start_soon(spawner)
    pending: dict[str, str] = {}
    for eid in ids:
        r = await rt.wait(eid)
        assert r.is_suspended and r.suspend_reason is not None, r
        pending[eid] = r.suspend_reason.confirmation_id  # type: ignore[assignment]
    return pending


async def phase_suspend(data_dir: str, count: int) -> dict[str, float]:
    agent = make_agent()
    async with Runtime(data_dir, agents=[agent], max_concurrency=CONCURRENCY) as rt:
        warm = await rt.run(agent, "go", execution_id="warmup")
        await rt.approve("warmup", warm.suspend_reason.confirmation_id)  # type: ignore[union-attr]
        await rt.wait("warmup")
        await anyio.wait_all_tasks_blocked()
        gc.collect()
        empty = rss_parts_kb()
        t = time.perf_counter()
        # One after another: the RSS below is then what suspended executions hold, not
        # the high-water mark of a burst of concurrent spawns (phase "prepare" times one).
        pending = await spawn_suspended(rt, agent, count, "s-")
        suspend_s = time.perf_counter() - t
        await anyio.wait_all_tasks_blocked()
        gc.collect()
        suspended = rss_parts_kb()
        live = len(rt._live)
        t = time.perf_counter()
        limiter = anyio.CapacityLimiter(SPAWNERS)

        async def approve(eid: str, cid: str) -> None:
            async with limiter:
                await rt.approve(eid, cid)

        async with anyio.create_task_group() as tg:
            for eid, cid in pending.items():
                tg.start_soon(approve, eid, cid)
        for eid in pending:
            assert (await rt.wait(eid)).is_completed
        approve_s = time.perf_counter() - t
    return {
        "suspend_all_s": suspend_s,
        "empty_rss_mb": empty["VmRSS"] / 1024,
        "suspended_rss_mb": suspended["VmRSS"] / 1024,
        "suspended_rss_delta_mb": (suspended["VmRSS"] - empty["VmRSS"]) / 1024,
        "suspended_anon_delta_mb": (suspended["RssAnon"] - empty["RssAnon"]) / 1024,
        "suspended_file_delta_mb": (suspended["RssFile"] - empty["RssFile"]) / 1024,
        "live_actors_while_suspended": live,
        "approve_all_complete_s": approve_s,
    }


async def phase_prepare(data_dir: str, count: int) -> dict[str, float]:
    agent = make_agent()
    async with Runtime(data_dir, agents=[agent], max_concurrency=CONCURRENCY) as rt:
        t = time.perf_counter()
        await spawn_suspended(rt, agent, count, "r-", spawners=SPAWNERS)
        return {"burst_suspend_all_s": time.perf_counter() - t}


async def phase_restart(data_dir: str, count: int) -> dict[str, float]:
    """Open a dir holding ``count`` suspended executions: time to accept work, and RSS.

    The RSS is taken once recovery has settled, to compare with :func:`phase_empty`'s
    (the same steps on an empty dir, in a process of its own): what a restarted
    service pays for executions it holds hibernated.
    """
    agent = Agent("fresh", llm=Scripted(["hello"]))
    t = time.perf_counter()
    async with Runtime(data_dir, agents=[make_agent(), agent]) as rt:
        handle = await rt.spawn(agent, "new work")
        accept_s = time.perf_counter() - t
        assert (await handle.result()).is_completed
        done_s = time.perf_counter() - t
        suspended = len(await rt.executions(status="suspended"))
        rss = await settled_rss_kb(rt)
    assert suspended >= count
    return {
        "restart_accept_s": accept_s,
        "restart_first_result_s": done_s,
        "restarted_rss_mb": rss["VmRSS"] / 1024,
        "restarted_anon_mb": rss["RssAnon"] / 1024,
    }


async def phase_empty(data_dir: str, count: int) -> dict[str, float]:
    """:func:`phase_restart`'s steps on an empty data dir: the RSS to compare with."""
    agent = Agent("fresh", llm=Scripted(["hello"]))
    async with Runtime(data_dir, agents=[make_agent(), agent]) as rt:
        handle = await rt.spawn(agent, "new work")
        assert (await handle.result()).is_completed
        rss = await settled_rss_kb(rt)
    return {
        "empty_restart_rss_mb": rss["VmRSS"] / 1024,
        "empty_restart_anon_mb": rss["RssAnon"] / 1024,
    }


async def settled_rss_kb(rt: Runtime) -> dict[str, int]:
    """The process's RSS parts once recovery is done and every task is idle."""
    await rt.wait_recovered()
    await anyio.wait_all_tasks_blocked()
    gc.collect()
    return rss_parts_kb()


async def phase_owner(data_dir: str, count: int) -> dict[str, float]:
    """Own the dir with ``count`` suspended executions; report completions on stdout."""
    agent = make_agent()
    async with Runtime(data_dir, agents=[agent], max_concurrency=CONCURRENCY) as rt:
        remaining = count

        @rt.on_complete
        def completed(result: Result) -> None:
            nonlocal remaining
            print(json.dumps({"id": result.execution_id, "at": time.time()}), flush=True)
            remaining -= 1

        cids = await spawn_suspended(rt, agent, count, "c-", spawners=SPAWNERS)
        print(json.dumps({"ready": cids}), flush=True)
        while remaining > 0:
            await rt.wait(min(cids), until="finished")
            await anyio.sleep(0.05)  # poll for the end of the benchmark, not for sync
    return {}


async def client_approve(data_dir: str, target: str, cid: str) -> float:
    log = await LmdbLog.open(data_dir, types=record_types(), client=True)
    try:
        sent = time.time()
        record = encode(SignalSent(target, "approve", {"confirmation_id": cid}, "bench"))
        await log.append(INBOX_STREAM, [record], expect=ANY)
        return sent
    finally:
        await log.aclose()


def phase_signal(count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        owner = subprocess.Popen(
            [sys.executable, str(HERE), "--phase", "owner", "--dir", d, "--count", str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert owner.stdout is not None
        cids = json.loads(owner.stdout.readline())["ready"]
        latencies = []
        for eid, cid in sorted(cids.items()):
            sent = anyio.run(client_approve, d, eid, cid)
            done = json.loads(owner.stdout.readline())
            assert done["id"] == eid
            latencies.append(done["at"] - sent)
        owner.wait(timeout=60)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {
        "cross_process_signal_p50_s": statistics.median(latencies),
        "cross_process_signal_p99_s": p99,
        "cross_process_signal_max_s": latencies[-1],
        "cross_process_signals": len(latencies),
    }


def run_phase(phase: str, data_dir: str, count: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, str(HERE), "--phase", phase, "--dir", data_dir, "--count", str(count)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


PHASES = {
    "suspend": phase_suspend,
    "prepare": phase_prepare,
    "restart": phase_restart,
    "empty": phase_empty,
    "owner": phase_owner,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 executions, fewer signals")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        figures = anyio.run(PHASES[args.phase], args.dir, args.count)
        print(json.dumps(figures), flush=True)
        return
    count = args.count or (2000 if args.quick else 10_000)
    print_machine(
        {"executions": str(count), "durability": "fsync", "max_concurrency": str(CONCURRENCY)}
    )
    figures: dict[str, float] = {"executions": count}
    with tempfile.TemporaryDirectory() as d:
        figures.update(run_phase("suspend", os.path.join(d, "a"), count))
        figures.update(run_phase("prepare", os.path.join(d, "b"), count))
        figures.update(run_phase("restart", os.path.join(d, "b"), count))
        figures.update(run_phase("empty", os.path.join(d, "c"), count))
    figures["restarted_rss_delta_mb"] = (
        figures["restarted_rss_mb"] - figures["empty_restart_rss_mb"]
    )
    figures["restarted_anon_delta_mb"] = (
        figures["restarted_anon_mb"] - figures["empty_restart_anon_mb"]
    )
    figures.update(phase_signal(20 if args.quick else 100))

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print_table(
        ["measure", "value", "unit", "target", ""],
        [
            [f"spawn {count} until all suspended", figures["suspend_all_s"], "s", "", ""],
            [
                f"  the same, {SPAWNERS} spawning at once",
                figures["burst_suspend_all_s"],
                "s",
                "",
                "",
            ],
            ["RSS of the empty runtime", figures["empty_rss_mb"], "MB", "", ""],
            [f"RSS with {count} suspended", figures["suspended_rss_mb"], "MB", "", ""],
            [
                "  delta",
                figures["suspended_rss_delta_mb"],
                "MB",
                "<= 20",
                verdict(figures["suspended_rss_delta_mb"] <= 20),
            ],
            ["    of which heap (anonymous)", figures["suspended_anon_delta_mb"], "MB", "", ""],
            [
                "    of which the LMDB map (file pages)",
                figures["suspended_file_delta_mb"],
                "MB",
                "",
                "",
            ],
            [
                f"RSS of a runtime restarted with {count} suspended",
                figures["restarted_rss_mb"],
                "MB",
                "",
                "",
            ],
            [
                "  delta to one restarted on an empty dir",
                figures["restarted_rss_delta_mb"],
                "MB",
                "<= 20",
                verdict(figures["restarted_rss_delta_mb"] <= 20),
            ],
            ["    of which heap (anonymous)", figures["restarted_anon_delta_mb"], "MB", "", ""],
            [
                "  live actors while suspended",
                figures["live_actors_while_suspended"],
                "",
                "0",
                verdict(figures["live_actors_while_suspended"] == 0),
            ],
            ["approve all -> all completed", figures["approve_all_complete_s"], "s", "", ""],
            [
                f"restart with {count} suspended: accepts work",
                figures["restart_accept_s"],
                "s",
                "<= 2",
                verdict(figures["restart_accept_s"] <= 2),
            ],
            ["  ... and its first result", figures["restart_first_result_s"], "s", "", ""],
            [
                "cross-process signal -> completed, p50",
                figures["cross_process_signal_p50_s"],
                "s",
                "",
                "",
            ],
            [
                "  p99",
                figures["cross_process_signal_p99_s"],
                "s",
                "<= 1",
                verdict(figures["cross_process_signal_p99_s"] <= 1),
            ],
        ],
    )
    if args.json:
        write_json(args.json, figures)


if __name__ == "__main__":
    main()
