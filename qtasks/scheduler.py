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
the reason; a delayed task cancelled while it waited is dropped here. A record the loop
cannot finish (its dead letter is refused) is held for :data:`RETRY` seconds and read
again, as a record not due yet is: the commit never passes it. Whatever else fails in
a pass (the supervisor restarts the loop on the same consumer, whose position is past
the whole batch) sets the pass's partitions back to where the pass began reading them,
so the restarted loop reads those records again.
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
from qtasks.supervise import raise_if_cancelled

log = logging.getLogger("qtasks.worker")

#: Records one pass of the loop reads at most.
BATCH = 500
#: The longest the loop waits for records before it looks at its held ones again (seconds).
IDLE = 1.0
#: A record the loop could not finish (its dead letter was refused) is read again after this (seconds).
RETRY = 1.0

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
        #: Partition -> where a pass that failed began reading it: the loop reads it again from there.
        self._rewind: dict[TopicPartition, int] = {}
        #: Counts the assignments: a pass that fails across one sets nothing back (all is read afresh).
        self._generation = 0
        #: (partition, offset) of a record whose dead letter is refused -> since when (logged once).
        self._refused: dict[tuple[TopicPartition, int], float] = {}
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
        self._rewind = {tp: offset for tp, offset in self._rewind.items() if tp not in revoked}
        if self._on_first is not None and TopicPartition(self.core.topics.delays, 0) in revoked:
            self._on_first(False)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # Every assigned partition is read again from its committed offset: nothing is held
        # (and nothing a failed pass left needs setting back).
        self._assigned = set(assigned)
        self._refused = {}
        self._held = {}
        self._rewind = {}
        self._generation += 1
        self._consumer.resume(assigned)
        if self._on_first is not None:
            self._on_first(TopicPartition(self.core.topics.delays, 0) in assigned)
        log.info("worker %s moves on the delayed tasks of levels %s", self.worker_id, sorted(p for _, p in assigned))

    async def run(self) -> None:
        """The worker's supervised loop (it returns once the worker stops: :meth:`leave`)."""
        while not self._leaving:
            await self._read_again()
            now = time.time()
            self._release(now)
            soonest = min((due for due, _ in self._held.values()), default=now + IDLE)
            records = await fetch(self._consumer, min(max(soonest - now, 0.0), IDLE), max_records=BATCH)
            if records and not self._leaving:
                await self._pass(records)
        await self._close()

    async def _read_again(self) -> None:
        """Set back the partitions a failed pass left past records it did not finish (a seek that
        fails raises: the restarted loop tries again before it reads anything)."""
        while self._rewind:
            tp, offset = next(iter(self._rewind.items()))
            if tp in self._assigned:
                await self._consumer.seek(tp, offset)
            del self._rewind[tp]

    async def _pass(self, records: list[Record]) -> None:
        """One pass over a batch. If anything in it fails, the loop is set back to where the pass
        began reading each of its partitions before the error goes on to the supervisor: the
        consumer's position is past the whole batch, and a restarted loop would otherwise never
        read the records the pass did not finish (nor would the next commit wait for them). The
        records it did move on are moved again: one task each (their uuid)."""
        generation = self._generation
        # A partition held before this pass is set back to its held record already.
        starts: dict[TopicPartition, int] = {}
        for record in records:
            if record.tp in self._assigned and record.tp not in self._held:
                starts.setdefault(record.tp, record.offset)
        try:
            await self._take(records)
        except BaseException:
            if generation == self._generation:  # after a new assignment all is read afresh anyway
                for tp, offset in starts.items():
                    self._rewind[tp] = min(offset, self._rewind.get(tp, offset))
                    self._held.pop(tp, None)  # a hold this pass made: the record is read again
                self._consumer.resume(starts)
            raise

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
        #: Partition -> the offset to commit: past every record of this pass finished there.
        done: dict[TopicPartition, int] = {}
        for record in records:
            tp = record.tp
            if tp in self._held or tp not in self._assigned:
                continue  # read past a held record (it is read again), or no longer ours
            try:
                uuid, due, at, headers = _read(record)
            except RecordError as problem:
                # Dead-lettered in its turn; a letter refused leaves it (and what follows it in
                # its partition) to be read again in a moment, as the worker's intake leaves it unfinished.
                if await self._dead_letter(record, str(problem), problem.kind):
                    done[tp] = record.offset + 1
                else:
                    await self._hold(record, time.time() + RETRY)
                continue
            # A record written "in the future" (its writer's clock runs ahead) must not hold
            # the partition back: it is moved on at once, stamped with this worker's clock.
            wake = now if at > now else min(due, at + level_seconds(record.partition))
            if wake > now:
                await self._hold(record, wake)
                continue
            done[tp] = record.offset + 1
            head = core.view.head(uuid)
            if head is not None and head.is_finished:
                self.dropped += 1  # cancelled while it waited
                continue
            sends.append((self._sender(record, uuid, due, now, headers), f"delayed task {uuid}", record))
        if sends:
            for record in await self._deliver(sends):  # not stored nor dead-lettered: read again in a moment
                done[record.tp] = min(done[record.tp], record.offset)
                await self._hold(record, time.time() + RETRY)
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

    async def _hold(self, record: Record, until: float) -> None:
        """Hold ``record`` until ``until``: its partition is paused and set back to it (it is read
        again then, with what follows it). A partition held at an earlier record stays there."""
        tp = record.tp
        held = self._held.get(tp)
        if tp not in self._assigned or (held is not None and held[1] <= record.offset):
            return  # no longer ours (its next owner reads it), or held at an earlier record
        self._held[tp] = (until, record.offset)
        self._consumer.pause([tp])
        await self._consumer.seek(tp, record.offset)

    async def _dead_letter(self, record: Record, reason: str, kind: str = "undecodable") -> bool:
        """Send ``record`` to the dead-letter topic; False if that failed (it is read again later)."""
        try:
            await dead_letter(self.core, record, reason, self.worker_id, kind=kind)
        except BrokerRefusedError:
            raise  # not allowed to write: the worker stops and says so
        except Exception as exc:
            raise_if_cancelled()  # a stop whose cancellation became an error
            where = (record.tp, record.offset)
            if where in self._refused:
                log.debug("delays: the dead letter of %s@%d is still refused: %r", record.tp, record.offset, exc)
                return False
            self._refused[where] = time.monotonic()  # logged once per record, not once per try
            log.error(
                "delays: could not send %s@%d to the dead-letter topic (%r); it is tried again every %.0f s",
                record.tp,
                record.offset,
                exc,
                RETRY,
            )
            return False
        since = self._refused.pop((record.tp, record.offset), None)
        if since is not None:
            log.info(
                "delays: %s@%d reached the dead-letter topic after %.0f s",
                record.tp,
                record.offset,
                time.monotonic() - since,
            )
        return True

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

    async def _deliver(self, sends: list[tuple[_Send, str, Record]]) -> list[Record]:
        """Store them all (retried while the broker is away); one the broker refuses for good is
        dead-lettered. Returns the records not finished (their dead letter was refused too)."""
        core = self.core
        try:
            await deliver_together([(send, what) for send, what, _ in sends], trouble=core.trouble)
            return []
        except BrokerRefusedError:
            raise  # not allowed to write: the worker stops and says so
        except ConnectorError:
            pass
        unfinished = []
        for send, what, record in sends:  # one at a time, to find the ones refused (a copy stored twice is one task)
            try:
                await deliver(send, what=what, trouble=core.trouble)
            except BrokerRefusedError:
                raise
            except ConnectorError as exc:
                if not await self._dead_letter(record, f"the delayed task could not be moved on: {exc}"):
                    unfinished.append(record)
        return unfinished


def _read(record: Record) -> tuple[str, float, float, list[tuple[str, bytes]]]:
    """(uuid, due, at, other headers) of a delays-topic record, or :class:`RecordError`."""
    uuid = decode_key(record.key)
    if record.value is None:
        raise RecordError("delayed task record has no value", "no_value")
    due, at, headers = read_headers(record.headers)
    return uuid, due, at, headers
