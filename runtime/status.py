"""How an execution's status reads to people, computed here and only here.

Every command that shows a status (``perdure status``, ``inspect``, the signal commands)
turns an execution's index entry (``journal.index_meta``) into words with
:func:`describe`, so no two of them can disagree. Two facts that the index entry alone
does not hold are passed in:

- whether a process owns the data dir (:func:`owner_pid`): a ``running`` execution with
  no owner is not running at all; it carries on when a runtime next opens the dir;
- how many signals for it wait in the inbox, not yet delivered
  (:func:`pending_signals`);
- which agents the owning runtime has registered (:func:`registered_agents`): a
  ``running`` execution whose agent the owner lacks waits until it is registered.

Nothing here takes the owner lock or writes: the owner is found by reading the pid in
``owner.lock`` and asking the kernel whether anyone holds the lock on that file.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from perdure.cli_render import fmt_time
from perdure.events import INBOX_STREAM, RUNTIME_STREAM, SignalSent, decode, execution_stream
from perdure.log.errors import CorruptRecordError, TrimmedError
from perdure.log.protocol import EventLog, Record
from perdure.timers import APPROVAL_TIMER

__all__ = [
    "STATUSES",
    "PendingSignal",
    "blocked_descendant",
    "confirmation_owner",
    "owner_phrase",
    "describe",
    "owner_pid",
    "pending_signals",
    "registered_agents",
]

#: Every status an execution's index entry may hold.
STATUSES = ("running", "queued", "suspended", "completed", "failed", "cancelled")

_LOCK_FILE = "owner.lock"
_LOCKS = "/proc/locks"


def describe(
    meta: Mapping[str, Any],
    *,
    owned: bool | None = None,
    pending: int = 0,
    agents: frozenset[str] | None = None,
) -> str:
    """One execution's status in words, e.g. ``"suspended (approval c-1a2b)"`` or
    ``"suspended (timer until 2026-12-03 10:00:00)"`` (local time).

    ``meta`` is the execution's index entry. ``owned`` says whether a process owns the
    data dir (None: unknown, say nothing about it); ``pending`` is how many signals for
    the execution wait in the inbox; ``agents``, the agents the owner has registered
    (None: unknown).
    """
    status = str(meta.get("status") or "unknown")
    notes: list[str] = []
    if status == "suspended":
        reason = str(meta.get("reason") or "unknown reason")
        confirmations = [str(c) for c in meta.get("confirmations") or ()]
        timer = meta.get("timer")
        if reason in ("approval", "contract") and confirmations:
            notes.append(f"{reason} {', '.join(confirmations)}")
        elif not (reason == "timer" and timer):
            notes.append(reason)
        if timer and str(timer[1]).startswith(APPROVAL_TIMER):
            # An approval timeout: what happens then is a rejection, not a wake-up.
            notes.append(f"expires {fmt_time(timer[0])}")
        elif timer:
            # Its earliest timer, whatever else it waits for: it wakes by itself then.
            notes.append(f"timer until {fmt_time(timer[0])}")
        if confirmations and reason not in ("approval", "contract"):
            # The reason names the first blocker only; a call of the same turn waiting
            # for a decision is what an operator can act on, so it is named too.
            noun = "confirmation" if len(confirmations) == 1 else "confirmations"
            notes.append(f"{noun} {', '.join(confirmations)}")
    elif status in ("running", "queued") and owned is False:
        notes.append("no owner: resumes at next start")
    elif status in ("running", "queued") and owned and agents is not None:
        agent = str(meta.get("agent") or "")
        if agent not in agents:
            notes.append(f"the owner has no agent {agent!r} registered: waits until it does")
    if pending:
        noun = "signal" if pending == 1 else "signals"
        where = "" if owned is not False else ", delivered at next start"
        notes.append(f"{pending} {noun} pending{where}")
    return f"{status} ({'; '.join(notes)})" if notes else status


#: How many generations below a child :func:`blocked_descendant` looks.
_MAX_DEPTH = 32


async def blocked_descendant(
    log: EventLog, meta: Mapping[str, Any]
) -> tuple[str, Mapping[str, Any]] | None:
    """The execution deepest down a chain of delegations that ``meta``'s waits on.

    ``meta`` is a child's index entry. If that child is suspended waiting for a child of
    its own (and so on), the last one of the chain (its id and index entry) is what
    holds the whole chain up: a grandchild's approval, say. None if ``meta`` waits for
    no child. The first child waited on is followed at each level.
    """
    found: tuple[str, Mapping[str, Any]] | None = None
    for _ in range(_MAX_DEPTH):
        if meta.get("status") != "suspended" or meta.get("reason") != "child":
            break
        waiting = list(meta.get("waiting_on") or ())
        if not waiting:
            break
        info = await log.stream_info(execution_stream(str(waiting[0])))
        if info is None:
            break
        meta = info.meta
        found = (str(waiting[0]), meta)
    return found


async def confirmation_owner(log: EventLog, eid: str, cid: str) -> list[str] | None:
    """The chain of descendants of ``eid`` down to the one that holds confirmation ``cid``.

    ``[child, ..., owner]``: a direct child's confirmation gives ``[child]``, a
    grandchild's ``[child, grandchild]``. None if no descendant has ``cid`` pending. Each
    candidate's ``parent`` fields are walked up to ``eid``, so an execution a user merely
    named under ``eid``'s id (ids may hold "/") is never taken for a descendant.
    """
    # A child's id is "eid/step", or "eid[:200]~digest/step" when that would be too long
    # (see Runtime._delegate): the walk up the parent fields below tells them apart.
    prefix = execution_stream(eid) + "/" if len(eid) <= 200 else execution_stream(eid[:200])
    async for info in log.streams(prefix=prefix):
        if cid not in (info.meta.get("confirmations") or ()):
            continue
        chain = [info.stream[len(execution_stream("")) :]]
        meta: Mapping[str, Any] = info.meta
        for _ in range(_MAX_DEPTH):
            parent = meta.get("parent")
            if not parent:
                break
            if parent == eid:
                return chain
            up = await log.stream_info(execution_stream(str(parent)))
            if up is None:
                break
            chain.insert(0, str(parent))
            meta = up.meta
    return None


def owner_phrase(eid: str, chain: list[str]) -> str:
    """Where a confirmation asked of ``eid`` lives, from :func:`confirmation_owner`'s chain.

    Every link is named: the operator sees why ``eid`` is held up by it.
    """
    owner = chain[-1]
    if len(chain) == 1:
        return f"child execution {owner!r}, which execution {eid!r} waits for"
    links = ", which waits for ".join(repr(c) for c in chain)
    return (
        f"execution {owner!r}, {len(chain)} delegations below {eid!r} ({eid!r} waits for {links})"
    )


async def registered_agents(log: EventLog, owner: int | None) -> frozenset[str] | None:
    """The agents the runtime that owns the dir (pid ``owner``) has registered.

    None when nobody owns it, or the owner has not said (an older version, or it is
    still opening): then nothing is said about agents.
    """
    if owner is None:
        return None
    info = await log.stream_info(RUNTIME_STREAM)
    if info is None or info.meta.get("pid") != owner:
        return None  # written by an earlier owner
    agents = info.meta.get("agents")
    return frozenset(str(a) for a in agents) if isinstance(agents, list) else None


def owner_pid(data_dir: str | os.PathLike[str]) -> int | None:
    """The pid of the process that owns ``data_dir`` (holds its lock), or None.

    Reads the pid the owner wrote into ``owner.lock`` and checks, without taking it,
    that the lock is held: on Linux from ``/proc/locks``, elsewhere by asking whether
    that pid is alive. A pid left behind by a process that closed the dir or died
    (SIGKILL included: the kernel drops its lock) is not an owner.
    """
    path = os.path.join(os.fspath(data_dir), _LOCK_FILE)
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
        st = os.stat(path)
    except OSError:
        return None
    pid = int(text) if text.isdigit() else None
    holders = _flock_holders(st, pid)
    if holders is None:  # no /proc/locks: the pid's liveness is the best evidence left
        return pid if pid is not None and _alive(pid) else None
    if not holders:
        return None
    if pid in holders:
        return pid
    # A new owner that has locked but not yet written its pid; or (pid 0) a holder in
    # another pid namespace, where the pid it wrote is the best name we have for it.
    seen = [h for h in holders if h > 0]
    if seen:
        return seen[0]
    return pid if pid is not None else 0


def _flock_holders(st: os.stat_result, pid: int | None) -> list[int] | None:
    """Pids holding a flock on the file ``st`` describes; None if the kernel won't say."""
    try:
        with open(_LOCKS, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = []
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146349 0 EOF" ("->" marks waiters).
        parts = line.split()
        if len(parts) < 6 or "->" in parts or parts[1] != "FLOCK" or not parts[4].isdigit():
            continue
        holder, where = int(parts[4]), parts[5]
        # Overlay and network filesystems may report the lower layer's device: accept
        # a lock on the same inode number held by the pid the owner wrote.
        if where == device or (where.rsplit(":", 1)[-1] == str(st.st_ino) and holder == pid):
            holders.append(holder)
    return holders


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is just not ours
    except OSError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class PendingSignal:
    """A signal in the inbox that its execution has not taken yet.

    ``state`` says why: ``"pending"`` (not delivered yet), ``"held"`` (its delivery
    failed ``attempts`` times, the last with ``error``; it is retried with backoff) or
    ``"waiting"`` (behind a held signal for the same execution, delivered after it).
    """

    seq: int
    target: str
    name: str
    payload: Any
    by: str
    timestamp: float
    state: str = "pending"
    attempts: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-friendly once the payload is)."""
        return {
            "inbox_seq": self.seq,
            "execution_id": self.target,
            "name": self.name,
            "payload": self.payload,
            "by": self.by,
            "sent_at": self.timestamp,
            "state": self.state,
            "attempts": self.attempts,
            "error": self.error,
        }


async def pending_signals(log: EventLog) -> dict[str, list[PendingSignal]]:
    """Signals not yet delivered, by execution id, oldest first.

    A signal is pending while the owning runtime's inbox pump has not got it through
    (see perdure.inbox: its ``cursor``, ``through`` and ``held`` in the inbox's index
    entry) and its execution has not recorded it (an execution records the inbox seq
    of each signal it takes, so a cursor that lags after a crash does not count as
    pending). Reads only the inbox's tail, after the cursor (the owner trims the inbox
    only through its stored cursor, so that tail is kept).
    """
    info = await log.stream_info(INBOX_STREAM)
    if info is None:
        return {}
    cursor = int(info.meta.get("cursor", 0) or 0)
    through = max(cursor, int(info.meta.get("through", 0) or 0))
    held: Mapping[str, Any] = info.meta.get("held") or {}
    found: dict[str, list[PendingSignal]] = {}
    async for record in _readable(log, cursor):
        try:
            event = decode(record)
        except Exception:  # the pump refuses it too; 'perdure health' names it
            continue
        if not isinstance(event, SignalSent):
            continue
        hold = held.get(event.target)
        if hold is None and record.seq <= through:
            continue  # through: taken, or refused (no such execution, or it is finished)
        state, attempts, error = "pending", 0, None
        if hold is not None:
            first = int(hold.get("seq", 0) or 0)
            if record.seq == first:
                state, attempts, error = "held", int(hold.get("attempts", 0)), hold.get("error")
            elif record.seq > first:
                state = "waiting"
            elif record.seq <= through:
                continue  # taken before its execution's lane was held
        found.setdefault(event.target, []).append(
            PendingSignal(
                record.seq,
                event.target,
                event.name,
                event.payload,
                event.by,
                record.timestamp,
                state,
                attempts,
                error,
            )
        )
    out: dict[str, list[PendingSignal]] = {}
    for target, signals in found.items():
        entry = await log.stream_info(execution_stream(target))
        taken = int(entry.meta.get("signal_seq", 0) or 0) if entry is not None else 0
        left = [s for s in signals if s.seq > taken]
        if left:
            out[target] = left
    return out


async def _readable(log: EventLog, after: int) -> AsyncIterator[Record]:
    """The inbox's records after ``after``, passing over any that cannot be read.

    One unreadable record (a checksum failure, CBOR the decoder refuses) must not make
    every status view fail: it is no pending signal anyone can act on, and ``perdure
    health`` names it by stream and seq. Records the owner trims meanwhile (it moved its
    cursor past them after ours was read, and trimmed) are through: they are passed.
    """
    while True:
        try:
            async for record in log.read(INBOX_STREAM, after=after):
                after = record.seq
                yield record
            return
        except TrimmedError as exc:
            after = max(after, exc.first_seq - 1)
            continue
        except CorruptRecordError as exc:
            if exc.seq is None or exc.seq <= after:
                raise  # the index entry itself, or no way past it
            after = exc.seq
