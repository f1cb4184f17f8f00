"""The log's error vocabulary: every error names the stream (and seq) it is about."""

from __future__ import annotations

import os

from perdure.errors import PerdureError

__all__ = [
    "ClientWriteError",
    "ConflictError",
    "CorruptRecordError",
    "DataDirLockedError",
    "LogClosedError",
    "LogError",
    "StorageFullError",
    "TrimmedError",
    "UnknownRecordTypeError",
    "UnknownRecordVersionError",
]


class LogError(PerdureError):
    """Base class of every error raised by :mod:`perdure.log`."""


class ConflictError(LogError):
    """An append named a sequence number that is no longer the stream's last one.

    The writer is stale: another writer appended first. Nothing was written.
    """

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"stream {stream!r}: append expected last seq {expected} but the stream is at "
            f"{actual}; nothing was written — re-read the stream and retry from seq {actual}"
        )


class CorruptRecordError(LogError):
    """A stored record, or a stream's index entry, failed its checksum or could not be
    decoded.

    ``seq`` is the record's seq, or None when the stream's index entry (its last seq,
    timestamps and meta) is what is corrupt.
    """

    def __init__(self, stream: str, seq: int | None, detail: str) -> None:
        self.stream = stream
        self.seq = seq
        self.detail = detail
        what = f"seq {seq}: corrupt record" if seq is not None else "index entry: corrupt"
        thing = "record" if seq is not None else "stream"
        super().__init__(
            f"stream {stream!r} {what} ({detail}); the {thing} was not skipped — restore "
            f"the data dir from a backup or run 'perdure health' to list every fault"
        )


class UnknownRecordTypeError(LogError):
    """A stored record has a type this program does not know."""

    def __init__(self, stream: str, seq: int, type: str) -> None:
        self.stream = stream
        self.seq = seq
        self.type = type
        super().__init__(
            f"stream {stream!r} seq {seq}: unknown record type {type!r}; this program is "
            f"older than the data — upgrade perdure or register the type"
        )


class UnknownRecordVersionError(LogError):
    """A stored record has a schema version newer than this program understands."""

    def __init__(self, stream: str, seq: int, type: str, version: int, known: int) -> None:
        self.stream = stream
        self.seq = seq
        self.type = type
        self.version = version
        self.known = known
        super().__init__(
            f"stream {stream!r} seq {seq}: record type {type!r} has schema version {version}, "
            f"this program understands up to {known} — upgrade perdure"
        )


class DataDirLockedError(LogError):
    """Another process, or another log in this one, owns the data dir for writing."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        if pid is not None and pid == os.getpid():
            # "stop that process" would tell the user to stop the very process asking.
            super().__init__(
                f"data dir {path!r} is already open in this process (pid {pid}): another "
                f"Runtime or LmdbLog here owns it; only one may own a data dir — close that "
                f"one first, or reuse it instead of opening the dir again"
            )
            return
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"data dir {path!r} is owned by {holder}; only one Runtime may own a data dir — "
            f"stop that process, or open the dir as a client (read, and append signals only)"
        )


class StorageFullError(LogError):
    """The disk holding the data dir is full; the batch was not written."""

    def __init__(self, path: str, detail: str = "") -> None:
        self.path = path
        super().__init__(
            f"data dir {path!r}: disk full{f' ({detail})' if detail else ''}; nothing from "
            f"the failed batch was written — free space and retry"
        )


class ClientWriteError(LogError):
    """A client (non-owner) tried to append to a stream other than a signal stream."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        super().__init__(
            f"stream {stream!r}: this log is open as a client, which may only append to "
            f"signal streams (names starting with 'signals/')"
        )


class TrimmedError(LogError):
    """A read asked for records that were trimmed from the front of their stream.

    ``after`` is the seq the read was asked to start after; ``first_seq`` is the first
    seq the stream still keeps (records before it were removed by ``trim``).
    """

    def __init__(self, stream: str, after: int, first_seq: int) -> None:
        self.stream = stream
        self.after = after
        self.first_seq = first_seq
        super().__init__(
            f"stream {stream!r}: a read from seq {after + 1} asks for trimmed records; the "
            f"stream was trimmed through seq {first_seq - 1} and keeps seq {first_seq} on — "
            f"read with after={first_seq - 1} (stream_info().first_seq - 1) or later"
        )


class LogClosedError(LogError):
    """The log was used after it was closed."""
