"""LmdbLog at its edges: damaged files, inherited locks, racing closes, dying owners."""

from __future__ import annotations

import fcntl
import os
import signal
from pathlib import Path

import anyio
import pytest

from perdure.log import LogClosedError, LogError
from perdure.log.lmdb_store import LOCK_FILE, LmdbLog

from .conformance import TYPES, note
from .test_lmdb_store import Child, open_log


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
    assert f"data.mdb is {cut} bytes" in words[2]
    assert "truncated" in words[2] and "restore the data dir from a backup" in words[2]
    # Refusing changed nothing, and took no lock with it.
    assert os.path.getsize(tmp_path / "data.mdb") == cut
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


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
