"""Benchmark perdure.log's LMDB store against raw LMDB and SQLite, in one run.

    python bench/log_bench.py [--quick] [--json FILE] [--backend asyncio|trio]

Rows (fsync durability unless said otherwise; one ~300-byte record per append):

* ``writers N``: N concurrent tasks, each appending to its own stream with an expected
  seq (the runtime's pattern: one stream per execution); records/s and the p50/p99
  time from calling ``append`` to it returning (acknowledged = on disk).
* ``writers 1000, one stream``: the same 1000 tasks appending to one stream with ANY.
* ``writers 1000, naive waker``: as ``writers 1000`` but with one thread-safe callback
  per waiting task instead of one per event loop per batch.
* ``raw lmdb sync/record``: py-lmdb, one put per sync transaction, nothing around it.
* ``raw lmdb batch 100``: py-lmdb, 100 puts per sync transaction.
* ``sqlite WAL FULL``: stdlib sqlite3, journal_mode=WAL, synchronous=FULL, one row per
  transaction.
* ``replay``: one stream of 100k records read on the loop thread with
  ``LmdbLog.read_chunks`` (as the runtime replays) and with ``read`` (one iterator step
  per record); with reads hopping to a worker thread per chunk; and as raw cursor
  iteration + ``cbor2.loads`` of the same stored values.
* ``bytes/record``: data.mdb size on disk / records, for the replay stream and for the
  1000-writer fleet.

Ratios compare figures measured in this run. The machine is shared: the load average
at the start is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import cbor2
import lmdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine as shared_machine
from bench.machine import reference_loop_ms
from perdure.log import ANY, LmdbLog, NewRecord, RecordTypes, lmdb_store
from perdure.log.codec import decode_record, encode_record

TYPES = RecordTypes({"llm.completed": 1})
# About 300 bytes stored per record, like a short LLM step outcome.
PAYLOAD = {
    "kind": "llm.completed",
    "model": "gpt-4o-mini",
    "text": "The weather in Lisbon is sunny, 24 degrees, light wind from the north-west. " * 2,
    "usage": {"input_tokens": 412, "output_tokens": 57},
    "fingerprint": "3f9a1c2e7b",
}
RECORD_BYTES = len(encode_record("llm.completed", 1, time.time(), PAYLOAD))


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nan if there are none."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def machine() -> dict[str, str]:
    """The shared machine description, plus the LMDB versions."""
    return {
        **shared_machine(),
        "lmdb": ".".join(map(str, lmdb.version())) + f" (py-lmdb {lmdb.__version__})",
    }


def disk_bytes(path: Path) -> int:
    """Bytes the file occupies on disk (allocated blocks, not its apparent size)."""
    return os.stat(path).st_blocks * 512


# -- perdure writers ---------------------------------------------------------------------


async def run_writers(
    root: Path, writers: int, seconds: float, warmup: float, shared: bool = False
) -> dict[str, float]:
    """``writers`` tasks appending one record each in fsync mode: rate, ack latency, size."""
    path = root / f"writers-{writers}{'-shared' if shared else ''}"
    shutil.rmtree(path, ignore_errors=True)
    log = await LmdbLog.open(path, types=TYPES, durability="fsync")
    latencies: list[float] = []
    measuring = False
    stop = False
    record = [NewRecord("llm.completed", PAYLOAD)]

    async def writer(w: int) -> None:
        stream = "fleet/shared" if shared else f"exec/{w:05d}"
        last = 0
        perf = time.perf_counter
        while not stop:
            started = perf()
            last = await log.append(stream, record, expect=ANY if shared else last)
            if measuring:
                latencies.append(perf() - started)

    async with anyio.create_task_group() as tg:
        for w in range(writers):
            tg.start_soon(writer, w)
        await anyio.sleep(warmup)
        before = await log.stats()
        measuring = True
        started = time.perf_counter()
        await anyio.sleep(seconds)
        measuring = False
        elapsed = time.perf_counter() - started
        after = await log.stats()
        stop = True
    stats = await log.stats()
    await log.aclose()
    latencies.sort()
    appended = after["records_appended"] - before["records_appended"]
    commits = after["commits"] - before["commits"]
    return {
        "records_per_s": appended / elapsed,
        "ack_p50_us": percentile(latencies, 0.50) * 1e6,
        "ack_p99_us": percentile(latencies, 0.99) * 1e6,
        "records_per_commit": appended / max(commits, 1),
        "bytes_per_record": disk_bytes(path / "data.mdb") / stats["records"],
    }


def naive_wake(items: Any, before: Callable[[int], None] | None = None) -> int:
    """The naive waker: one thread-safe callback per waiting task."""
    items = list(items)
    if before is not None:
        before(len(items))
    count = 0
    for completion, outcome in items:
        try:
            completion.schedule(completion.resolve, outcome)
        except RuntimeError:
            continue
        count += 1
    return count


# -- raw baselines -----------------------------------------------------------------------


def raw_lmdb_sync(root: Path, transactions: int) -> dict[str, float]:
    """Baseline: py-lmdb, one put per sync transaction; rate and commit latency."""
    path = root / "raw-sync"
    shutil.rmtree(path, ignore_errors=True)
    env = lmdb.open(str(path), map_size=1 << 30, max_dbs=2)
    db = env.open_db(b"records")
    value = encode_record("llm.completed", 1, time.time(), PAYLOAD)
    latencies = []
    started = time.perf_counter()
    for i in range(transactions):
        t0 = time.perf_counter()
        with env.begin(write=True, db=db) as txn:
            txn.put(i.to_bytes(12, "big"), value)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    env.close()
    latencies.sort()
    return {
        "records_per_s": transactions / elapsed,
        "commit_p50_us": percentile(latencies, 0.5) * 1e6,
        "commit_p99_us": percentile(latencies, 0.99) * 1e6,
    }


def raw_lmdb_batches(root: Path, batches: int, size: int = 100) -> dict[str, float]:
    """Baseline: py-lmdb, ``size`` puts per sync transaction; the rate."""
    path = root / "raw-batch"
    shutil.rmtree(path, ignore_errors=True)
    env = lmdb.open(str(path), map_size=1 << 30, max_dbs=2)
    db = env.open_db(b"records")
    value = encode_record("llm.completed", 1, time.time(), PAYLOAD)
    started = time.perf_counter()
    n = 0
    for _ in range(batches):
        with env.begin(write=True, db=db) as txn:
            for _ in range(size):
                txn.put(n.to_bytes(12, "big"), value)
                n += 1
    elapsed = time.perf_counter() - started
    env.close()
    return {"records_per_s": n / elapsed}


def sqlite_wal_full(root: Path, transactions: int) -> dict[str, float]:
    """Peer: stdlib sqlite3 in WAL mode, synchronous=FULL, one row per transaction."""
    path = root / "sqlite.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE records (stream TEXT, seq INTEGER, value BLOB, PRIMARY KEY (stream, seq))"
    )
    value = encode_record("llm.completed", 1, time.time(), PAYLOAD)
    latencies = []
    started = time.perf_counter()
    for i in range(transactions):
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        conn.execute("INSERT INTO records VALUES (?, ?, ?)", ("exec/1", i + 1, value))
        conn.execute("COMMIT")
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    conn.close()
    latencies.sort()
    return {
        "records_per_s": transactions / elapsed,
        "commit_p50_us": percentile(latencies, 0.5) * 1e6,
    }


# -- replay ------------------------------------------------------------------------------


async def build_replay_stream(path: Path, records: int) -> None:
    """Write the one stream of ``records`` records that the replay rows read."""
    shutil.rmtree(path, ignore_errors=True)
    async with await LmdbLog.open(path, types=TYPES, durability="process") as log:
        batch = [NewRecord("llm.completed", PAYLOAD)] * 1000
        last = 0
        while last < records:
            last = await log.append("replay", batch[: records - last], expect=last)


async def replay_perdure(path: Path) -> float:
    """Replay as the runtime does it: ``read_chunks`` (checksums, checks, Records)."""
    async with await LmdbLog.open(path, types=TYPES, durability="process") as log:
        started = time.perf_counter()
        count = 0
        async for chunk in log.read_chunks("replay"):
            for _ in chunk:
                count += 1
        return count / (time.perf_counter() - started)


async def replay_perdure_per_record(path: Path) -> float:
    """The same through ``read``: one async-iterator step per record."""
    async with await LmdbLog.open(path, types=TYPES, durability="process") as log:
        started = time.perf_counter()
        count = 0
        async for _ in log.read("replay"):
            count += 1
        return count / (time.perf_counter() - started)


async def replay_perdure_to_thread(path: Path) -> float:
    """The same replay with each chunk's read transaction on a worker thread."""
    async with await LmdbLog.open(path, types=TYPES, durability="process") as log:
        known = log.types._known
        started = time.perf_counter()
        seq = 0
        while True:
            values = await anyio.to_thread.run_sync(log._read_chunk, "replay", b"replay", seq)
            for value in values:
                seq += 1
                decode_record(known, "replay", seq, value)
            if len(values) < lmdb_store.READ_CHUNK:
                break
            await anyio.lowlevel.checkpoint()
        return seq / (time.perf_counter() - started)


def replay_raw(path: Path) -> float:
    """Raw cursor iteration over the same stored values + cbor2.loads of each."""
    env = lmdb.open(str(path), max_dbs=8, readonly=True, lock=False)
    db = env.open_db(b"records", create=False)
    loads = cbor2.loads
    started = time.perf_counter()
    count = 0
    with env.begin(db=db) as txn:
        for value in txn.cursor().iternext(keys=False, values=True):
            loads(value)
            count += 1
    elapsed = time.perf_counter() - started
    env.close()
    return count / elapsed


# -- main --------------------------------------------------------------------------------


def main() -> None:
    """Run every row, print the table and, with ``--json``, write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run under 30 seconds")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--dir", help="where to put the data (default: a temp dir)")
    args = parser.parse_args()

    seconds, warmup = (1.0, 0.4) if args.quick else (4.0, 1.0)
    raw_txns = 300 if args.quick else 2000
    replay_records = 100_000
    replay_runs = 1 if args.quick else 3
    root = Path(args.dir or tempfile.mkdtemp(prefix="perdure-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    info = machine()
    results: dict[str, float] = {}

    def run(fn: Callable[..., Any], *fn_args: Any) -> Any:
        return anyio.run(fn, *fn_args, backend=args.backend)

    try:
        # Raw baselines first and last would bracket drift; measure them right before
        # the writer rows they are compared with.
        raw = raw_lmdb_sync(root, raw_txns)
        results["raw_sync_per_record_records_per_s"] = raw["records_per_s"]
        results["raw_sync_commit_p50_us"] = raw["commit_p50_us"]
        results["raw_sync_commit_p99_us"] = raw["commit_p99_us"]
        results["raw_batch100_records_per_s"] = raw_lmdb_batches(root, raw_txns // 10)[
            "records_per_s"
        ]
        sql = sqlite_wal_full(root, raw_txns)
        results["sqlite_wal_full_records_per_s"] = sql["records_per_s"]
        results["sqlite_wal_full_commit_p50_us"] = sql["commit_p50_us"]

        for writers in (1, 10, 100, 1000):
            figures = run(run_writers, root, writers, seconds, warmup)
            for key, value in figures.items():
                results[f"writers_{writers}_{key}"] = value
        shared = run(run_writers, root, 1000, seconds, warmup, True)
        results["writers_1000_one_stream_records_per_s"] = shared["records_per_s"]
        results["writers_1000_one_stream_ack_p50_us"] = shared["ack_p50_us"]
        results["writers_1000_one_stream_ack_p99_us"] = shared["ack_p99_us"]
        real_wake = lmdb_store.wake
        lmdb_store.wake = naive_wake  # type: ignore[assignment]
        try:
            naive = run(run_writers, root, 1000, seconds, warmup)
        finally:
            lmdb_store.wake = real_wake
        results["writers_1000_naive_waker_records_per_s"] = naive["records_per_s"]
        results["writers_1000_naive_waker_ack_p50_us"] = naive["ack_p50_us"]

        replay_path = root / "replay"
        run(build_replay_stream, replay_path, replay_records)
        ours, threaded, raw_rates = [], [], []
        per_record = []
        for _ in range(replay_runs):
            raw_rates.append(replay_raw(replay_path))
            ours.append(run(replay_perdure, replay_path))
            per_record.append(run(replay_perdure_per_record, replay_path))
            threaded.append(run(replay_perdure_to_thread, replay_path))
        results["replay_records_per_s"] = max(ours)
        results["replay_read_records_per_s"] = max(per_record)
        results["replay_to_thread_records_per_s"] = max(threaded)
        results["raw_replay_records_per_s"] = max(raw_rates)
        results["bytes_per_record"] = disk_bytes(replay_path / "data.mdb") / replay_records
        results["fleet_bytes_per_record"] = results["writers_1000_bytes_per_record"]
        results["stored_value_bytes"] = RECORD_BYTES
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    results["writers_1000_vs_raw_sync"] = (
        results["writers_1000_records_per_s"] / results["raw_sync_per_record_records_per_s"]
    )
    results["writers_1_p50_vs_raw_sync_p50"] = (
        results["writers_1_ack_p50_us"] / results["raw_sync_commit_p50_us"]
    )
    results["replay_vs_raw"] = results["replay_records_per_s"] / results["raw_replay_records_per_s"]
    results["cpu_count"] = float(os.cpu_count() or 0)
    results["load_avg_1m_at_start"] = float(info["load"].split()[0])
    results["reference_loop_ms"] = reference_loop_ms()

    print_table(info, args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def print_table(info: dict[str, str], args: argparse.Namespace, r: dict[str, float]) -> None:
    """Print the figures of one run as one table, then the targets met or missed."""
    print(f"perdure.log bench — {'quick' if args.quick else 'full'} run, backend {args.backend}")
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"LMDB {info['lmdb']}, load avg {info['load']}"
    )
    print(f"speed: {info['speed']}")
    print(f"record: {r['stored_value_bytes']:.0f} stored bytes (payload + envelope + CRC)")
    print()
    rows = [("case", "records/s", "p50 µs", "p99 µs", "notes")]
    for n in (1, 10, 100, 1000):
        rows.append(
            (
                f"perdure fsync, {n} writer{'s' if n > 1 else ''}",
                f"{r[f'writers_{n}_records_per_s']:,.0f}",
                f"{r[f'writers_{n}_ack_p50_us']:,.0f}",
                f"{r[f'writers_{n}_ack_p99_us']:,.0f}",
                f"{r[f'writers_{n}_records_per_commit']:.1f} records/commit",
            )
        )
    rows.append(
        (
            "perdure fsync, 1000 writers, one stream",
            f"{r['writers_1000_one_stream_records_per_s']:,.0f}",
            f"{r['writers_1000_one_stream_ack_p50_us']:,.0f}",
            f"{r['writers_1000_one_stream_ack_p99_us']:,.0f}",
            "expect=ANY",
        )
    )
    rows.append(
        (
            "perdure fsync, 1000 writers, naive waker",
            f"{r['writers_1000_naive_waker_records_per_s']:,.0f}",
            f"{r['writers_1000_naive_waker_ack_p50_us']:,.0f}",
            "",
            "one callback per task",
        )
    )
    rows.append(
        (
            "raw lmdb, sync txn per record",
            f"{r['raw_sync_per_record_records_per_s']:,.0f}",
            f"{r['raw_sync_commit_p50_us']:,.0f}",
            f"{r['raw_sync_commit_p99_us']:,.0f}",
            "commit latency",
        )
    )
    rows.append(
        (
            "raw lmdb, sync txn per 100 records",
            f"{r['raw_batch100_records_per_s']:,.0f}",
            "",
            "",
            "",
        )
    )
    rows.append(
        (
            "sqlite3 WAL synchronous=FULL, row/txn",
            f"{r['sqlite_wal_full_records_per_s']:,.0f}",
            f"{r['sqlite_wal_full_commit_p50_us']:,.0f}",
            "",
            "",
        )
    )
    rows.append(
        ("replay 100k, LmdbLog.read_chunks", f"{r['replay_records_per_s']:,.0f}", "", "", "")
    )
    rows.append(("replay 100k, LmdbLog.read", f"{r['replay_read_records_per_s']:,.0f}", "", "", ""))
    rows.append(
        (
            "replay 100k, chunks via to_thread",
            f"{r['replay_to_thread_records_per_s']:,.0f}",
            "",
            "",
            "",
        )
    )
    rows.append(
        (
            "replay 100k, raw cursor + cbor2.loads",
            f"{r['raw_replay_records_per_s']:,.0f}",
            "",
            "",
            "",
        )
    )
    rows.append(
        (
            "bytes on disk, replay stream",
            "",
            "",
            "",
            f"{r['bytes_per_record']:.0f} bytes/record (100k records, one stream)",
        )
    )
    rows.append(
        (
            "bytes on disk, 1000-writer fleet",
            "",
            "",
            "",
            f"{r['fleet_bytes_per_record']:.0f} bytes/record (one stream per writer)",
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print(
            "  ".join(
                cell.ljust(w) if j in (0, 4) else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print("targets:")
    checks = [
        (
            "1000 writers >= 15,000 records/s",
            r["writers_1000_records_per_s"] >= 15_000,
            f"{r['writers_1000_records_per_s']:,.0f}",
        ),
        (
            "1000 writers >= 20x raw sync/record",
            r["writers_1000_vs_raw_sync"] >= 20,
            f"{r['writers_1000_vs_raw_sync']:.1f}x",
        ),
        (
            "1 writer p50 <= 1.5x raw commit p50",
            r["writers_1_p50_vs_raw_sync_p50"] <= 1.5,
            f"{r['writers_1_p50_vs_raw_sync_p50']:.2f}x",
        ),
        (
            "replay >= 80% of raw cursor + cbor2",
            r["replay_vs_raw"] >= 0.8,
            f"{r['replay_vs_raw']:.0%}",
        ),
        (
            "<= 600 bytes on disk per record",
            r["bytes_per_record"] <= 600,
            f"{r['bytes_per_record']:.0f} (replay stream); fleet of 1000 streams: "
            f"{r['fleet_bytes_per_record']:.0f}",
        ),
    ]
    for name, ok, figure in checks:
        print(f"  [{'met ' if ok else 'MISS'}] {name}: {figure}")


if __name__ == "__main__":
    if sys.platform != "linux":
        print("note: written for Linux (reads /proc/cpuinfo)", file=sys.stderr)
    main()
