"""The worker's delay loop: delayed tasks move through the delays topic's levels to the tasks topic.

Every worker is a member of a second consumer group, ``<group_id>.delays``, over the
delays topic (:mod:`qtasks.delays`): each level partition has one owner at a time. The
owner reads a partition in order; a record whose time at this level has not come
yet is *held*: the partition is paused and set back to that record's offset, and the
loop sleeps until the earliest held record is due (one held record per partition, no
timer per task). A record whose time came is moved on, to a shorter level or, within
a second of its due time, to the tasks topic, with its bytes unchanged. The offsets
of the records moved on are committed only once the records are stored where they
went: a worker that dies meanwhile leaves them to the partition's next owner, which
moves them again. A task moved twice is one task (its uuid): the worker that takes
the second copy finds it running or finished, and does not run it again.

A record that cannot be used (no key, no due time) goes to the dead-letter topic with
the reason; a delayed task cancelled while it waited is dropped here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from qtasks.connectors.base import Record, TopicPartition
from qtasks.core import Core
from qtasks.deadletter import dead_letter
from qtasks.delays import KEY, MOVED, delay_headers, level_for, level_seconds, read_headers
from qtasks.delivery import deliver, deliver_together, fetch
from qtasks.exc import BrokerRefusedError, CommitFailedError, ConnectorError, RecordError
from qtasks.partitioner import partition_for
from qtasks.records import decode_key

log = logging.getLogger("qtasks.worker")

#: Records one pass of the loop reads at most.
BATCH = 500
#: The longest the loop waits for records before it looks at its held ones again (seconds).
IDLE = 1.0

_Send = Callable[[], Awaitable[Awaitable[Any] | None]]


class DelayScheduler:
    """Moves the delayed tasks of the partitions it owns on as their time comes."""

    def __init__(
        self,
        core: Core,
        group_id: str,
        client_id: str,
        worker_id: str,
        on_first: Callable[[bool], None] | None = None,
    ) -> None:
        self.core = core
        #: Told whether this worker owns partition 0 now (the periodic tasks tick there).
        self._on_first = on_first
        self.group_id = group_id
        self.client_id = client_id
        self.worker_id = worker_id
        self._consumer: Any = None
        self._assigned: set[TopicPartition] = set()
        #: Partition -> (when its first record is due at its level, that record's offset).
        self._held: dict[TopicPartition, tuple[float, int]] = {}
        self._leaving = False
        self._closing: asyncio.Future[None] | None = None
        #: Delayed tasks moved on (to a shorter level or to the tasks topic), and dropped (cancelled).
        self.moved = 0
        self.due = 0
        self.dropped = 0

    @property
    def held(self) -> int:
        """Records held in memory right now: at most one per owned partition."""
        return len(self._held)

    async def start(self) -> None:
        """Join the delays group (its partitions come with the first poll)."""
        self._consumer = self.core.broker.consumer(self.group_id, client_id=self.client_id)
        self._consumer.subscribe([self.core.topics.delays], self)
        await self._consumer.start()

    def leave(self) -> None:
        """The worker stops: the loop ends at its next pass and leaves the group, so that
        other workers take these levels (and the ticking of periodic tasks) at once, not
        after this worker's running tasks have finished."""
        self._leaving = True

    async def stop(self) -> None:
        """Leave the group (what was moved on is committed already)."""
        self._leaving = True
        await self._close()

    async def _close(self) -> None:
        if self._consumer is None:
            return
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._consumer.stop())
        await asyncio.shield(self._closing)

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._held = {tp: held for tp, held in self._held.items() if tp not in revoked}
        if self._on_first is not None and TopicPartition(self.core.topics.delays, 0) in revoked:
            self._on_first(False)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # Every assigned partition is read again from its committed offset: nothing is held.
        self._assigned = set(assigned)
        self._held = {}
        self._consumer.resume(assigned)
        if self._on_first is not None:
            self._on_first(TopicPartition(self.core.topics.delays, 0) in assigned)
        log.info("worker %s moves on the delayed tasks of levels %s", self.worker_id, sorted(p for _, p in assigned))

    async def run(self) -> None:
        """The worker's supervised loop (it returns once the worker stops: :meth:`leave`)."""
        while not self._leaving:
            now = time.time()
            self._release(now)
            soonest = min((due for due, _ in self._held.values()), default=now + IDLE)
            records = await fetch(self._consumer, min(max(soonest - now, 0.0), IDLE), max_records=BATCH)
            if records and not self._leaving:
                await self._take(records)
        await self._close()

    def _release(self, now: float) -> None:
        due = [tp for tp, (at, _) in self._held.items() if at <= now]
        for tp in due:
            del self._held[tp]
        if due:
            self._consumer.resume(due)

    async def _take(self, records: list[Record]) -> None:
        """Move on the records whose time came, hold the first that is not due in each partition, commit."""
        now = time.time()
        core = self.core
        sends: list[tuple[_Send, str, Record]] = []
        bad: list[tuple[Record, RecordError]] = []
        done: dict[TopicPartition, int] = {}
        for record in records:
            tp = record.tp
            if tp in self._held or tp not in self._assigned:
                continue  # read past a held record (it is read again), or no longer ours
            try:
                uuid, due, at, headers = _read(record)
            except RecordError as problem:
                bad.append((record, problem))
                done[tp] = record.offset + 1
                continue
            # A record written "in the future" (its writer's clock runs ahead) must not hold
            # the partition back: it is moved on at once, stamped with this worker's clock.
            wake = now if at > now else min(due, at + level_seconds(record.partition))
            if wake > now:
                self._held[tp] = (wake, record.offset)
                self._consumer.pause([tp])
                await self._consumer.seek(tp, record.offset)
                continue
            done[tp] = record.offset + 1
            head = core.view.head(uuid)
            if head is not None and head.is_finished:
                self.dropped += 1  # cancelled while it waited
                continue
            sends.append((self._sender(record, uuid, due, now, headers), f"delayed task {uuid}", record))
        for record, error in bad:
            await dead_letter(core, record, str(error), self.worker_id, kind=error.kind)
        if sends:
            await self._deliver(sends)
        if done:
            try:
                await self._consumer.commit(done)
            except CommitFailedError as exc:  # a rebalance: the next owner moves them again (one task each)
                log.info("delays: %s", exc)
            except ConnectorError as exc:
                if not exc.retriable:
                    raise
                # The broker is away: the next commit covers these (or they are moved again: one task each).
                log.debug("delays: commit failed: %s", exc)

    def _sender(self, record: Record, uuid: str, due: float, now: float, headers: list[tuple[str, bytes]]) -> _Send:
        """Where the record goes now: the level for the time left, or (under a second) the tasks topic."""
        core = self.core
        producer = core.broker.producer
        value, key = record.value, record.key
        level = level_for(due - now, core.delays_partitions)
        if level is None:
            self.due += 1
            # A keyed task goes to its key's partition (the header is the delays topic's only).
            order = next((v.decode("utf-8", "replace") for n, v in headers if n == KEY), uuid)
            headers = [(n, v) for n, v in headers if n not in (KEY, MOVED)]
            headers.append((MOVED, repr(now).encode()))  # the worker that takes it holds it, never sends it back
            topic, partition, out = core.topics.tasks, partition_for(order, core.tasks_partitions), headers
        else:
            self.moved += 1
            topic, partition, out = core.topics.delays, level, delay_headers(due, now, headers)

        def send() -> Any:
            return producer.send(topic, value, key=key, partition=partition, headers=out or None)

        return send

    async def _deliver(self, sends: list[tuple[_Send, str, Record]]) -> None:
        """Store them all (retried while the broker is away); one the broker refuses for good is dead-lettered."""
        core = self.core
        try:
            await deliver_together([(send, what) for send, what, _ in sends], trouble=core.trouble)
            return
        except BrokerRefusedError:
            raise  # not allowed to write: the worker stops and says so
        except ConnectorError:
            pass
        for send, what, record in sends:  # one at a time, to find the ones refused (a copy stored twice is one task)
            try:
                await deliver(send, what=what, trouble=core.trouble)
            except BrokerRefusedError:
                raise
            except ConnectorError as exc:
                await dead_letter(core, record, f"the delayed task could not be moved on: {exc}", self.worker_id)


def _read(record: Record) -> tuple[str, float, float, list[tuple[str, bytes]]]:
    """(uuid, due, at, other headers) of a delays-topic record, or :class:`RecordError`."""
    uuid = decode_key(record.key)
    if record.value is None:
        raise RecordError("delayed task record has no value", "no_value")
    due, at, headers = read_headers(record.headers)
    return uuid, due, at, headers
