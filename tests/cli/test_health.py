"""``perdure health``: a clean store passes; a flipped byte and a lying index are named."""

from __future__ import annotations

import struct
from pathlib import Path

import anyio
import lmdb

from perdure.events import record_types
from perdure.log import LmdbLog
from perdure.log.codec import unseal
from tests.cli.conftest import Store, perdure, perdure_here


def flip_a_byte_of(path: Path, stream: str, seq: int) -> None:
    """Corrupt one stored record in data.mdb, with no process holding the env open.

    The record's value bytes are read through LMDB, then a byte in their middle is
    flipped in the file at every place they occur (stale copies may linger in free
    pages; flipping them all is sure to hit the live one).
    """
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=8, subdir=True)
    try:
        with env.begin() as txn:
            streams = env.open_db(b"streams", txn=txn, create=False)
            records = env.open_db(b"records", txn=txn, create=False)
            stream_id = unseal(bytes(txn.get(stream.encode(), db=streams)), 5)[0]
            value = bytes(txn.get(struct.pack(">IQ", stream_id, seq), db=records))
    finally:
        env.close()
    data_file = path / "data.mdb"
    data = bytearray(data_file.read_bytes())
    at = data.find(value)
    assert at >= 0, "the record's bytes are not in data.mdb"
    while at >= 0:
        data[at + len(value) // 2] ^= 0x20
        at = data.find(value, at + 1)
    data_file.write_bytes(bytes(data))


def test_health_on_a_clean_store(store: Store) -> None:
    ran = perdure(store.path, "health")
    assert ran.code == 0, ran.out
    lines = ran.out.splitlines()
    assert lines[-1].startswith("healthy: no faults in ") and lines[-1].endswith(" records")
    assert any(line.startswith("map ") and "used of" in line for line in lines)
    doc = perdure_here(store.path, "health", "--json").json()
    assert doc["ok"] is True and doc["faults"] == []
    assert doc["stats"]["streams"] == 13  # 11 executions, the inbox, the owner's agents
    assert 0 < doc["stats"]["map_used_fraction"] < 1
    assert doc["owner_pid"] is None


def test_health_names_the_stream_and_seq_of_a_flipped_byte(fresh_store: Store) -> None:
    path = fresh_store.path
    flip_a_byte_of(path, "exec/weather-1", 2)
    ran = perdure(path, "health")
    assert ran.code == 1
    faults = [line for line in ran.out.splitlines() if line.startswith("FAULT ")]
    assert faults == [faults[0]] and faults[0].startswith(
        "FAULT stream 'exec/weather-1' seq 2: checksum: "
    )
    assert ran.out.splitlines()[-1].startswith("1 fault found")
    doc = perdure_here(path, "health", "--json")
    assert doc.code == 1
    assert [(f["stream"], f["seq"], f["kind"]) for f in doc.json()["faults"]] == [
        ("exec/weather-1", 2, "checksum")
    ]
    # Reading the corrupt history is a named error, never a traceback or a silent skip.
    events = perdure(path, "events", "weather-1")
    assert events.code == 1
    assert [line.split()[0] for line in events.out.splitlines()] == ["1"]  # up to the fault
    assert "stream 'exec/weather-1' seq 2: corrupt record" in events.err
    # The rest of the store still reads.
    assert perdure_here(path, "steps", "pay-1").code == 0


def test_health_finds_an_index_status_the_records_do_not_bear_out(fresh_store: Store) -> None:
    path = fresh_store.path

    async def lie() -> None:
        log = await LmdbLog.open(path, types=record_types(), durability="process")
        try:
            await log.set_meta("exec/pay-1", {"status": "completed"})
        finally:
            await log.aclose()

    anyio.run(lie)
    doc = perdure(path, "health", "--json")
    assert doc.code == 1
    [fault] = doc.json()["faults"]
    assert (fault["stream"], fault["kind"]) == ("exec/pay-1", "status")
    assert "the index says 'completed'" in fault["detail"]
    assert "the records say 'suspended'" in fault["detail"]
