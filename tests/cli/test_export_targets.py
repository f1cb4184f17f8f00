"""``export -o TARGET``: a file is replaced whole; nothing that is not a file is replaced.

A regular file is written aside and renamed over; a symlink stays a symlink (its target
gets the export); a FIFO, /dev/null or a full device is written into, never replaced by
a JSON file; a directory is refused by name; a write error exits 1 naming the path and
the error, and leaves no temporary file behind.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import Store, perdure, perdure_here

EID = "weather-1"


def exported(store: Store) -> Any:
    """The export document, as printed on stdout."""
    ran = perdure_here(store.path, "export", EID)
    assert ran.code == 0, ran.err
    return json.loads(ran.out)


def test_a_regular_file_is_replaced_whole_and_keeps_its_mode(store: Store, tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("an older export")
    target.chmod(0o640)
    ran = perdure(store.path, "export", EID, "-o", str(target))
    assert ran.code == 0, ran.err
    assert json.loads(target.read_text()) == exported(store)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left beside it


def test_a_symlink_stays_a_symlink_and_its_target_gets_the_export(
    store: Store, tmp_path: Path
) -> None:
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "export.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "real" / "new.json")

    ran = perdure(store.path, "export", EID, "-o", str(link))
    assert ran.code == 0, ran.err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text()) == exported(store)
    # A link to nothing yet: its target is created; the link is left as it was.
    assert perdure(store.path, "export", EID, "-o", str(dangling)).code == 0
    assert dangling.is_symlink() and os.readlink(dangling) == str(tmp_path / "real" / "new.json")
    assert json.loads((tmp_path / "real" / "new.json").read_text()) == exported(store)
    assert sorted(os.listdir(tmp_path / "real")) == ["export.json", "new.json"]


def test_a_fifo_is_written_into_not_replaced(store: Store, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    # The reader opens the FIFO (blocking until the CLI opens it to write) and reads
    # until the CLI closes it.
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    ran = perdure(store.path, "export", EID, "-o", str(fifo))
    reader.join(timeout=30)
    assert ran.code == 0, ran.err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert json.loads(got[0]) == exported(store)
    assert os.listdir(tmp_path) == ["pipe"]


def device(tmp_path: Path, name: str, major: int, minor: int) -> Path:
    """/dev/NAME, or, when running as root, a private node of the same kind.

    Root could replace /dev/NAME itself: were the export ever to replace its target
    again, a test run as root would replace the machine's /dev/null. A private node
    (made with mknod in tmp_path) behaves the same and costs nothing if replaced.
    Nobody else can replace anything in /dev, so they use the real one.
    """
    real = Path("/dev") / name
    if os.geteuid() != 0:
        if not real.exists():
            pytest.skip(f"no {real} on this system")
        return real
    node = tmp_path / name
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(major, minor))
    except OSError:  # a container without CAP_MKNOD
        pytest.skip(f"running as root without mknod: {real} itself could be replaced")
    return node


def test_dev_null_is_written_into_not_replaced(store: Store, tmp_path: Path) -> None:
    null = device(tmp_path, "null", 1, 3)
    before = os.stat(null)
    ran = perdure(store.path, "export", EID, "-o", str(null))
    assert (ran.code, ran.err) == (0, "")
    assert ran.out.startswith("exported ") and ran.out.endswith(f" to {null}\n")
    after = os.stat(null)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino
    assert [p.name for p in null.parent.iterdir() if p.name.startswith(".null.")] == []


def test_a_full_device_exits_1_naming_the_path_and_the_error(store: Store, tmp_path: Path) -> None:
    full = device(tmp_path, "full", 1, 7)
    before = os.stat(full)
    ran = perdure(store.path, "export", EID, "-o", str(full))
    assert (ran.code, ran.out) == (1, "")
    assert ran.err == (
        f"perdure: error: cannot write the export of {EID!r} to {str(full)!r}: "
        f"No space left on device (ENOSPC)\n"
    )
    after = os.stat(full)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino
    assert [p.name for p in full.parent.iterdir() if p.name.startswith(".full.")] == []
    as_json = perdure_here(store.path, "export", EID, "-o", str(full), "--json")
    assert as_json.code == 1 and "No space left on device" in as_json.json()["error"]["message"]


def test_a_directory_is_refused_by_name(store: Store, tmp_path: Path) -> None:
    ran = perdure(store.path, "export", EID, "-o", str(tmp_path))
    assert (ran.code, ran.out) == (2, "")
    assert ran.err == (
        f"perdure: error: cannot write the export of {EID!r} to {str(tmp_path)!r}: it is a "
        f"directory; give a file name, e.g. -o {tmp_path / EID}.json\n"
    )
    assert "tmp" not in ran.err.replace(str(tmp_path), "")  # no temporary name leaks
    assert os.listdir(tmp_path) == []


def test_a_missing_directory_names_the_path_and_the_error(store: Store, tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir.json"
    ran = perdure(store.path, "export", EID, "-o", str(target))
    assert ran.code == 1
    assert ran.err.startswith(
        f"perdure: error: cannot write the export of {EID!r} to {str(target)!r}"
    )
    assert "No such file or directory (ENOENT)" in ran.err
    assert os.listdir(tmp_path) == []


def test_a_path_to_stdout_gets_the_document_alone(store: Store, tmp_path: Path) -> None:
    # /dev/stdout is a link to /proc/self/fd/1; as root, a private link of the same kind
    # (root could replace /dev/stdout itself, were the export ever to rename over it).
    stdout = Path("/dev/stdout")
    if os.geteuid() == 0:
        stdout = tmp_path / "stdout"
        stdout.symlink_to("/proc/self/fd/1")
    ran = perdure(store.path, "export", EID, "-o", str(stdout))
    assert ran.code == 0, ran.err
    assert json.loads(ran.out) == exported(store)  # no "exported ..." line after it
    assert stdout.is_symlink()
