"""The status store: the status view, the tailer that feeds it, and the one way to write a status.

- **Reading.** At start the store reads the compacted status topic from the beginning
  into its :class:`~qtasks.status.StatusView`, then tails it (a supervised loop).
- **Writing.** :meth:`StatusStore.write` writes a *copy* of the task it is given (the
  caller's object never changes) with the next ``rev`` (:func:`~qtasks.status.next_rev`),
  slimmed to fit one record (:func:`~qtasks.status.slim`). A non-durable write is applied
  to the view at once (a running task sees itself as ``process``); a durable write
  (terminal statuses, submissions) only once the broker stored it, so whatever this
  process reports as done is on the log, where any other process can read it.
- **Read-your-writes across processes.** A question about a uuid the view has not seen
  (:meth:`StatusStore.lookup`) first catches up: it reads the end offset of the uuid's
  status partition and waits (bounded) until the tailer has read that far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from qtasks import _state
from qtasks.config import QueueConfig
from qtasks.connectors.base import Connector, Record, TopicPartition
from qtasks.delivery import Trouble, deliver, fetch
from qtasks.exc import ConnectorError, RecordError
from qtasks.partitioner import partition_for
from qtasks.records import TERMINAL, StatusHead, Task, decode_status, decode_status_head, encode, head_of
from qtasks.status import CANCEL_REV, StatusView, next_rev, slim
from qtasks.supervise import Supervisor

if TYPE_CHECKING:
    from qtasks.transactions import PartitionTxn

log = logging.getLogger("qtasks.status")

#: How long a lookup of an unseen uuid waits for the tailer to reach the log's end.
CATCH_UP_TIMEOUT = 10.0
#: How often a catch-up looks at the consumer's position itself (for offsets without records).
_GAP_CHECK = 0.02
#: Seconds a finished task's record must stay stale (:meth:`StatusStore.restate`) before it is written again.
RESTATE_AFTER = 2.0


class StatusStore:
    """The status view of one process, its tailer, and its writes."""

    def __init__(self, topic: str, config: QueueConfig, supervisor: Supervisor, trouble: Trouble) -> None:
        self.topic = topic
        self.config = config
        self.view = StatusView(config.max_record_bytes, config.status_cache_size)
        self.partitions = 0
        self._supervisor = supervisor
        self._trouble = trouble
        self._connector: Connector | None = None
        self._consumer: Any = None
        self._positions: dict[TopicPartition, int] = {}
        self._progress: asyncio.Event | None = None
        self._record_limit = config.max_record_bytes
        #: Exactly-once: uuid -> its latest status written in a transaction not committed yet
        #: (this process reads its own writes; the view holds committed records only).
        self._pending: dict[str, tuple[Task, bytes, PartitionTxn]] = {}
        #: Endings written again after a stale record (:meth:`restate`).
        self.restated = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, connector: Connector, partitions: int, record_limit: int | None = None) -> None:
        """Read the status topic to its end (bootstrap), then keep tailing it."""
        self._connector = connector
        self.partitions = partitions
        if record_limit is not None:
            self._record_limit = min(self._record_limit, record_limit)
        self._progress = asyncio.Event()
        consumer = connector.consumer(None, client_id=f"{self.topic}-tail")
        await consumer.start()
        self._consumer = consumer
        tps = self._tps(range(partitions))
        consumer.assign(tps)
        await consumer.seek_to_beginning(tps)
        ends = await consumer.end_offsets(tps)
        self._supervisor.spawn("status-tail", self._tail)
        await self._supervisor.wait(self._reach(ends))
        self.view.caught_up.set()

    async def stop(self) -> None:
        """Stop reading (the supervisor has stopped the tailer)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
        self._positions.clear()
        self.view = StatusView(self.config.max_record_bytes, self.config.status_cache_size)

    def _tps(self, partitions: Any) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in partitions]

    async def follow(self, partitions: int) -> None:
        """The status topic grew: read its new partitions from their beginning too."""
        if partitions <= self.partitions or self._consumer is None:
            return
        new = self._tps(range(self.partitions, partitions))
        keep = {tp: await self._consumer.position(tp) for tp in self._tps(range(self.partitions))}
        self._consumer.assign([*keep, *new])
        for tp, position in keep.items():
            await self._consumer.seek(tp, position)
        await self._consumer.seek_to_beginning(new)
        log.info("status topic %s grew from %d to %d partitions", self.topic, self.partitions, partitions)
        self.partitions = partitions

    # -- reading ---------------------------------------------------------------------

    async def _tail(self) -> None:
        consumer = self._consumer
        view = self.view
        positions = self._positions
        while True:
            records = await fetch(consumer, 0.5)
            for record in records:
                positions[record.tp] = record.offset + 1
                try:
                    view.apply_raw(record.key, record.value)
                except (RecordError, UnicodeDecodeError) as exc:
                    log.warning("ignored a status record at %s@%d: %s", record.tp, record.offset, exc)
            if not records:
                # Compaction leaves gaps: the consumer's position moves past them.
                for tp in consumer.assignment():
                    positions[tp] = max(positions.get(tp, 0), await consumer.position(tp))
            assert self._progress is not None
            self._progress.set()
            self._progress = asyncio.Event()

    async def _reach(self, ends: dict[TopicPartition, int]) -> None:
        """Wait until the tailer has read every partition in ``ends`` up to its end offset.

        The last offsets of a partition may hold no record the tailer is handed
        (transaction markers, compacted gaps): the consumer's position passes them while
        its fetch waits for more, so a partition still behind is checked there too.
        """
        positions = self._positions
        while True:
            behind = [tp for tp, end in ends.items() if end > 0 and positions.get(tp, 0) < end]
            if not behind:
                return
            assert self._progress is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_GAP_CHECK):
                    await self._progress.wait()
            consumer = self._consumer
            if consumer is not None:
                for tp in behind:
                    if tp in consumer.assignment():
                        positions[tp] = max(positions.get(tp, 0), await consumer.position(tp))

    async def catch_up(self, uuid: str, timeout: float = CATCH_UP_TIMEOUT) -> None:
        """Wait until the view holds everything written to ``uuid``'s partition before now (bounded)."""
        if self._consumer is None:
            return
        tp = TopicPartition(self.topic, partition_for(uuid, self.partitions))
        ends = await self._consumer.end_offsets([tp])
        try:
            await self._supervisor.wait(self._reach(ends), timeout)
        except TimeoutError:
            log.warning("the status view did not reach the end of %s within %.0f s", tp, timeout)

    async def catch_up_all(self, timeout: float = CATCH_UP_TIMEOUT) -> None:
        """Wait until the view holds everything committed to the status topic before now.

        Exactly-once relies on it (a partition's new owner goes on from what was committed),
        so running out of ``timeout`` is a retriable :class:`ConnectorError`, never a guess.
        """
        if self._consumer is None:
            raise ConnectorError("the status view is not running", retriable=True)
        ends = await self._consumer.end_offsets(self._tps(range(self.partitions)))
        try:
            await self._supervisor.wait(self._reach(ends), timeout)
        except TimeoutError:
            raise ConnectorError(
                f"the status view did not reach the end of {self.topic} within {timeout:.0f} s", retriable=True
            ) from None

    async def _grown(self) -> None:
        """Follow a status topic that gained partitions since this process counted them."""
        if self._connector is None:
            return
        try:
            count = await self._connector.partitions_for(self.topic, refresh=True)
        except ConnectorError as exc:
            log.debug("could not refresh the partitions of %s: %s", self.topic, exc)
            return
        await self.follow(count)

    def forget(self, txn: PartitionTxn) -> None:
        """Exactly-once: the writes of a lost transaction will never commit; stop showing them."""
        for uuid in [u for u, (_, _, t) in self._pending.items() if t is txn]:
            del self._pending[uuid]

    async def lookup(self, uuid: str) -> Task | None:
        """The latest status of ``uuid``; an unseen uuid is looked for up to the log's end first.

        If the view has dropped finished tasks (its cache is bounded), a uuid it does not
        hold is read back from its status partition. Exactly-once, only a task's own context
        (``_state.own_task``) is answered with a status this process wrote in a transaction
        that has not committed yet; everyone else sees what is committed.
        """
        pending = self._pending.get(uuid) if _state.own_task.get() == uuid else None
        if pending is not None and not pending[2].lost:
            return decode_status(pending[1], self.config.max_record_bytes)  # a copy, as the view's
        task = self.view.get(uuid)
        if task is None:
            await self._grown()  # the uuid's status may live on a partition new to this process
            await self.catch_up(uuid)
            task = self.view.get(uuid)
        if task is None and self.view.evicted:
            task = await self._read_back(uuid)
        return task

    async def head(
        self, uuid: str, timeout: float = CATCH_UP_TIMEOUT, txn: PartitionTxn | None = None
    ) -> StatusHead | None:
        """The head of ``uuid``'s latest status, looked for as :meth:`lookup` does.

        ``txn`` (exactly-once): a status written in that transaction, still open, counts: it
        will commit with whatever is decided now (a task whose ending waits in it is finished).
        """
        pending = self._pending.get(uuid) if txn is not None else None
        if pending is not None and pending[2] is txn and not txn.lost:
            return head_of(pending[0])
        head = self.view.head(uuid)
        if head is None:
            await self._grown()
            await self.catch_up(uuid, timeout)
            head = self.view.head(uuid)
        if head is None and self.view.evicted:
            task = await self._read_back(uuid, timeout)
            head = None if task is None else head_of(task)
        return head

    async def _read_back(self, uuid: str, timeout: float = CATCH_UP_TIMEOUT) -> Task | None:
        """Scan ``uuid``'s status partition for its last record (a dropped, finished task)."""
        assert self._connector is not None
        tp = TopicPartition(self.topic, partition_for(uuid, self.partitions))
        key = uuid.encode()
        found = await records_of(self._connector, tp, key, client_id=f"{self.topic}-lookup", timeout=timeout)
        last = found[-1].value if found else None
        if last is None:
            return None
        task = decode_status(last, self.config.max_record_bytes)
        if uuid not in self.view:
            # Held again (a cache: it may drop another finished task): whoever asked goes on to
            # read the view (a stream of the task, its retries, its ending) and finds it there.
            self.view.apply_raw(key, last)
        return task

    # -- writing ---------------------------------------------------------------------

    async def write(
        self,
        task: Task,
        *,
        durable: bool = False,
        wanted: Callable[[], bool] | None = None,
        txn: PartitionTxn | None = None,
        rev: int | None = None,
    ) -> Task:
        """Write a copy of ``task`` with the next rev (or ``rev``); return what was written
        (a terminal status over a client's cancel that ended the task meanwhile is not
        written: the cancel, as held, is returned).

        ``durable``: wait until the broker stored it (retrying while the failure is
        retriable) and only then show it in the view. A non-terminal write is retried only
        while ``wanted()`` holds and the task has not ended: on a compacted topic the last
        record wins, so a late ``process`` must never land after the ending.

        ``txn`` (exactly-once): the record goes in that transaction, unretried (a failure
        loses the transaction), and is shown once the transaction commits, durable or not.
        """
        uuid = task.uuid
        if rev is None and task.status in TERMINAL:
            held = self.view.head(uuid)
            if held is not None and held.is_finished and held.rev >= CANCEL_REV:
                # A client cancelled the task while this process ran it (its `process` was held
                # back: the client saw `new`): the cancel stands, this ending is not written.
                return self.view.get(uuid) or task
        record, raw = self.prepare(task, rev)
        if txn is not None:
            # Shown once committed, never before: what the view holds of a partition's tasks
            # is what a run taken up again goes on from, so it must never be a write that
            # an aborted transaction dropped.
            view, pending = self.view, self._pending

            def committed() -> None:
                view.apply(record, raw)
                if pending.get(uuid, (None,))[0] is record:
                    del pending[uuid]

            pending[uuid] = (record, raw, txn)
            await txn.send(
                self.topic, raw, key=uuid.encode(), partition=partition_for(uuid, self.partitions), on_commit=committed
            )
            return record
        if not durable:
            self.view.apply(record, raw)
        if not record.is_finished:
            view = self.view

            def still(wanted: Callable[[], bool] | None = wanted) -> bool:
                head = view.head(uuid)
                return (head is None or not head.is_finished) and (wanted is None or wanted())

            wanted = still
        await deliver(
            self.sender(uuid, raw),
            what=f"status {record.status} of {uuid}",
            durable=durable,
            trouble=self._trouble,
            wanted=wanted,
        )
        if durable:
            self.view.apply(record, raw)
        return record

    async def restate(self) -> None:
        """A worker's supervised loop: write again the ending of each finished task that a stale
        record followed in the status topic (:attr:`StatusView.stale`), so that compaction,
        which keeps a key's last record, keeps the ending."""
        while True:
            view = self.view  # a new one after a stop
            if not view.stale:
                view.stale_found.clear()
                await view.stale_found.wait()
                continue
            uuid, found = next(iter(view.stale.items()))  # the oldest first
            # A moment first: another worker that read the same record may write the ending
            # again sooner, and reading that clears this one.
            wait = found + RESTATE_AFTER - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            del view.stale[uuid]
            head, raw = view.head(uuid), view.raw(uuid)
            if head is None or raw is None or not head.is_finished:
                continue
            log.info("status %s of %s written again: an older record had landed after it", head.status, uuid)
            await deliver(
                self.sender(uuid, raw),
                what=f"status {head.status} of {uuid}, again",
                durable=False,
                trouble=self._trouble,
            )
            self.restated += 1

    def show(self, task: Task) -> Task:
        """Show a copy of ``task`` (the next rev) in this process's view only, unwritten; return it.

        A run's ``process`` status while it is held back (``process_grace``): its own
        context and this process see it running before the log does.
        """
        record, raw = self.prepare(task)
        self.view.apply(record, raw)
        return record

    def prepare(self, task: Task, rev: int | None = None) -> tuple[Task, bytes]:
        """The record to write for ``task`` (a copy with the next rev or ``rev``, slimmed to fit) and its bytes."""
        if rev is None:
            rev = next_rev(self.view.rev(task.uuid), task.status)
        record = msgspec.structs.replace(task, rev=rev)
        raw = encode(record)
        if len(raw) > self._record_limit:
            record = slim(record, self._record_limit)
            raw = encode(record)
        return record, raw

    async def tombstone(self, uuid: str) -> None:
        """Expire a finished task: it leaves the view now and the topic at its next compaction."""
        self.view.apply_raw(uuid.encode(), None)
        await deliver(self.sender(uuid, None), what=f"expiry of {uuid}", durable=False, trouble=self._trouble)

    def sender(self, uuid: str, raw: bytes | None) -> Callable[[], Any]:
        """A call that enqueues ``raw`` as ``uuid``'s status record (for :mod:`qtasks.delivery`)."""
        connector = self._connector
        if connector is None:
            raise ConnectorError("the app is not connected", retriable=False)
        key = uuid.encode()
        partition = partition_for(uuid, self.partitions)
        producer = connector.producer
        topic = self.topic

        def send() -> Any:
            return producer.send(topic, raw, key=key, partition=partition)

        return send

    async def sweep(self, ttl: float) -> int:
        """Expire the finished tasks older than ``ttl`` that the view has dropped: one pass over the topic.

        The view keeps only so many finished tasks, so it cannot name every task to
        expire; this reads the status topic once (to its end as of now) and tombstones
        each finished record older than ``ttl`` whose task the view does not hold. A
        finished status never changes again, so such a task is expired whatever comes
        after it. Returns how many it expired.
        """
        assert self._connector is not None
        before = time.time() - ttl
        view = self.view
        # Dropped tasks not older than `before` are left for a later sweep.
        view.unswept_drop = before if view.newest_drop >= before else None
        limit = self.config.max_record_bytes
        consumer = self._connector.consumer(None, client_id=f"{self.topic}-sweep")
        await consumer.start()
        expired = 0
        try:
            tps = self._tps(range(self.partitions))
            consumer.assign(tps)
            await consumer.seek_to_beginning(tps)
            ends = await consumer.end_offsets(tps)
            left = {tp for tp, end in ends.items() if end > 0}
            while left:
                for record in await fetch(consumer, 0.5):
                    if record.value is None or record.offset >= ends[record.tp]:
                        continue
                    try:
                        head = decode_status_head(record.value, limit)
                    except RecordError:
                        continue
                    if head.is_finished and head.updated_at < before and head.uuid not in self.view:
                        await self.tombstone(head.uuid)
                        expired += 1
                left = {tp for tp in left if await consumer.position(tp) < ends[tp]}
        finally:
            await consumer.stop()
        return expired

    def expired(self, ttl: float) -> list[str]:
        """uuids of finished tasks older than ``ttl`` seconds."""
        return list(self.view.expired(time.time() - ttl))


async def records_of(
    connector: Connector,
    tp: TopicPartition,
    key: bytes,
    *,
    client_id: str,
    since_ms: int | None = None,
    timeout: float = CATCH_UP_TIMEOUT,
) -> list[Record]:
    """The records of ``key`` in ``tp`` before its end at the call, from its beginning (or from
    the first at or after ``since_ms``), read by a consumer of their own: a scan, for rare
    lookups. ``TimeoutError`` if the end is not reached within ``timeout`` (the broker is away).
    """
    consumer = connector.consumer(None, client_id=client_id)
    await consumer.start()
    found: list[Record] = []
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        if since_ms is None:
            await consumer.seek_to_beginning([tp])
        else:
            start = (await consumer.offsets_for_times({tp: since_ms})).get(tp)
            if start is None or start >= end:
                return found
            await consumer.seek(tp, start)
        async with asyncio.timeout(timeout):
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(timeout=0.5)
                found.extend(record for record in batch if record.key == key and record.offset < end)
    finally:
        await consumer.stop()
    return found
