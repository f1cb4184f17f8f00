"""``MemoryLog``: the event log in memory, with the LMDB store's semantics.

For tests and for users' own unit tests. Records go through the same codec as on disk
(encoded with their checksum on append, verified and decoded on read), so a test that
passes here exercises the real envelope. Nothing survives the process.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
import cbor2

from .codec import (
    check_after,
    check_expect,
    check_indexed_fields,
    check_stream_name,
    check_stream_names,
    check_through,
    decode_all,
    encode_records,
    meta_matches,
    meta_value_key,
    normalize_meta,
    record_fault,
    trim_beyond_error,
    where_conditions,
)
from .errors import ConflictError, LogClosedError, LogError, TrimmedError
from .protocol import Fault, NewRecord, Record, RecordTypes, StreamInfo
from .waker import AppendWaiters, Completion, wake

__all__ = ["MemoryLog"]

#: Records (or index entries) handed out between two yields to the event loop.
READ_CHUNK = 256

_checkpoint = anyio.lowlevel.checkpoint


class _Stream:
    __slots__ = ("created_at", "meta", "trimmed", "updated_at", "values")

    def __init__(self, created_at: float) -> None:
        # The records from seq trimmed + 1 on: trim() drops them from the front.
        self.values: list[bytes] = []
        self.trimmed = 0
        self.created_at = created_at
        self.updated_at = created_at
        # Kept CBOR-encoded so a caller mutating a returned StreamInfo.meta cannot
        # reach into the store, exactly as with the LMDB store.
        self.meta = cbor2.dumps({})

    @property
    def last_seq(self) -> int:
        return self.trimmed + len(self.values)


class MemoryLog:
    """An :class:`~perdure.log.EventLog` kept in memory; same semantics as ``LmdbLog``.

    ``types`` is copied: register every record type before creating the log, or later
    through :attr:`types`. ``indexed`` names the meta keys answered from a secondary
    index by ``streams(where=...)`` (results are the same either way; only the cost
    differs). Safe to share between tasks, and between event loops in several threads.
    """

    def __init__(self, types: RecordTypes, *, indexed: Sequence[str] = ("status", "kind")) -> None:
        self._types = types.copy()
        # The live dict of the store's own RecordTypes: later registrations are seen.
        self._known: dict[str, int] = self._types._known
        self._indexed = check_indexed_fields(indexed)
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._names: list[str] = []  # sorted, for prefix listing
        self._index: dict[tuple[str, bytes], set[str]] = {}
        self._waiters = AppendWaiters()
        self._closed = False
        self._appends = 0

    # -- lifecycle -------------------------------------------------------------------

    @property
    def is_owner(self) -> bool:
        """Always True: a memory log has no other processes to share with."""
        return True

    @property
    def types(self) -> RecordTypes:
        """The record types this log reads and accepts (its own copy; register more here)."""
        return self._types

    async def __aenter__(self) -> MemoryLog:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the log: later calls raise ``LogClosedError``; waiters are woken with it."""
        with self._lock:
            self._closed = True
        waiters = self._waiters.pop_all()
        wake((c, LogClosedError("memory log: closed while waiting for an append")) for c in waiters)
        await _checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError("memory log: used after aclose(); open a new log")

    # -- writing ---------------------------------------------------------------------

    async def append(
        self,
        stream: str,
        records: Sequence[NewRecord],
        expect: int | None,
        meta: Mapping[str, Any] | None = None,
    ) -> int:
        """Append ``records`` atomically; see :meth:`perdure.log.EventLog.append`."""
        self._check_open()
        check_stream_name(stream)
        check_expect(stream, expect)
        timestamp = time.time()
        values = encode_records(self._known, stream, records, timestamp)
        new_meta = normalize_meta(stream, meta) if meta else None
        # Cancellation is only possible here, before anything is written.
        await _checkpoint()
        with self._lock:
            self._check_open()
            entry = self._streams.get(stream)
            current = entry.last_seq if entry is not None else 0
            if expect is not None and expect != current:
                raise ConflictError(stream, expect, current)
            if entry is None:
                entry = self._streams[stream] = _Stream(timestamp)
                bisect.insort(self._names, stream)
            entry.values.extend(values)
            entry.updated_at = timestamp
            if new_meta:
                self._merge_meta(stream, entry, new_meta)
            last = entry.last_seq
            self._appends += 1
            due = self._waiters.due(((stream, last),)) if values else []
        if due:
            wake(due)
        return last

    async def set_meta(self, stream: str, meta: Mapping[str, Any]) -> None:
        """Shallow-merge ``meta`` into an existing stream's index entry."""
        self._check_open()
        check_stream_name(stream)
        new_meta = normalize_meta(stream, meta)
        await _checkpoint()
        with self._lock:
            self._check_open()
            entry = self._streams.get(stream)
            if entry is None:
                raise LogError(
                    f"stream {stream!r} does not exist, so it has no metadata to update; "
                    f"append to it first (append(..., meta=...) sets meta on creation)"
                )
            entry.updated_at = time.time()
            self._merge_meta(stream, entry, new_meta)

    async def delete_streams(self, streams: Sequence[str]) -> int:
        """Delete ``streams`` atomically; see :meth:`perdure.log.EventLog.delete_streams`.

        Waiters on a deleted stream are woken with 0, as the LMDB store does.
        """
        self._check_open()
        names = check_stream_names(streams)
        await _checkpoint()
        woken: list[Completion] = []
        deleted = 0
        with self._lock:
            self._check_open()
            for name in names:
                entry = self._streams.pop(name, None)
                if entry is None:
                    continue
                deleted += 1
                del self._names[bisect.bisect_left(self._names, name)]
                meta = cbor2.loads(entry.meta)
                for field in self._indexed:
                    if field not in meta:
                        continue
                    key = (field, meta_value_key(meta[field]))
                    indexed = self._index.get(key)
                    if indexed is not None:
                        indexed.discard(name)
                        if not indexed:
                            del self._index[key]
                woken += self._waiters.pop_stream(name)
        if woken:
            wake((completion, 0) for completion in woken)
        return deleted

    async def trim(self, stream: str, through: int) -> int:
        """Drop ``stream``'s records up to ``through``; see :meth:`perdure.log.EventLog.trim`."""
        self._check_open()
        check_stream_name(stream)
        check_through(stream, through)
        await _checkpoint()
        with self._lock:
            self._check_open()
            entry = self._streams.get(stream)
            last = entry.last_seq if entry is not None else 0
            if through > last:
                raise trim_beyond_error(stream, through, last)
            if entry is None or through <= entry.trimmed:
                return 0
            removed = through - entry.trimmed
            del entry.values[:removed]
            entry.trimmed = through
            return removed

    def _merge_meta(self, stream: str, entry: _Stream, new_meta: dict[str, Any]) -> None:
        old = cbor2.loads(entry.meta)
        merged = {**old, **new_meta}
        entry.meta = cbor2.dumps(merged)
        for field in self._indexed:
            if field not in new_meta:
                continue
            if field in old:
                names = self._index.get((field, meta_value_key(old[field])))
                if names is not None:
                    names.discard(stream)
            self._index.setdefault((field, meta_value_key(merged[field])), set()).add(stream)

    # -- reading ---------------------------------------------------------------------

    async def read(self, stream: str, after: int = 0) -> AsyncIterator[Record]:
        """Yield records with seq > ``after`` in order, yielding to the loop between chunks."""
        async for chunk in self.read_chunks(stream, after):
            for record in chunk:
                yield record

    async def read_chunks(self, stream: str, after: int = 0) -> AsyncIterator[list[Record]]:
        """Like :meth:`read`, a list of records at a time (cheaper per record)."""
        check_stream_name(stream)
        check_after(stream, after)
        known = self._known
        seq = after
        while True:
            with self._lock:
                self._check_open()
                entry = self._streams.get(stream)
                if entry is None:
                    return
                trimmed = entry.trimmed
                if seq < trimmed:
                    raise TrimmedError(stream, seq, trimmed + 1)
                chunk = entry.values[seq - trimmed : seq - trimmed + READ_CHUNK]
            records, error = decode_all(known, stream, seq + 1, chunk)
            if records:
                yield records
            if error is not None:
                raise error
            if len(chunk) < READ_CHUNK:
                return
            seq += len(chunk)
            await _checkpoint()

    async def last_seq(self, stream: str) -> int:
        """The stream's last seq, 0 if it does not exist."""
        check_stream_name(stream)
        return self._last_seq_now(stream)

    def _last_seq_now(self, stream: str) -> int:
        with self._lock:
            self._check_open()
            entry = self._streams.get(stream)
            return entry.last_seq if entry is not None else 0

    async def stream_info(self, stream: str) -> StreamInfo | None:
        """The stream's index entry, or None if it does not exist."""
        check_stream_name(stream)
        with self._lock:
            self._check_open()
            entry = self._streams.get(stream)
            return self._info(stream, entry) if entry is not None else None

    @staticmethod
    def _info(stream: str, entry: _Stream) -> StreamInfo:
        return StreamInfo(
            stream=stream,
            last_seq=entry.last_seq,
            created_at=entry.created_at,
            updated_at=entry.updated_at,
            meta=cbor2.loads(entry.meta),
            first_seq=entry.trimmed + 1,
        )

    async def streams(
        self, prefix: str = "", where: Mapping[str, Any] | None = None
    ) -> AsyncIterator[StreamInfo]:
        """Yield index entries by name prefix and ``where`` filter, in name order."""
        if type(prefix) is not str:
            raise LogError(f"prefix must be a str, got {prefix!r}")
        conditions = where_conditions(where)
        driver = next((c for c in conditions if c[0] in self._indexed), None)
        with self._lock:
            self._check_open()
            if driver is not None:
                names = sorted(n for n in self._index.get(driver, ()) if n.startswith(prefix))
            else:
                start = bisect.bisect_left(self._names, prefix)
                names = []
                for name in self._names[start:]:
                    if not name.startswith(prefix):
                        break
                    names.append(name)
        for start in range(0, len(names), READ_CHUNK):
            if start:
                await _checkpoint()
            batch = []
            with self._lock:
                self._check_open()
                for name in names[start : start + READ_CHUNK]:
                    entry = self._streams.get(name)
                    if entry is not None:
                        batch.append(self._info(name, entry))
            for info in batch:
                if meta_matches(info.meta, conditions):
                    yield info

    async def wait_for_append(self, stream: str, after: int, timeout: float | None = None) -> int:
        """Wait until ``stream``'s last seq exceeds ``after``; return it (or, on timeout, the
        unchanged last seq)."""
        check_stream_name(stream)
        check_after(stream, after)
        # Register before looking, so an append between the look and the wait still wakes.
        completion = self._waiters.add(stream, after)
        try:
            current = self._last_seq_now(stream)
            if current > after:
                return current
            with anyio.move_on_after(timeout):
                return await completion.wait()  # type: ignore[no-any-return]
            return self._last_seq_now(stream)
        finally:
            self._waiters.remove(stream, completion)

    # -- health ----------------------------------------------------------------------

    async def check(self) -> list[Fault]:
        """Decode every record and index entry; return every fault found."""
        faults: list[Fault] = []
        with self._lock:
            self._check_open()
            snapshot = [
                (name, list(e.values), e.trimmed, e.meta) for name, e in self._streams.items()
            ]
            index = {key: set(names) for key, names in self._index.items()}
        for name, values, trimmed, meta_blob in sorted(snapshot, key=lambda item: item[0]):
            for seq, value in enumerate(values, trimmed + 1):
                fault = record_fault(self._known, name, seq, value)
                if fault is not None:
                    faults.append(fault)
            meta = cbor2.loads(meta_blob)
            for field in self._indexed:
                if field in meta and name not in index.get(
                    (field, meta_value_key(meta[field])), ()
                ):
                    faults.append(
                        Fault(name, None, "index", f"meta {field!r} is missing from its index")
                    )
            await _checkpoint()
        return faults

    async def stats(self) -> Mapping[str, Any]:
        """Counts of streams, records, stored bytes and appends."""
        with self._lock:
            self._check_open()
            return {
                "backend": "memory",
                "streams": len(self._streams),
                "records": sum(len(e.values) for e in self._streams.values()),
                "record_bytes": sum(sum(map(len, e.values)) for e in self._streams.values()),
                "appends": self._appends,
                "waiters": len(self._waiters),
            }
