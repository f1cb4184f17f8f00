"""``LmdbLog``: the event log on LMDB, with one writer thread doing group commit.

Layout
------
``path`` is a directory holding the LMDB environment (``data.mdb``, ``lock.mdb``) and
``owner.lock``. The environment has four named databases:

``records``
    key ``stream id (u32) | seq (u64)``, big-endian, so a cursor walks one stream in
    order; value the sealed record envelope (see :mod:`perdure.log.codec`). Small
    integer stream ids keep the 12-byte keys short.
``streams``
    the stream index: key the stream name (UTF-8), value the sealed
    ``[id, last_seq, created_at, updated_at, meta]``.
``by_meta``
    the secondary index for the ``indexed`` meta keys: key
    ``len|field|len|value|stream name``, empty value. ``value`` is the canonical CBOR
    of the meta value, or a BLAKE2b digest of it when longer than 32 bytes (matches are
    then confirmed against the stream's meta).
``meta``
    the format marker, the next stream id, and each trimmed stream's *trim mark*: key
    ``trimmed/`` + the stream name, value the sealed ``[through]`` (the last seq
    :meth:`LmdbLog.trim` removed; records ``1..through`` are gone on purpose, which
    ``check()`` tells from a gap).

Group commit
------------
Every write goes through ONE writer thread. It takes whatever appends are queued (up
to :data:`MAX_BATCH_APPENDS` appends or :data:`MAX_BATCH_BYTES` bytes), applies them
in order inside one write transaction, commits, and then wakes the waiting tasks with
one thread-safe callback per event loop. An append whose ``expect`` does not match
fails alone with ``ConflictError``; appends to the same stream within a batch see each
other. Records are encoded (and checksummed) on the caller's thread, so the writer
holds the GIL only to put bytes; the caller also learns at once that a record cannot
be encoded or has an unregistered type.

The writer is told about new appends by a "kick": a callback the first append of a
burst schedules on its own event loop, which runs once the tasks that are ready now
have run. So the appends of many tasks woken by one commit become the next batch, and
the writer applies it while the loop waits. py-lmdb releases the GIL around every put,
and taking it back from a busy loop thread can cost the interpreter's 5 ms switch
interval, so a writer that raced the loop would crawl. If a kick never comes (its loop
ended first), the writer takes the queue after :data:`RELEASE_TIMEOUT` anyway.

Durability
----------
``"fsync"`` (the default)
    LMDB ``sync`` and ``metasync`` on: ``append`` returns only after the transaction
    holding the batch is on disk. Survives a process crash and a power loss.
``"process"``
    No sync: ``append`` returns once the batch is committed to the OS page cache. It
    survives a crash of the process (SIGKILL included), not a power loss or a kernel
    crash, which may lose the last transactions (never corrupt the rest: LMDB keeps
    its two meta pages consistent).

Map size
--------
The map starts at ``map_size`` bytes and grows by itself: on ``MDB_MAP_FULL`` the
writer aborts the transaction, doubles the map (bounded by the free disk) and applies
the same batch again from scratch, expects included. (First it frees the reader slots
of processes that died inside a read transaction: each pins every page freed after
its snapshot, so the map fills though little of it is live.) When the disk is full, every
append of the batch fails with ``StorageFullError`` and nothing of it is written.

Ownership
---------
One process owns a data dir: it holds an exclusive ``flock`` on ``owner.lock`` (whose
content is its pid) for as long as the log is open. The kernel drops the lock when the
process dies, even by SIGKILL, so a restarted process is never locked out (a forked
child closes its copy of the lock's descriptor, so it cannot keep the lock). Other
processes may open the dir with ``client=True``: they read everything and may append
only to signal streams (``signals/...``); LMDB's own lock serialises their write
transactions with the owner's. A task in ``wait_for_append`` notices another
process's append by polling LMDB's last transaction id every
:data:`POLL_INTERVAL` seconds, only while someone waits.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from functools import partial
from itertools import islice
from typing import Any, Final

import anyio
import cbor2
import lmdb

from .codec import (
    check_after,
    check_expect,
    check_indexed_fields,
    check_stream_name,
    check_stream_names,
    check_through,
    decode_all,
    encode_entry,
    encode_records,
    meta_matches,
    meta_value_key,
    normalize_meta,
    record_fault,
    seal,
    trim_beyond_error,
    unseal,
    where_conditions,
)
from .errors import (
    ClientWriteError,
    ConflictError,
    CorruptRecordError,
    DataDirLockedError,
    LogClosedError,
    LogError,
    StorageFullError,
    TrimmedError,
)
from .protocol import (
    SIGNAL_STREAM_PREFIX,
    Durability,
    Fault,
    NewRecord,
    Record,
    RecordTypes,
    StreamInfo,
)
from .waker import AppendWaiters, Completion, wake

__all__ = ["LmdbLog"]

logger = logging.getLogger("perdure.log")

#: The most appends one write transaction takes from the queue.
MAX_BATCH_APPENDS: Final = 4096
#: The most record bytes one write transaction takes (one larger append goes alone).
MAX_BATCH_BYTES: Final = 8 << 20
#: Records or index entries read per read transaction, between yields to the loop.
READ_CHUNK: Final = 256
#: Records decoded and handed out at a time within a read chunk. Small enough that the
#: containers of one handed-out list plus the next stay under the collector's
#: first-generation threshold (700 tracked objects, a few per record), so a replay whose
#: consumer drops records as it goes runs few collections: 256 at a time cost replay
#: about 10% (bench/log_bench.py, replay rows).
DECODE_CHUNK: Final = 64
#: Keys ``check()`` reads per read transaction (it releases the map guard in between).
CHECK_CHUNK: Final = 1024
#: The longest queued appends wait for their event loop's kick before the writer takes
#: them anyway, in seconds (a safety net: see _submit).
RELEASE_TIMEOUT: Final = 0.1
#: How often a waiting task's poller looks for other processes' commits, in seconds.
POLL_INTERVAL: Final = 0.025
#: The map size a new environment starts with; it grows on demand.
DEFAULT_MAP_SIZE: Final = 64 << 20
#: The name of the owner's lock file inside the data dir.
LOCK_FILE: Final = "owner.lock"

_FORMAT_KEY: Final = b"format"
_FORMAT: Final = b"perdure.log/1"
_NEXT_ID_KEY: Final = b"next_stream_id"
# In the meta database: + stream name (UTF-8) -> sealed [through] (see the module doc).
# Keyed by name, not id, so listing a stream's entry finds its mark without decoding it.
_TRIM_PREFIX: Final = b"trimmed/"
_RECORD_KEY: Final = struct.Struct(">IQ")
_ID: Final = struct.Struct(">I")
_pack_seq = struct.Struct(">Q").pack
_MAX_STREAM_ID: Final = 2**32 - 1
_RAW_INDEX_VALUE: Final = 32  # longer canonical meta values are indexed by digest
_PAGE: Final = 4096
_NUMBER: Final = (int, float)  # exact types: a bool is not a timestamp

# Pending states: QUEUED -> TAKEN by the writer, or QUEUED -> WITHDRAWN by a cancelled
# caller. Both transitions happen under the queue lock, so exactly one wins.
_QUEUED: Final = 0
_TAKEN: Final = 1
_WITHDRAWN: Final = 2

_APPEND: Final = 0
_SET_META: Final = 1
# A delete goes alone in its write transaction (see _writer_main): its ``values`` are
# the index keys (UTF-8 names) of the streams to delete, and _apply_delete leaves the
# names of those it found in its ``meta``, under "deleted".
_DELETE: Final = 2
# A trim goes alone too: its ``expect`` is the seq to trim through; it leaves its index
# entry as it is (the last seq does not move) and writes the stream's trim mark.
_TRIM: Final = 3

_STORAGE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_checkpoint = anyio.lowlevel.checkpoint
_checkpoint_if_cancelled = anyio.lowlevel.checkpoint_if_cancelled
_time = time.time


class _MapGuard:
    """Readers-writer lock between LMDB transactions and remapping the environment.

    ``set_mapsize`` (growing the map, or adopting another process's growth) and
    ``close`` replace or drop the memory map under every open transaction of the
    process, so they take the exclusive side; every transaction holds the shared side.
    Writers of the exclusive side are preferred, so a stream of readers cannot starve
    a map growth.
    """

    __slots__ = ("_cond", "_exclusive", "_readers", "_waiting")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._exclusive = False
        self._waiting = 0

    def acquire_shared(self) -> None:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers and self._waiting:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()


class _Pending:
    """One queued write, from the caller to the writer thread and back."""

    __slots__ = (
        "completion",
        "expect",
        "kind",
        "meta",
        "nbytes",
        "state",
        "stream",
        "stream_key",
        "timestamp",
        "values",
    )

    def __init__(
        self,
        kind: int,
        stream: str,
        stream_key: bytes,
        values: list[bytes],
        expect: int | None,
        meta: dict[str, Any] | None,
        timestamp: float,
        completion: Completion,
    ) -> None:
        self.kind = kind
        self.stream = stream
        self.stream_key = stream_key
        self.values = values
        self.nbytes = sum(map(len, values))
        self.expect = expect
        self.meta = meta
        self.timestamp = timestamp
        self.completion = completion
        self.state = _QUEUED


class _StreamState:
    """A stream's index entry while a write transaction changes it.

    ``meta`` is never mutated in place (an update makes a new dict), so ``old_meta``
    and the writer's cached entries can share it safely.
    """

    __slots__ = (
        "created_at",
        "dirty",
        "id_prefix",
        "last_seq",
        "meta",
        "meta_cbor",
        "name",
        "name_key",
        "new_meta_cbor",
        "old_meta",
        "sid",
        "updated_at",
    )

    def __init__(
        self,
        name: str,
        name_key: bytes,
        sid: int,
        last_seq: int,
        created_at: float,
        updated_at: float,
        meta: dict[str, Any],
        meta_cbor: bytes | None = None,
    ) -> None:
        self.name = name
        self.name_key = name_key
        self.sid = sid
        self.id_prefix = _ID.pack(sid)
        self.last_seq = last_seq
        self.created_at = created_at
        self.updated_at = updated_at
        self.meta = meta
        self.old_meta = meta
        self.meta_cbor = cbor2.dumps(meta) if meta_cbor is None else meta_cbor
        # ``meta`` as CBOR once encoded() has stored it (so entry() needn't encode it
        # again): it may only be taken while ``meta`` is still the dict it encodes.
        self.new_meta_cbor: tuple[dict[str, Any], bytes] | None = None
        self.dirty = False

    def entry(self) -> _Entry:
        """The index entry as the writer caches it."""
        meta = self.meta
        if meta is not self.old_meta:
            done = self.new_meta_cbor
            self.meta_cbor = done[1] if done is not None and done[0] is meta else cbor2.dumps(meta)
            self.old_meta = meta
        return (
            self.sid,
            self.last_seq,
            self.created_at,
            self.updated_at,
            self.meta,
            self.meta_cbor,
        )

    def encoded(self) -> bytes:
        """The sealed index entry to store."""
        meta = self.meta
        if meta is self.old_meta:
            meta_cbor = self.meta_cbor
        else:
            meta_cbor = cbor2.dumps(meta)
            self.new_meta_cbor = (meta, meta_cbor)
        return encode_entry(self.sid, self.last_seq, self.created_at, self.updated_at, meta_cbor)


# (id, last_seq, created_at, updated_at, meta, meta as CBOR)
_Entry = tuple[int, int, float, float, dict[str, Any], bytes]


def _index_value(value_key: bytes) -> bytes:
    if len(value_key) <= _RAW_INDEX_VALUE:
        return b"\x00" + value_key
    return b"\x01" + hashlib.blake2b(value_key, digest_size=16).digest()


def _index_prefix(field: str, value_key: bytes) -> bytes:
    """The by_meta key prefix of every stream whose meta ``field`` has this value."""
    field_bytes = field.encode("utf-8")
    value = _index_value(value_key)
    return bytes((len(field_bytes),)) + field_bytes + bytes((len(value),)) + value


# LMDB's on-disk layout (lmdb.h / mdb.c, 64-bit builds), just enough to find the pages
# its trees use without touching the memory map: see LmdbLog._check_file_size.
_PAGE_HEAD: Final = struct.Struct("<QHHHH")  # pgno, pad, flags, lower, upper
_OVERFLOW_PAGES: Final = struct.Struct("<I")  # after pgno, pad, flags: the run's length
_NODE_HEAD: Final = struct.Struct("<HHHH")  # lo, hi, flags, key size
_PGNO: Final = struct.Struct("<Q")
_DB_ROOT: Final = struct.Struct("<IHHQQQQQ")  # pad, flags, depth, 4 counts, root
_META_DBS: Final = 40  # page header (16), magic, version, address, map size
_META_TXNID: Final = _META_DBS + 2 * _DB_ROOT.size + 8
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_LEAF2 = 0x01, 0x02, 0x04, 0x20
_F_BIGDATA, _F_SUBDATA, _F_DUPDATA = 0x01, 0x02, 0x04
_NO_PAGE: Final = 2**64 - 1


def _page_beyond_end(data_file: str, psize: int, last_pgno: int, size: int) -> int | None:
    """The first page the newest meta's trees use that lies past ``size``, or None.

    Reads pages with ``os.pread`` only. Anything that does not parse as expected is
    None (not proven truncated): refusing an intact store would be worse.
    """
    fd = os.open(data_file, os.O_RDONLY | os.O_CLOEXEC)
    try:

        def page(pgno: int) -> bytes:
            return os.pread(fd, psize, pgno * psize)

        metas = [page(0), page(1)]
        if any(len(m) < _META_TXNID + 8 for m in metas):
            return None
        meta = max(metas, key=lambda m: _PGNO.unpack_from(m, _META_TXNID)[0])
        roots = [_DB_ROOT.unpack_from(meta, _META_DBS + k * _DB_ROOT.size)[7] for k in (0, 1)]
        todo = [root for root in roots if root != _NO_PAGE]
        seen: set[int] = set()
        while todo:
            pgno = todo.pop()
            if pgno in seen or pgno > last_pgno or pgno < 2:
                return None
            seen.add(pgno)
            if (pgno + 1) * psize > size:
                return pgno
            raw = page(pgno)
            _, _, flags, lower, _ = _PAGE_HEAD.unpack_from(raw)
            if flags & _P_LEAF2:
                continue  # fixed-size keys, no pointers
            if not flags & (_P_BRANCH | _P_LEAF):
                return None
            for k in range((lower - _PAGE_HEAD.size) // 2):
                at = struct.unpack_from("<H", raw, _PAGE_HEAD.size + 2 * k)[0]
                lo, hi, node_flags, ksize = _NODE_HEAD.unpack_from(raw, at)
                if flags & _P_BRANCH:
                    todo.append(lo | hi << 16 | node_flags << 32)
                    continue
                data = at + _NODE_HEAD.size + ksize
                if node_flags & _F_BIGDATA:
                    first = _PGNO.unpack_from(raw, data)[0]
                    if first > last_pgno:
                        return None
                    if (first + 1) * psize > size:
                        return first
                    head = os.pread(fd, _PAGE_HEAD.size, first * psize)
                    if len(head) < _PAGE_HEAD.size or not _PAGE_HEAD.unpack(head)[2] & _P_OVERFLOW:
                        return None
                    pages = _OVERFLOW_PAGES.unpack_from(head, 12)[0]
                    if (first + pages) * psize > size:
                        return first + pages - 1
                elif node_flags & _F_SUBDATA:
                    root = _DB_ROOT.unpack_from(raw, data)[7]
                    if root != _NO_PAGE:
                        todo.append(root)
                # _F_DUPDATA alone: a sub-page inside this node; nothing to follow.
        return None
    except (struct.error, OSError):
        return None
    finally:
        os.close(fd)


def _stream_name(name_key: bytes) -> str:
    """A stream name from its index key; ``CorruptRecordError`` if it is not UTF-8.

    Keys carry no checksum: a damaged one is named (escaped) as the stream's entry,
    never left to surface as a bare ``UnicodeDecodeError``.
    """
    try:
        return name_key.decode("utf-8")
    except UnicodeDecodeError:
        name = name_key.decode("utf-8", "backslashreplace")
        raise CorruptRecordError(name, None, "its name in the index is not UTF-8") from None


def _decode_entry(name: str, raw: bytes) -> list[Any]:
    """Unseal a stream index entry: ``[id, last_seq, created_at, updated_at, meta]``.

    Raises ``CorruptRecordError`` with ``seq=None`` (the entry, not a record).
    """
    try:
        entry = unseal(raw, 5)
    except ValueError as exc:
        raise CorruptRecordError(name, None, str(exc)) from None
    sid, last_seq, created_at, updated_at, meta = entry
    if type(sid) is not int or type(last_seq) is not int:
        raise CorruptRecordError(name, None, "malformed stream id or last seq")
    if type(created_at) not in _NUMBER or type(updated_at) not in _NUMBER:
        raise CorruptRecordError(name, None, "malformed timestamps")
    if not isinstance(meta, dict):
        raise CorruptRecordError(name, None, "malformed meta")
    return entry


def _decode_trim(name: str, raw: bytes | None) -> int:
    """A stream's trim mark (the last seq trimmed; 0 if ``raw`` is None, never trimmed).

    Raises ``CorruptRecordError`` with ``seq=None`` (the stream, not a record).
    """
    if raw is None:
        return 0
    try:
        (through,) = unseal(raw, 1)
    except ValueError as exc:
        raise CorruptRecordError(name, None, f"its trim mark is corrupt ({exc})") from None
    if type(through) is not int or through < 0:
        raise CorruptRecordError(name, None, "its trim mark is malformed")
    return through


class LmdbLog:
    """An :class:`~perdure.log.EventLog` on LMDB with group commit; see the module doc.

    Open with ``await LmdbLog.open(path, types=...)`` (or ``async with await
    LmdbLog.open(...) as log``) and close with :meth:`aclose`.
    """

    def __init__(self) -> None:
        # Use LmdbLog.open(): opening touches the disk and must not block the loop.
        raise TypeError("use 'await LmdbLog.open(path, types=...)' to open an LmdbLog")

    # -- opening and closing -----------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        types: RecordTypes,
        durability: Durability = "fsync",
        client: bool = False,
        indexed: Sequence[str] = ("status", "kind"),
        map_size: int = DEFAULT_MAP_SIZE,
    ) -> LmdbLog:
        """Open (creating if needed) the log in directory ``path``.

        ``types`` is copied (see :attr:`types`). ``durability`` is ``"fsync"`` or
        ``"process"`` (see the module doc). ``client=True`` opens without owning the
        dir: read everything, append only to signal streams. ``indexed`` names the meta
        keys ``streams(where=...)`` answers from a secondary index; changing it for an
        existing dir rebuilds that index. ``map_size`` is the initial map size in bytes.

        Raises ``DataDirLockedError`` if another process owns the dir.
        """
        if durability not in ("fsync", "process"):
            raise LogError(f"durability must be 'fsync' or 'process', got {durability!r}")
        fields = check_indexed_fields(indexed)
        if type(map_size) is not int or map_size < _PAGE * 16:
            raise LogError(f"map_size must be an int of at least {_PAGE * 16} bytes")
        self = object.__new__(cls)
        await anyio.to_thread.run_sync(
            partial(self._open_sync, os.fspath(path), types, durability, client, fields, map_size)
        )
        return self

    def _open_sync(
        self,
        path: str,
        types: RecordTypes,
        durability: Durability,
        client: bool,
        indexed: tuple[str, ...],
        map_size: int,
    ) -> None:
        self._path = os.path.abspath(path)
        self._data_file = os.path.join(self._path, "data.mdb")
        self._types = types.copy()
        # The live dict of our own RecordTypes: registrations through .types are seen.
        self._known: dict[str, int] = self._types._known
        self._durability = durability
        self._client = client
        self._indexed = indexed
        self._lock_fd: int | None = None
        if client:
            if not os.path.exists(self._data_file):
                raise LogError(
                    f"data dir {self._path!r} holds no perdure log; a client can only open a "
                    f"dir an owner has created"
                )
            if not os.path.exists(os.path.join(self._path, "lock.mdb")):
                # Opening the environment would create LMDB's lock.mdb: first make sure,
                # creating nothing, that the dir holds a log (a client never leaves a
                # file in a wrong dir).
                self._check_holds_a_log()
        else:
            try:
                os.makedirs(self._path, exist_ok=True)
                self._lock_fd = self._take_owner_lock()
                _lock_holders.add(self)
            except OSError as exc:
                if os.path.exists(self._path) and not os.path.isdir(self._path):
                    why = "is not a directory"
                else:
                    why = f"cannot be created or locked ({exc.strerror or exc})"
                raise LogError(
                    f"data dir {self._path!r} {why}; open the log in a directory this "
                    f"process can create and write"
                ) from None
        try:
            self._open_env(map_size)
        except BaseException:
            self._release_owner_lock()
            raise

        self._guard = _MapGuard()
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[_Pending] = deque()
        # Group commit waits for each event loop's burst of work to end (see _submit):
        # the writer takes only appends "released" by a kick, counted since open.
        self._enqueued = 0
        self._released = 0
        self._taken = 0
        self._kicks: set[int] = set()
        # The writer's copy of stream index entries, valid while no other process
        # commits (checked by transaction id): saves a get and a decode per append.
        # Two generations of _CACHE_GENERATION commits each: a stream written in this
        # one or the one before is cached; one idle for longer (a suspended execution
        # waiting for a person) is dropped, and read back from the store if it is ever
        # written again. So the cache holds the streams in use, not all ever written.
        self._entries: dict[str, _Entry] = {}
        self._entries_old: dict[str, _Entry] = {}
        self._entries_commits = 0
        self._entries_txnid = -1
        self._writer_idle = False
        self._stopping = False
        self._closing = False
        self._closed = False
        # Set once aclose() has released everything: a second closer waits for it.
        self._released_event = threading.Event()
        self._waiters = AppendWaiters()
        self._poller: threading.Thread | None = None
        self._poll_stop = threading.Event()
        self._counters = {
            "commits": 0,
            "appends": 0,
            "records_appended": 0,
            "conflicts": 0,
            "wake_callbacks": 0,
            "largest_batch": 0,
            "largest_batch_bytes": 0,
            "map_growths": 0,
            "stale_readers_cleared": self._stale_readers_at_open,
            "poll_wake_callbacks": 0,
            "streams_deleted": 0,
            "records_trimmed": 0,
        }
        self._writer = threading.Thread(
            target=self._writer_main, name=f"perdure-log-writer {self._path}", daemon=True
        )
        self._writer.start()

    def _take_owner_lock(self) -> int:
        lock_path = os.path.join(self._path, LOCK_FILE)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self._read_owner_pid(fd)
            os.close(fd)
            raise DataDirLockedError(self._path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    @staticmethod
    def _read_owner_pid(fd: int) -> int | None:
        # The holder writes its pid right after taking the lock; give it a moment.
        for _ in range(20):
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            if text.isdigit():
                return int(text)
            time.sleep(0.005)
        return None

    def _release_owner_lock(self) -> None:
        _lock_holders.discard(self)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
            self._lock_fd = None

    def _drop_inherited_lock(self) -> None:
        """In a forked child: close the copy of the owner lock's descriptor.

        A flock belongs to the open file, which fork shares with the child: a child that
        outlived a SIGKILLed owner (a multiprocessing worker, say) would keep the dir
        locked, and the restarted owner would be refused, told to stop a dead process.
        The child never owns the dir (LMDB handles are unusable after fork anyway).
        """
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _open_env(self, map_size: int) -> None:
        sync = self._durability == "fsync"
        # An existing environment keeps the map size it has grown to (0 adopts it);
        # asking for less would shrink the map back to the used size.
        existing = os.path.exists(self._data_file)
        try:
            env = lmdb.open(
                self._path,
                map_size=0 if existing else map_size,
                subdir=True,
                max_dbs=8,
                max_readers=512,
                sync=sync,
                metasync=sync,
                # No OS read-ahead on the map: replaying one execution touches a few
                # pages, and read-ahead would map (and count in RSS) their neighbours.
                readahead=False,
                create=not self._client,
            )
        except lmdb.Error as exc:
            if "already open in this process" in str(exc):
                raise LogError(
                    f"data dir {self._path!r} is already open in this process; LMDB allows "
                    f"one handle per process — share that LmdbLog instead of opening another"
                ) from None
            raise LogError(f"data dir {self._path!r}: cannot open the LMDB environment ({exc})")
        try:
            self._check_file_size(env)
            # LMDB frees a dead process's reader slots only when no process has the
            # environment open; with a client (the CLI, a dashboard) open across an
            # owner's crash, a slot held mid-read would pin every page freed after it,
            # and data.mdb would grow with each commit.
            self._stale_readers_at_open: int = env.reader_check()
            while True:
                try:
                    dbs, marker = self._open_dbs(env)
                    break
                except lmdb.MapResizedError:
                    # Another process (the owner, or a client) grew the map since this
                    # environment was opened: take up its size and begin again.
                    env.set_mapsize(0)
        except lmdb.NotFoundError:
            env.close()
            raise LogError(f"data dir {self._path!r} holds no perdure log") from None
        except BaseException:
            env.close()
            raise
        if marker != _FORMAT:
            env.close()
            raise LogError(
                f"data dir {self._path!r} was written in log format {marker!r}; this perdure "
                f"reads {_FORMAT!r} — upgrade perdure"
            )
        if not self._client and env.info()["map_size"] < map_size:
            env.set_mapsize(map_size)
        self._env = env
        self._records, self._streams, self._by_meta, self._meta = dbs

    def _check_holds_a_log(self) -> None:
        """Raise unless data.mdb holds a perdure log; read it without LMDB's lock file.

        Only for a dir without lock.mdb: no process has the environment open (every
        LMDB open creates that file), so reading without locks races no writer.
        """
        try:
            env = lmdb.open(
                self._path,
                map_size=0,
                subdir=True,
                max_dbs=8,
                readonly=True,
                lock=False,
                readahead=False,
                create=False,
            )
        except lmdb.Error as exc:
            raise LogError(
                f"data dir {self._path!r}: cannot open the LMDB environment ({exc})"
            ) from None
        try:
            self._check_file_size(env)  # before any read through the map
            with env.begin() as txn:
                try:
                    meta = env.open_db(_DB_NAMES[3], txn=txn, create=False)
                except lmdb.Error:  # no such database, or a key of another program
                    marker = None
                else:
                    marker = txn.get(_FORMAT_KEY, db=meta)
        finally:
            env.close()
        if marker is None:
            raise LogError(f"data dir {self._path!r} holds no perdure log")

    def _open_dbs(self, env: lmdb.Environment) -> tuple[list[Any], bytes | None]:
        """The named databases and the format marker (an owner creates them if new)."""
        if self._client:
            # Database handles opened in a read transaction die with it: use a
            # (write) transaction that commits, though a client changes nothing.
            with env.begin(write=True) as txn:
                dbs = [env.open_db(name, txn=txn, create=False) for name in _DB_NAMES]
                return dbs, txn.get(_FORMAT_KEY, db=dbs[3])
        with env.begin(write=True) as txn:
            dbs = [env.open_db(name, txn=txn) for name in _DB_NAMES]
            marker = txn.get(_FORMAT_KEY, db=dbs[3])
            if marker is None:
                if txn.stat(dbs[0])["entries"] or txn.stat(dbs[1])["entries"]:
                    raise LogError(f"data dir {self._path!r}: records but no format marker")
                txn.put(_FORMAT_KEY, _FORMAT, db=dbs[3])
                txn.put(_NEXT_ID_KEY, _ID.pack(1), db=dbs[3])
                marker = _FORMAT
            self._sync_secondary_index(txn, dbs)
        return dbs, marker

    def _check_file_size(self, env: lmdb.Environment) -> None:
        """Refuse a data.mdb cut short (a partial copy or restore), by name.

        LMDB reads pages through the memory map: touching one past the end of a truncated
        file kills the process with SIGBUS, which no caller could catch or report. An
        intact file may end before the last page number too (LMDB does not write pages
        freed in the transaction that allocated them), so when it is short, the trees
        are walked (with pread, never the map) for a page in use past the end; only
        that is refused. The file only grows while the log is open, so its size taken
        after the meta page is read is never too small for the pages that meta uses.
        """
        psize: int = env.stat()["psize"]
        last_pgno: int = env.info()["last_pgno"]
        size = os.path.getsize(self._data_file)
        if size >= (last_pgno + 1) * psize:
            return
        beyond = _page_beyond_end(self._data_file, psize, last_pgno, size)
        if beyond is not None:
            raise LogError(
                f"data dir {self._path!r}: data.mdb is {size} bytes, but page {beyond} "
                f"(at byte {beyond * psize}) is in use: the file was truncated (a partial "
                f"copy or restore?) and cannot be read safely; restore the data dir from a "
                f"backup"
            )

    def _sync_secondary_index(self, txn: lmdb.Transaction, dbs: list[Any]) -> None:
        """Rebuild ``by_meta`` if the set of indexed meta keys changed since last open."""
        wanted = cbor2.dumps(list(self._indexed))
        if txn.get(b"indexed", db=dbs[3]) == wanted:
            return
        txn.drop(dbs[2], delete=False)
        for name_key, raw in txn.cursor(db=dbs[1]):
            meta = _decode_entry(_stream_name(name_key), raw)[4]
            for field in self._indexed:
                if field in meta:
                    key = _index_prefix(field, meta_value_key(meta[field])) + name_key
                    txn.put(key, b"", db=dbs[2])
        txn.put(b"indexed", wanted, db=dbs[3])

    async def __aenter__(self) -> LmdbLog:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Commit what is queued, stop the threads, close LMDB and release the dir.

        Later calls raise ``LogClosedError``; tasks in ``wait_for_append`` get it too.
        Calling ``aclose`` again does nothing more: a call made while another task is
        still closing returns once that close is done, so whoever returns from
        ``aclose`` may reopen the dir at once. Closing completes even when the caller
        is cancelled (the usual case when ``async with`` is left by a timeout): the
        cancellation is raised once the dir is released.
        """
        if self._closing:
            if not self._released_event.is_set():
                # Any loop's task may be the second closer: wait in a worker thread.
                await anyio.to_thread.run_sync(self._released_event.wait, abandon_on_cancel=True)
            return
        self._closing = True
        # Shielded: given up half way, LMDB would stay open and the flock held, so the
        # dir could not be opened again by this process or any other.
        with anyio.CancelScope(shield=True):
            try:
                await self._close()
            finally:
                self._released_event.set()
        await _checkpoint_if_cancelled()

    async def _close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await anyio.to_thread.run_sync(self._writer.join)
        self._poll_stop.set()
        poller = self._poller
        if poller is not None:
            await anyio.to_thread.run_sync(poller.join)
        waiters = self._waiters.pop_all()
        wake((c, self._closed_error("closed while waiting for an append")) for c in waiters)
        self._guard.acquire_exclusive()
        try:
            self._closed = True
            self._env.close()
        finally:
            self._guard.release_exclusive()
            self._release_owner_lock()

    def _closed_error(self, what: str = "used after aclose()") -> LogClosedError:
        return LogClosedError(f"log at {self._path!r}: {what}; open it again to continue")

    # -- properties --------------------------------------------------------------------

    @property
    def is_owner(self) -> bool:
        """True if this process owns the dir; False when opened with ``client=True``."""
        return not self._client

    @property
    def path(self) -> str:
        """The data dir."""
        return self._path

    @property
    def durability(self) -> Durability:
        """``"fsync"`` or ``"process"``."""
        return self._durability

    @property
    def types(self) -> RecordTypes:
        """The record types this log reads and accepts (its own copy; register more here)."""
        return self._types

    # -- writing -----------------------------------------------------------------------

    async def append(
        self,
        stream: str,
        records: Sequence[NewRecord],
        expect: int | None,
        meta: Mapping[str, Any] | None = None,
    ) -> int:
        """Append ``records`` atomically; see :meth:`perdure.log.EventLog.append`.

        Cancellation: an append cancelled before the writer thread took it writes
        nothing; once taken it is committed (or fails) whatever happens to the caller,
        who then learns the outcome from ``last_seq``.
        """
        if self._closing:
            raise self._closed_error()
        stream_key = check_stream_name(stream)
        if self._client and not stream.startswith(SIGNAL_STREAM_PREFIX):
            raise ClientWriteError(stream)
        if expect is not None and (type(expect) is not int or expect < 0):
            check_expect(stream, expect)
        timestamp = _time()
        values = encode_records(self._known, stream, records, timestamp)
        new_meta = normalize_meta(stream, meta) if meta else None
        # An append made in an already-cancelled scope must not reach the writer.
        await _checkpoint_if_cancelled()
        completion = Completion()
        pending = _Pending(
            _APPEND, stream, stream_key, values, expect, new_meta, timestamp, completion
        )
        # (The wait is here, not in a helper coroutine: a fleet has one append in flight
        # per execution, and each frame fewer is less for the garbage collector to scan.)
        self._submit(pending)
        try:
            return await completion.wait()  # type: ignore[no-any-return]
        except BaseException:
            self._withdraw(pending)
            raise

    async def set_meta(self, stream: str, meta: Mapping[str, Any]) -> None:
        """Shallow-merge ``meta`` into an existing stream's index entry (owner only)."""
        if self._closing:
            raise self._closed_error()
        stream_key = check_stream_name(stream)
        if self._client:
            raise ClientWriteError(stream)
        new_meta = normalize_meta(stream, meta)
        await _checkpoint_if_cancelled()
        completion = Completion()
        pending = _Pending(_SET_META, stream, stream_key, [], None, new_meta, _time(), completion)
        await self._submit_and_wait(pending)

    async def delete_streams(self, streams: Sequence[str]) -> int:
        """Delete ``streams`` atomically; see :meth:`perdure.log.EventLog.delete_streams`.

        Owner only (a client gets ``ClientWriteError``). The delete is queued to the
        writer thread like an append and applied alone in one write transaction, so it
        is ordered with the appends queued before and after it, and its records, index
        entries and ``by_meta`` keys go together or not at all. Returns once durable.
        Tasks of this process waiting on a deleted stream are woken with 0; a client
        process's waiters are not (its poller sees no append) and keep waiting until
        their timeout or an append past their ``after``. Stream ids are never reused,
        so a stream appended again afresh shares nothing with its past. LMDB puts the
        freed pages on its free list and reuses them for later writes: ``data.mdb``
        does not shrink (copy it with compaction, ``mdb_copy -c``, to give space back).
        """
        if self._closing:
            raise self._closed_error()
        names = check_stream_names(streams)
        if self._client:
            raise ClientWriteError(next(iter(names), "(none)"))
        if not names:
            return 0
        await _checkpoint_if_cancelled()
        completion = Completion()
        first = next(iter(names))
        pending = _Pending(
            _DELETE, first, names[first], list(names.values()), None, None, _time(), completion
        )
        return await self._submit_and_wait(pending)  # type: ignore[no-any-return]

    async def trim(self, stream: str, through: int) -> int:
        """Delete ``stream``'s records up to ``through``; see :meth:`perdure.log.EventLog.trim`.

        Owner only (a client gets ``ClientWriteError``). Like a delete, the trim is
        queued to the writer thread and applied alone in one write transaction, after
        the writes queued before it: its records and the stream's trim mark (how far it
        was trimmed, in the ``meta`` database) change together or not at all. Returns
        once durable. The index entry is left as it is, so the writer's cached entries
        stay valid. Freed pages are reused by LMDB, as for a delete.
        """
        if self._closing:
            raise self._closed_error()
        stream_key = check_stream_name(stream)
        if self._client:
            raise ClientWriteError(stream)
        check_through(stream, through)
        await _checkpoint_if_cancelled()
        completion = Completion()
        pending = _Pending(_TRIM, stream, stream_key, [], through, None, _time(), completion)
        return await self._submit_and_wait(pending)  # type: ignore[no-any-return]

    async def _submit_and_wait(self, pending: _Pending) -> Any:
        """Queue ``pending`` to the writer and wait for its outcome (withdrawn if the
        wait is cancelled before the writer took it). append() has this inline."""
        self._submit(pending)
        try:
            return await pending.completion.wait()
        except BaseException:
            self._withdraw(pending)
            raise

    def _submit(self, pending: _Pending) -> None:
        # The writer is not told about this append at once: a callback scheduled on
        # the caller's loop tells it once the tasks that are ready now have run (a kick).
        # So a burst of appends from many tasks becomes one batch, and the writer does
        # its work while the loop waits instead of fighting it for the GIL (py-lmdb
        # drops the GIL around every put; taking it back from a busy loop thread costs
        # up to the 5 ms switch interval).
        cond = self._cond
        completion = pending.completion
        loop_key = id(completion.loop)
        with cond:
            if self._stopping:
                raise self._closed_error()
            self._queue.append(pending)
            self._enqueued += 1
            kick = loop_key not in self._kicks
            if kick:
                self._kicks.add(loop_key)
        if kick:
            completion.call_soon(self._kick, loop_key)

    def _withdraw(self, pending: _Pending) -> None:
        """The caller of a queued write was cancelled: take it back if not yet taken."""
        if pending.state == _QUEUED:
            with self._cond:
                if pending.state == _QUEUED:
                    pending.state = _WITHDRAWN

    def _kick(self, loop_key: int) -> None:
        """Release every append queued so far to the writer (runs on a caller's loop)."""
        with self._cond:
            self._kicks.discard(loop_key)
            self._released = self._enqueued
            if self._writer_idle:
                self._cond.notify()

    # -- the writer thread ---------------------------------------------------------------

    def _writer_main(self) -> None:
        cond = self._cond
        queue = self._queue
        while True:
            with cond:
                while not (queue and (self._taken < self._released or self._stopping)):
                    if self._stopping and not queue:
                        return  # everything queued is done
                    self._writer_idle = True
                    # Appends wait for their loop's kick. If none comes within
                    # RELEASE_TIMEOUT (its loop was closed with the kick pending, or is
                    # blocked), release everything queued and forget the kicks expected.
                    # (So an idle writer wakes ten times a second; that costs nothing.)
                    timed_out = not cond.wait(RELEASE_TIMEOUT)
                    if timed_out and queue and self._taken >= self._released:
                        self._released = self._enqueued
                        self._kicks.clear()
                self._writer_idle = False
                available = len(queue) if self._stopping else self._released - self._taken
                batch: list[_Pending] = []
                nbytes = 0
                while available and len(batch) < MAX_BATCH_APPENDS:
                    pending = queue[0]
                    if batch and nbytes + pending.nbytes > MAX_BATCH_BYTES:
                        break
                    # A delete (or a trim) takes a transaction of its own, after the
                    # writes queued before it: _apply keeps a batch's index entries in
                    # memory until the end, which a delete in the middle would have to
                    # see through.
                    alone = pending.kind >= _DELETE
                    if alone and batch:
                        break
                    queue.popleft()
                    available -= 1
                    self._taken += 1
                    if pending.state == _WITHDRAWN:
                        continue
                    pending.state = _TAKEN
                    batch.append(pending)
                    nbytes += pending.nbytes
                    if alone:
                        break
            if not batch:
                continue
            try:
                outcomes, touched = self._commit(batch, nbytes)
            except BaseException as exc:  # never let the writer die with callers waiting
                # _commit returns (never raises) once the transaction has committed, so
                # nothing of this batch is on disk.
                detail = f"{exc.__class__.__name__}: {exc}"
                outcomes = [
                    self._batch_error(pending, batch, f"failed before its commit ({detail})")
                    for pending in batch
                ]
                touched = []
            self._finish(batch, outcomes, touched)

    def _batch_error(self, pending: _Pending, batch: list[_Pending], what: str) -> LogError:
        """The error an uncommitted batch's write reports: its stream, its batch, what next."""
        return LogError(
            f"log at {self._path!r}: the write to stream {pending.stream!r} and the rest of "
            f"its batch ({_describe_batch(batch)}) {what}; nothing of the batch was written "
            f"— retry the write; if it keeps failing, check the disk holding the data dir "
            f"and run 'perdure health'"
        )

    def _finish(self, batch: list[_Pending], outcomes: list[Any], touched: list[Any]) -> None:
        items: list[tuple[Completion, Any]] = [
            (pending.completion, outcome) for pending, outcome in zip(batch, outcomes, strict=True)
        ]
        if batch[0].kind == _DELETE and type(outcomes[0]) is int and self._waiters:
            # The streams they waited on are gone: wake them with the last seq now, 0.
            # (Not those waiting for a stream that did not exist: nothing changed.)
            for name in (batch[0].meta or {}).get("deleted", ()):
                items += ((c, 0) for c in self._waiters.pop_stream(name))
        if touched and self._waiters:
            try:
                items += self._waiters.due(touched)
            except Exception:
                # The batch's own callers must be woken whatever happens to the waiters
                # (whom the poller still finds).
                logger.exception("log at %r: waking the waiters of a commit failed", self._path)
        try:
            wake(items, self._count_wakes)
        except Exception:
            # Never leave a batch's callers waiting forever: wake them one by one.
            logger.exception("log at %r: waking the callers of a commit failed", self._path)
            for completion, outcome in items:
                try:
                    completion.schedule(completion.resolve, outcome)
                except Exception:
                    pass  # its loop is gone, and its task with it

    def _count_wakes(self, callbacks: int) -> None:
        self._counters["wake_callbacks"] += callbacks

    def _commit(
        self, batch: list[_Pending], nbytes: int
    ) -> tuple[list[Any], list[tuple[str, int]]]:
        """Apply ``batch`` in one write transaction, growing the map as needed."""
        probed = False
        exact = False
        readers_checked = False
        while True:
            guard = self._guard
            guard.acquire_shared()
            txn = None
            try:
                txn = self._env.begin(write=True)
                txnid = txn.id()
                if txnid != self._entries_txnid + 1:
                    # Another process committed since our last transaction: the cached
                    # index entries may be stale.
                    self._drop_entries()
                if batch[0].kind == _DELETE:
                    outcomes, states = [self._apply_delete(txn, batch[0])], {}
                elif batch[0].kind == _TRIM:
                    outcomes, states = [self._apply_trim(txn, batch[0])], {}
                else:
                    outcomes, states = self._apply(
                        txn, batch, self._entries, self._entries_old, exact
                    )
                txn.commit()
                txn = None
            except _Inconsistent:
                # A record already sits where an append would write: redo the batch one
                # put at a time, which finds the append, undoes it and names the record.
                exact = True
                failure = "retry"
            except lmdb.MapFullError:
                failure = "map_full"
            except lmdb.MapResizedError:
                failure = "resized"
            except lmdb.Error as exc:
                failure = f"{exc}"
            else:
                failure = ""
            finally:
                if txn is not None:
                    try:
                        txn.abort()
                    except lmdb.Error:
                        pass  # a failed commit already ended the transaction
                guard.release_shared()
            if not failure:
                break
            if failure == "retry":
                continue
            if failure == "map_full":
                if not readers_checked:
                    # A process that died inside a read transaction pins the pages
                    # freed since, so the map fills though little is live: free its
                    # slot and try again before growing the map.
                    readers_checked = True
                    if self._clear_stale_readers():
                        continue
                reason = self._grow_map()
                if reason is not None:
                    return [StorageFullError(self._path, reason) for _ in batch], []
            elif failure == "resized":
                self._adopt_map_size()
            else:
                # LMDB reports a short write as EIO, so ask the filesystem itself whether
                # the data file can grow by this batch.
                reason = self._probe_space(nbytes)
                if reason is not None:
                    return [StorageFullError(self._path, reason) for _ in batch], []
                if probed:
                    return [
                        self._batch_error(pending, batch, f"failed to commit ({failure})")
                        for pending in batch
                    ], []
                probed = True  # the probe reserved the space: try once more

        # The batch is on disk: from here on its callers get their committed outcomes,
        # whatever goes wrong in the bookkeeping.
        touched: list[tuple[str, int]] = []
        try:
            touched = [(name, state.last_seq) for name, state in states.items() if state.dirty]
            self._after_commit(batch, nbytes, outcomes, states, txnid)
        except Exception:
            # The cache may be half updated: drop it, so the next batch reads the
            # index entries from the store. Waiters left unwoken (if touched is
            # empty) are found by the poller, which sees every commit.
            self._drop_entries()
            self._entries_txnid = -1
            logger.exception(
                "log at %r: a batch of %s was committed, but updating the writer's state "
                "afterwards failed; its callers get their outcomes",
                self._path,
                _describe_batch(batch),
            )
        return outcomes, touched

    def _drop_entries(self) -> None:
        """Forget every cached index entry (both generations): they may be stale."""
        self._entries = {}
        self._entries_old = {}
        self._entries_commits = 0

    def _after_commit(
        self,
        batch: list[_Pending],
        nbytes: int,
        outcomes: list[Any],
        states: dict[str, _StreamState],
        txnid: int,
    ) -> None:
        """Cache the committed index entries and count the batch."""
        self._entries_commits += 1
        if (
            self._entries_commits > _CACHE_GENERATION
            or len(self._entries) + len(states) > _MAX_CACHED_ENTRIES
        ):
            self._entries_old = self._entries
            self._entries = {}
            self._entries_commits = 1
        cache = self._entries
        # A transaction that changed nothing (a batch of conflicts, say) leaves no trace:
        # LMDB does not use up its id, so the next write transaction, ours or another
        # process's, gets the same one. The cache then holds the store as of the id
        # before; keyed to this one, a commit by another process in between would go
        # unnoticed, and a stale entry would be written back over its appends.
        wrote = any(state.dirty for state in states.values())
        if batch[0].kind == _DELETE:
            # Never let a cached entry bring a deleted stream back: the next append to
            # it must find no entry and start the stream afresh.
            wrote = type(outcomes[0]) is int and outcomes[0] > 0
            for name_key in batch[0].values:
                name = name_key.decode("utf-8")
                self._entries.pop(name, None)
                self._entries_old.pop(name, None)
        elif batch[0].kind == _TRIM:
            wrote = type(outcomes[0]) is int and outcomes[0] > 0
        self._entries_txnid = txnid if wrote else txnid - 1
        for name, state in states.items():
            cache[name] = state.entry()
        counters = self._counters
        counters["commits"] += 1
        counters["largest_batch"] = max(counters["largest_batch"], len(batch))
        counters["largest_batch_bytes"] = max(counters["largest_batch_bytes"], nbytes)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.kind == _DELETE:
                if type(outcome) is int:
                    counters["streams_deleted"] += outcome
            elif pending.kind == _TRIM:
                if type(outcome) is int:
                    counters["records_trimmed"] += outcome
            elif type(outcome) is int:
                counters["appends"] += 1
                counters["records_appended"] += len(pending.values)
            elif isinstance(outcome, ConflictError):
                counters["conflicts"] += 1

    def _apply(
        self,
        txn: lmdb.Transaction,
        batch: list[_Pending],
        cache: dict[str, _Entry],
        older: dict[str, _Entry],
        exact: bool = False,
    ) -> tuple[list[Any], dict[str, _StreamState]]:
        """Apply every pending write of the batch in ``txn``; return their outcomes.

        Runs again from scratch when a batch is retried (after growing the map), so
        expects are checked against what is committed, never against a failed attempt.
        ``cache`` and ``older`` (the generation before; ``cache`` wins) hold committed
        index entries; they are only read here.

        Records are written with one ``putmulti`` for the whole batch: py-lmdb drops and
        retakes the GIL around every call, and each retake competes with a busy event
        loop. If any record would overwrite an existing one (an inconsistent store),
        ``_Inconsistent`` is raised and the batch is redone with ``exact=True``, one put
        at a time, which pins the fault on its append alone.
        """
        records_db = self._records
        streams_db = self._streams
        get = txn.get
        put = txn.put
        states: dict[str, _StreamState] = {}
        outcomes: list[Any] = []
        items: list[tuple[bytes, bytes]] = []
        next_id: int | None = None
        first_new_id = 0
        for pending in batch:
            stream = pending.stream
            state = states.get(stream)
            if state is None:
                entry = cache.get(stream)
                if entry is None:
                    entry = older.get(stream)
                if entry is None:
                    raw = get(pending.stream_key, db=streams_db)
                    if raw is not None:
                        try:
                            entry = _decode_entry(stream, raw)  # type: ignore[assignment]
                        except CorruptRecordError as exc:
                            outcomes.append(exc)  # fails this stream's writes, not the batch
                            continue
                if entry is not None:
                    state = _StreamState(stream, pending.stream_key, *entry)
                    states[stream] = state
            current = state.last_seq if state is not None else 0
            if pending.kind == _SET_META:
                if state is None:
                    outcomes.append(
                        LogError(
                            f"stream {stream!r} does not exist, so it has no metadata to "
                            f"update; append to it first (append(..., meta=...) sets meta "
                            f"on creation)"
                        )
                    )
                    continue
                state.meta = {**state.meta, **pending.meta}  # type: ignore[dict-item]
                state.updated_at = pending.timestamp
                state.dirty = True
                outcomes.append(current)
                continue
            expect = pending.expect
            if expect is not None and expect != current:
                outcomes.append(ConflictError(stream, expect, current))
                continue
            if state is None:
                if next_id is None:
                    next_id = first_new_id = _ID.unpack(get(_NEXT_ID_KEY, db=self._meta))[0]
                if next_id > _MAX_STREAM_ID:
                    outcomes.append(LogError(f"stream {stream!r}: out of stream ids"))
                    continue
                ts = pending.timestamp
                state = _StreamState(stream, pending.stream_key, next_id, 0, ts, ts, _NO_META)
                states[stream] = state
                next_id += 1
            prefix = state.id_prefix
            seq = current
            refused = None
            if not exact:
                for value in pending.values:
                    seq += 1
                    items.append((prefix + _pack_seq(seq), value))
            else:
                for value in pending.values:
                    seq += 1
                    if not put(prefix + _pack_seq(seq), value, db=records_db, overwrite=False):
                        refused = seq
                        break
            if refused is not None:
                # A record already sits where the index says the stream ends: the store
                # is inconsistent. Never overwrite; undo this append's puts.
                for undo in range(current + 1, refused):
                    txn.delete(prefix + _pack_seq(undo), db=records_db)
                outcomes.append(
                    CorruptRecordError(
                        stream,
                        refused,
                        f"a record already exists at this seq although the stream index "
                        f"ends at {current}; refusing to overwrite it",
                    )
                )
                continue
            state.last_seq = seq
            state.updated_at = pending.timestamp
            if pending.meta:
                state.meta = {**state.meta, **pending.meta}
            state.dirty = True
            outcomes.append(seq)

        if items:
            _, added = txn.cursor(db=records_db).putmulti(items, overwrite=False)
            if added != len(items):
                raise _Inconsistent
        by_meta = self._by_meta
        entries = [(s.name_key, s.encoded()) for s in states.values() if s.dirty]
        if entries:
            txn.cursor(db=streams_db).putmulti(entries)
        for state in states.values():
            if not state.dirty:
                continue
            if state.meta is state.old_meta:
                continue
            for field in self._indexed:
                old = state.old_meta.get(field, _MISSING)
                new = state.meta.get(field, _MISSING)
                old_key = None if old is _MISSING else meta_value_key(old)
                new_key = None if new is _MISSING else meta_value_key(new)
                if old_key == new_key:
                    continue
                if old_key is not None:
                    txn.delete(_index_prefix(field, old_key) + state.name_key, db=by_meta)
                if new_key is not None:
                    put(_index_prefix(field, new_key) + state.name_key, b"", db=by_meta)
        if next_id is not None and next_id != first_new_id:
            put(_NEXT_ID_KEY, _ID.pack(next_id), db=self._meta)
        return outcomes, states

    def _apply_delete(self, txn: lmdb.Transaction, pending: _Pending) -> int | LogError:
        """Delete the streams ``pending`` names in ``txn``; return how many existed.

        Every entry is read and decoded before anything is deleted: a corrupt one fails
        the whole delete (returned, not raised) with nothing changed, since without its
        stream id its records cannot be found.
        """
        streams_db = self._streams
        found: list[tuple[bytes, int, dict[str, Any]]] = []
        for name_key in pending.values:
            raw = txn.get(name_key, db=streams_db)
            if raw is None:
                continue
            try:
                sid, _, _, _, meta = _decode_entry(name_key.decode("utf-8"), raw)
            except CorruptRecordError as exc:
                return exc
            found.append((name_key, sid, meta))
        records_db = self._records
        by_meta = self._by_meta
        for name_key, sid, meta in found:
            _delete_records(txn.cursor(db=records_db), sid, 0, None)
            for field in self._indexed:
                if field in meta:
                    key = _index_prefix(field, meta_value_key(meta[field])) + name_key
                    txn.delete(key, db=by_meta)
            txn.delete(_TRIM_PREFIX + name_key, db=self._meta)
            txn.delete(name_key, db=streams_db)
        pending.meta = {"deleted": [name_key.decode("utf-8") for name_key, _, _ in found]}
        return len(found)

    def _apply_trim(self, txn: lmdb.Transaction, pending: _Pending) -> int | LogError:
        """Trim ``pending.stream`` through ``pending.expect`` in ``txn``; how many went.

        Errors are returned, not raised, with nothing changed: a trim past the last
        seq, or a corrupt entry or trim mark (without them the records to delete, or
        the ones already gone, are unknown).
        """
        stream = pending.stream
        name_key = pending.stream_key
        through = pending.expect
        assert through is not None
        raw = txn.get(name_key, db=self._streams)
        try:
            sid, last_seq = _decode_entry(stream, raw)[:2] if raw is not None else (0, 0)
            trimmed = _decode_trim(stream, txn.get(_TRIM_PREFIX + name_key, db=self._meta))
        except CorruptRecordError as exc:
            return exc
        if through > last_seq:
            return trim_beyond_error(stream, through, last_seq)
        if through <= trimmed:
            return 0
        _delete_records(txn.cursor(db=self._records), sid, trimmed + 1, through)
        txn.put(_TRIM_PREFIX + name_key, seal([through]), db=self._meta)
        return through - trimmed

    def _clear_stale_readers(self) -> int:
        """Free the reader slots of dead processes; return how many were freed."""
        self._guard.acquire_shared()
        try:
            cleared: int = self._env.reader_check()
        finally:
            self._guard.release_shared()
        if cleared:
            self._counters["stale_readers_cleared"] += cleared
        return cleared

    def _grow_map(self) -> str | None:
        """Double the map, bounded by the free disk; return why not, or None if grown."""
        self._guard.acquire_shared()
        try:
            current = self._env.info()["map_size"]
        finally:
            self._guard.release_shared()
        free = shutil.disk_usage(self._path).free
        ceiling = os.path.getsize(self._data_file) + free
        target = min(current * 2, ceiling // _PAGE * _PAGE)
        if target <= current:
            return f"the map is full at {current} bytes and the disk has {free} bytes free"
        self._guard.acquire_exclusive()
        try:
            self._env.set_mapsize(target)
        finally:
            self._guard.release_exclusive()
        self._counters["map_growths"] += 1
        return None

    def _adopt_map_size(self) -> None:
        """Take up the map size another process grew the environment to."""
        self._guard.acquire_exclusive()
        try:
            self._env.set_mapsize(0)
        finally:
            self._guard.release_exclusive()

    def _probe_space(self, nbytes: int) -> str | None:
        """Ask the filesystem whether data.mdb can grow by a batch; return why not."""
        try:
            fd = os.open(self._data_file, os.O_RDWR | os.O_CLOEXEC)
            try:
                # Reserves blocks past the end; harmless, LMDB fills them as it grows.
                os.posix_fallocate(fd, os.fstat(fd).st_size, max(2 * nbytes, 1 << 20))
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in _STORAGE_ERRNOS:
                return os.strerror(exc.errno)
        return None

    # -- reading -------------------------------------------------------------------------

    def _begin_read(self) -> lmdb.Transaction:
        """Begin a read transaction holding the shared map guard (release both after)."""
        guard = self._guard
        while True:
            guard.acquire_shared()
            if self._closed:
                guard.release_shared()
                raise self._closed_error()
            try:
                return self._env.begin()
            except lmdb.MapResizedError:
                guard.release_shared()
                self._adopt_map_size()
            except BaseException:
                guard.release_shared()
                raise

    def _end_read(self, txn: lmdb.Transaction) -> None:
        txn.abort()
        self._guard.release_shared()

    # Reads run on the event loop thread. Reading a chunk of READ_CHUNK records from
    # the map costs about 0.3 us a record (under 0.1 ms a chunk); a hop to a worker
    # thread and back costs more than that per chunk: bench/log_bench.py measured replay
    # through anyio.to_thread between as fast and 35% slower than on the loop thread
    # (never faster) across our runs. Decoding
    # (cbor2, the CRC) stays on the loop thread either way: under the GIL a worker
    # thread would not make it cheaper. Each chunk has its own short read transaction,
    # so a long replay neither pins old pages nor blocks map growth for long.

    async def read(self, stream: str, after: int = 0) -> AsyncIterator[Record]:
        """Yield records with seq > ``after`` in order, yielding to the loop between chunks."""
        async for chunk in self.read_chunks(stream, after):
            for record in chunk:
                yield record

    async def read_chunks(self, stream: str, after: int = 0) -> AsyncIterator[list[Record]]:
        """Like :meth:`read`, a list of records at a time (cheaper per record)."""
        stream_key = check_stream_name(stream)
        check_after(stream, after)
        known = self._known
        seq = after
        while True:
            values = self._read_chunk(stream, stream_key, seq)
            for start in range(0, len(values), DECODE_CHUNK):
                records, error = decode_all(
                    known, stream, seq + 1 + start, values[start : start + DECODE_CHUNK]
                )
                if records:
                    yield records
                if error is not None:
                    raise error
            if len(values) < READ_CHUNK:
                return
            seq += len(values)
            await _checkpoint()

    def _read_chunk(self, stream: str, stream_key: bytes, after: int) -> list[bytes]:
        txn = self._begin_read()
        try:
            raw = txn.get(stream_key, db=self._streams)
            if raw is None:
                return []
            sid, last_seq = _decode_entry(stream, raw)[:2]
            count = min(READ_CHUNK, last_seq - after)
            if count <= 0:
                return []
            first_key = _RECORD_KEY.pack(sid, after + 1)
            last_key = _RECORD_KEY.pack(sid, after + count)
            cursor = txn.cursor(db=self._records)
            if not cursor.set_range(first_key) or cursor.key() != first_key:
                # Looked up only now: a read of kept records pays nothing for trims.
                trimmed = _decode_trim(stream, txn.get(_TRIM_PREFIX + stream_key, db=self._meta))
                if after < trimmed:
                    raise TrimmedError(stream, after, trimmed + 1)
                raise CorruptRecordError(
                    stream, after + 1, f"record missing (the stream index says it has {last_seq})"
                )
            values = list(islice(cursor.iternext(keys=False, values=True), count))
            # Keys are unique and ordered: `count` values running from first_key to
            # last_key are exactly the contiguous seqs after+1 .. after+count.
            if len(values) != count or cursor.key() != last_key:
                self._raise_gap(stream, txn, sid, after, count, last_seq)
            return values
        finally:
            self._end_read(txn)

    def _raise_gap(
        self, stream: str, txn: lmdb.Transaction, sid: int, after: int, count: int, last: int
    ) -> None:
        cursor = txn.cursor(db=self._records)
        for seq in range(after + 1, after + count + 1):
            if not cursor.set_key(_RECORD_KEY.pack(sid, seq)):
                raise CorruptRecordError(
                    stream, seq, f"record missing (the stream index says it has {last})"
                )
        raise CorruptRecordError(stream, after + 1, "records out of order")  # unreachable

    async def last_seq(self, stream: str) -> int:
        """The stream's last seq, 0 if it does not exist."""
        stream_key = check_stream_name(stream)
        return self._last_seq_now(stream, stream_key)

    def _last_seq_now(self, stream: str, stream_key: bytes) -> int:
        txn = self._begin_read()
        try:
            raw = txn.get(stream_key, db=self._streams)
        finally:
            self._end_read(txn)
        return 0 if raw is None else _decode_entry(stream, raw)[1]  # type: ignore[no-any-return]

    async def stream_info(self, stream: str) -> StreamInfo | None:
        """The stream's index entry, or None if it does not exist."""
        stream_key = check_stream_name(stream)
        txn = self._begin_read()
        try:
            raw = txn.get(stream_key, db=self._streams)
            mark = txn.get(_TRIM_PREFIX + stream_key, db=self._meta) if raw is not None else None
        finally:
            self._end_read(txn)
        return None if raw is None else _info(stream, raw, mark)

    async def streams(
        self, prefix: str = "", where: Mapping[str, Any] | None = None
    ) -> AsyncIterator[StreamInfo]:
        """Yield index entries by name prefix and ``where`` filter, in name order.

        A ``where`` on an indexed meta key walks the ``by_meta`` index instead of every
        stream.
        """
        if type(prefix) is not str:
            raise LogError(f"prefix must be a str, got {prefix!r}")
        conditions = where_conditions(where)
        driver = next((c for c in conditions if c[0] in self._indexed), None)
        scan_prefix = b"" if driver is None else _index_prefix(*driver)
        full_prefix = scan_prefix + prefix.encode("utf-8")
        position: bytes | None = full_prefix
        exclusive = False
        while position is not None:
            if exclusive:
                await _checkpoint()
            chunk, position = self._list_chunk(
                len(scan_prefix), full_prefix, position, exclusive, driver is not None
            )
            exclusive = True
            for name, raw, mark in chunk:
                info = _info(name, raw, mark)
                if meta_matches(info.meta, conditions):
                    yield info

    def _list_chunk(
        self, skip: int, full_prefix: bytes, start: bytes, exclusive: bool, by_index: bool
    ) -> tuple[list[tuple[str, bytes, bytes | None]], bytes | None]:
        """Up to READ_CHUNK (name, index entry, trim mark) with keys from ``start`` on.

        Returns them and the key to continue after, or None when the listing is done.
        """
        chunk: list[tuple[str, bytes, bytes | None]] = []
        streams_db = self._streams
        meta_db = self._meta
        txn = self._begin_read()
        try:
            cursor = txn.cursor(db=self._by_meta if by_index else streams_db)
            if not cursor.set_range(start):
                return chunk, None
            last = start
            for key, value in cursor.iternext(keys=True, values=True):
                if not key.startswith(full_prefix):
                    return chunk, None
                if exclusive and key == start:
                    continue
                if len(chunk) == READ_CHUNK:
                    return chunk, last
                name_key = key[skip:]
                raw = txn.get(name_key, db=streams_db) if by_index else value
                if raw is not None:
                    mark = txn.get(_TRIM_PREFIX + name_key, db=meta_db)
                    chunk.append((_stream_name(name_key), raw, mark))
                last = key
            return chunk, None
        finally:
            self._end_read(txn)

    # -- waiting for appends ---------------------------------------------------------------

    async def wait_for_append(self, stream: str, after: int, timeout: float | None = None) -> int:
        """Wait until ``stream``'s last seq exceeds ``after``; return it.

        Appends through this log wake the waiter at once; appends by another process
        are seen within about :data:`POLL_INTERVAL` seconds. On timeout, returns the
        last seq unchanged.
        """
        stream_key = check_stream_name(stream)
        check_after(stream, after)
        if self._closing:
            raise self._closed_error()
        # Register before looking, so a commit between the look and the wait still wakes.
        completion = self._waiters.add(stream, after)
        try:
            self._ensure_poller()
            current = self._last_seq_now(stream, stream_key)
            if current > after:
                return current
            with anyio.move_on_after(timeout):
                return await completion.wait()  # type: ignore[no-any-return]
            return self._last_seq_now(stream, stream_key)
        finally:
            self._waiters.remove(stream, completion)

    def _ensure_poller(self) -> None:
        with self._cond:
            if self._poller is not None and self._poller.is_alive():
                return
            self._poller = threading.Thread(
                target=self._poll_main, name=f"perdure-log-poller {self._path}", daemon=True
            )
            self._poller.start()

    def _poll_main(self) -> None:
        """While anyone waits, wake them for commits made by other processes."""
        seen_txnid = -1
        failure = ""
        while not self._poll_stop.wait(POLL_INTERVAL):
            with self._cond:
                if not self._waiters:
                    self._poller = None
                    return
            try:
                seen_txnid = self._poll_once(seen_txnid)
            except LogClosedError:
                return
            except Exception as exc:
                # Dying would leave every waiter of other processes' appends asleep:
                # say what went wrong (once while it keeps going wrong) and poll on.
                if repr(exc) != failure:
                    logger.exception(
                        "log at %r: polling for other processes' appends failed; still "
                        "polling (waiters may wake late)",
                        self._path,
                    )
                failure = repr(exc)
            else:
                failure = ""

    def _poll_once(self, seen_txnid: int) -> int:
        """Wake the waiters whose streams moved since ``seen_txnid``; return the new txnid.

        A stream whose index entry is corrupt fails its own waiters with
        ``CorruptRecordError``; the other streams are woken as usual.
        """
        streams = self._waiters.streams()
        txn = self._begin_read()
        try:
            txnid: int = txn.id()
            if txnid == seen_txnid:
                return txnid
            last_seqs: list[tuple[str, int]] = []
            corrupt: list[CorruptRecordError] = []
            for stream in streams:
                raw = txn.get(stream.encode("utf-8"), db=self._streams)
                if raw is None:
                    continue
                try:
                    last_seqs.append((stream, _decode_entry(stream, raw)[1]))
                except CorruptRecordError as exc:
                    corrupt.append(exc)
        finally:
            self._end_read(txn)
        due = self._waiters.due(last_seqs)
        for exc in corrupt:
            # One instance per waiter: each task raises (and annotates) its own.
            due += (
                (completion, CorruptRecordError(exc.stream, exc.seq, exc.detail))
                for completion in self._waiters.pop_stream(exc.stream)
            )
        if due:
            # Its own counter: the writer thread updates the others.
            self._counters["poll_wake_callbacks"] += wake(due)
        return txnid

    # -- health ------------------------------------------------------------------------------

    async def check(self) -> list[Fault]:
        """Full scan (in a worker thread, in short read transactions): see the protocol.

        Safe while the log is in use, here or by another process: the scan reads
        :data:`CHECK_CHUNK` keys per read transaction, so it never holds up a map growth
        (nor the reads queued behind one) for longer than a chunk, and a commit between
        chunks is never reported as a fault. Streams created while the scan runs may go
        unchecked; the next scan covers them.
        """
        if self._closed:
            raise self._closed_error()
        return await anyio.to_thread.run_sync(self._check_sync)

    # The store may change between two chunks of a scan, but only in these ways:
    # records are added past a stream's last seq (never rewritten), index entries are
    # rewritten in place, new streams take ids from next_stream_id upward, secondary
    # index keys move with meta, delete_streams removes a stream's entry, records
    # and keys in one transaction (its id is never used again), and trim removes a
    # stream's first records and raises its trim mark in one transaction. So a record
    # past the index's last seq, or of an unknown stream id, is checked again against
    # the transaction that found it before it is called a fault; seq gaps are tracked
    # across chunks, as each stream's records are only ever added at its end (and
    # taken from its front); and missing records are looked up again (the stream's id
    # and trim mark) before they are called a gap, since the stream may have been
    # deleted or trimmed after the index was read.

    def _check_sync(self) -> list[Fault]:
        faults: list[Fault] = []
        next_id_before = self._read_next_id()
        by_id = self._check_index(faults)
        next_id = self._read_next_id()
        if next_id is None or next_id_before is None:
            # A health scan reports this, and scans on as if the value were right.
            faults.append(Fault(None, None, "index", "the next stream id is missing or malformed"))
            next_id = next_id_before = max(by_id, default=0) + 1
        elif by_id and max(by_id) >= next_id:
            faults.append(Fault(None, None, "index", f"next stream id {next_id} is in use"))
        self._check_records(faults, by_id, next_id_before)
        self._check_secondary(faults)
        self._check_trim_marks(faults)
        return faults

    def _read_next_id(self) -> int | None:
        """The next stream id, or None if the stored value is missing or malformed."""
        txn = self._begin_read()
        try:
            raw = txn.get(_NEXT_ID_KEY, db=self._meta)
        finally:
            self._end_read(txn)
        if raw is None or len(raw) != _ID.size:
            return None
        return _ID.unpack(raw)[0]  # type: ignore[no-any-return]

    def _scan(self, db: Any, visit: Callable[[lmdb.Transaction, bytes, bytes], None]) -> None:
        """``visit(txn, key, value)`` for every key of ``db`` in order, a chunk per txn."""
        after: bytes | None = None
        while True:
            txn = self._begin_read()
            try:
                cursor = txn.cursor(db=db)
                if after is None:
                    more = cursor.first()
                else:
                    more = cursor.set_range(after)
                    if more and cursor.key() == after:
                        more = cursor.next()
                for _ in range(CHECK_CHUNK):
                    if not more:
                        return
                    after = cursor.key()
                    visit(txn, after, cursor.value())
                    more = cursor.next()
                if not more:
                    return
            finally:
                self._end_read(txn)

    def _check_index(self, faults: list[Fault]) -> dict[int, list[Any]]:
        """Check every index entry (its secondary index keys and trim mark too); map
        id -> [name, last seq, last seq trimmed]."""
        by_id: dict[int, list[Any]] = {}
        by_meta = self._by_meta
        meta_db = self._meta
        indexed = self._indexed

        def visit(txn: lmdb.Transaction, name_key: bytes, raw: bytes) -> None:
            try:
                name = name_key.decode("utf-8")
            except UnicodeDecodeError:
                faults.append(Fault(None, None, "index", f"undecodable name {name_key!r}"))
                return
            try:
                sid, last_seq, _, _, meta = _decode_entry(name, raw)
            except CorruptRecordError as exc:
                faults.append(Fault(name, None, "index", f"its entry is corrupt ({exc.detail})"))
                return
            if sid in by_id:
                faults.append(
                    Fault(name, None, "index", f"stream id {sid} also used by {by_id[sid][0]!r}")
                )
            try:
                trimmed = _decode_trim(name, txn.get(_TRIM_PREFIX + name_key, db=meta_db))
            except CorruptRecordError as exc:
                faults.append(Fault(name, None, "index", exc.detail))
                trimmed = 0
            if trimmed > last_seq:
                faults.append(
                    Fault(
                        name,
                        None,
                        "index",
                        f"its trim mark says trimmed through seq {trimmed}, past its last "
                        f"seq {last_seq}",
                    )
                )
                trimmed = last_seq
            by_id[sid] = [name, last_seq, trimmed]
            # In the entry's own transaction: the entry and its keys change together.
            for field in indexed:
                if field in meta:
                    key = _index_prefix(field, meta_value_key(meta[field])) + name_key
                    if txn.get(key, db=by_meta) is None:
                        faults.append(
                            Fault(name, None, "index", f"meta {field!r} is missing from its index")
                        )

        self._scan(self._streams, visit)
        return by_id

    def _check_records(
        self, faults: list[Fault], by_id: dict[int, list[Any]], next_id_before: int
    ) -> None:
        """Check every record: checksum, decoding, seq order, and against the index."""
        known = self._known
        streams_db = self._streams
        meta_db = self._meta
        expected: dict[int, int] = {}
        orphans: dict[int, int] = {}

        def visit(txn: lmdb.Transaction, key: bytes, value: bytes) -> None:
            if len(key) != _RECORD_KEY.size:
                faults.append(Fault(None, None, "orphan", f"malformed record key {key!r}"))
                return
            sid, seq = _RECORD_KEY.unpack(key)
            owner = by_id.get(sid)
            if owner is None:
                orphans[sid] = orphans.get(sid, 0) + 1
                return
            name, last_seq, trimmed = owner
            want = expected.get(sid, trimmed + 1)
            if seq < want:
                faults.append(
                    Fault(name, seq, "index", f"record kept although trimmed through {trimmed}")
                )
            elif seq != want:
                # Trimmed since the index was read? Ask this transaction's trim mark.
                try:
                    mark = txn.get(_TRIM_PREFIX + name.encode("utf-8"), db=meta_db)
                    fresh = _decode_trim(name, mark)
                except CorruptRecordError:
                    fresh = trimmed  # reported by the index scan
                if fresh < seq - 1:
                    first = max(want, fresh + 1)
                    faults.append(Fault(name, first, "gap", f"records {first}..{seq - 1} missing"))
            expected[sid] = max(seq + 1, want)
            if seq > last_seq:
                # Appended since the index was read? Ask this transaction's index.
                fresh = _last_seq_in(txn, streams_db, name)
                if fresh is not None and fresh >= seq:
                    owner[1] = fresh
                else:
                    faults.append(
                        Fault(name, seq, "index", f"record beyond the index's last seq {last_seq}")
                    )
            fault = record_fault(known, name, seq, value)
            if fault is not None:
                faults.append(fault)

        self._scan(self._records, visit)
        # Ids from next_id_before on may belong to streams created during the scan.
        maybe_new = {sid for sid in orphans if sid >= next_id_before}
        if maybe_new:
            for sid in self._stream_ids_among(maybe_new):
                del orphans[sid]
        for sid, count in sorted(orphans.items()):
            detail = f"{count} records of unknown stream id {sid}"
            faults.append(Fault(None, None, "orphan", detail))
        for sid, (name, last_seq, trimmed) in by_id.items():
            have = expected.get(sid, trimmed + 1) - 1
            if have >= last_seq:
                continue
            sid_now, trimmed_now = self._stream_now(name)
            # Trimmed since: the records it removed are no gap.
            have = max(have, trimmed_now)
            if have < last_seq and sid_now == sid:
                faults.append(
                    Fault(
                        name,
                        have + 1,
                        "gap",
                        f"records {have + 1}..{last_seq} missing (index says {last_seq})",
                    )
                )

    def _stream_now(self, name: str) -> tuple[int | None, int]:
        """The stream's id and trim mark in a fresh read transaction; the id is None if
        the stream was deleted or its entry is unreadable, the mark 0 if unreadable."""
        name_key = name.encode("utf-8")
        txn = self._begin_read()
        try:
            raw = txn.get(name_key, db=self._streams)
            mark = txn.get(_TRIM_PREFIX + name_key, db=self._meta)
        finally:
            self._end_read(txn)
        if raw is None:
            return None, 0
        try:
            sid: int = _decode_entry(name, raw)[0]
        except CorruptRecordError:
            return None, 0
        try:
            return sid, _decode_trim(name, mark)
        except CorruptRecordError:
            return sid, 0

    def _stream_ids_among(self, sids: set[int]) -> set[int]:
        """Which of ``sids`` an index entry now names (another scan of the index)."""
        found: set[int] = set()

        def visit(txn: lmdb.Transaction, name_key: bytes, raw: bytes) -> None:
            try:
                sid = _decode_entry(name_key.decode("utf-8"), raw)[0]
            except (UnicodeDecodeError, CorruptRecordError):
                return  # already reported by the first scan
            if sid in sids:
                found.add(sid)

        self._scan(self._streams, visit)
        return found

    def _check_trim_marks(self, faults: list[Fault]) -> None:
        """Report trim marks of streams that do not exist (a delete removes both)."""
        streams_db = self._streams

        def visit(txn: lmdb.Transaction, key: bytes, _: bytes) -> None:
            if not key.startswith(_TRIM_PREFIX):
                return
            name_key = key[len(_TRIM_PREFIX) :]
            if txn.get(name_key, db=streams_db) is None:
                name = name_key.decode("utf-8", "backslashreplace")
                faults.append(Fault(name, None, "orphan", "a trim mark of a stream not indexed"))

        self._scan(self._meta, visit)

    def _check_secondary(self, faults: list[Fault]) -> None:
        """Report secondary index keys that no stream's meta accounts for."""
        streams_db = self._streams
        indexed = self._indexed

        def visit(txn: lmdb.Transaction, key: bytes, _: bytes) -> None:
            # key: len|field|len|value|stream name (see _index_prefix)
            name_key = b""
            try:
                field_end = 1 + key[0]
                field = key[1:field_end].decode("utf-8")
                name_key = key[field_end + 1 + key[field_end] :]
                name = name_key.decode("utf-8")
            except (IndexError, UnicodeDecodeError):
                field = name = ""
            raw = txn.get(name_key, db=streams_db) if field in indexed and name else None
            if raw is not None:
                try:
                    meta = _decode_entry(name, raw)[4]
                except CorruptRecordError:
                    meta = {}
                if field in meta:
                    wanted = _index_prefix(field, meta_value_key(meta[field])) + name_key
                    if key == wanted:
                        return
            faults.append(Fault(None, None, "index", f"stale secondary index entry {key!r}"))

        self._scan(self._by_meta, visit)

    async def stats(self) -> Mapping[str, Any]:
        """Streams, records, map usage and writer counters."""
        return await anyio.to_thread.run_sync(self._stats_sync)

    def _stats_sync(self) -> dict[str, Any]:
        txn = self._begin_read()
        try:
            info = self._env.info()
            streams = txn.stat(self._streams)["entries"]
            records = txn.stat(self._records)["entries"]
            page_size = self._env.stat()["psize"]
        finally:
            self._end_read(txn)
        used = (info["last_pgno"] + 1) * page_size
        return {
            "backend": "lmdb",
            "path": self._path,
            "durability": self._durability,
            "owner": not self._client,
            "streams": streams,
            "records": records,
            "map_size": info["map_size"],
            "map_used_bytes": used,
            "map_used_fraction": used / info["map_size"],
            "file_bytes": os.path.getsize(self._data_file),
            "last_txnid": info["last_txnid"],
            "waiters": len(self._waiters),
            **self._counters,
        }


# The owners open in this process, so a forked child can close its copies of their lock
# descriptors (see LmdbLog._drop_inherited_lock). Process-wide by nature: fork copies
# every descriptor of the process, whoever opened it.
_lock_holders: weakref.WeakSet[LmdbLog] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    for log in list(_lock_holders):
        log._drop_inherited_lock()
    _lock_holders.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)

_DB_NAMES: Final = (b"records", b"streams", b"by_meta", b"meta")
_MISSING: Final = object()
_NO_META: Final[dict[str, Any]] = {}  # shared, never mutated: see _StreamState
# The writer's cache only needs the streams appended to right now (a fleet's running
# executions). A generation of the cache spans this many commits: a running execution
# appends every commit or two while its steps are quick, and when they are slow (an LLM
# call of seconds) a miss costs one get and decode, nothing next to the call.
_CACHE_GENERATION: Final = 8
# ... or this many entries (each ~1 KB), whichever comes first: one huge batch must not
# pin a generation's worth of memory.
_MAX_CACHED_ENTRIES: Final = 4096


class _Inconsistent(Exception):
    """A batch's records collided with stored ones: redo it one put at a time."""


def _describe_batch(batch: Sequence[_Pending], show: int = 3) -> str:
    """``"5 writes to 4 streams: 'a', 'b', 'c' and 1 more"``: for error messages."""
    names = sorted({pending.stream for pending in batch})
    shown = ", ".join(repr(name) for name in names[:show])
    more = f" and {len(names) - show} more" if len(names) > show else ""
    writes = f"{len(batch)} write{'s' if len(batch) != 1 else ''}"
    if len(names) == 1:
        return f"{writes} to stream {shown}"
    return f"{writes} to {len(names)} streams: {shown}{more}"


def _last_seq_in(txn: lmdb.Transaction, streams_db: Any, name: str) -> int | None:
    """The stream's last seq in ``txn``'s snapshot, or None if its entry is unreadable."""
    raw = txn.get(name.encode("utf-8"), db=streams_db)
    if raw is None:
        return None
    try:
        return _decode_entry(name, raw)[1]  # type: ignore[no-any-return]
    except CorruptRecordError:
        return None


def _delete_records(cursor: lmdb.Cursor, sid: int, first: int, last: int | None) -> None:
    """Delete stream ``sid``'s records with seq ``first..last`` (``last`` None: to its
    end; ``first`` 0: every record of the stream, a stray seq 0 included)."""
    prefix = _ID.pack(sid)
    last_key = _RECORD_KEY.pack(sid, last) if last is not None else None
    if cursor.set_range(_RECORD_KEY.pack(sid, first)):
        # delete() moves the cursor to the next key (b"" past the end).
        while cursor.key()[:4] == prefix and (last_key is None or cursor.key() <= last_key):
            if not cursor.delete():
                break


def _info(stream: str, raw: bytes, mark: bytes | None) -> StreamInfo:
    _, last_seq, created_at, updated_at, meta = _decode_entry(stream, raw)
    first_seq = _decode_trim(stream, mark) + 1
    return StreamInfo(stream, last_seq, created_at, updated_at, meta, first_seq)
