"""Child processes for the LMDB tests: ``python procs.py [--backend=B] MODE DIR [ARGS...]``.

Each mode opens the data dir at ``DIR`` the way another process would (an owner, a
client, a writer about to be SIGKILLed) and talks to the parent over stdin/stdout, one
line per message.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import sys
import time

import anyio
import cbor2
import lmdb

from perdure.log import ANY, LmdbLog, NewRecord, RecordTypes, StorageFullError
from perdure.log.codec import encode_entry, encode_record, unseal

TYPES = RecordTypes({"note": 1, "step": 2, "signal": 1})


def say(*words: object) -> None:
    """One line to the parent, flushed at once (the parent may kill us any moment)."""
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


async def next_line() -> str:
    """The parent's next line on stdin ('' when it closed stdin)."""
    return await anyio.to_thread.run_sync(sys.stdin.readline)


async def owner(path: str) -> None:
    """Own the dir and append on command: 'append STREAM N' or 'quit'."""
    async with await LmdbLog.open(path, types=TYPES, durability="process") as log:
        say("ready", os.getpid())
        while True:
            words = (await next_line()).split()
            if not words or words[0] == "quit":
                return
            if words[0] == "append":
                stream, count = words[1], int(words[2])
                seq = await log.append(
                    stream, [NewRecord("note", {"i": i}) for i in range(count)], expect=ANY
                )
                say("appended", seq)


async def client(path: str) -> None:
    """Open as a client; on 'go STREAM', read STREAM and append one signal."""
    async with await LmdbLog.open(path, types=TYPES, client=True) as log:
        say("ready", os.getpid())
        words = (await next_line()).split()
        if words and words[0] == "go":
            count = 0
            async for record in log.read(words[1]):
                assert record.seq == count + 1
                count += 1
            seq = await log.append("signals/from-client", [NewRecord("signal", {})], expect=ANY)
            say("read", count, "signalled", seq)


async def client_append(path: str, stream: str) -> None:
    """Open as a client, append one signal to ``stream``, say its seq."""
    async with await LmdbLog.open(path, types=TYPES, client=True) as log:
        seq = await log.append(stream, [NewRecord("signal", {"from": os.getpid()})], expect=ANY)
        say("appended", seq)


async def crash_writer(path: str, round_id: str, seed: str, map_size: str = "0") -> None:
    """Append batches from many tasks forever, saying each acknowledged batch.

    Each line is ``ack STREAM LAST_SEQ BATCH_ID SIZE``: the batch's records carry
    ``{"batch": BATCH_ID, "i": 0..SIZE-1, "size": SIZE}``, so the parent can tell a
    whole batch from a partial one whether or not it was acknowledged. The parent
    SIGKILLs us at a random moment. A ``map_size`` other than 0 opens with that
    initial map (a tiny one makes the map grow while we run).
    """
    rng = random.Random(seed)
    pad = "x" * 200
    sizing = {"map_size": int(map_size)} if int(map_size) else {}
    async with await LmdbLog.open(path, types=TYPES, durability="fsync", **sizing) as log:

        async def own_stream(task: int) -> None:
            stream = f"exec/{task}"
            last = await log.last_seq(stream)
            for n in range(10**9):
                size = rng.randint(1, 4)
                batch = f"{round_id}-{task}-{n}"
                records = [
                    NewRecord("note", {"batch": batch, "i": i, "size": size, "pad": pad})
                    for i in range(size)
                ]
                last = await log.append(stream, records, expect=last, meta={"status": batch})
                say("ack", stream, last, batch, size)

        async def shared_stream(task: int) -> None:
            for n in range(10**9):
                size = rng.randint(1, 3)
                batch = f"{round_id}-s{task}-{n}"
                records = [
                    NewRecord("signal", {"batch": batch, "i": i, "size": size}) for i in range(size)
                ]
                last = await log.append("signals/shared", records, expect=ANY)
                say("ack", "signals/shared", last, batch, size)

        say("ready", os.getpid())
        async with anyio.create_task_group() as tg:
            for task in range(8):
                tg.start_soon(own_stream, task)
            for task in range(4):
                tg.start_soon(shared_stream, task)


async def fill(path: str, map_size: str) -> None:
    """Append 20 KiB batches until the storage is full; report what happened as JSON."""
    report: dict[str, object] = {"acked": 0}
    async with await LmdbLog.open(path, types=TYPES, map_size=int(map_size)) as log:
        blob = "y" * 20_000
        last = 0
        for n in range(100_000):
            try:
                last = await log.append(
                    "fill", [NewRecord("note", {"n": n, "b": blob})], expect=last
                )
            except StorageFullError as exc:
                report["error"] = str(exc)
                report["error_path"] = exc.path
                break
            report["acked"] = last
        report["last_seq_after_error"] = await log.last_seq("fill")
        report["faults_after_error"] = [str(f) for f in await log.check()]
        # Free space (the parent's ballast file) and show the log carries on.
        ballast = os.environ.get("PERDURE_TEST_BALLAST")
        if ballast:
            os.unlink(ballast)
            last = await log.append("fill", [NewRecord("note", {"n": -1})], expect=last)
            report["appended_after_freeing"] = last
        report["records"] = [r.payload["n"] async for r in log.read("fill")]
        report["faults"] = [str(f) for f in await log.check()]
    say(json.dumps(report))


async def corrupt_and_append(path: str, corrupt: str, append: str) -> None:
    """In ONE raw LMDB transaction, damage ``corrupt``'s index entry and append a signal
    to ``append`` (as a buggy or failing foreign writer might); say the new last seq."""
    env = lmdb.open(path, map_size=0, max_dbs=8)  # 0: keep the owner's map size
    try:
        records = env.open_db(b"records", create=False)
        streams = env.open_db(b"streams", create=False)
        with env.begin(write=True) as txn:
            damaged = bytearray(txn.get(corrupt.encode(), db=streams))
            damaged[len(damaged) // 2] ^= 0x01
            txn.put(corrupt.encode(), bytes(damaged), db=streams)
            sid, last, created_at, _, meta = unseal(txn.get(append.encode(), db=streams), 5)
            now = time.time()
            key = struct.pack(">IQ", sid, last + 1)
            txn.put(key, encode_record("signal", 1, now, {}), db=records)
            entry = encode_entry(sid, last + 1, created_at, now, cbor2.dumps(meta))
            txn.put(append.encode(), entry, db=streams)
    finally:
        env.close()
    say("done", last + 1)


async def try_open(path: str, role: str) -> None:
    """Open the dir as ``role`` (owner or client) and say 'opened', or 'error TYPE MESSAGE'.

    Run in a child because a bad store could kill the process (SIGBUS) instead of
    raising: the parent then sees the signal, not a line.
    """
    try:
        async with await LmdbLog.open(path, types=TYPES, client=role == "client") as log:
            await log.last_seq("s")
    except Exception as exc:
        say("error", type(exc).__name__, str(exc))
    else:
        say("opened")


async def owner_forks(path: str) -> None:
    """Own the dir, then fork a child that outlives us; say both pids, then wait.

    The child holds on to whatever fork gave it (as a multiprocessing worker would) and
    sleeps; the parent test SIGKILLs us, then the child.
    """
    async with await LmdbLog.open(path, types=TYPES, durability="process") as log:
        await log.append("s", [NewRecord("note", {"i": 0})], expect=ANY)
        ready_r, ready_w = os.pipe()
        child = os.fork()
        if child == 0:
            # fork() has returned here, so the log's at-fork hook has run: say so, or
            # the parent test may race the hook on a busy machine.
            os.write(ready_w, b"x")
            time.sleep(120)
            os._exit(0)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        say("forked", os.getpid(), child)
        await next_line()


async def client_signaller(path: str, tag: str, pad: str = "0") -> None:
    """Open as a client and append signals one by one forever, saying each ack.

    Each line is ``ack SEQ ID``; ids are ``TAG-N``; each signal carries ``pad`` bytes of
    padding (enough of it makes the client grow the map). The parent SIGKILLs us.
    """
    padding = "p" * int(pad)
    async with await LmdbLog.open(path, types=TYPES, client=True, durability="fsync") as log:
        say("ready", os.getpid())
        for n in range(10**9):
            signal_id = f"{tag}-{n}"
            payload = {"id": signal_id, "pad": padding}
            seq = await log.append("signals/client", [NewRecord("signal", payload)], expect=ANY)
            say("ack", seq, signal_id)


def die_reading(path: str) -> None:
    """Begin a read transaction, say so, and SIGKILL ourselves inside it."""
    env = lmdb.open(path, map_size=0, max_dbs=8)  # 0: keep the owner's map size
    txn = env.begin()
    say("reading", os.getpid(), txn.id())
    os.kill(os.getpid(), signal.SIGKILL)


MODES = {
    "owner": owner,
    "client": client,
    "client-append": client_append,
    "crash-writer": crash_writer,
    "fill": fill,
    "corrupt-and-append": corrupt_and_append,
    "try-open": try_open,
    "owner-forks": owner_forks,
    "client-signaller": client_signaller,
    "die-reading": die_reading,
}

if __name__ == "__main__":
    # python procs.py [--backend=asyncio|trio] MODE DIR [ARGS...]
    argv = sys.argv[1:]
    backend = "asyncio"
    if argv and argv[0].startswith("--backend="):
        backend = argv.pop(0).partition("=")[2]
    mode = MODES[argv[0]]
    if mode is die_reading:  # plain LMDB, no event loop
        die_reading(*argv[1:])
    anyio.run(mode, *argv[1:], backend=backend)
