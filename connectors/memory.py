"""The memory connector: ``memory://name``, a producer and consumers over the in-process log.

The log itself (topics, partitions, groups, compaction, retention) is
:mod:`qtasks.connectors.memory_log`; this module is the :class:`~qtasks.connectors.base.Connector`
on top of it. Apps in one process that use the same ``memory://name`` URL share one log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from qtasks.connectors.base import GroupInfo, RebalanceListener, Record, TopicPartition, TopicSpec
from qtasks.connectors.memory_log import (
    DEFAULT_RETENTION,
    RECORD_OVERHEAD,
    MemoryLog,
    _call_soon,
    _resolve,
    drop_log,
    get_log,
    url_options,
)
from qtasks.connectors.memory_share import MemoryShareConsumer, share_groups
from qtasks.exc import ConnectorError, ProducerFencedError

if TYPE_CHECKING:
    from qtasks.config import QueueConfig

__all__ = [
    "DEFAULT_RETENTION",
    "RECORD_OVERHEAD",
    "MemoryConnector",
    "MemoryConsumer",
    "MemoryLog",
    "MemoryProducer",
    "MemoryTxnProducer",
    "drop_log",
    "get_log",
    "url_options",
]


class MemoryProducer:
    """Appends records to the log; every send is written at once, so ``flush`` has nothing to wait for."""

    def __init__(self, log: MemoryLog) -> None:
        self._log = log

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        partition: int,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> None:
        """Append the record (it is written at once: there is no delivery to wait for)."""
        self._log.append(topic, partition, key, value, headers)
        return None

    async def flush(self) -> None:
        """Nothing is pending in memory."""

    def known_end(self, topic: str, partition: int) -> int | None:
        """The partition's end offset (exact in memory)."""
        return self._log.end_offset(TopicPartition(topic, partition))


class MemoryTxnProducer:
    """A transactional producer of the memory log, one per transactional id (see :class:`TxnProducer`)."""

    def __init__(self, log: MemoryLog, transactional_id: str, timeout_ms: int) -> None:
        self._log = log
        self.transactional_id = transactional_id
        self._timeout_ms = timeout_ms
        self._epoch = -1

    async def start(self) -> None:
        """Take the transactional id over: an older producer of it is fenced, its open transaction aborted."""
        self._epoch = self._log.init_txn(self.transactional_id, self._timeout_ms)

    async def stop(self) -> None:
        """Abort the open transaction, if this producer still may."""
        if self._epoch >= 0:
            try:
                self._log.txn_end(self.transactional_id, self._epoch, commit=False)
            except ProducerFencedError:
                pass
            self._epoch = -1

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        partition: int,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> None:
        """Append the record in the open transaction (the first send opens one)."""
        self._log.txn_append(self.transactional_id, self._epoch, topic, partition, key, value, headers)
        return None

    async def send_offsets(self, offsets: dict[TopicPartition, int], group_id: str) -> None:
        """Commit these group offsets with the transaction."""
        self._log.txn_offsets(self.transactional_id, self._epoch, group_id, offsets)

    async def commit(self) -> None:
        """Make the transaction's records visible and its offsets committed, atomically."""
        self._log.txn_end(self.transactional_id, self._epoch, commit=True)

    async def abort(self) -> None:
        """Drop the transaction's records and offsets."""
        self._log.txn_end(self.transactional_id, self._epoch, commit=False)

    def known_end(self, topic: str, partition: int) -> int | None:
        """The partition's end offset (exact in memory)."""
        return self._log.end_offset(TopicPartition(topic, partition))


class MemoryConsumer:
    """A consumer of the memory log: a group member (``subscribe``) or self-assigned (``assign``)."""

    def __init__(self, log: MemoryLog, group_id: str | None, client_id: str = "", read_committed: bool = False) -> None:
        self._log = log
        #: Read only committed records (Kafka's ``isolation.level=read_committed``).
        self.read_committed = read_committed
        self.group_id = group_id
        self.client_id = client_id
        self.topics: set[str] = set()
        self._listener: RebalanceListener | None = None
        self._member_id = ""
        self._generation = -1
        #: Set between giving the partitions of a generation up and taking the next one's.
        self._revoked = False
        self._assigned: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._started = False
        self._wakeup: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Join the group, if subscribed."""
        self._loop = asyncio.get_running_loop()
        self._started = True
        if self.group_id and self.topics and not self._member_id:
            self._member_id = self._log.join(self.group_id, self)

    async def stop(self) -> None:
        """Leave the group, so its partitions go to the other members."""
        self._started = False
        if self.group_id and self._member_id:
            self._log.leave(self.group_id, self._member_id)
            self._member_id = ""
        self.wake()

    def wake(self) -> None:
        """Interrupt a waiting ``getmany`` (a rebalance happened)."""
        fut, loop = self._wakeup, self._loop
        if fut is not None and loop is not None and not loop.is_closed():
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                _resolve(fut)
            else:
                _call_soon(loop, fut)

    def subscribe(self, topics: list[str], listener: RebalanceListener) -> None:
        """Join ``group_id`` for these topics (at ``start``)."""
        if not self.group_id:
            raise ConnectorError("subscribe needs a consumer with a group_id")
        self.topics = set(topics)
        self._listener = listener

    def rejoin(self) -> None:
        """Ask the group for a rebalance."""
        if self.group_id and self._member_id:
            self._log.rejoin(self.group_id, self._member_id)

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read these partitions, from the beginning unless ``seek`` says otherwise."""
        self._assigned = set(partitions)
        for tp in self._assigned:
            self._positions.setdefault(tp, self._log.first_offset(tp))
        self.wake()

    def assignment(self) -> set[TopicPartition]:
        """The partitions this consumer reads now."""
        return set(self._assigned)

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` on."""
        self._positions[tp] = offset
        self.wake()

    async def seek_to_end(self, partitions: Iterable[TopicPartition]) -> None:
        """Read only records written from now on."""
        for tp in partitions:
            self._positions[tp] = self._log.end_offset(tp)

    async def seek_to_beginning(self, partitions: Iterable[TopicPartition]) -> None:
        """Read from the oldest record still in the log."""
        for tp in partitions:
            self._positions[tp] = self._log.first_offset(tp)

    async def _sync_group(self) -> None:
        if not self.group_id or not self._member_id:
            return
        generation, assignment = self._log.group_state(self.group_id)
        if generation == self._generation:
            return
        listener = self._listener
        if not self._revoked:
            if listener is not None and self._generation != -1:
                await listener.on_partitions_revoked(set(self._assigned))
            self._revoked = True
            self._assigned = set()
        # The listener may have committed; read the assignment again after it. It is taken
        # once every member let its partitions go (until then this member holds none).
        generation, assignment = self._log.group_state(self.group_id)
        if not self._log.sync(self.group_id, self._member_id, generation):
            return
        new = assignment.get(self._member_id, set())
        self._generation = generation
        self._revoked = False
        self._assigned = set(new)
        self._paused &= self._assigned
        for tp in new:
            committed = self._log.committed(self.group_id, tp)
            self._positions[tp] = committed if committed is not None else self._log.first_offset(tp)
        if listener is not None:
            await listener.on_partitions_assigned(set(new))

    async def getmany(self, timeout: float, max_records: int | None = None) -> list[Record]:
        """Records from the assigned, unpaused partitions; waits up to ``timeout`` seconds for some."""
        deadline = time.monotonic() + timeout
        limit = max_records or 10_000
        while True:
            await self._sync_group()
            out: list[Record] = []
            moved = False
            active = [tp for tp in self._assigned if tp not in self._paused]
            for tp in active:
                if len(out) >= limit:
                    break
                committed = self.read_committed
                records = self._log.fetch(tp, self._positions[tp], limit - len(out), committed)
                if records:
                    self._positions[tp] = records[-1].offset + 1
                    out.extend(records)
                else:
                    # Nothing at or after the position: compaction (or markers, or aborted
                    # records) left a gap up to the end. Kafka moves the position past it too.
                    end = self._log.end_offset(tp, committed)
                    if end > self._positions[tp]:
                        self._positions[tp] = end
                        moved = True
            if out or moved:
                return out  # a position that moved past a gap is news to a reader waiting for it
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._started:
                return out
            fut = (
                self._log.watch(active, self._positions, self.read_committed)
                if active
                else asyncio.get_running_loop().create_future()
            )
            if fut is None:
                continue
            self._wakeup = fut
            try:
                # Not asyncio.wait_for: on Python 3.11, if ``fut`` completes in the loop
                # iteration in which this task is cancelled, wait_for returns its result
                # instead of raising CancelledError, and a ``while True: getmany()`` loop
                # never ends. asyncio.wait never loses a cancellation (a cancel that meets a
                # finished wait is raised at the next step) and never cancels ``fut``.
                await asyncio.wait((fut,), timeout=remaining)
            finally:
                self._wakeup = None
                self._log.unwatch(active, fut)
            if not fut.done():
                return []

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit offsets for the group (the next offset to read, as in Kafka)."""
        if not self.group_id:
            raise ConnectorError("commit needs a consumer with a group_id")
        self._log.commit(self.group_id, self._member_id, self._generation, offsets, self._assigned)

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop returning records from these partitions (the group membership stays)."""
        self._paused |= set(partitions) & self._assigned

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        """Return records from these partitions again."""
        self._paused -= set(partitions)
        self.wake()

    async def position(self, tp: TopicPartition) -> int:
        """The offset of the next record this consumer will return from ``tp``."""
        return self._positions[tp]

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The next offset of each partition."""
        return {tp: self._log.end_offset(tp, self.read_committed) for tp in partitions}

    def high_watermark(self, tp: TopicPartition) -> int | None:
        """The partition's end including open transactions (exact in memory)."""
        return self._log.end_offset(tp) if tp in self._assigned else None

    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict[TopicPartition, int | None]:
        """The first offset at or after each timestamp (milliseconds), or None."""
        return {tp: self._log.offset_for_time(tp, ts) for tp, ts in timestamps.items()}


class MemoryConnector:
    """The connector for ``memory://`` URLs."""

    def __init__(
        self,
        url: str = "memory://",
        *,
        config: QueueConfig | None = None,
        read_committed: bool | None = None,
        transaction_timeout: float | None = None,
    ) -> None:
        self.url = url
        self._config = config
        self._read_committed = read_committed
        self._transaction_timeout = transaction_timeout
        if url.startswith("file://"):
            from qtasks.connectors.file_log import FILE_OPTIONS, get_file_log

            self.log: MemoryLog = get_file_log(url)
            self._defaults = url_options(url, skip=FILE_OPTIONS)
        else:
            self._defaults = url_options(url)
            self.log = get_log(url)
        self._producer = MemoryProducer(self.log)

    async def start(self) -> None:
        """Nothing to connect to."""

    @property
    def read_committed(self) -> bool:
        """Whether consumers read committed records only: the app runs exactly-once (read when a consumer is made)."""
        if self._read_committed is not None:
            return self._read_committed
        return self._config is not None and self._config.exactly_once

    @property
    def reachable(self) -> bool:
        """Always: the log is in this process."""
        return True

    @property
    def unreachable_since(self) -> float | None:
        """Never unreachable."""
        return None

    def record_limit(self, topic: str) -> int:
        """No limit of its own: the app's ``max_record_bytes`` is the limit."""
        return 2**31 - 1

    async def stop(self) -> None:
        """Nothing to disconnect; the log stays for other apps of the process."""

    async def ensure_topics(self, specs: list[TopicSpec]) -> None:
        """Create the topics that do not exist (with the URL's retention); check the cleanup policy of those that do."""
        for spec in specs:
            self.log.create_topic(spec, self._defaults)

    async def check_access(
        self,
        needs: Mapping[str, Collection[str]],
        group: str | Sequence[str] | None = None,
        share_group: str | None = None,
    ) -> None:
        """The memory log has no access control: everything is allowed."""

    async def partitions_for(self, topic: str, *, refresh: bool = False) -> int:
        """How many partitions a topic has (``refresh`` changes nothing: the count is always current here)."""
        return self.log.partitions_for(topic)

    async def describe_group(self, group_id: str) -> GroupInfo:
        """The group's members (in this process), their partitions and its committed offsets."""
        return self.log.describe_group(group_id)

    @property
    def producer(self) -> MemoryProducer:
        """The one producer of this connector."""
        return self._producer

    def consumer(
        self, group_id: str | None = None, *, client_id: str = "", max_wait_ms: int | None = None
    ) -> MemoryConsumer:
        """A new consumer; with ``group_id`` it can ``subscribe`` as a group member (reads never wait in memory)."""
        return MemoryConsumer(self.log, group_id, client_id, self.read_committed)

    def share_consumer(self, group_id: str, topics: list[str], client_id: str | None = None) -> MemoryShareConsumer:
        """A member of a share group of this log (docs/share-groups.md)."""
        return MemoryShareConsumer(self.log, group_id=group_id, topics=topics, client_id=client_id)

    async def describe_share_group(self, group_id: str, topic: str) -> GroupInfo:
        """The share group's members (in this process), start offsets and lag on ``topic``."""
        return share_groups(self.log).describe(group_id, topic)

    async def configure_share_group(self, group_id: str, settings: dict[str, str]) -> None:
        """Set a share group's ``share.*`` settings."""
        share_groups(self.log).configure(group_id, settings)

    def transactional_producer(self, transactional_id: str) -> MemoryTxnProducer:
        """A transactional producer for ``transactional_id`` (``start`` fences the older ones)."""
        timeout = self._transaction_timeout
        if timeout is None:
            timeout = self._config.eos_transaction_timeout if self._config is not None else 60.0
        return MemoryTxnProducer(self.log, transactional_id, int(timeout * 1000))
