"""A partition's deliveries as the engine sees them: one callback for all its records.

Every record a producer sends gets a delivery of its own, apart from aiokafka's future:
a caller that gives up on it (a timeout, a cancel) cancels only its own, never
aiokafka's, which the producer still reads (a partition's end, the failures a ``flush``
reports). A failure is a :class:`~qtasks.exc.ConnectorError` (the producer maps it),
already marked as retrieved: a caller that never awaits it learns of it elsewhere.

One :class:`Deliveries` per partition is the callback of all its records. A closure per
record (a function, its cells and a second future) kept some ten objects alive per record
in flight for the garbage collector to walk; without them a task that yields many values
takes about a fifth less CPU (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
from collections import deque
from typing import Any, Protocol

from aiokafka import TopicPartition as KafkaTP


class Owner(Protocol):
    """The producer a partition's deliveries report to."""

    def delivered(self, deliveries: Deliveries, result: Any) -> None:
        """A record of the partition is stored (``result``: aiokafka's metadata of it)."""

    def failed(self, deliveries: Deliveries, exc: BaseException) -> BaseException:
        """A record of the partition failed with ``exc``: the error its delivery ends with."""
        ...


class Deliveries:
    """The deliveries of one partition's records, sent by one aiokafka producer (``sender``)."""

    __slots__ = ("_context", "_deliveries", "_loop", "_owner", "_raws", "_strays", "partition", "sender", "topic", "tp")

    def __init__(self, owner: Owner, sender: Any, topic: str, partition: int) -> None:
        self._owner = owner
        #: The aiokafka producer that sends them (a producer that is rebuilt starts new ones).
        self.sender = sender
        self.topic = topic
        self.partition = partition
        #: The partition's name for aiokafka.
        self.tp = KafkaTP(topic, partition)
        self._loop = asyncio.get_running_loop()
        # The callback reads no context variable: one empty context, not a copy per record.
        self._context = contextvars.Context()
        #: aiokafka's futures and the deliveries, side by side (no tuple per record), in the
        #: order sent: a partition's records end in that order.
        self._raws: deque[asyncio.Future[Any]] = deque()
        self._deliveries: deque[asyncio.Future[Any]] = deque()
        #: Records taken out of the deques once one ended out of order (aiokafka's future:
        #: the delivery), so a stopping producer that fails thousands of them in another
        #: order costs one pass, not one search each.
        self._strays: dict[asyncio.Future[Any], asyncio.Future[Any]] = {}

    def add(self, raw: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """The delivery of the record whose aiokafka future is ``raw``."""
        delivery: asyncio.Future[Any] = self._loop.create_future()
        self._raws.append(raw)
        self._deliveries.append(delivery)
        raw.add_done_callback(self, context=self._context)
        return delivery

    def __call__(self, raw: asyncio.Future[Any]) -> None:
        raws, deliveries = self._raws, self._deliveries
        if raws and raws[0] is raw:
            raws.popleft()
            delivery = deliveries.popleft()
        else:  # out of order (a producer that stops fails its queued batches before the one in flight)
            strays = self._strays
            if raw not in strays:
                strays.update(zip(raws, deliveries, strict=True))
                raws.clear()
                deliveries.clear()
            delivery = strays.pop(raw)
        # The delivery may be done already: a caller that gave up awaiting it cancelled it.
        # The outcome then concerns no one, but the producer still learns of it.
        if raw.cancelled():
            delivery.cancel()
            return
        exc = raw.exception()
        if exc is None:
            result = raw.result()
            self._owner.delivered(self, result)
            if not delivery.done():
                delivery.set_result(result)
            return
        error = self._owner.failed(self, exc)
        if not delivery.done():
            delivery.set_exception(error)
            delivery.exception()


def deliveries_of(
    table: dict[tuple[str, int], Deliveries], owner: Owner, sender: Any, topic: str, partition: int
) -> Deliveries:
    """The partition's deliveries in ``table`` for records ``sender`` sends (new ones for a new sender)."""
    key = (topic, partition)
    deliveries = table.get(key)
    if deliveries is None or deliveries.sender is not sender:
        deliveries = table[key] = Deliveries(owner, sender, topic, partition)
    return deliveries


def read_when_sender_dies(client: Any) -> None:
    """Read the errors a started aiokafka producer leaves unread when its sender dies.

    A sender that stops on an error (the transactional producer fenced, or an error
    aiokafka does not expect) fails every queued batch and the open transaction on
    futures of aiokafka's own: a batch's future and drain waiter, which nothing waits on
    once the sender is gone, and the transaction's waiter, which a commit may never come
    to read. The engine learns of the failure from each record's delivery and from its
    next commit or flush; unread, asyncio logs each of those errors as "never retrieved"
    when the batch is collected: ERROR lines an operator can do nothing about, for a
    failure the engine handles.
    """
    # The accumulator and the transaction manager, not the client: the sender's task must
    # not keep an unstopped client alive (its "unclosed" warning would never come).
    sender = client._sender
    failed = functools.partial(_read_failures, sender, client._message_accumulator, client._txn_manager)
    sender.sender_task.add_done_callback(failed)


def _read_failures(sender: Any, accumulator: Any, manager: Any, sender_task: asyncio.Task[Any]) -> None:
    # Runs after aiokafka's own callback (added when it started the sender), which failed them.
    if sender_task.cancelled() or sender_task.exception() is None:
        return
    # The sender's requests still under way (a produce, a transaction step) belong to no
    # running sender now: once the client closes, they would wait forever for a metadata
    # update that never comes, and asyncio logs each one as "destroyed but pending" when
    # it is collected. Their batches failed with the sender; nothing waits for the answers.
    for task in asyncio.all_tasks():
        frame = getattr(task.get_coro(), "cr_frame", None)
        if frame is not None and frame.f_locals.get("self") is sender:
            task.cancel()
    batches = [*itertools.chain.from_iterable(accumulator._batches.values()), *accumulator._pending_batches]
    futures = [f for batch in batches for f in (batch.future, batch._drain_waiter)]
    if manager is not None and manager._transaction_waiter is not None:
        futures.append(manager._transaction_waiter)
    for future in futures:
        read_error(future)
    # A request still in flight ends later; a retriable error (its connection closed as the
    # producer stops) would put its batch back for a sender that is gone, and aiokafka's
    # re-queue of a batch it already failed raises KeyError in a task nobody reads.
    accumulator.reenqueue = _never_again


def _never_again(batch: Any) -> None:
    """A dead sender's batch is not queued again: it failed with the sender's error."""


def read_error(future: asyncio.Future[Any]) -> None:
    """Mark a failed future's error as read (whoever awaits it still gets it)."""
    if future.done() and not future.cancelled():
        future.exception()
