"""LmdbLog at its edges: damaged files, inherited locks, racing closes, dying owners."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import struct
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import lmdb
import pytest

from perdure.log import ANY, ConflictError, CorruptRecordError, LogClosedError, LogError
from perdure.log.codec import encode_record, unseal
from perdure.log.lmdb_store import LOCK_FILE, LmdbLog

from .conformance import TYPES, collect, note
from .test_lmdb_store import PROCS, Child, WriterGate, _unshare_works, open_log


def _fill(path: Path) -> int:
    """A log of 20 streams of 50 records; return the size of its data.mdb."""

    async def fill() -> None:
        async with await open_log(path) as log:
            for s in range(20):
                records = [note(i, pad="x" * 500) for i in range(50)]
                await log.append(f"s/{s}", records, expect=0)

    anyio.run(fill)
    return os.path.getsize(path / "data.mdb")


@pytest.mark.parametrize("role", ["owner", "client"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_data_file_is_refused_by_name_not_a_crash(
    tmp_path: Path, role: str, keep: float
) -> None:
    """LMDB maps data.mdb: reading a page past the end of a truncated file is SIGBUS.

    Opening must look at the file's size first and refuse with an error that names the
    dir and says to restore it, whether the opener is the owner or the CLI's client.
    """
    size = _fill(tmp_path)
    cut = int(size * keep) // 4096 * 4096 + 100  # not even on a page boundary
    os.truncate(tmp_path / "data.mdb", cut)
    child = Child("try-open", str(tmp_path), role)
    said = child.line(60)
    assert child.finish() == 0, f"the opener died (signal {-child.proc.returncode})"
    words = said.split(" ", 2)
    assert words[:2] == ["error", "LogError"], said
    assert str(tmp_path) in words[2]
    assert f"data.mdb is {cut} bytes, but page " in words[2] and "is in use" in words[2]
    assert "truncated" in words[2] and "restore the data dir from a backup" in words[2]
    # Refusing changed nothing, and took no lock with it.
    assert os.path.getsize(tmp_path / "data.mdb") == cut
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_data_file_ending_before_its_free_tail_pages_still_opens(tmp_path: Path) -> None:
    """LMDB does not write pages freed in the transaction that allocated them, so an
    intact data.mdb can end before its last page number (mdb_copy clamps to the file
    size for this reason). Such a file must open: only a page in use past the end is
    truncation. Simulated by raising the newest meta page's last page number by 3."""
    _fill(tmp_path)
    data_file = tmp_path / "data.mdb"
    raw = bytearray(data_file.read_bytes())
    txnids = [struct.unpack_from("<Q", raw, at + 144)[0] for at in (0, 4096)]
    newest = 4096 * txnids.index(max(txnids))
    last_pgno = struct.unpack_from("<Q", raw, newest + 136)[0]
    assert (last_pgno + 1) * 4096 == len(raw)
    struct.pack_into("<Q", raw, newest + 136, last_pgno + 3)
    data_file.write_bytes(bytes(raw))
    for role in ("client", "owner"):
        child = Child("try-open", str(tmp_path), role)
        said = child.line(60)
        assert child.finish() == 0
        assert said == "opened", said

    async def use() -> None:
        async with await open_log(tmp_path) as log:
            assert (await log.stats())["file_bytes"] < (last_pgno + 3) * 4096
            assert [r.payload["i"] for r in await collect(log, "s/19")] == list(range(50))
            assert await log.append("s/19", [note(50)], expect=50) == 51
            assert await log.check() == []

    anyio.run(use)


def test_a_forked_child_does_not_keep_a_dead_owners_lock(tmp_path: Path) -> None:
    """A flock belongs to the open file, which fork shares: a child that outlives a
    SIGKILLed owner (a multiprocessing worker, say) must not lock out its restart."""
    owner = Child("owner-forks", str(tmp_path))
    grandchild = 0
    try:
        owner_pid, grandchild = map(int, owner.expect("forked"))
        owner.kill()
        os.kill(grandchild, 0)  # still alive, holding every descriptor fork gave it

        async def reopen() -> None:
            async with await LmdbLog.open(tmp_path, types=TYPES) as log:
                assert log.is_owner
                assert await log.last_seq("s") == 1
            assert owner_pid != os.getpid()

        anyio.run(reopen)
    finally:
        owner.proc.kill()
        owner.proc.wait(30)
        if grandchild:
            # Reparented to init (or a subreaper), which reaps it: not our child.
            os.kill(grandchild, signal.SIGKILL)


@pytest.mark.anyio
async def test_an_owner_open_on_a_file_or_under_one_is_a_named_error(tmp_path: Path) -> None:
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a dir")
    with pytest.raises(LogError) as caught:
        await open_log(a_file)
    assert f"data dir {str(a_file)!r} is not a directory" in str(caught.value)
    with pytest.raises(LogError) as caught:
        await open_log(a_file / "data")
    message = str(caught.value)
    assert f"data dir {str(a_file / 'data')!r} cannot be created or locked" in message
    assert "Not a directory" in message
    # A client is told the same dir holds no log.
    with pytest.raises(LogError, match="holds no perdure log"):
        await open_log(a_file, client=True)
    assert a_file.read_text() == "not a dir"


@pytest.mark.anyio
async def test_a_second_aclose_returns_only_once_the_dir_is_released(tmp_path: Path) -> None:
    """Whoever returns from aclose() may reopen the dir, even if another task began the
    close: the second caller must not return while the first is still closing."""
    log = await open_log(tmp_path)
    await log.append("s", [note(0)], expect=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(log.aclose)
        await anyio.lowlevel.checkpoint()  # the first close is under way
        await log.aclose()
        # Released: another open file description can take the flock, and this
        # process can open the dir again.
        fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        with pytest.raises(LogClosedError):
            await log.last_seq("s")
        async with await open_log(tmp_path) as again:
            assert await again.last_seq("s") == 1


def _raw_put(path: Path, stream: str, seq: int, value: bytes) -> None:
    """Store a record at (stream, seq) behind the log's back, index untouched."""
    env = lmdb.open(str(path), max_dbs=8)
    try:
        records = env.open_db(b"records")
        streams = env.open_db(b"streams")
        with env.begin(write=True) as txn:
            sid = unseal(txn.get(stream.encode(), db=streams), 5)[0]
            txn.put(struct.pack(">IQ", sid, seq), value, db=records)
    finally:
        env.close()


@pytest.mark.anyio
async def test_an_append_onto_a_stray_record_is_refused_alone_and_overwrites_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record past the index's end (a foreign writer's, or damage): the append that
    would land on it fails with the stream and seq, undoes its own earlier puts, and
    leaves the rest of its batch committed."""
    async with await open_log(tmp_path) as log:
        await log.append("s", [note(1), note(2)], expect=0)
        await log.append("t", [note(1)], expect=0)
    stray = encode_record("note", 1, 0.0, {"stray": True})
    _raw_put(tmp_path, "s", 4, stray)
    async with await open_log(tmp_path) as log:
        gate = WriterGate(log, monkeypatch)
        outcomes: dict[str, Any] = {}

        async def append(stream: str, expect: int, count: int) -> None:
            try:
                records = [note(100 + i) for i in range(count)]
                outcomes[stream] = await log.append(stream, records, expect=expect)
            except LogError as exc:
                outcomes[stream] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(log.append, "held", [note(0)], 0)
            await gate.wait_held()
            # One batch: seq 3 of 's' is free, seq 4 holds the stray record.
            tg.start_soon(append, "t", 1, 2)
            tg.start_soon(append, "s", 2, 2)
            tg.start_soon(append, "u", 0, 1)
            await anyio.wait_all_tasks_blocked()
            gate.open()
        assert outcomes["t"] == 3 and outcomes["u"] == 1
        error = outcomes["s"]
        assert isinstance(error, CorruptRecordError)
        assert (error.stream, error.seq) == ("s", 4)
        assert "refusing to overwrite" in str(error)
        assert (await log.stats())["commits"] == 2
        # Nothing of the refused append stayed: seq 3 is free again, the index says 2,
        # and the stray record is still the one found at seq 4.
        assert await log.last_seq("s") == 2
        assert [r.payload["i"] for r in await collect(log, "s")] == [1, 2]
        faults = [(f.stream, f.seq, f.kind) for f in await log.check()]
        assert faults == [("s", 3, "gap"), ("s", 4, "index")]
        # The next append to 's' is refused the same way (a conflict would be a lie).
        with pytest.raises(CorruptRecordError):
            await log.append("s", [note(3), note(4)], expect=2)
        with pytest.raises(ConflictError):
            await log.append("s", [note(3)], expect=3)
    env = lmdb.open(str(tmp_path), max_dbs=8)
    try:
        records = env.open_db(b"records")
        streams = env.open_db(b"streams")
        with env.begin() as txn:
            sid = unseal(txn.get(b"s", db=streams), 5)[0]
            assert txn.get(struct.pack(">IQ", sid, 4), db=records) == stray
            assert txn.get(struct.pack(">IQ", sid, 3), db=records) is None
    finally:
        env.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_client_appending_while_the_owner_is_sigkilled_loses_nothing(
    tmp_path: Path, backend: str
) -> None:
    """The owner dies mid group commit (likely holding LMDB's write lock, in fsync mode
    most of its time is a commit) while a client process appends signals: the client
    carries on, and the next owner sees every acknowledged signal exactly once. The
    first owner starts from a 64 KiB map, so owner and client grow it as they go (a
    reopened environment keeps its grown map)."""
    seed = int(os.environ.get("PERDURE_CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    client_acks: dict[int, str] = {}
    owner_acks: list[tuple[str, int, str, int]] = []
    for round_id in range(3):
        args = (str(tmp_path), str(round_id), str(rng.random()), str(64 * 1024))
        owner = Child("crash-writer", *args)
        client = None
        try:
            owner.expect("ready")
            client = Child("client-signaller", str(tmp_path), f"r{round_id}", backend=backend)
            client.expect("ready")
            for _ in range(rng.randint(10, 200)):
                words = owner.expect("ack")
                owner_acks.append((words[0], int(words[1]), words[2], int(words[3])))
            owner.kill()
            # The client is not stuck behind the dead owner's write lock.
            for _ in range(30):
                seq, signal_id = client.expect("ack")
                assert int(seq) not in client_acks, f"seq {seq} acknowledged twice (seed {seed})"
                client_acks[int(seq)] = signal_id
            client.kill()
            # Whatever the client said before it died, drained.
            while (line := client.lines.get(timeout=30)) != "":
                words = line.split()
                if words[0] == "ack":
                    client_acks[int(words[1])] = words[2]
        finally:
            owner.proc.kill()
            owner.proc.wait(30)
            if client is not None:
                client.proc.kill()
                client.proc.wait(30)

    async def verify() -> None:
        async with await LmdbLog.open(tmp_path, types=TYPES) as log:
            assert await log.check() == [], f"seed {seed}"
            signals = await collect(log, "signals/client")
            assert [r.seq for r in signals] == list(range(1, len(signals) + 1))
            ids = [r.payload["id"] for r in signals]
            repeated = [i for i, n in Counter(ids).items() if n > 1]
            assert repeated == [], f"signals stored twice: {repeated} (seed {seed})"
            for seq, signal_id in client_acks.items():
                assert ids[seq - 1] == signal_id, f"acknowledged seq {seq} (seed {seed})"
            for stream, last_seq, batch, size in owner_acks:
                records = await collect(log, stream, after=last_seq - size)
                assert [r.payload["batch"] for r in records[:size]] == [batch] * size

    anyio.run(verify)
    assert len(client_acks) >= 90
    assert os.path.getsize(tmp_path / "data.mdb") > 64 * 1024 * 4  # the map did grow


def _die_reading(path: Path) -> int:
    """A process that dies by SIGKILL inside a read transaction; return its pid."""
    child = Child("die-reading", str(path))
    pid = int(child.expect("reading")[0])
    child.proc.wait(30)
    assert child.proc.returncode == -signal.SIGKILL
    return pid


@pytest.mark.anyio
async def test_a_reader_that_died_mid_read_does_not_pin_pages_for_the_next_owner(
    tmp_path: Path,
) -> None:
    """While any process (here a client, as the CLI or a dashboard would be) keeps the
    environment open, LMDB never resets its reader table: the dead reader's slot stays,
    pinning its snapshot, and every page a commit frees after it is lost for reuse."""
    async with await open_log(tmp_path) as log:
        await log.append("s", [note(0)], expect=0)
    client = await anyio.to_thread.run_sync(lambda: Child("client", str(tmp_path)))
    try:
        await anyio.to_thread.run_sync(client.expect, "ready")
        dead = await anyio.to_thread.run_sync(_die_reading, tmp_path)
        async with await open_log(tmp_path) as log:
            assert f" {dead} " not in log._env.readers()
            last = 1
            for i in range(2000):  # one commit each, each rewriting the stream's pages
                last = await log.append("s", [note(i)], expect=last)
            stats = await log.stats()
            # Freed pages are reused: a few hundred KB, not a new page set per commit
            # (about 50 MB when the dead reader's slot stays).
            assert stats["file_bytes"] < 4 << 20, stats
            assert stats["stale_readers_cleared"] == 1
    finally:
        client.finish()


@pytest.mark.anyio
async def test_a_full_map_frees_dead_readers_before_growing(tmp_path: Path) -> None:
    """A reader process dies mid-read while the owner runs: once the map fills up with
    pages only the dead reader's snapshot needed, the writer frees its slot and carries
    on in the same map instead of doubling it again and again."""
    map_size = 1 << 20
    async with await open_log(tmp_path, map_size=map_size) as log:
        await log.append("s", [note(0)], expect=0)
        await anyio.to_thread.run_sync(_die_reading, tmp_path)
        last = 1
        for i in range(2000):
            last = await log.append("s", [note(i)], expect=last)
        stats = await log.stats()
        assert stats["map_growths"] == 0, stats
        assert stats["map_size"] == map_size
        assert stats["stale_readers_cleared"] == 1, stats
        assert [r.seq for r in await collect(log, "s")] == list(range(1, 2002))
        assert await log.check() == []


@pytest.mark.anyio
async def test_a_replay_suspended_across_map_growths_by_owner_and_client(
    tmp_path: Path,
) -> None:
    """A reader suspended between chunks while the map grows twice under it: once by a
    client process appending large signals (the owner must adopt the new size), once by
    the owner's own appends to the stream being read. The reader sees one contiguous,
    consistent sequence; every acknowledged signal is stored exactly once."""
    async with await open_log(tmp_path, map_size=64 * 1024) as log:
        await log.append("long", [note(i, pad="l" * 100) for i in range(600)], expect=0)
        start_size = (await log.stats())["map_size"]
        chunks = log.read_chunks("long")
        got = list(await chunks.__anext__())
        before = await log.stats()
        client = await anyio.to_thread.run_sync(
            lambda: Child("client-signaller", str(tmp_path), "c", str(20_000))
        )
        acks: dict[int, str] = {}
        try:
            await anyio.to_thread.run_sync(client.expect, "ready")
            for _ in range(60):  # 1.2 MB of signals: the client grows the map
                seq, signal_id = await anyio.to_thread.run_sync(client.expect, "ack")
                acks[int(seq)] = signal_id
            got += await chunks.__anext__()  # adopts the client's map size
            adopted = await log.stats()
            assert adopted["map_size"] > before["map_size"]
            assert adopted["map_growths"] == before["map_growths"]  # the client's growth
            own_growths = adopted["map_growths"]
            last = await log.last_seq("long")
            big = [note(i, pad="g" * 20_000) for i in range(last, last + 100)]
            await log.append("long", big, expect=last)
            assert (await log.stats())["map_growths"] > own_growths
            async for chunk in chunks:
                got += chunk
        finally:
            await anyio.to_thread.run_sync(client.kill)
        while (line := client.lines.get(timeout=30)) != "":
            words = line.split()
            if words[0] == "ack":
                acks[int(words[1])] = words[2]
        assert [r.seq for r in got] == list(range(1, 701))
        assert [r.payload["i"] for r in got] == list(range(700))
        stats = await log.stats()
        assert stats["map_size"] >= start_size * 16
        signals = await collect(log, "signals/client")
        assert [r.seq for r in signals] == list(range(1, len(signals) + 1))
        ids = [r.payload["id"] for r in signals]
        assert len(set(ids)) == len(ids)
        for seq, signal_id in acks.items():
            assert ids[seq - 1] == signal_id
        assert await log.check() == []


def _log_threads(path: Path) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith(str(path)) and t.is_alive()]


@pytest.mark.anyio
async def test_aclose_amid_queued_appends_waiters_and_a_suspended_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose() while the writer is inside a commit, appends are queued behind it, tasks
    wait for appends (so the poller runs) and a replay is suspended between chunks:
    every queued append gets its seq, everyone else a LogClosedError, nothing hangs, and
    neither the writer nor the poller thread outlives the log."""
    log = await open_log(tmp_path)
    await log.append("long", [note(i) for i in range(600)], expect=0)
    chunks = log.read_chunks("long")
    assert len(await chunks.__anext__()) < 600
    gate = WriterGate(log, monkeypatch)
    results: dict[str, Any] = {}

    async def record(name: str, call: Any) -> None:
        try:
            results[name] = await call
        except LogClosedError as exc:
            results[name] = exc

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(record, "held", log.append("held", [note(0)], 0))
            await gate.wait_held()
            for i in range(20):
                tg.start_soon(record, f"q/{i}", log.append(f"q/{i}", [note(i)], 0))
            for i in range(5):
                tg.start_soon(record, f"wait/{i}", log.wait_for_append(f"w/{i}", 0))
            await anyio.wait_all_tasks_blocked()
            assert len(_log_threads(tmp_path)) == 2  # the writer and the poller
            tg.start_soon(record, "aclose", log.aclose())
            await anyio.wait_all_tasks_blocked()
            # Closing: new calls are refused at once, while the held commit still runs.
            with pytest.raises(LogClosedError):
                await log.append("late", [note(0)], expect=0)
            with pytest.raises(LogClosedError):
                await log.wait_for_append("late", 0)
            gate.open()
        with pytest.raises(LogClosedError):
            async for _ in chunks:
                pass
    assert results.pop("aclose") is None
    assert results.pop("held") == 1
    assert {name: results.pop(name) for name in [f"q/{i}" for i in range(20)]} == {
        f"q/{i}": 1 for i in range(20)
    }
    assert sorted(results) == [f"wait/{i}" for i in range(5)]
    assert all(isinstance(exc, LogClosedError) for exc in results.values())
    assert _log_threads(tmp_path) == []
    async with await open_log(tmp_path) as again:
        assert [await again.last_seq(f"q/{i}") for i in range(20)] == [1] * 20
        assert await again.last_seq("late") == 0
    assert _log_threads(tmp_path) == []


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user namespaces")
def test_a_read_only_data_dir_is_a_named_error_for_owner_and_client(tmp_path: Path) -> None:
    """On a read-only mount (a backup, say): owner and client are each refused with a
    LogError naming the dir and the reason, not a bare OSError."""
    data = tmp_path / "ro" / "data"

    async def make() -> None:
        async with await open_log(data) as log:
            await log.append("s", [note(0)], expect=0)

    anyio.run(make)
    mount = tmp_path / "ro"
    opens = " ; ".join(
        f"{sys.executable} {PROCS} try-open {path} {role}"
        for path, role in [(data, "owner"), (data, "client"), (mount / "new", "owner")]
    )
    script = f"mount --bind {mount} {mount} && mount -o remount,bind,ro {mount} && {opens}"
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    owner, client, new = result.stdout.strip().splitlines()
    assert owner.startswith(f"error LogError data dir {str(data)!r} cannot be created or locked")
    assert "Read-only file system" in owner
    assert client.startswith(f"error LogError data dir {str(data)!r}: cannot open")
    assert "Read-only file system" in client
    assert new.startswith(f"error LogError data dir {str(mount / 'new')!r} cannot be created")


@pytest.mark.anyio
async def test_a_damaged_stream_name_key_is_a_named_error_in_listings_and_reindexing(
    tmp_path: Path,
) -> None:
    """Index keys carry no checksum: a damaged byte in a stream's name (here, the name
    no longer UTF-8) must surface as that stream's CorruptRecordError, not as a bare
    UnicodeDecodeError out of streams() or out of opening with other indexed keys."""
    async with await open_log(tmp_path) as log:
        for name in ("exec/a", "exec/b", "exec/c"):
            await log.append(name, [note(0)], expect=0, meta={"status": "run"})
    env = lmdb.open(str(tmp_path), max_dbs=8)
    try:
        streams = env.open_db(b"streams")
        with env.begin(write=True) as txn:
            entry = txn.get(b"exec/b", db=streams)
            txn.delete(b"exec/b", db=streams)
            txn.put(b"exec/\xe2", entry, db=streams)
    finally:
        env.close()
    async with await open_log(tmp_path) as log:
        with pytest.raises(CorruptRecordError) as caught:
            _ = [info async for info in log.streams("exec/")]
        assert (caught.value.stream, caught.value.seq) == ("exec/\\xe2", None)
        assert "stream 'exec/\\\\xe2' index entry: corrupt (its name" in str(caught.value)
        # The index-driven listing finds no entry under the old name: nothing to list.
        assert [i.stream async for i in log.streams(where={"status": "run"})] == [
            "exec/a",
            "exec/c",
        ]
        faults = [str(f) for f in await log.check()]
        assert "store: index: undecodable name b'exec/\\xe2'" in faults
    with pytest.raises(CorruptRecordError) as caught:
        await open_log(tmp_path, indexed=("status", "owner"))
    assert caught.value.stream == "exec/\\xe2"
    # Refused whole: the dir is not left locked, and still opens as it was.
    async with await open_log(tmp_path) as log:
        assert await log.last_seq("exec/a") == 1


@pytest.mark.anyio
async def test_a_batch_that_changes_nothing_does_not_hide_a_clients_commit(tmp_path: Path) -> None:
    """LMDB does not use up the id of a write transaction that changed nothing (here, a
    batch of one conflict), so a client's next commit takes that very id. The writer's
    cache of index entries, keyed by transaction id, must still see that commit: a
    stale entry written back would drop the client's acknowledged signal (set_meta) or
    fail an ANY append with a false 'record already exists'."""

    async def client_appends() -> None:
        child = await anyio.to_thread.run_sync(
            lambda: Child("client-append", str(tmp_path), "signals/x")
        )
        await anyio.to_thread.run_sync(child.expect, "appended")
        assert await anyio.to_thread.run_sync(child.finish) == 0

    async with await open_log(tmp_path) as log:
        assert await log.append("signals/x", [note(1)], expect=0) == 1
        with pytest.raises(ConflictError):
            await log.append("signals/x", [note(2)], expect=0)
        await client_appends()  # seq 2, in the id the conflict batch left unused
        await log.set_meta("signals/x", {"status": "seen"})
        assert await log.last_seq("signals/x") == 2
        with pytest.raises(ConflictError):
            await log.append("signals/x", [note(2)], expect=0)
        await client_appends()  # seq 3, the same way
        assert await log.append("signals/x", [note(4)], expect=ANY) == 4
        records = await collect(log, "signals/x")
        assert [r.seq for r in records] == [1, 2, 3, 4]
        assert [r.type for r in records] == ["note", "signal", "signal", "note"]
        info = await log.stream_info("signals/x")
        assert info is not None and info.meta == {"status": "seen"}
        assert await log.check() == []


@pytest.mark.anyio
async def test_a_malformed_next_stream_id_is_a_fault_the_scan_reports_not_a_crash(
    tmp_path: Path,
) -> None:
    async with await open_log(tmp_path) as log:
        await log.append("s", [note(1)], expect=0)
    env = lmdb.open(str(tmp_path), max_dbs=8)
    try:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"next_stream_id", b"\x01", db=meta)  # 1 byte, not 4
    finally:
        env.close()
    async with await LmdbLog.open(tmp_path, types=TYPES, client=True) as log:
        faults = await log.check()
        assert [r.seq async for r in log.read("s")] == [1]  # the records still read
    assert [(f.stream, f.seq, f.kind, f.detail) for f in faults] == [
        (None, None, "index", "the next stream id is missing or malformed")
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("client", [False, True])
async def test_opening_while_another_process_grows_the_map_begins_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: bool
) -> None:
    """LMDB refuses the first transaction of an environment whose map another process
    grew after it was opened (MDB_MAP_RESIZED): the open takes up the size, not the error."""
    async with await open_log(tmp_path) as log:
        await log.append("s", [note(1)], expect=0)
    real = LmdbLog._open_dbs
    refused: list[bool] = []

    def grown_meanwhile(self: LmdbLog, env: Any) -> Any:
        if not refused:
            refused.append(True)
            raise lmdb.MapResizedError("MDB_MAP_RESIZED")
        return real(self, env)

    monkeypatch.setattr(LmdbLog, "_open_dbs", grown_meanwhile)
    async with await LmdbLog.open(tmp_path, types=TYPES, client=client) as log:
        assert refused and await log.last_seq("s") == 1


def _listing(path: Path) -> list[tuple[str, int]] | None:
    """The names and sizes in ``path`` (None if it does not exist)."""
    if not path.exists():
        return None
    return sorted((p.name, p.stat().st_size) for p in path.iterdir())


@pytest.mark.anyio
async def test_a_client_open_of_a_dir_without_a_log_creates_nothing_there(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"  # another program's LMDB environment, no lock file
    env = lmdb.open(str(foreign), max_dbs=2)
    with env.begin(write=True) as txn:
        txn.put(b"key", b"value")
    env.close()
    (foreign / "lock.mdb").unlink()
    empty_file = tmp_path / "empty-file"  # a data.mdb of zero bytes
    empty_file.mkdir()
    (empty_file / "data.mdb").touch()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "data.mdb").write_bytes(os.urandom(8192))
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    for where, says in [
        (foreign, "holds no perdure log"),
        (empty_file, "cannot open the LMDB environment"),
        (junk, "cannot open the LMDB environment"),
        (empty, "holds no perdure log"),
        (missing, "holds no perdure log"),
    ]:
        before = _listing(where)
        with pytest.raises(LogError, match=says):
            await open_log(where, client=True)
        assert _listing(where) == before, where
    # A real log whose lock file is gone (a restored copy) still opens as a client.
    real = tmp_path / "real"
    async with await open_log(real) as log:
        await log.append("s", [note(0)], expect=0)
    (real / "lock.mdb").unlink()
    async with await open_log(real, client=True) as log:
        assert len(await collect(log, "s")) == 1
