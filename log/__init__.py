"""perdure.log: the durable event log (records, streams, the LMDB and memory stores).

Every agent step is durable when, and only when, its record is committed here. A store
implements :class:`EventLog`; :class:`LmdbLog` keeps the log on disk with group commit,
:class:`MemoryLog` keeps it in memory with the same semantics, for tests.
"""

from .errors import (
    ClientWriteError,
    ConflictError,
    CorruptRecordError,
    DataDirLockedError,
    LogClosedError,
    LogError,
    StorageFullError,
    TrimmedError,
    UnknownRecordTypeError,
    UnknownRecordVersionError,
)
from .lmdb_store import LmdbLog
from .memory_store import MemoryLog
from .protocol import (
    ANY,
    SIGNAL_STREAM_PREFIX,
    Durability,
    EventLog,
    Fault,
    NewRecord,
    Record,
    RecordTypes,
    StreamInfo,
    is_signal_stream,
)

__all__ = [
    "ANY",
    "SIGNAL_STREAM_PREFIX",
    "ClientWriteError",
    "ConflictError",
    "CorruptRecordError",
    "DataDirLockedError",
    "Durability",
    "EventLog",
    "Fault",
    "LmdbLog",
    "LogClosedError",
    "LogError",
    "MemoryLog",
    "NewRecord",
    "Record",
    "RecordTypes",
    "StorageFullError",
    "StreamInfo",
    "TrimmedError",
    "UnknownRecordTypeError",
    "UnknownRecordVersionError",
    "is_signal_stream",
]
