"""The bounded mailbox an actor reads from, and the envelope that carries an ``ask``.

A mailbox belongs to a child, not to an incarnation: it outlives restarts, so a
message sent while the actor restarts waits for the next incarnation. It has one
consumer (the child's runner task) and any number of producers. Producers that find
it full wait in FIFO order; a consumer that frees a slot reserves it for the first
waiting producer, so a later ``put_nowait`` cannot overtake it.

Why not an anyio memory object stream: the consumer must also be woken without a
message (to begin a graceful stop after the current message), the mailbox must fail
queued asks when the child is gone for good, a *dormant* consumer (a child with no
task yet) must be told when its first message arrives, and an idle mailbox should
cost almost nothing (the buffer is created on first use and dropped when it drains;
the consumer waits on a :mod:`~perdure.actors.parking` waiter, not an anyio.Event).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

import anyio

from perdure.actors.errors import MailboxClosed
from perdure.actors.parking import Parking

__all__ = ["EMPTY", "AskEnvelope", "Mailbox"]


class _Empty:
    __slots__ = ()

    def __repr__(self) -> str:
        return "EMPTY"


EMPTY: Final = _Empty()
"""Returned by :meth:`Mailbox.take` when there is nothing to take."""


class AskEnvelope:
    """One ``ask`` in flight: the message, and a reply slot with a one-shot waiter."""

    __slots__ = ("done", "error", "message", "parking", "value", "waiter")

    def __init__(self, message: object, parking: Parking) -> None:
        self.message = message
        self.parking = parking
        self.waiter = parking.waiter()
        self.done = False
        self.value: object = None
        self.error: BaseException | None = None

    def reply(self, value: object) -> None:
        """Deliver the reply (first outcome wins)."""
        if not self.done:
            self.done = True
            self.value = value
            self.parking.wake(self.waiter)

    def fail(self, error: BaseException) -> None:
        """Deliver an error instead of a reply (first outcome wins)."""
        if not self.done:
            self.done = True
            self.error = error
            self.parking.wake(self.waiter)

    def outcome(self) -> object:
        """Return the reply or raise the error (only once :attr:`done`)."""
        if self.error is None:
            return self.value
        raise self.error


class Mailbox:
    """A bounded FIFO of messages with a single consumer; see the module docstring."""

    __slots__ = (
        "_capacity",
        "_closed",
        "_getter",
        "_items",
        "_putters",
        "_reserved",
        "consumer",
        "dormant",
        "owner",
        "parking",
    )

    def __init__(self, capacity: int, owner: str, parking: Parking, consumer: Any) -> None:
        self._capacity = capacity
        self.owner = owner
        self.parking = parking
        # When ``dormant``, the consumer has no task waiting: the first message put in
        # calls ``consumer._mail_arrived()`` (once) to give it one.
        self.consumer = consumer
        self.dormant = False
        self._items: deque[object] | None = None
        self._getter: Any = None  # the consumer's parking waiter while it waits
        self._putters: deque[anyio.Event] | None = None
        # Slots freed by the consumer and promised to woken (not yet resumed) putters.
        self._reserved = 0
        self._closed: str | None = None

    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)

    @property
    def capacity(self) -> int:
        """How many messages fit before senders wait."""
        return self._capacity

    @property
    def closed(self) -> bool:
        """True once the mailbox's child is gone for good."""
        return self._closed is not None

    @property
    def waiting_senders(self) -> int:
        """How many producers are blocked waiting for room."""
        return (0 if self._putters is None else len(self._putters)) + self._reserved

    def put_nowait(self, item: object) -> None:
        """Append ``item`` or raise ``anyio.WouldBlock`` when full (or senders are queued)."""
        if self._closed is not None:
            raise MailboxClosed(self.owner, self._closed)
        items = self._items
        if items is None:
            items = self._items = deque()
        elif len(items) + self._reserved >= self._capacity or self._putters:
            raise anyio.WouldBlock
        items.append(item)
        getter = self._getter
        if getter is not None:
            self._getter = None
            self.parking.wake(getter)
        elif self.dormant:
            self.dormant = False
            self.consumer._mail_arrived()

    async def put(self, item: object) -> None:
        """Append ``item``, waiting in FIFO order while the mailbox is full.

        Not a checkpoint when there is room (callers add one where they need it).
        """
        try:
            self.put_nowait(item)
            return
        except anyio.WouldBlock:
            pass
        putters = self._putters
        if putters is None:
            putters = self._putters = deque()
        event = anyio.Event()
        putters.append(event)
        try:
            await event.wait()
        except BaseException:
            try:
                putters.remove(event)
            except ValueError:
                # We were woken (a slot was reserved for us) but are leaving: hand the
                # reservation to the next waiting producer so it is not lost.
                self._reserved -= 1
                self._wake_putter()
            raise
        self._reserved -= 1
        if self._closed is not None:
            raise MailboxClosed(self.owner, self._closed)
        items = self._items
        if items is None:
            items = self._items = deque()
        items.append(item)
        getter = self._getter
        if getter is not None:
            self._getter = None
            self.parking.wake(getter)
        elif self.dormant:
            self.dormant = False
            self.consumer._mail_arrived()

    def _wake_putter(self) -> None:
        putters = self._putters
        if putters:
            self._reserved += 1
            putters.popleft().set()

    def take(self) -> object:
        """Remove and return the oldest message, or :data:`EMPTY` if there is none."""
        items = self._items
        if not items:
            return EMPTY
        item = items.popleft()
        if self._putters:
            self._wake_putter()
        elif not items and not self._reserved:
            # Idle actors should not each hold an empty deque (~600 bytes).
            self._items = None
        return item

    def park(self) -> Any:
        """Register the consumer as waiting; return the waiter to await (then :meth:`unpark`)."""
        waiter = self._getter = self.parking.waiter()
        return waiter

    def unpark(self, waiter: Any) -> None:
        """Unregister the consumer's ``waiter`` after its wait ended (woken or cancelled)."""
        if self._getter is waiter:
            self._getter = None

    def wake(self) -> None:
        """Wake the consumer if it is waiting, without a message."""
        getter = self._getter
        if getter is not None:
            self._getter = None
            self.parking.wake(getter)

    def close(self, detail: str) -> None:
        """Close for good: fail queued asks and waiting senders, drop queued tells."""
        if self._closed is not None:
            return
        self._closed = detail
        items, self._items = self._items, None
        if items:
            for item in items:
                if type(item) is AskEnvelope:
                    item.fail(MailboxClosed(self.owner, detail))
        putters, self._putters = self._putters, None
        if putters:
            for event in putters:
                self._reserved += 1
                event.set()
            putters.clear()
        self.wake()
