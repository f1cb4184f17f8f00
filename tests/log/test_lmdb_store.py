"""LmdbLog against the conformance suite (fsync and process durability)."""

from __future__ import annotations

from pathlib import Path

from perdure.log import EventLog, RecordTypes
from perdure.log.lmdb_store import LmdbLog

from .conformance import EventLogConformance


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
