"""Retention: which finished executions ``Runtime.purge`` may delete.

A service embeds a Runtime for months; every finished execution's stream would stay in
the data dir for ever. ``rt.purge(older_than)`` (and ``perdure purge``) deletes the
streams of finished executions whose last update is older than a cutoff. This module
chooses them, from the index alone (no replay); the runtime decides which of them are
free of live work and deletes them.

Delegation trees go together: a child's stream is deleted only with its root's, and a
root only when every execution of its tree is finished and older than the cutoff, so a
parent is never left waiting on (or pointing at) a child that vanished, nor a child
kept without the parent that explains it. An execution whose parent has no index entry
(a data dir from before purge, edited by hand) counts as a root of its own.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from perdure.events import execution_stream
from perdure.log.protocol import EventLog, StreamInfo

__all__ = [
    "FINISHED",
    "Tree",
    "batches",
    "check_statuses",
    "cutoff",
    "eligible_trees",
    "still_eligible",
]

#: The statuses an execution can no longer leave by itself; only these are purged.
FINISHED = ("completed", "failed", "cancelled")

_PREFIX = execution_stream("")

#: The most streams one delete of a purge takes (whole trees; a bigger tree goes alone).
BATCH = 512


@dataclass(frozen=True, slots=True)
class Tree:
    """A root execution and its descendants (ids, root first), to delete together."""

    root: str
    members: tuple[str, ...]


def check_statuses(statuses: Iterable[str]) -> frozenset[str]:
    """The statuses a purge selects roots by; only finished ones are accepted."""
    if isinstance(statuses, str):
        statuses = (statuses,)
    chosen = frozenset(statuses)
    wrong = sorted(s for s in chosen if s not in FINISHED)
    if wrong or not chosen:
        raise ValueError(
            f"purge statuses must be some of {', '.join(FINISHED)} (only a finished "
            f"execution can be purged), got {sorted(chosen) or 'none'}"
        )
    return chosen


def cutoff(older_than: float | datetime.timedelta, now: float) -> float:
    """The timestamp (seconds since the epoch) a purge deletes up to, inclusive.

    ``older_than`` is seconds (an int or float) or a ``timedelta``, at least 0: 0 means
    every finished execution up to ``now``.
    """
    if isinstance(older_than, datetime.timedelta):
        seconds = older_than.total_seconds()
    elif isinstance(older_than, (int, float)) and not isinstance(older_than, bool):
        seconds = float(older_than)
    else:
        raise TypeError(
            f"older_than must be seconds (a number) or a datetime.timedelta, got "
            f"{type(older_than).__name__} {older_than!r}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"older_than must be a finite duration of at least 0, got {older_than!r}")
    return now - seconds


def _eligible(info: StreamInfo, cut: float) -> bool:
    return info.meta.get("status") in FINISHED and info.updated_at <= cut


async def eligible_trees(log: EventLog, cut: float, statuses: frozenset[str]) -> list[Tree]:
    """Trees whose root has one of ``statuses`` and whose every member is finished and
    last updated at or before ``cut``; in root id order.

    One listing of the execution index (no record is read).
    """
    index: dict[str, StreamInfo] = {}
    async for info in log.streams(prefix=_PREFIX, where={"kind": "execution"}):
        index[info.stream[len(_PREFIX) :]] = info
    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for eid, info in index.items():
        parent = info.meta.get("parent")
        if parent and str(parent) in index and str(parent) != eid:
            children.setdefault(str(parent), []).append(eid)
        else:
            roots.append(eid)
    trees = []
    for root in sorted(roots):
        if index[root].meta.get("status") not in statuses:
            continue
        members = _walk(root, children)
        if all(_eligible(index[m], cut) for m in members):
            trees.append(Tree(root, members))
    return trees


def _walk(root: str, children: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """``root`` and every descendant, root first (each once, whatever the parent links)."""
    seen = {root}
    order = [root]
    todo = [root]
    while todo:
        for child in sorted(children.get(todo.pop(), ())):
            if child not in seen:
                seen.add(child)
                order.append(child)
                todo.append(child)
    return tuple(order)


async def still_eligible(log: EventLog, trees: Sequence[Tree], cut: float) -> list[Tree]:
    """The ``trees`` whose members are all, as read now, finished and older than ``cut``.

    The runtime calls this once no actor can start for the members any more: a failed
    execution resumed since the listing (or one updated since) keeps its whole tree.
    """
    kept = []
    for tree in trees:
        for member in tree.members:
            info = await log.stream_info(execution_stream(member))
            if info is None or not _eligible(info, cut):
                break
        else:
            kept.append(tree)
    return kept


def batches(trees: Sequence[Tree], size: int | None = None) -> Iterator[list[str]]:
    """The trees' members in groups of whole trees, about ``size`` ids each (``BATCH``).

    Each group is one ``delete_streams`` call: a tree is never split between two, so
    it goes whole or not at all; grouping saves a commit (an fsync) per tree.
    """
    size = BATCH if size is None else size
    batch: list[str] = []
    for tree in trees:
        if batch and len(batch) + len(tree.members) > size:
            yield batch
            batch = []
        batch += tree.members
    if batch:
        yield batch
