"""``perdure purge``: deleting finished executions from a data dir nobody else owns."""

from __future__ import annotations

from typing import Any

import pytest

from perdure import retention
from perdure.log import LmdbLog, StorageFullError
from tests.cli.conftest import EXPECTED, Store, perdure, perdure_here

FINISHED_ROOTS = ["archive-1", "boss-1", "cancel-1", "fail-1", "report-1", "weather-1"]


def listed(store: Store) -> list[str]:
    ran = perdure(store.path, "status", "--json")
    assert ran.code == 0, ran.err
    return sorted(e["execution_id"] for e in ran.json()["executions"])


def purged_ids(doc: Any) -> list[str]:
    return sorted(r["execution_id"] for r in doc["purged"])


def test_purge_deletes_finished_trees_only(fresh_store: Store) -> None:
    everything = sorted(EXPECTED)
    finished = sorted([*FINISHED_ROOTS, "boss-1/2"])

    dry = perdure(fresh_store.path, "purge", "--older-than", "0s", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    doc = dry.json()
    assert doc["dry_run"] is True and purged_ids(doc) == finished
    assert {r["execution_id"]: r["root"] for r in doc["purged"]}["boss-1/2"] == "boss-1"
    assert listed(fresh_store) == everything  # a dry run deletes nothing

    none = perdure(fresh_store.path, "purge", "--older-than", "30d", "--json")
    assert none.code == 0 and none.json()["purged"] == []
    said = perdure(fresh_store.path, "purge", "--older-than", "4w")
    assert said.code == 0 and said.out.startswith("nothing to purge: no finished execution")

    failed = perdure(fresh_store.path, "purge", "--older-than", "0s", "--status", "failed")
    assert failed.code == 0, failed.err
    assert "fail-1" in failed.out and "purged 1 execution in 1 tree" in failed.out

    rest = perdure(fresh_store.path, "purge", "--older-than", "0m")
    assert rest.code == 0, rest.err
    assert rest.out.splitlines()[0].split() == ["EXECUTION", "AGENT", "STATUS", "TREE", "UPDATED"]
    assert "purged 6 executions in 5 trees" in rest.out
    assert listed(fresh_store) == sorted(set(everything) - set(finished))
    health = perdure(fresh_store.path, "health")
    assert health.code == 0, health.out + health.err
    gone = perdure(fresh_store.path, "inspect", "weather-1")
    assert gone.code == 1 and "'weather-1'" in gone.err


def test_a_tree_with_a_signal_waiting_in_the_inbox_is_kept(fresh_store: Store) -> None:
    # Sent with no runtime running: it waits in the inbox for the next start.
    sent = perdure(fresh_store.path, "resume", "fail-1")
    assert sent.code == 0, sent.err
    ran = perdure(fresh_store.path, "purge", "--older-than", "0s", "--json")
    assert ran.code == 0, ran.err
    doc = ran.json()
    assert "fail-1" not in purged_ids(doc)
    assert doc["kept"] == [{"execution_id": "fail-1", "why": "signals for it wait in the inbox"}]
    assert "fail-1" in listed(fresh_store)


def test_purge_refuses_while_a_runtime_owns_the_dir(fresh_store: Store, owner_factory: Any) -> None:
    with owner_factory(fresh_store.path) as owner:
        pid = owner.expect("ready").split()[1]
        ran = perdure(fresh_store.path, "purge", "--older-than", "0s")
        assert ran.code == 1
        assert f"runtime pid {pid}" in ran.err and "rt.purge(...)" in ran.err
        assert "stop it first" in ran.err
        as_json = perdure(fresh_store.path, "purge", "--older-than", "0s", "--json")
        assert as_json.code == 1 and as_json.json()["error"]["kind"] == "owned"
        assert listed(fresh_store) == sorted(EXPECTED)


def test_purge_needs_a_duration_with_a_unit(fresh_store: Store) -> None:
    for bad in ("30", "-1d", "1y", "d"):
        ran = perdure(fresh_store.path, "purge", f"--older-than={bad}")
        assert ran.code == 2, bad
        assert "30d, 12h, 90m, 3600s" in ran.err
    missing = perdure(fresh_store.path, "purge")
    assert missing.code == 2 and "--older-than" in missing.err
    assert listed(fresh_store) == sorted(EXPECTED)


def test_a_purge_that_fails_part_way_says_what_it_deleted(
    fresh_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deletes go a batch at a time; when a later one fails, the ones before it are gone,
    and the operator is told so (and that running purge again finishes the job)."""
    monkeypatch.setattr(retention, "BATCH", 1)  # one tree per delete
    deletes: list[int] = []
    real = LmdbLog.delete_streams

    async def second_fails(self: LmdbLog, streams: Any) -> int:
        deletes.append(len(streams))
        if len(deletes) == 2:
            raise StorageFullError(str(fresh_store.path))
        return await real(self, streams)

    monkeypatch.setattr(LmdbLog, "delete_streams", second_fails)
    failed = perdure_here(fresh_store.path, "purge", "--older-than", "0s")
    assert failed.code == 1
    assert "purged 1 execution, then deleting the next 2 failed" in failed.err
    assert "run 'perdure purge' again" in failed.err
    first_root = sorted(FINISHED_ROOTS)[0]
    assert first_root not in listed(fresh_store)

    monkeypatch.setattr(LmdbLog, "delete_streams", real)
    rest = perdure(fresh_store.path, "purge", "--older-than", "0s", "--json")
    assert rest.code == 0, rest.err
    assert first_root not in purged_ids(rest.json()) and len(purged_ids(rest.json())) == 6
