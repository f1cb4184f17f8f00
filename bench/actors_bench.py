"""Benchmark perdure.actors against a bare anyio memory-object-stream ping-pong.

Measured on asyncio and on trio, each point in a fresh subprocess (so one point's
allocations do not pollute the next one's RSS):

* ask round trip (sequential, default 5 s timeout) beside a bare ping-pong over two
  anyio memory object streams, in the same process;
* tell throughput beside a bare memory-stream send throughput;
* tell latency: from ``tell`` to the actor's ``receive`` running, one message at a
  time (so no queueing);
* concurrent ask throughput: 50 askers asking one actor at once (its mailbox of 64
  holds them all), asks per second;
* spawn: 100k idle actors started one after another with ``start_child`` (the clock
  stops once every actor is idle, i.e. all tasks are blocked);
* RSS per idle actor at 10k and 100k (``/proc/self/statm``), mailbox included;
* for three actors: only ``receive``; with ``on_start``; with ``on_start`` and
  ``on_stop`` (each starts dormant, without a task of its own, until its first
  message); plus, at 10k, the time to send each its first message (which gives it its
  task) and the RSS per actor after that ("warm").

Usage::

    python bench/actors_bench.py [--quick] [--json FILE]

``--quick`` (< ~60 s) measures spawn and RSS at 10k only and extrapolates
``spawn_100k_s`` linearly from the 10k rate (flagged ``spawn_100k_extrapolated``);
``idle_actor_rss_kb`` is then the 10k figure (flagged ``idle_actor_rss_kb_extrapolated``).
Round-trip figures are medians (robust to other processes sharing the CPU); the load
average at start is printed because it shows how contended the machine was.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine as shared_machine
from bench.machine import reference_loop_ms, rss_kb

BACKENDS = ("asyncio", "trio")
TARGET_ASK_RATIO = 1.5
TARGET_RSS_KB = 12.0
TARGET_SPAWN_100K_S = 10.0


# ---- measurements (run inside a subprocess) ---------------------------------------


def summary(samples_ns: list[int]) -> dict[str, float]:
    samples = sorted(samples_ns)
    return {
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[int(len(samples) * 0.99)] / 1000,
        "mean_us": statistics.fmean(samples) / 1000,
    }


async def bare_pingpong(n: int, buffer: int) -> dict[str, float]:
    import anyio

    req_send, req_recv = anyio.create_memory_object_stream[int](buffer)
    rep_send, rep_recv = anyio.create_memory_object_stream[int](buffer)

    async def server() -> None:
        async with req_recv, rep_send:
            async for item in req_recv:
                await rep_send.send(item)

    samples: list[int] = []
    clock = time.perf_counter_ns
    async with anyio.create_task_group() as tg:
        tg.start_soon(server)
        async with req_send, rep_recv:
            for i in range(n // 10):  # warm-up
                await req_send.send(i)
                await rep_recv.receive()
            for i in range(n):
                t = clock()
                await req_send.send(i)
                await rep_recv.receive()
                samples.append(clock() - t)
    return summary(samples)


async def actor_ask(n: int) -> dict[str, float]:
    from perdure.actors import Actor, ChildSpec, Supervisor

    class Echo(Actor):
        async def receive(self, message: object) -> object:
            return message

    samples: list[int] = []
    clock = time.perf_counter_ns
    async with Supervisor(name="bench") as sup:
        ref = await sup.start_child(ChildSpec("echo", Echo))
        for i in range(n // 10):
            await ref.ask(i)
        for i in range(n):
            t = clock()
            await ref.ask(i)  # the default 5 s timeout: the path the runtime uses
            samples.append(clock() - t)
    return summary(samples)


async def bare_send_throughput(n: int) -> float:
    """Microseconds per item sent through a 64-slot memory stream to a consumer task."""
    import anyio

    send, recv = anyio.create_memory_object_stream[int](64)
    done = anyio.Event()

    async def consumer() -> None:
        count = 0
        async with recv:
            async for _ in recv:
                count += 1
                if count == n:
                    done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        t = time.perf_counter()
        async with send:
            for i in range(n):
                await send.send(i)
            await done.wait()
        return (time.perf_counter() - t) / n * 1e6


async def actor_tell_throughput(n: int) -> float:
    """Microseconds per message told to an actor (mailbox of 64), until all are handled."""
    from perdure.actors import Actor, ChildSpec, Supervisor

    class Counter(Actor):
        count = 0

        async def receive(self, message: object) -> object:
            if message == "count":
                return self.count
            self.count += 1
            return None

    async with Supervisor(name="bench") as sup:
        ref = await sup.start_child(ChildSpec("counter", Counter, mailbox_size=64))
        t = time.perf_counter()
        for i in range(n):
            await ref.tell(i)
        assert await ref.ask("count") == n
        return (time.perf_counter() - t) / n * 1e6


async def actor_tell_latency(n: int) -> dict[str, float]:
    """From ``tell`` to the actor handling it, one message at a time (no queueing)."""
    import anyio

    from perdure.actors import Actor, ChildSpec, Supervisor

    clock = time.perf_counter_ns
    samples: list[int] = []

    class Stamp(Actor):
        async def receive(self, message: object) -> object:
            sent, handled = message  # type: ignore[misc]
            samples.append(clock() - sent)
            handled.set()
            return None

    async with Supervisor(name="bench") as sup:
        ref = await sup.start_child(ChildSpec("stamp", Stamp))
        warm_up = n // 10
        for _ in range(warm_up + n):
            handled = anyio.Event()  # made before the clock starts: not measured
            await ref.tell((clock(), handled))
            await handled.wait()
    return summary(samples[warm_up:])


ASKERS = 50


async def actor_ask_throughput(n: int, askers: int = ASKERS) -> float:
    """Asks per second to one actor from ``askers`` tasks asking at once (n asks in all)."""
    import anyio

    from perdure.actors import Actor, ChildSpec, Supervisor

    class Echo(Actor):
        async def receive(self, message: object) -> object:
            return message

    each = max(1, n // askers)

    async def asker(ref: Any, count: int) -> None:
        for i in range(count):
            await ref.ask(i)

    async with Supervisor(name="bench") as sup:
        ref = await sup.start_child(ChildSpec("echo", Echo))  # mailbox of 64 >= askers
        async with anyio.create_task_group() as tg:  # warm-up
            for _ in range(askers):
                tg.start_soon(asker, ref, max(1, each // 10))
        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(askers):
                tg.start_soon(asker, ref, each)
        return askers * each / (time.perf_counter() - t)


async def messaging(quick: bool) -> dict[str, Any]:
    n = 5_000 if quick else 20_000
    rounds = 2 if quick else 3
    bare0, bare64, ask = [], [], []
    for _ in range(rounds):  # interleaved, so drifting load hits all alike
        bare0.append(await bare_pingpong(n, 0))
        bare64.append(await bare_pingpong(n, 64))
        ask.append(await actor_ask(n))

    def best(runs: list[dict[str, float]]) -> dict[str, float]:
        return min(runs, key=lambda r: r["p50_us"])

    tells = [await actor_tell_throughput(n * 2) for _ in range(rounds)]
    sends = [await bare_send_throughput(n * 2) for _ in range(rounds)]
    tell_latency = [await actor_tell_latency(n) for _ in range(rounds)]
    throughput = [await actor_ask_throughput(n * 2) for _ in range(rounds)]
    bare = min(best(bare0), best(bare64), key=lambda r: r["p50_us"])
    return {
        "ask": best(ask),
        "bare": bare,
        "bare_unbuffered": best(bare0),
        "bare_buffered": best(bare64),
        "tell_us_per_msg": min(tells),
        "bare_send_us_per_msg": min(sends),
        "tell_latency": best(tell_latency),
        "ask_throughput_per_s": max(throughput),
    }


KINDS = ("minimal", "on_start", "on_stop")


async def idle_actors(n: int, kind: str, shutdown: bool) -> dict[str, Any]:
    """Start ``n`` actors of ``kind`` one after another; measure time, RSS, and more at 10k."""
    import anyio

    from perdure.actors import Actor, ChildSpec, StopReason, Supervisor

    class Minimal(Actor):
        """Only receive: it starts dormant (no task until its first message)."""

        async def receive(self, message: object) -> object:
            return message

    class WithOnStart(Minimal):
        """on_start runs in the starter's task; then dormant as well."""

        async def on_start(self) -> None:
            self.ready = True

    class WithOnStop(WithOnStart):
        """With on_stop too: dormant as well (a stop before any message runs it inline)."""

        async def on_stop(self, reason: StopReason) -> None:
            self.ready = False

    actor = {"minimal": Minimal, "on_start": WithOnStart, "on_stop": WithOnStop}[kind]
    result: dict[str, Any] = {"n": n}
    async with Supervisor(name="bench", intensity=None) as sup:
        await anyio.wait_all_tasks_blocked()
        gc.collect()
        rss0 = rss_kb()
        wall, cpu = time.perf_counter(), time.process_time()
        refs = []
        for i in range(n):
            refs.append(await sup.start_child(ChildSpec(f"idle-{i}", actor)))
        await anyio.wait_all_tasks_blocked()
        result["spawn_s"] = time.perf_counter() - wall
        result["spawn_cpu_s"] = time.process_time() - cpu
        result["rss_kb_per_actor"] = (rss_kb() - rss0) / n
        if shutdown:
            # Warm: every actor handles one message (its first: it gets its task),
            # then idles.
            wall = time.perf_counter()
            for ref in refs:
                await ref.ask(None)
            await anyio.wait_all_tasks_blocked()
            result["wake_s"] = time.perf_counter() - wall
            result["warm_rss_kb_per_actor"] = (rss_kb() - rss0) / n
        del refs
        if not shutdown:
            # Stopping 10^5 actors gracefully takes a while and is not what this
            # point measures: report and leave.
            print(json.dumps(result), flush=True)
            os._exit(0)
        wall = time.perf_counter()
    result["shutdown_s"] = time.perf_counter() - wall
    return result


def child_main(args: argparse.Namespace) -> None:
    import anyio

    if args.child == "messaging":
        result = anyio.run(messaging, args.quick, backend=args.backend)
    else:
        result = anyio.run(idle_actors, args.n, args.child, args.n <= 10_000, backend=args.backend)
    print(json.dumps(result), flush=True)


# ---- orchestration ---------------------------------------------------------------------


def run_child(kind: str, backend: str, *, n: int = 0, quick: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--backend", backend, "--n", str(n)]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict[str, str]:
    """The shared machine description, plus the anyio and trio versions."""
    from importlib.metadata import version

    return {**shared_machine(), "anyio": version("anyio"), "trio": version("trio")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k points only (< ~60 s)")
    parser.add_argument("--json", metavar="FILE", help="write one flat JSON object of numbers")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="asyncio", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    info = machine()
    print(
        f"perdure.actors bench — {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"anyio {info['anyio']}, trio {info['trio']}, load average {info['load']}"
        + (" (quick)" if args.quick else "")
    )
    print(f"speed: {info['speed']}")
    flat: dict[str, float] = {}
    rows: list[tuple[str, dict[str, str], str]] = []
    started = time.perf_counter()
    per_backend: dict[str, dict[str, Any]] = {}
    for backend in BACKENDS:
        prefix = "" if backend == "asyncio" else "trio_"
        msg = run_child("messaging", backend, quick=args.quick)
        points10 = {kind: run_child(kind, backend, n=10_000) for kind in KINDS}
        points100 = {
            kind: None if args.quick else run_child(kind, backend, n=100_000) for kind in KINDS
        }
        ratio = msg["ask"]["p50_us"] / msg["bare"]["p50_us"]
        values = {
            "ask_roundtrip_us": msg["ask"]["p50_us"],
            "ask_roundtrip_p99_us": msg["ask"]["p99_us"],
            "ask_roundtrip_mean_us": msg["ask"]["mean_us"],
            "bare_pingpong_roundtrip_us": msg["bare"]["p50_us"],
            "bare_pingpong_roundtrip_p99_us": msg["bare"]["p99_us"],
            "bare_pingpong_unbuffered_us": msg["bare_unbuffered"]["p50_us"],
            "bare_pingpong_buffered_us": msg["bare_buffered"]["p50_us"],
            "ask_vs_bare_ratio": ratio,
            "tell_us_per_msg": msg["tell_us_per_msg"],
            "tell_msgs_per_s": 1e6 / msg["tell_us_per_msg"],
            "bare_send_us_per_msg": msg["bare_send_us_per_msg"],
            "tell_latency_us": msg["tell_latency"]["p50_us"],
            "tell_latency_p99_us": msg["tell_latency"]["p99_us"],
            "ask_throughput_per_s": msg["ask_throughput_per_s"],
            "ask_throughput_askers": ASKERS,
            "spawn_100k_extrapolated": 1.0 if args.quick else 0.0,
            # --quick: the idle RSS is the 10k figure, not measured at 100k.
            "idle_actor_rss_kb_extrapolated": 1.0 if args.quick else 0.0,
        }
        for kind in KINDS:
            # Keys for the minimal actor are unprefixed: it is "the idle actor".
            name = "" if kind == "minimal" else f"{kind}_"
            point10, point100 = points10[kind], points100[kind]
            values[f"{name}idle_actor_rss_kb_10k"] = point10["rss_kb_per_actor"]
            values[f"{name}warm_actor_rss_kb_10k"] = point10["warm_rss_kb_per_actor"]
            values[f"{name}spawn_10k_s"] = point10["spawn_s"]
            values[f"{name}shutdown_10k_s"] = point10["shutdown_s"]
            values[f"{name}first_ask_10k_s"] = point10["wake_s"]
            if point100 is not None:
                values[f"{name}spawn_100k_s"] = point100["spawn_s"]
                values[f"{name}spawn_100k_cpu_s"] = point100["spawn_cpu_s"]
                values[f"{name}idle_actor_rss_kb_100k"] = point100["rss_kb_per_actor"]
            else:  # --quick: linear extrapolation from 10k (GC makes the real one worse)
                values[f"{name}spawn_100k_s"] = point10["spawn_s"] * 10
                values[f"{name}spawn_100k_cpu_s"] = point10["spawn_cpu_s"] * 10
            values[f"{name}idle_actor_rss_kb"] = values.get(
                f"{name}idle_actor_rss_kb_100k", values[f"{name}idle_actor_rss_kb_10k"]
            )
        values["spawn_per_s"] = 100_000 / values["spawn_100k_s"]
        per_backend[backend] = values
        flat.update({prefix + k: float(v) for k, v in values.items()})

    def cell(key: str, fmt: str) -> dict[str, str]:
        return {
            b: fmt.format(per_backend[b][key]) if key in per_backend[b] else "-" for b in BACKENDS
        }

    def verdict(key: str, limit: float) -> str:
        ok = all(per_backend[b][key] <= limit for b in BACKENDS)
        return "ok" if ok else "MISSED"

    spawn_label = "spawn 100k, s" + (" (extrapolated from 10k)" if args.quick else "")
    rows = [
        (
            "bare memory-stream ping-pong, us (p50)",
            cell("bare_pingpong_roundtrip_us", "{:.1f}"),
            "",
        ),
        (
            "  unbuffered / 64-slot streams, us",
            {
                b: f"{per_backend[b]['bare_pingpong_unbuffered_us']:.1f} / "
                f"{per_backend[b]['bare_pingpong_buffered_us']:.1f}"
                for b in BACKENDS
            },
            "",
        ),
        ("ask round trip, us (p50)", cell("ask_roundtrip_us", "{:.1f}"), ""),
        ("ask round trip, us (p99)", cell("ask_roundtrip_p99_us", "{:.1f}"), ""),
        (
            "ask / bare ping-pong",
            cell("ask_vs_bare_ratio", "{:.2f}x"),
            f"<= {TARGET_ASK_RATIO}x {verdict('ask_vs_bare_ratio', TARGET_ASK_RATIO)}",
        ),
        ("tell, us per message", cell("tell_us_per_msg", "{:.1f}"), ""),
        ("tell throughput, msgs/s", cell("tell_msgs_per_s", "{:,.0f}"), ""),
        ("bare stream send, us per item", cell("bare_send_us_per_msg", "{:.1f}"), ""),
        ("tell latency (tell to receive), us (p50)", cell("tell_latency_us", "{:.1f}"), ""),
        ("tell latency, us (p99)", cell("tell_latency_p99_us", "{:.1f}"), ""),
        (
            f"ask throughput, {ASKERS} concurrent askers, asks/s",
            cell("ask_throughput_per_s", "{:,.0f}"),
            "",
        ),
    ]
    titles = {
        "minimal": "idle actor, receive only",
        "on_start": "idle actor with on_start",
        "on_stop": "idle actor with on_start and on_stop",
    }
    for kind in KINDS:
        name = "" if kind == "minimal" else f"{kind}_"
        headline = kind == "minimal"
        rows += [
            (titles[kind], {b: "" for b in BACKENDS}, ""),
            ("  RSS per actor, KB (10k)", cell(f"{name}idle_actor_rss_kb_10k", "{:.2f}"), ""),
            (
                "  RSS per actor, KB (100k)",
                cell(f"{name}idle_actor_rss_kb_100k", "{:.2f}"),
                f"<= {TARGET_RSS_KB} {verdict(f'{name}idle_actor_rss_kb', TARGET_RSS_KB)}"
                if headline and not args.quick
                else "",
            ),
            (
                "  first ask to each of 10k (gives each its task), s",
                cell(f"{name}first_ask_10k_s", "{:.2f}"),
                "",
            ),
            (
                "  RSS per actor after 1 message, KB (10k)",
                cell(f"{name}warm_actor_rss_kb_10k", "{:.2f}"),
                "",
            ),
            ("  spawn 10k, s", cell(f"{name}spawn_10k_s", "{:.2f}"), ""),
            (
                "  " + spawn_label,
                cell(f"{name}spawn_100k_s", "{:.2f}"),
                f"<= {TARGET_SPAWN_100K_S} {verdict(f'{name}spawn_100k_s', TARGET_SPAWN_100K_S)}",
            ),
            ("    of which CPU time, s", cell(f"{name}spawn_100k_cpu_s", "{:.2f}"), ""),
            ("  shut down 10k (1 message each), s", cell(f"{name}shutdown_10k_s", "{:.2f}"), ""),
        ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'asyncio':>14}  {'trio':>14}  target")
    for label, values, target in rows:
        print(f"{label:{width}}  {values['asyncio']:>14}  {values['trio']:>14}  {target}")
    print(f"({time.perf_counter() - started:.0f} s; load average now {machine()['load']})")
    if args.json:
        flat["reference_loop_ms"] = reference_loop_ms()
        with open(args.json, "w") as f:
            json.dump(flat, f, indent=2, sort_keys=True)
            f.write("\n")


if __name__ == "__main__":
    main()
