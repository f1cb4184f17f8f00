"""The event log's contract: records, stream metadata and the ``EventLog`` protocol.

Every store (memory, LMDB, and later PostgreSQL) implements :class:`EventLog` and passes
the one conformance suite in ``tests/log/``. Nothing here is LMDB-specific: expected-seq
appends, atomic per-stream metadata, a stream index and cross-process wake-ups all map
onto a SQL table with a primary key and NOTIFY.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "ANY",
    "SIGNAL_STREAM_PREFIX",
    "Durability",
    "EventLog",
    "Fault",
    "NewRecord",
    "Record",
    "RecordTypes",
    "StreamInfo",
    "is_signal_stream",
]

#: Streams whose names start with this prefix may be appended to by client processes
#: (the CLI) while another process owns the data dir. Everything else is owner-only.
SIGNAL_STREAM_PREFIX = "signals/"

#: Pass as ``expect`` to append at the end of a stream whatever its last seq is. Meant
#: for signal streams, where many independent writers add to one inbox.
ANY: None = None

Durability = Literal["fsync", "process"]
"""How durable an acknowledged append is: the ``durability`` a store is opened with.

``"fsync"`` (the default): ``append`` returns only once the batch is on disk; it
survives a process crash and a power loss. ``"process"``: ``append`` returns once the
batch is in the OS page cache; it survives a crash of the process (SIGKILL included)
but a power loss or a kernel crash may lose the last acknowledged batches (never
corrupt the rest). (``MemoryLog`` keeps nothing past its process and takes no mode.)
"""


def is_signal_stream(stream: str) -> bool:
    """True if client processes may append to ``stream``."""
    return stream.startswith(SIGNAL_STREAM_PREFIX)


@dataclass(frozen=True, slots=True)
class NewRecord:
    """A record to append: the log assigns its seq and timestamp."""

    type: str
    payload: Any
    version: int = 1


class Record(NamedTuple):
    """A stored record: the envelope every store reads back.

    ``seq`` starts at 1 and is contiguous within a stream. ``timestamp`` is the wall
    clock (seconds since the epoch) at which the batch holding the record was accepted.
    ``payload`` is whatever CBOR value was appended (usually a dict). An immutable named
    tuple rather than a dataclass: replay builds one per record, and a tuple is built in
    a fifth of the time.
    """

    stream: str
    seq: int
    type: str
    version: int
    timestamp: float
    payload: Any


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One entry of the stream index.

    ``meta`` is small, opaque to the log, and replaced key by key (a shallow merge) by
    the ``meta`` argument of the append that changes it. ``first_seq`` is the first seq
    the stream still stores: 1 unless :meth:`EventLog.trim` removed records from its
    front, ``last_seq + 1`` once every record was trimmed.
    """

    stream: str
    last_seq: int
    created_at: float
    updated_at: float
    meta: Mapping[str, Any] = field(default_factory=dict)
    first_seq: int = 1


@dataclass(frozen=True, slots=True)
class Fault:
    """One problem found by an integrity scan."""

    stream: str | None
    seq: int | None
    kind: str  # "checksum", "decode", "unknown_type", "unknown_version", "gap", "index", ...
    detail: str

    def __str__(self) -> str:
        where = "store" if self.stream is None else f"stream {self.stream!r}"
        if self.seq is not None:
            where += f" seq {self.seq}"
        return f"{where}: {self.kind}: {self.detail}"


class RecordTypes:
    """The record types a program understands, each with its newest schema version.

    A store decodes a record only if its type is registered and its version is at most
    the registered one; otherwise it raises ``UnknownRecordTypeError`` or
    ``UnknownRecordVersionError`` naming the stream and seq. Older versions are passed
    through with their version so the reader can upcast them.
    """

    __slots__ = ("_known",)

    def __init__(self, known: Mapping[str, int] | None = None) -> None:
        self._known: dict[str, int] = dict(known or {})

    def register(self, type: str, version: int = 1) -> None:
        """Declare that records of ``type`` up to schema ``version`` can be read."""
        if version < 1:
            raise ValueError(f"record type {type!r}: version must be >= 1, got {version}")
        self._known[type] = max(version, self._known.get(type, 0))

    def newest(self, type: str) -> int | None:
        """The newest understood version of ``type``, or None if it is unknown."""
        return self._known.get(type)

    def __contains__(self, type: object) -> bool:
        return type in self._known

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._known)

    def copy(self) -> RecordTypes:
        """An independent copy (stores keep their own)."""
        return RecordTypes(self._known)


@runtime_checkable
class EventLog(Protocol):
    """An append-only log of streams, each a contiguous sequence of records.

    All methods are async and safe to call from many tasks of one event loop at once.
    """

    @property
    def is_owner(self) -> bool:
        """True if this handle owns the data (may append anywhere); False for clients."""
        ...

    async def append(
        self,
        stream: str,
        records: Sequence[NewRecord],
        expect: int | None,
        meta: Mapping[str, Any] | None = None,
    ) -> int:
        """Append ``records`` atomically and return the stream's new last seq.

        ``expect`` is the last seq the writer saw (0 for a stream that does not exist
        yet), or :data:`ANY`. On mismatch nothing is written and ``ConflictError`` is
        raised. ``meta`` is shallow-merged into the stream's index entry in the same
        transaction. Returns once the batch is as durable as the log's durability mode
        promises.
        """
        ...

    def read_chunks(self, stream: str, after: int = 0) -> AsyncIterator[list[Record]]:
        """Like :meth:`read`, a chunk (a non-empty list, in order) at a time.

        Cheaper per record than ``read`` (no iterator step per record), which is what
        replay wants. A corrupt or unknown record raises its named error after the
        records before it were yielded.
        """
        ...

    def read(self, stream: str, after: int = 0) -> AsyncIterator[Record]:
        """Yield the stream's records with seq > ``after``, in order.

        Reads in chunks and yields to the event loop between chunks, so replaying a long
        stream never stalls other tasks. A corrupt or unknown record raises the named
        error; nothing is skipped. Asking for records removed by :meth:`trim` (``after``
        below ``first_seq - 1``, now or by a trim between two chunks) raises
        ``TrimmedError``.
        """
        ...

    async def last_seq(self, stream: str) -> int:
        """The stream's last seq, 0 if it does not exist."""
        ...

    async def stream_info(self, stream: str) -> StreamInfo | None:
        """The stream's index entry, or None if it does not exist."""
        ...

    def streams(
        self, prefix: str = "", where: Mapping[str, Any] | None = None
    ) -> AsyncIterator[StreamInfo]:
        """Yield index entries whose name starts with ``prefix``, in name order.

        ``where`` keeps only entries whose meta has each given key equal to the given
        value; keys the store was told to index are answered from a secondary index
        rather than by scanning every entry.
        """
        ...

    async def set_meta(self, stream: str, meta: Mapping[str, Any]) -> None:
        """Shallow-merge ``meta`` into an existing stream's index entry (owner only)."""
        ...

    async def delete_streams(self, streams: Sequence[str]) -> int:
        """Delete ``streams`` (records, index entry, secondary index keys) atomically.

        Owner only: a client raises ``ClientWriteError``, as for an append. Applied in
        one write, ordered with appends like an append. Names that do not exist are
        skipped; returns how many did. Afterwards each deleted stream is as one that never
        existed: ``last_seq`` is 0, ``stream_info`` None, it is not listed, ``check()``
        reports nothing for it, an append with ``expect=0`` starts it afresh (one naming
        its old last seq gets ``ConflictError``). Tasks of this handle waiting in
        :meth:`wait_for_append` on a deleted stream are woken with 0 (its last seq now,
        at most their ``after``): the stream they waited on is gone. A store on disk may
        reuse the freed space for new records without returning it to the filesystem.
        """
        ...

    async def trim(self, stream: str, through: int) -> int:
        """Delete ``stream``'s records with seq <= ``through`` atomically; return how many.

        Owner only: a client raises ``ClientWriteError``, as for ``delete_streams``.
        ``through`` past the stream's last seq raises ``LogError`` naming the stream,
        ``through`` and the last seq; trimming at or below what was already trimmed
        (or ``through=0``) removes nothing and returns 0. The stream keeps its last seq,
        meta and place in the index: appends go on at ``last_seq + 1`` and ``expect``
        means what it always did. ``stream_info().first_seq`` becomes ``through + 1``;
        reading with ``after < first_seq - 1`` raises ``TrimmedError``, reading from
        ``after >= first_seq - 1`` works as before. ``check()`` does not call the
        trimmed prefix a gap. Waiters in :meth:`wait_for_append` are not woken (the last
        seq did not move).
        """
        ...

    async def wait_for_append(self, stream: str, after: int, timeout: float | None = None) -> int:
        """Wait until ``stream``'s last seq exceeds ``after``; return the new last seq.

        Wakes at once for appends made through this handle, and promptly (by default
        within about 50 ms) for appends made by another process. Returns the current last
        seq without waiting if it already exceeds ``after``; returns it unchanged when
        ``timeout`` elapses first.
        """
        ...

    async def check(self) -> list[Fault]:
        """Scan the whole store: checksums, decoding, seq gaps, index vs streams.

        Returns every fault found (empty when healthy); never raises for a fault.
        """
        ...

    async def stats(self) -> Mapping[str, Any]:
        """Store-level figures, e.g. streams, records, bytes used and map size.

        Every store reports at least ``streams``, ``records`` and ``waiters`` (the tasks
        blocked in :meth:`wait_for_append` right now).
        """
        ...

    async def aclose(self) -> None:
        """Flush pending appends, stop background threads, release the data dir."""
        ...
