"""LmdbLog against the conformance suite (fsync and process durability)."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import lmdb
import pytest

from perdure.log import (
    ANY,
    ClientWriteError,
    ConflictError,
    CorruptRecordError,
    DataDirLockedError,
    EventLog,
    LogClosedError,
    LogError,
    NewRecord,
    RecordTypes,
    lmdb_store,
)
from perdure.log.codec import seal, unseal
from perdure.log.lmdb_store import _CACHE_GENERATION, LmdbLog

from .conformance import TYPES, EventLogConformance, collect, note


def flip_byte_in_file(path: Path, needle: bytes) -> int:
    """Flip one byte inside every occurrence of ``needle`` in ``path``; return how many."""
    data = bytearray(path.read_bytes())
    count = 0
    start = data.find(needle)
    while start != -1:
        data[start + len(needle) // 2] ^= 0x01
        count += 1
        start = data.find(needle, start + 1)
    path.write_bytes(bytes(data))
    return count


class LmdbConformance(EventLogConformance):
    durability = "fsync"

    async def open_log(self, tmp_path: Path, types: RecordTypes) -> EventLog:
        return await LmdbLog.open(tmp_path / "data", types=types, durability=self.durability)

    async def reopen(self, log: EventLog, tmp_path: Path, types: RecordTypes) -> EventLog:
        await log.aclose()
        return await self.open_log(tmp_path, types)

    async def corrupt(self, log: EventLog, tmp_path: Path, stream: str, seq: int) -> EventLog:
        # Find the record's stored value in data.mdb (with the env closed) by the
        # unique bytes of its payload, and flip a byte inside it.
        records = [r async for r in log.read(stream)]
        target = records[seq - 1]
        await log.aclose()
        import cbor2

        needle = cbor2.dumps(target.payload)
        assert flip_byte_in_file(tmp_path / "data" / "data.mdb", needle) >= 1
        return await self.open_log(tmp_path, log.types)  # type: ignore[attr-defined]


class TestLmdbFsync(LmdbConformance):
    durability = "fsync"


class TestLmdbProcess(LmdbConformance):
    durability = "process"


# -- LMDB-only behaviour ---------------------------------------------------------------

PROCS = Path(__file__).with_name("procs.py")


class Child:
    """A child process running procs.py, read line by line with a timeout."""

    def __init__(
        self,
        *args: str,
        backend: str = "asyncio",
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PROCS), f"--backend={backend}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            preexec_fn=preexec_fn,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # EOF

    def line(self, timeout: float = 30) -> str:
        return self.lines.get(timeout=timeout)

    def expect(self, first_word: str, timeout: float = 30) -> list[str]:
        words = self.line(timeout).split()
        assert words and words[0] == first_word, f"child said {words!r}, wanted {first_word!r}"
        return words[1:]

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def finish(self) -> int:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        return self.proc.wait(30)


class WriterGate:
    """Holds the writer thread inside its next commit until :meth:`open` is called.

    A test seam, not a mock: everything still runs on real LMDB. While the writer is
    held, appends queue up (and cancelled ones are withdrawn) exactly as they would
    behind a slow commit, so a test can know what the writer will find.
    """

    def __init__(self, log: LmdbLog, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held = threading.Event()
        self._opened = threading.Event()
        real_commit = log._commit

        def commit(batch: list[Any], nbytes: int) -> Any:
            if not self.held.is_set():
                self.held.set()
                self._opened.wait(30)
            return real_commit(batch, nbytes)

        monkeypatch.setattr(log, "_commit", commit)

    async def wait_held(self) -> None:
        """Until the writer is inside the held commit."""
        assert await anyio.to_thread.run_sync(self.held.wait, 30)

    def open(self) -> None:
        self._opened.set()


async def open_log(path: Path, **kwargs: Any) -> LmdbLog:
    kwargs.setdefault("durability", "process")
    return await LmdbLog.open(path, types=TYPES, **kwargs)


def test_lmdb_log_cannot_be_constructed_directly() -> None:
    with pytest.raises(TypeError, match=r"LmdbLog\.open"):
        LmdbLog()


@pytest.mark.anyio
async def test_open_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(LogError, match="durability"):
        await LmdbLog.open(tmp_path, types=TYPES, durability="sometimes")  # type: ignore[arg-type]
    with pytest.raises(LogError, match="map_size"):
        await LmdbLog.open(tmp_path, types=TYPES, map_size=100)
    with pytest.raises(LogError, match="indexed"):
        await LmdbLog.open(tmp_path, types=TYPES, indexed="status")
    with pytest.raises(LogError, match="no perdure log"):
        await LmdbLog.open(tmp_path / "nothing", types=TYPES, client=True)


@pytest.mark.anyio
async def test_group_commit_wakes_each_batch_with_one_callback(tmp_path: Path) -> None:
    async with await open_log(tmp_path, durability="fsync") as log:

        async def writer(w: int) -> None:
            last = 0
            for k in range(5):
                last = await log.append(f"s/{w}", [note(k)], expect=last)

        async with anyio.create_task_group() as tg:
            for w in range(200):
                tg.start_soon(writer, w)
        stats = await log.stats()
    summary = {k: stats[k] for k in ("appends", "commits", "largest_batch", "wake_callbacks")}
    assert stats["appends"] == 1000, summary
    # Many appends share a transaction (how many depends on the machine's load: a
    # loop burst slower than RELEASE_TIMEOUT is split)...
    assert stats["commits"] <= stats["appends"] // 4, summary
    assert stats["largest_batch"] >= 20, summary
    # ...and each committed batch woke its single event loop with ONE callback, not one
    # per waiting task.
    assert stats["wake_callbacks"] == stats["commits"], summary


def test_group_commit_serves_asyncio_and_trio_at_once(tmp_path: Path) -> None:
    """Two event loops (asyncio and trio, each in its own thread) share one log."""
    holder: dict[str, Any] = {}
    opened = threading.Event()
    done = threading.Event()
    errors: list[BaseException] = []

    async def owner_loop() -> None:
        holder["log"] = await open_log(tmp_path)
        opened.set()
        await anyio.to_thread.run_sync(done.wait)
        holder["stats"] = await holder["log"].stats()
        await holder["log"].aclose()

    async def writers(prefix: str) -> None:
        log = holder["log"]

        async def writer(w: int) -> None:
            last = 0
            for k in range(20):
                last = await log.append(f"{prefix}/{w}", [note(k)], expect=last)
                await log.append("signals/all", [note(k, who=f"{prefix}/{w}")], expect=ANY)

        async with anyio.create_task_group() as tg:
            for w in range(20):
                tg.start_soon(writer, w)

    def run(backend: str) -> None:
        try:
            anyio.run(writers, backend, backend=backend)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    owner = threading.Thread(target=anyio.run, args=(owner_loop,))
    owner.start()
    assert opened.wait(30)
    threads = [threading.Thread(target=run, args=(b,)) for b in ("asyncio", "trio")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    owner.join(30)
    assert errors == []
    stats = holder["stats"]
    assert stats["appends"] == 2 * 20 * 20 * 2
    assert stats["records"] == 2 * 20 * 20 * 2
    # At most one callback per loop per batch: two loops, so at most two per commit.
    assert stats["wake_callbacks"] <= 2 * stats["commits"]
    assert stats["commits"] < stats["appends"]

    async def verify() -> None:
        async with await open_log(tmp_path) as log:
            for backend in ("asyncio", "trio"):
                for w in range(20):
                    got = [r.payload["i"] for r in await collect(log, f"{backend}/{w}")]
                    assert got == list(range(20))
            assert await log.last_seq("signals/all") == 800
            assert await log.check() == []

    anyio.run(verify)


@pytest.mark.anyio
async def test_map_grows_from_tiny_with_concurrent_appends(tmp_path: Path) -> None:
    async with await open_log(tmp_path, map_size=64 * 1024) as log:

        async def writer(w: int) -> None:
            last = 0
            for k in range(20):
                last = await log.append(
                    f"w/{w}", [note(k, pad="z" * 1000)], expect=last, meta={"status": f"k{k}"}
                )

        async with anyio.create_task_group() as tg:
            for w in range(30):
                tg.start_soon(writer, w)
        stats = await log.stats()
        assert stats["map_growths"] >= 3
        assert stats["map_size"] > 64 * 1024 * 4
        for w in range(30):
            assert [r.payload["i"] for r in await collect(log, f"w/{w}")] == list(range(20))
        assert stats["records"] == 600
        assert await log.check() == []
    async with await open_log(tmp_path, map_size=64 * 1024) as log:
        # Reopening with a smaller map_size keeps the grown map.
        assert (await log.stats())["map_size"] == stats["map_size"]
        assert await log.append("w/0", [note(20)], expect=20) == 21


@pytest.mark.anyio
async def test_batch_retried_after_map_full_checks_expects_afresh(tmp_path: Path) -> None:
    async with await open_log(tmp_path, map_size=64 * 1024) as log:
        outcomes: dict[str, Any] = {}

        async def append(name: str) -> None:
            try:
                outcomes[name] = await log.append(
                    "s", [note(0, who=name, pad="p" * 300_000)], expect=0
                )
            except ConflictError as exc:
                outcomes[name] = exc

        # Both land in one batch (same loop burst); either overflows the 64 KiB map,
        # so the batch is aborted, the map grown and the batch applied again from
        # scratch: exactly one wins, whichever ran first.
        async with anyio.create_task_group() as tg:
            tg.start_soon(append, "one")
            tg.start_soon(append, "two")
        stats = await log.stats()
        assert stats["map_growths"] >= 1
        assert stats["commits"] == 1
        won = [name for name, outcome in outcomes.items() if outcome == 1]
        lost = [outcome for outcome in outcomes.values() if isinstance(outcome, ConflictError)]
        assert len(won) == 1 and len(lost) == 1
        assert lost[0].actual == 1
        records = await collect(log, "s")
        assert [r.payload["who"] for r in records] == won


def _limit_file_size() -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_storage_full_when_the_file_cannot_grow(tmp_path: Path, backend: str) -> None:
    """RLIMIT_FSIZE caps data.mdb at 1 MiB: the batch that crosses it fails whole."""
    child = Child(
        "fill", str(tmp_path / "data"), str(4 << 20), backend=backend, preexec_fn=_limit_file_size
    )
    report = json.loads(child.line(120))
    assert child.finish() == 0
    assert "disk full" in report["error"]
    assert report["error_path"] == str(tmp_path / "data")
    assert report["acked"] >= 10
    # Nothing of the failed batch was written; everything acknowledged is there.
    assert report["last_seq_after_error"] == report["acked"]
    assert report["records"] == list(range(report["acked"]))
    assert report["faults_after_error"] == []
    assert report["faults"] == []


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user namespaces")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_storage_full_on_a_full_filesystem(tmp_path: Path, backend: str) -> None:
    """A real ENOSPC: the data dir on a 2 MiB tmpfs, half taken by a ballast file."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    data = mount / "data"
    ballast = mount / "ballast"
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {mount} && "
        f"dd if=/dev/zero of={ballast} bs=1k count=1024 status=none && "
        f"PERDURE_TEST_BALLAST={ballast} exec {sys.executable} {PROCS} --backend={backend} "
        f"fill {data} {1 << 20}"
    )
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "disk full" in report["error"]
    assert report["error_path"] == str(data)
    assert report["acked"] >= 5
    assert report["last_seq_after_error"] == report["acked"]
    assert report["faults_after_error"] == []
    # Once space is freed, the log carries on where it stopped.
    assert report["appended_after_freeing"] == report["acked"] + 1
    assert report["records"] == [*range(report["acked"]), -1]
    assert report["faults"] == []


@pytest.mark.anyio
async def test_second_owner_in_this_process_is_refused(tmp_path: Path) -> None:
    async with await open_log(tmp_path):
        with pytest.raises(DataDirLockedError) as caught:
            await open_log(tmp_path)
        assert caught.value.pid == os.getpid()
        message = str(caught.value)
        assert f"already open in this process (pid {os.getpid()})" in message
        assert "another Runtime or LmdbLog here owns it" in message
        assert "close that one first, or reuse it" in message
        assert "stop that process" not in message  # that would be this very process
        with pytest.raises(LogError, match="already open in this process"):
            await open_log(tmp_path, client=True)
    # Closing released the dir.
    async with await open_log(tmp_path) as log:
        assert log.is_owner


@pytest.mark.anyio
async def test_aclose_in_a_cancelled_scope_still_releases_the_dir(tmp_path: Path) -> None:
    log = await open_log(tmp_path)
    await log.append("s", [note(1)], expect=0)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await log.aclose()
    # The cancellation was raised (after closing), not swallowed.
    assert scope.cancelled_caught
    with pytest.raises(LogClosedError):
        await log.last_seq("s")
    # LMDB was closed and the flock released: this process can own the dir again.
    async with await open_log(tmp_path) as again:
        assert await again.last_seq("s") == 1


@pytest.mark.anyio
async def test_async_with_left_by_a_timeout_releases_the_dir(tmp_path: Path) -> None:
    log = await open_log(tmp_path)
    await log.append("s", [note(1)], expect=0)
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.01):
            async with log:
                await anyio.sleep_forever()
    async with await open_log(tmp_path) as again:
        assert again.is_owner
        assert await again.last_seq("s") == 1


@pytest.mark.anyio
async def test_lock_client_and_restart_across_processes(tmp_path: Path) -> None:
    async with await open_log(tmp_path) as log:
        await log.append("exec/1", [note(1), note(2)], expect=0)
    owner = Child("owner", str(tmp_path))
    try:
        pid = int(owner.expect("ready")[0])
        assert (tmp_path / "owner.lock").read_text().strip() == str(pid)
        with pytest.raises(DataDirLockedError) as caught:
            await open_log(tmp_path)
        assert caught.value.pid == pid
        assert f"owned by process {pid}" in str(caught.value)
        assert "stop that process" in str(caught.value)
        assert "this process" not in str(caught.value)

        async with await open_log(tmp_path, client=True) as client:
            assert not client.is_owner
            assert [r.payload["i"] for r in await collect(client, "exec/1")] == [1, 2]
            assert await client.append("signals/approve", [NewRecord("signal", {})], ANY) == 1
            with pytest.raises(ClientWriteError, match="'exec/1'"):
                await client.append("exec/1", [note(3)], expect=2)
            with pytest.raises(ClientWriteError):
                await client.set_meta("signals/approve", {"status": "x"})
            # The owner's appends are visible to the client.
            owner.send("append exec/1 3")
            assert owner.expect("appended") == ["5"]
            seen = await client.last_seq("exec/1")
            assert seen == 5, f"client saw last seq {seen} after the owner said 5"
    finally:
        owner.kill()
    # SIGKILL released the flock: a new owner opens at once and sees everything.
    async with await open_log(tmp_path) as log:
        assert log.is_owner
        assert await log.last_seq("exec/1") == 5
        assert await log.last_seq("signals/approve") == 1
        assert await log.check() == []


@pytest.mark.anyio
async def test_owner_is_woken_by_a_client_process_append(tmp_path: Path) -> None:
    async with await open_log(tmp_path) as log:
        await log.append("signals/inbox", [NewRecord("signal", {})], expect=0)
        woken: list[int] = []

        async def wait() -> None:
            with anyio.fail_after(20):
                woken.append(await log.wait_for_append("signals/inbox", 1))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            child = await anyio.to_thread.run_sync(
                lambda: Child("client-append", str(tmp_path), "signals/inbox")
            )
            said = await anyio.to_thread.run_sync(child.expect, "appended")
            assert said == ["2"]
            assert await anyio.to_thread.run_sync(child.finish) == 0
        assert woken == [2]


@pytest.mark.anyio
async def test_poller_wakes_other_streams_and_fails_the_corrupt_streams_waiters(
    tmp_path: Path,
) -> None:
    async with await open_log(tmp_path) as log:
        await log.append("signals/bad", [NewRecord("signal", {})], expect=0)
        await log.append("signals/good", [NewRecord("signal", {})], expect=0)
        results: dict[str, Any] = {}

        async def wait(stream: str) -> None:
            try:
                results[stream] = await log.wait_for_append(stream, 1)  # no timeout
            except CorruptRecordError as exc:
                results[stream] = exc

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait, "signals/bad")
                tg.start_soon(wait, "signals/good")
                await anyio.wait_all_tasks_blocked()
                # Another process damages one entry and appends to the other stream,
                # in one transaction: the poller sees both in one look.
                args = ("corrupt-and-append", str(tmp_path), "signals/bad", "signals/good")
                child = await anyio.to_thread.run_sync(lambda: Child(*args))
                assert await anyio.to_thread.run_sync(child.expect, "done") == ["2"]
                assert await anyio.to_thread.run_sync(child.finish) == 0
        assert results["signals/good"] == 2
        error = results["signals/bad"]
        assert isinstance(error, CorruptRecordError)
        assert error.stream == "signals/bad"
        assert (await log.stats())["waiters"] == 0


@pytest.mark.anyio
async def test_poller_logs_an_unexpected_error_and_keeps_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="perdure.log")
    async with await open_log(tmp_path) as log:
        await log.append("signals/inbox", [NewRecord("signal", {})], expect=0)
        real_poll = log._poll_once
        polls = 0

        def poll_failing_once(seen_txnid: int) -> int:
            nonlocal polls
            polls += 1
            if polls == 1:
                raise RuntimeError("injected poller failure")
            return real_poll(seen_txnid)

        monkeypatch.setattr(log, "_poll_once", poll_failing_once)
        woken: list[int] = []

        async def wait() -> None:
            woken.append(await log.wait_for_append("signals/inbox", 1))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                child = await anyio.to_thread.run_sync(
                    lambda: Child("client-append", str(tmp_path), "signals/inbox")
                )
                assert await anyio.to_thread.run_sync(child.expect, "appended") == ["2"]
                assert await anyio.to_thread.run_sync(child.finish) == 0
        # Only the poller sees another process's append: it survived its failure.
        assert woken == [2]
        assert polls >= 2
        failures = [r for r in caplog.records if "polling" in r.getMessage()]
        assert len(failures) == 1
        assert str(tmp_path) in failures[0].getMessage()
        assert failures[0].exc_info is not None
        assert "injected poller failure" in str(failures[0].exc_info[1])


@pytest.mark.anyio
async def test_a_failing_waker_still_wakes_every_caller_and_the_writer_lives_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If grouping the wake-ups fails, the batch's callers are woken one by one."""
    from perdure.log import lmdb_store

    caplog.set_level(logging.ERROR, logger="perdure.log")
    real_wake = lmdb_store.wake
    calls = 0

    def wake_failing_once(items: Any, before: Any = None) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected waker failure")
        return real_wake(items, before)

    monkeypatch.setattr(lmdb_store, "wake", wake_failing_once)
    async with await open_log(tmp_path) as log:
        with anyio.fail_after(20):
            seqs: list[int] = []

            async def writer(w: int) -> None:
                seqs.append(await log.append(f"s/{w}", [note(w)], expect=0))

            async with anyio.create_task_group() as tg:
                for w in range(5):
                    tg.start_soon(writer, w)
            # The writer thread survived: later appends commit and return as usual.
            assert await log.append("s/0", [note(9)], expect=1) == 2
    assert sorted(seqs) == [1] * 5
    assert calls >= 2
    failures = [r for r in caplog.records if "waking the callers" in r.getMessage()]
    assert len(failures) == 1 and str(tmp_path) in failures[0].getMessage()


@pytest.mark.anyio
async def test_client_survives_the_owner_growing_the_map(tmp_path: Path) -> None:
    async with await open_log(tmp_path, map_size=64 * 1024) as log:
        await log.append("big", [note(0)], expect=0)
        child = await anyio.to_thread.run_sync(lambda: Child("client", str(tmp_path)))
        await anyio.to_thread.run_sync(child.expect, "ready")
        before = (await log.stats())["map_size"]
        last = 1
        for k in range(40):
            last = await log.append("big", [note(k, pad="g" * 4000)], expect=last)
        assert (await log.stats())["map_size"] >= 4 * before
        child.send("go big")
        said = await anyio.to_thread.run_sync(child.expect, "read")
        assert said == ["41", "signalled", "1"]
        assert await anyio.to_thread.run_sync(child.finish) == 0
        assert await log.last_seq("signals/from-client") == 1
        # The owner adopts the client's commit (and any map size it set) too.
        assert await log.append("big", [note(99)], expect=41) == 42


def _raw_env(path: Path) -> tuple[lmdb.Environment, list[Any]]:
    env = lmdb.open(str(path), max_dbs=8)
    return env, [env.open_db(n) for n in (b"records", b"streams", b"by_meta", b"meta")]


@pytest.mark.parametrize("chunk", [1, 2, 3, lmdb_store.CHECK_CHUNK])
@pytest.mark.anyio
async def test_check_finds_gaps_orphans_and_index_faults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Whatever the chunk size, so faults that span two read transactions are found."""
    async with await open_log(tmp_path) as log:
        await log.append("a", [note(i) for i in range(5)], expect=0, meta={"status": "x"})
        await log.append("b", [note(1)], expect=0, meta={"status": "y"})
        await log.append("c", [note(i) for i in range(4)], expect=0)
    env, (records, _, by_meta, _) = _raw_env(tmp_path)
    with env.begin(write=True) as txn:
        keys = [k for k, _ in txn.cursor(db=records)]
        assert len(keys) == 10
        txn.delete(keys[2], db=records)  # a's seq 3
        txn.delete(keys[8], db=records)  # c's seq 3 and 4: the index says 4
        txn.delete(keys[9], db=records)
        txn.put(b"\x00\x00\x03\xe7" + (1).to_bytes(8, "big"), b"orphan", db=records)
        stale = [k for k, _ in txn.cursor(db=by_meta) if k.endswith(b"b")]
        txn.delete(stale[0], db=by_meta)
        txn.put(stale[0][:-1] + b"ghost", b"", db=by_meta)
    env.close()
    monkeypatch.setattr(lmdb_store, "CHECK_CHUNK", chunk)
    async with await open_log(tmp_path) as log:
        faults = await log.check()
        kinds = sorted((f.stream, f.seq, f.kind) for f in faults if f.stream is not None)
        assert kinds == [("a", 3, "gap"), ("b", None, "index"), ("c", 3, "gap")]
        others = sorted((f.kind, f.detail) for f in faults if f.stream is None)
        assert others == [
            ("index", f"stale secondary index entry {stale[0][:-1] + b'ghost'!r}"),
            ("orphan", "1 records of unknown stream id 999"),
        ]
        with pytest.raises(CorruptRecordError) as caught:
            await collect(log, "a")
        assert (caught.value.stream, caught.value.seq) == ("a", 3)
        assert "missing" in str(caught.value)
        assert [r.seq for r in await collect(log, "a", after=3)] == [4, 5]


@pytest.mark.parametrize(
    ("field", "bad"),
    [(2, "yesterday"), (3, True), (3, None), (0, 1.5), (1, "7"), (4, [1, 2])],
    ids=["created_at str", "updated_at bool", "updated_at None", "id", "last_seq", "meta"],
)
@pytest.mark.anyio
async def test_a_malformed_index_entry_is_named_as_the_streams_entry(
    tmp_path: Path, field: int, bad: Any
) -> None:
    async with await open_log(tmp_path) as log:
        await log.append("s", [note(1)], expect=0)
        await log.append("t", [note(1)], expect=0)
    env, (_, streams, _, _) = _raw_env(tmp_path)
    with env.begin(write=True) as txn:
        entry = unseal(txn.get(b"s", db=streams), 5)
        entry[field] = bad
        txn.put(b"s", seal(entry), db=streams)  # a valid checksum over a bad entry
    env.close()
    async with await open_log(tmp_path) as log:
        with pytest.raises(CorruptRecordError) as caught:
            await log.last_seq("s")
        error = caught.value
        assert (error.stream, error.seq) == ("s", None)
        assert "stream 's' index entry: corrupt (malformed" in str(error)
        assert "seq" not in str(error).split("(")[0]
        with pytest.raises(CorruptRecordError):
            await collect(log, "s")
        with pytest.raises(CorruptRecordError):
            await log.stream_info("s")
        assert await log.last_seq("t") == 1
        faults = await log.check()
        # Its records are orphans: the entry that names their stream id is unreadable.
        assert [(f.stream, f.seq, f.kind) for f in faults] == [
            ("s", None, "index"),
            (None, None, "orphan"),
        ]
        assert "malformed" in faults[0].detail
        assert str(faults[0]).startswith("stream 's': index: ")


@pytest.mark.anyio
async def test_a_damaged_index_entry_is_named_as_the_streams_entry(tmp_path: Path) -> None:
    async with await open_log(tmp_path) as log:
        await log.append("s", [note(1)], expect=0)
    env, (_, streams, _, _) = _raw_env(tmp_path)
    with env.begin(write=True) as txn:
        damaged = bytearray(txn.get(b"s", db=streams))
        damaged[len(damaged) // 2] ^= 0x01
        txn.put(b"s", bytes(damaged), db=streams)
    env.close()
    async with await open_log(tmp_path) as log:
        with pytest.raises(CorruptRecordError) as caught:
            await log.last_seq("s")
        assert caught.value.seq is None
        assert "stream 's' index entry: corrupt (checksum mismatch" in str(caught.value)
        with pytest.raises(CorruptRecordError) as caught:
            await log.append("s", [note(2)], expect=1)
        assert caught.value.seq is None
        faults = await log.check()
        assert [(f.stream, f.seq, f.kind) for f in faults] == [
            ("s", None, "index"),
            (None, None, "orphan"),
        ]
        assert "checksum mismatch" in faults[0].detail


@pytest.mark.anyio
async def test_check_between_chunks_lets_the_log_change_and_reports_no_false_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check() reads in short transactions: between two of them the map can grow, and
    appends, new streams and meta changes land; none of that is a fault.

    The commits are made deterministically between chunks: the scan's thread runs them
    on the loop (anyio.from_thread) just before it begins its n-th read transaction,
    for every n the scan reaches. A scan that kept the map guard from one chunk to the
    next would deadlock the growth (and fail the test by its timeout); one snapshot for
    the whole scan fails the count of read transactions.
    """
    monkeypatch.setattr(lmdb_store, "CHECK_CHUNK", 2)
    loop_thread = threading.get_ident()
    async with await open_log(tmp_path, map_size=64 * 1024) as log:
        for i in range(5):
            meta = {"status": "even" if i % 2 == 0 else "odd"}
            await log.append(f"e/{i}", [note(k) for k in range(5)], expect=ANY, meta=meta)
        real_begin_read = log._begin_read
        reads = 0
        trigger = 0

        async def change_the_log() -> None:
            with anyio.fail_after(20):
                for i in range(5):  # streams before and after the scan's position
                    await log.append(f"e/{i}", [note(99)], expect=ANY)
                await log.append(f"a/{trigger}", [note(0)], expect=0, meta={"status": "new"})
                await log.append(f"z/{trigger}", [note(0)], expect=0, meta={"kind": "new"})
                await log.set_meta("e/0", {"status": f"moved {trigger}"})
                if trigger == 1:  # more than the map holds: it grows, mid-scan
                    await log.append("big", [note(0, pad="g" * 200_000)], expect=ANY)

        def begin_read() -> Any:
            nonlocal reads
            if threading.get_ident() != loop_thread:
                reads += 1
                if reads == trigger:
                    anyio.from_thread.run(change_the_log)
            return real_begin_read()

        monkeypatch.setattr(log, "_begin_read", begin_read)
        assert await log.check() == []
        chunks = reads
        assert chunks > 20  # many short transactions, not one snapshot
        for trigger in range(1, chunks + 1):
            reads = 0
            assert await log.check() == [], f"commits before read transaction {trigger}"
        stats = await log.stats()
        assert stats["map_growths"] >= 1
        assert stats["streams"] == 5 + 2 * chunks + 1
        assert [r.seq for r in await collect(log, "e/4")] == list(range(1, 5 + chunks + 1))


@pytest.mark.anyio
async def test_changing_indexed_keys_rebuilds_the_index(tmp_path: Path) -> None:
    async with await open_log(tmp_path, indexed=("status",)) as log:
        for i in range(10):
            meta = {"status": "on" if i % 2 else "off", "owner": f"o{i % 3}"}
            await log.append(f"s/{i}", [note(i)], expect=0, meta=meta)
    async with await open_log(tmp_path, indexed=("owner", "status")) as log:
        names = [i.stream async for i in log.streams(where={"owner": "o1"})]
        assert names == ["s/1", "s/4", "s/7"]
        assert await log.check() == []
        env_stats = await log.stats()
        assert env_stats["streams"] == 10


@pytest.mark.anyio
async def test_the_writer_forgets_idle_streams_and_reads_them_back_intact(tmp_path: Path) -> None:
    """The writer's cache keeps the streams written in its last two generations of
    commits only: a stream left idle (a suspended execution) costs no memory, and is
    read back from the store, seq, meta and secondary index intact, when written."""
    async with await open_log(tmp_path) as log:
        for i in range(50):
            meta = {"status": "waiting", "n": i}
            assert await log.append(f"cold/{i}", [note(i)], expect=0, meta=meta) == 1
        for i in range(2 * _CACHE_GENERATION + 1):  # one commit each
            assert await log.append("hot", [note(i)], expect=i) == i + 1
        assert set(log._entries) | set(log._entries_old) == {"hot"}
        with pytest.raises(ConflictError):
            await log.append("cold/7", [note(0)], expect=0)
        assert await log.append("cold/7", [note(1)], expect=1, meta={"status": "done"}) == 2
        await log.set_meta("cold/8", {"status": "done"})
        info = await log.stream_info("cold/7")
        assert info is not None and (info.last_seq, info.meta) == (2, {"status": "done", "n": 7})
        done = [i.stream async for i in log.streams(where={"status": "done"})]
        assert done == ["cold/7", "cold/8"]
        assert len([i async for i in log.streams(where={"status": "waiting"})]) == 48
        assert await log.check() == []


@pytest.mark.anyio
async def test_append_withdrawn_when_cancelled_before_the_writer_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await open_log(tmp_path) as log:
        gate = WriterGate(log, monkeypatch)
        async with anyio.create_task_group() as outer:
            outer.start_soon(log.append, "held", [note(0)], 0)
            await gate.wait_held()
            # The writer is busy with "held": these are queued, and stay queued.
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    for i in range(5):
                        tg.start_soon(log.append, f"c/{i}", [note(i)], 0)
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
            assert scope.cancelled_caught
            gate.open()
        # Queued after the withdrawn ones: once it is committed, the writer has passed them.
        assert await log.append("after", [note(0)], expect=0) == 1
        for i in range(5):
            assert await log.last_seq(f"c/{i}") == 0
        stats = await log.stats()
        assert stats["appends"] == 2
        assert await log.check() == []


@pytest.mark.parametrize(
    ("durability", "synced"), [("fsync", True), ("process", False)], ids=["fsync", "process"]
)
@pytest.mark.anyio
async def test_durability_sets_lmdb_sync_flags(
    tmp_path: Path, durability: str, synced: bool
) -> None:
    async with await open_log(tmp_path, durability=durability) as log:
        assert log.durability == durability
        flags = log._env.flags()
        assert (flags["sync"], flags["metasync"]) == (synced, synced)
        # The same when the environment already exists (opened with map_size=0).
        await log.append("s", [note(0)], expect=0)
    async with await open_log(tmp_path, durability=durability) as log:
        flags = log._env.flags()
        assert (flags["sync"], flags["metasync"]) == (synced, synced)


@pytest.mark.anyio
async def test_a_batch_takes_at_most_max_batch_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = lmdb_store.MAX_BATCH_APPENDS
    async with await open_log(tmp_path) as log:
        gate = WriterGate(log, monkeypatch)
        async with anyio.create_task_group() as tg:
            tg.start_soon(log.append, "held", [note(0)], 0)
            await gate.wait_held()
            # All of these are queued before the writer takes any.
            for i in range(cap + 100):
                tg.start_soon(log.append, f"q/{i}", [note(i)], 0)
            await anyio.wait_all_tasks_blocked()
            gate.open()
        stats = await log.stats()
        assert stats["appends"] == cap + 101
        # The first batch after the held one took exactly the cap, the next the rest.
        assert stats["largest_batch"] == cap
        assert stats["commits"] == 3
        assert stats["records"] == cap + 101


@pytest.mark.anyio
async def test_a_batch_takes_at_most_max_batch_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = lmdb_store.MAX_BATCH_BYTES
    big = "b" * (cap // 5)  # with its envelope, a bit over a fifth: four fit in a batch
    async with await open_log(tmp_path) as log:
        gate = WriterGate(log, monkeypatch)
        async with anyio.create_task_group() as tg:
            tg.start_soon(log.append, "held", [note(0)], 0)
            await gate.wait_held()
            for i in range(12):
                tg.start_soon(log.append, f"b/{i}", [note(i, pad=big)], 0)
            await anyio.wait_all_tasks_blocked()
            gate.open()
        stats = await log.stats()
        assert stats["appends"] == 13
        assert stats["largest_batch_bytes"] <= cap
        assert stats["largest_batch"] == 4
        assert stats["commits"] == 1 + 3  # the held one, then 4 + 4 + 4
        assert [r.payload["i"] for r in await collect(log, "b/11")] == [11]


@pytest.mark.anyio
async def test_a_batch_whose_bookkeeping_fails_after_commit_reports_its_outcomes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The commit returned, so the records are on disk: callers must not hear "failed"."""
    caplog.set_level(logging.ERROR, logger="perdure.log")

    class CountersFailingOnce(dict[str, int]):
        failed = False

        def __setitem__(self, key: str, value: int) -> None:
            if key == "commits" and not self.failed:
                self.failed = True
                raise RuntimeError("injected bookkeeping failure")
            super().__setitem__(key, value)

    async with await open_log(tmp_path) as log:
        await log.append("s", [note(0)], expect=0)  # cached by the writer
        monkeypatch.setattr(log, "_counters", CountersFailingOnce(log._counters))
        woken: list[int] = []

        async def wait() -> None:
            woken.append(await log.wait_for_append("s", 1))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            assert await log.append("s", [note(1), note(2)], expect=1) == 3
        assert woken == [3]
        assert log._counters.failed
        failures = [r for r in caplog.records if "was committed" in r.getMessage()]
        assert len(failures) == 1
        assert str(tmp_path) in failures[0].getMessage()
        assert "stream 's'" in failures[0].getMessage()
        # The writer dropped its possibly stale cache and carries on from the store.
        assert await log.append("s", [note(3)], expect=3) == 4
        with pytest.raises(ConflictError):
            await log.append("s", [note(4)], expect=3)
        assert [r.payload["i"] for r in await collect(log, "s")] == [0, 1, 2, 3]
        assert await log.check() == []


@pytest.mark.anyio
async def test_a_batch_failing_before_commit_names_its_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await open_log(tmp_path) as log:
        gate = WriterGate(log, monkeypatch)
        real_apply = log._apply

        def apply(txn: Any, batch: list[Any], *args: Any) -> Any:
            if any(pending.stream.startswith("f/") for pending in batch):
                raise RuntimeError("injected failure")
            return real_apply(txn, batch, *args)

        monkeypatch.setattr(log, "_apply", apply)
        errors: dict[str, LogError] = {}

        async def append(stream: str) -> None:
            try:
                await log.append(stream, [note(0)], expect=0)
            except LogError as exc:
                errors[stream] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(log.append, "held", [note(0)], 0)
            await gate.wait_held()
            # Queued behind the held commit, these five become the next batch.
            for i in range(5):
                tg.start_soon(append, f"f/{i}")
            await anyio.wait_all_tasks_blocked()
            gate.open()
        assert sorted(errors) == [f"f/{i}" for i in range(5)]
        for stream, error in errors.items():
            message = str(error)
            assert str(tmp_path) in message
            assert f"stream {stream!r}" in message
            assert "5 writes to 5 streams: 'f/0', 'f/1', 'f/2' and 2 more" in message
            assert "RuntimeError: injected failure" in message
            assert "nothing of the batch was written" in message and "retry" in message
        for i in range(5):
            assert await log.last_seq(f"f/{i}") == 0
        assert await log.last_seq("held") == 1


@pytest.mark.anyio
async def test_aclose_commits_what_is_queued(tmp_path: Path) -> None:
    log = await open_log(tmp_path)
    results: dict[int, Any] = {}

    async def append(i: int) -> None:
        try:
            results[i] = await log.append(f"q/{i}", [note(i)], expect=0)
        except LogError as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(append, i)
        # Every task is now parked in append(): its record is queued or committing.
        await anyio.wait_all_tasks_blocked()
        await log.aclose()
        with pytest.raises(LogClosedError):
            await log.append("late", [note(0)], expect=0)
    # Everything handed to the log before aclose() was committed.
    assert results == {i: 1 for i in range(50)}
    async with await open_log(tmp_path) as log:
        for i in range(50):
            assert await log.last_seq(f"q/{i}") == 1
        assert await log.last_seq("late") == 0


@pytest.mark.anyio
async def test_an_append_whose_kick_never_comes_is_still_committed(tmp_path: Path) -> None:
    """The safety net behind the kick: if a loop's kick is believed scheduled but never
    runs (its loop ended first, and a new loop got the same id()), the writer takes
    the queued append after RELEASE_TIMEOUT and forgets the stale kicks."""
    from perdure.log.waker import Completion

    async with await open_log(tmp_path) as log:
        log._kicks.add(id(Completion().loop))  # a kick that will never run
        with anyio.fail_after(10):
            assert await log.append("s", [note(0)], expect=0) == 1
        assert log._kicks == set()
        # And the next burst is released by its own kick again.
        with anyio.fail_after(10):
            assert await log.append("s", [note(1)], expect=1) == 2


# -- delete_streams: LMDB only -----------------------------------------------------------


@pytest.mark.anyio
async def test_client_cannot_delete(tmp_path: Path) -> None:
    async with await open_log(tmp_path) as owner:
        await owner.append("exec/1", [note(1)], expect=0)
        await owner.append("signals/x", [NewRecord("signal", {})], expect=0)
    # (LMDB allows one handle per process: the client opens once the owner is closed.)
    async with await open_log(tmp_path, client=True) as client:
        for stream in ("exec/1", "signals/x"):
            with pytest.raises(ClientWriteError, match=repr(stream)):
                await client.delete_streams([stream])
        assert await client.last_seq("exec/1") == 1
        assert await client.last_seq("signals/x") == 1


@pytest.mark.anyio
async def test_delete_with_a_corrupt_entry_deletes_nothing(tmp_path: Path) -> None:
    async with await open_log(tmp_path) as log:
        await log.append("good", [note(1)], expect=0, meta={"status": "x"})
        await log.append("bad", [note(1)], expect=0)
    env, (_, streams, _, _) = _raw_env(tmp_path)
    with env.begin(write=True) as txn:
        txn.put(b"bad", b"\x00not a sealed entry", db=streams)
    env.close()
    async with await open_log(tmp_path) as log:
        with pytest.raises(CorruptRecordError, match="'bad'"):
            await log.delete_streams(["good", "bad"])
        assert await log.last_seq("good") == 1
        assert [i.stream async for i in log.streams(where={"status": "x"})] == ["good"]


@pytest.mark.anyio
async def test_delete_between_appends_of_one_burst(tmp_path: Path) -> None:
    """A delete queued among many appends gets its own transaction; none is lost."""
    async with await open_log(tmp_path) as log:
        await log.append("old", [note(i) for i in range(10)], expect=0, meta={"status": "x"})
        deleted: list[int] = []

        async def delete() -> None:
            deleted.append(await log.delete_streams(["old"]))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(log.append, f"new/{i}", [note(i)], 0, {"status": "x"})
            tg.start_soon(delete)
            for i in range(50, 100):
                tg.start_soon(log.append, f"new/{i}", [note(i)], 0, {"status": "x"})
        assert deleted == [1]
        names = [i.stream async for i in log.streams(where={"status": "x"})]
        assert names == sorted(f"new/{i}" for i in range(100))
        assert await log.check() == []
        assert (await log.stats())["streams_deleted"] == 1


@pytest.mark.anyio
async def test_check_during_a_delete_reports_no_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream deleted after check() read the index is not reported as missing records."""
    async with await open_log(tmp_path) as log:
        await log.append("a", [note(i) for i in range(5)], expect=0, meta={"status": "x"})
        await log.append("b", [note(1)], expect=0)
        original = LmdbLog._check_index

        def index_then_delete(self: LmdbLog, faults: list[Any]) -> Any:
            by_id = original(self, faults)
            # What the writer thread would do between the scan's transactions.
            pending = lmdb_store._Pending(
                lmdb_store._DELETE,
                "a",
                b"a",
                [b"a"],
                None,
                None,
                0.0,
                None,  # type: ignore[arg-type]
            )
            with self._env.begin(write=True) as txn:
                assert self._apply_delete(txn, pending) == 1
            return by_id

        monkeypatch.setattr(LmdbLog, "_check_index", index_then_delete)
        assert await log.check() == []
        monkeypatch.undo()
        assert await log.stream_info("a") is None
        # The writer notices the foreign transaction and rereads "b" from the store.
        assert await log.append("b", [note(2)], expect=1) == 2
        assert await log.check() == []


@pytest.mark.anyio
async def test_deleted_space_is_reused_not_returned(tmp_path: Path) -> None:
    async with await open_log(tmp_path) as log:
        batch = [NewRecord("note", {"i": i, "pad": "x" * 400}) for i in range(200)]
        for round in range(3):
            for k in range(10):
                await log.append(f"r{round}/{k}", batch, expect=0)
            if round == 0:
                size_after_first = (await log.stats())["map_used_bytes"]
            assert await log.delete_streams([f"r{round}/{k}" for k in range(10)]) == 10
        stats = await log.stats()
        assert stats["records"] == 0
        # Three rounds of ~1 MB each fit in the pages the first round used (plus slack
        # for LMDB's free list and the two meta pages), not in three times as many.
        assert stats["map_used_bytes"] < 2 * size_after_first


# -- trim: LMDB only ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_client_cannot_trim(tmp_path: Path) -> None:
    async with await open_log(tmp_path) as owner:
        await owner.append("exec/1", [note(1)], expect=0)
        await owner.append("signals/x", [NewRecord("signal", {})], expect=0)
    async with await open_log(tmp_path, client=True) as client:
        for stream in ("exec/1", "signals/x"):
            with pytest.raises(ClientWriteError, match=repr(stream)):
                await client.trim(stream, 1)
        assert [r.seq for r in await collect(client, "signals/x")] == [1]
        assert await client.last_seq("exec/1") == 1


@pytest.mark.parametrize("chunk", [1, 2, lmdb_store.CHECK_CHUNK])
@pytest.mark.anyio
async def test_check_tells_a_trim_from_a_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """The trimmed prefix is no fault; a record missing after it still is, and so is
    one missing from the end, whatever the chunk size of the scan."""
    async with await open_log(tmp_path) as log:
        await log.append("a", [note(i) for i in range(10)], expect=0)
        await log.append("b", [note(i) for i in range(6)], expect=0)
        await log.append("c", [note(i) for i in range(3)], expect=0)
        await log.trim("a", 4)
        await log.trim("b", 2)
        await log.trim("c", 3)
        assert await log.check() == []
    env, (records, _, _, _) = _raw_env(tmp_path)
    with env.begin(write=True) as txn:
        keys = [k for k, _ in txn.cursor(db=records)]
        assert len(keys) == 6 + 4  # a: 5..10, b: 3..6, c: none
        txn.delete(keys[1], db=records)  # a's seq 6
        txn.delete(keys[9], db=records)  # b's seq 6, its last
    env.close()
    monkeypatch.setattr(lmdb_store, "CHECK_CHUNK", chunk)
    async with await open_log(tmp_path) as log:
        faults = sorted((f.stream, f.seq, f.kind, f.detail) for f in await log.check())
        assert faults == [
            ("a", 6, "gap", "records 6..6 missing"),
            ("b", 6, "gap", "records 6..6 missing (index says 6)"),
        ]
        with pytest.raises(CorruptRecordError) as caught:
            await collect(log, "a", 4)
        assert (caught.value.stream, caught.value.seq) == ("a", 6)


@pytest.mark.anyio
async def test_check_names_a_bad_trim_mark(tmp_path: Path) -> None:
    async with await open_log(tmp_path) as log:
        for name in ("a", "b", "c"):
            await log.append(name, [note(1), note(2)], expect=0)
            await log.trim(name, 1)
    env, (records, _, _, meta) = _raw_env(tmp_path)
    with env.begin(write=True) as txn:
        txn.put(b"trimmed/a", b"\x00not sealed", db=meta)
        txn.put(b"trimmed/b", seal([5]), db=meta)  # past b's last seq, 2
        txn.put(b"trimmed/ghost", seal([1]), db=meta)
        # c keeps a record the trim removed.
        c_first = [k for k, _ in txn.cursor(db=records)][-1]
        txn.put(c_first[:4] + (1).to_bytes(8, "big"), b"x", db=records)
    env.close()
    async with await open_log(tmp_path) as log:
        faults = sorted((f.stream or "", f.kind, f.detail) for f in await log.check())
        assert faults == [
            ("a", "gap", "records 1..1 missing"),  # its mark unreadable: seq 1 looks missing
            ("a", "index", "its trim mark is corrupt (checksum mismatch over 11 stored bytes)"),
            ("b", "index", "its trim mark says trimmed through seq 5, past its last seq 2"),
            ("b", "index", "record kept although trimmed through 2"),
            ("c", "checksum", "checksum mismatch over 1 bytes"),
            ("c", "index", "record kept although trimmed through 1"),
            ("ghost", "orphan", "a trim mark of a stream not indexed"),
        ]
        with pytest.raises(CorruptRecordError, match="trim mark"):
            await log.stream_info("a")


@pytest.mark.anyio
async def test_check_during_a_trim_reports_no_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records trimmed after check() read the index are not reported missing."""
    async with await open_log(tmp_path) as log:
        await log.append("a", [note(i) for i in range(5)], expect=0)
        await log.append("b", [note(i) for i in range(5)], expect=0)
        original = LmdbLog._check_index

        def index_then_trim(self: LmdbLog, faults: list[Any]) -> Any:
            by_id = original(self, faults)
            # What the writer thread would do between the scan's transactions.
            for name, through in (("a", 3), ("b", 5)):
                pending = lmdb_store._Pending(
                    lmdb_store._TRIM,
                    name,
                    name.encode(),
                    [],
                    through,
                    None,
                    0.0,
                    None,  # type: ignore[arg-type]
                )
                with self._env.begin(write=True) as txn:
                    assert self._apply_trim(txn, pending) == through
            return by_id

        monkeypatch.setattr(LmdbLog, "_check_index", index_then_trim)
        assert await log.check() == []
        monkeypatch.undo()
        assert await log.check() == []
        info = await log.stream_info("a")
        assert info is not None and info.first_seq == 4


@pytest.mark.anyio
async def test_trim_between_appends_of_one_burst(tmp_path: Path) -> None:
    """A trim queued among many appends gets its own transaction; none is lost."""
    async with await open_log(tmp_path) as log:
        await log.append("inbox", [note(i) for i in range(10)], expect=0)
        trimmed: list[int] = []

        async def trim() -> None:
            trimmed.append(await log.trim("inbox", 8))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(log.append, "inbox", [note(i)], None)
            tg.start_soon(trim)
            for i in range(50):
                tg.start_soon(log.append, f"new/{i}", [note(i)], 0)
        assert trimmed == [8]
        assert await log.last_seq("inbox") == 60
        assert [r.seq for r in await collect(log, "inbox", 8)] == list(range(9, 61))
        assert await log.check() == []
        assert (await log.stats())["records_trimmed"] == 8


@pytest.mark.anyio
async def test_trim_frees_space_for_reuse(tmp_path: Path) -> None:
    """A long-lived inbox trimmed as it goes stays in the pages it first used."""
    async with await open_log(tmp_path) as log:
        batch = [NewRecord("note", {"pad": "x" * 400}) for _ in range(200)]
        last = 0
        for round in range(6):
            last = await log.append("inbox", batch, expect=last)
            if round == 1:
                size_early = (await log.stats())["map_used_bytes"]
            await log.trim("inbox", last)
        stats = await log.stats()
        assert stats["records"] == 0
        assert stats["map_used_bytes"] < 2 * size_early
