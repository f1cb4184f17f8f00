"""SIGKILL a process that appends in fsync mode; every acknowledged batch survives."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from pathlib import Path

import anyio
import pytest

from perdure.log import LmdbLog, Record

from .conformance import TYPES, collect
from .test_lmdb_store import Child


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sigkilled_writer_loses_no_acknowledged_batch(tmp_path: Path, backend: str) -> None:
    seed = int(os.environ.get("PERDURE_CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    acked: list[tuple[str, int, str, int]] = []
    rounds = 5
    for round_id in range(rounds):
        child = Child(
            "crash-writer", str(tmp_path), str(round_id), str(rng.random()), backend=backend
        )
        child.expect("ready")
        # Let it run for a random number of acknowledgements, then kill it mid-flight.
        for _ in range(rng.randint(20, 400)):
            words = child.expect("ack")
            acked.append((words[0], int(words[1]), words[2], int(words[3])))
        child.kill()
        assert child.proc.returncode == -9, f"seed {seed}"

    async def verify() -> None:
        async with await LmdbLog.open(tmp_path, types=TYPES) as log:
            assert await log.check() == [], f"seed {seed}"
            streams = [info.stream async for info in log.streams()]
            by_stream: dict[str, list[Record]] = {}
            for stream in streams:
                records = await collect(log, stream)
                # Seqs are contiguous from 1.
                assert [r.seq for r in records] == list(range(1, len(records) + 1))
                by_stream[stream] = records
            # No batch is half there, acknowledged or not: every record carries its
            # batch's size, and each batch present has all of them, contiguous and in
            # order.
            batches: dict[str, list[Record]] = defaultdict(list)
            for records in by_stream.values():
                for record in records:
                    batches[record.payload["batch"]].append(record)
            for batch, records in batches.items():
                size = records[0].payload["size"]
                assert all(r.payload["size"] == size for r in records), batch
                assert [r.payload["i"] for r in records] == list(range(size)), (batch, seed)
                seqs = [r.seq for r in records]
                assert seqs == list(range(seqs[0], seqs[0] + size)), batch
            # Every acknowledged batch is there, whole, ending at the acknowledged seq.
            for stream, last_seq, batch, size in acked:
                records = batches.get(batch)
                assert records is not None, f"acknowledged batch {batch} lost (seed {seed})"
                assert len(records) == size, f"batch {batch} (seed {seed})"
                assert records[-1].stream == stream
                assert records[-1].seq == last_seq
            # The per-stream meta written with each append names a batch that is there.
            for i in range(8):
                info = await log.stream_info(f"exec/{i}")
                if info is not None:
                    assert info.meta["status"] in batches

    anyio.run(verify)
    assert len(acked) >= rounds * 20
