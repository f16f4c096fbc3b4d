"""Consumers that read raw bytes, in a group or on assigned partitions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTP
from aiokafka import errors as kafka_exc

from qtasks.connectors.base import RebalanceListener, Record, TopicPartition
from qtasks.connectors.kafka.errors import _tp, kafka_errors
from qtasks.connectors.kafka.health import pace_metadata_updates

if TYPE_CHECKING:
    from qtasks.connectors.kafka.connector import KafkaConnector

log = logging.getLogger("qtasks.kafka")


# -- consumer ----------------------------------------------------------------------------


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, listener: RebalanceListener) -> None:
        self._listener = listener

    async def on_partitions_revoked(self, revoked: Iterable[KafkaTP]) -> None:
        await self._listener.on_partitions_revoked({TopicPartition(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[KafkaTP]) -> None:
        await self._listener.on_partitions_assigned({TopicPartition(tp.topic, tp.partition) for tp in assigned})


class KafkaConsumer:
    """A Kafka consumer with auto-commit off, reading raw bytes; every call maps its errors."""

    def __init__(self, connector: KafkaConnector, group_id: str | None, client_id: str, max_wait_ms: int) -> None:
        config = connector.config
        extra: dict[str, Any] = {}
        if group_id:
            extra.update(
                max_poll_interval_ms=config.kafka_max_poll_interval_ms,
                session_timeout_ms=config.kafka_session_timeout_ms,
                heartbeat_interval_ms=config.kafka_heartbeat_interval_ms,
            )
        self._connector = connector
        self._consumer = AIOKafkaConsumer(
            **connector.options,
            **extra,
            group_id=group_id,
            client_id=client_id or "qtasks",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Exactly-once: only committed records (open and aborted transactions stay hidden).
            isolation_level="read_committed" if config.exactly_once else "read_uncommitted",
            # Data returns as soon as it arrives; this bounds how long a seek or a new
            # assignment waits for the fetch in flight.
            fetch_max_wait_ms=max_wait_ms,
            # The broker returns a batch larger than this anyway (KIP-74); sized so the
            # largest record the cluster takes comes back in one fetch.
            max_partition_fetch_bytes=max(1_048_576, connector.largest_limit()),
            request_timeout_ms=config.kafka_request_timeout_ms,
            # A group member sees partitions added to its topics at its next metadata
            # refresh, then the group rebalances (Kafka's default waits 5 minutes).
            metadata_max_age_ms=int(connector.timings.metadata_max_age * 1000),
        )
        pace_metadata_updates(self._consumer._client)
        self._subscription: tuple[list[str], RebalanceListener] | None = None

    @contextlib.contextmanager
    def _errors(self, action: str, topic: str | None = None) -> Iterator[None]:
        with kafka_errors(action, servers=self._connector.where, topic=topic, health=self._connector.health):
            yield

    async def start(self) -> None:
        """Connect (within ``connect_timeout``), and join the group if subscribed.

        A failed or cancelled start leaves nothing behind: one given up while aiokafka
        connects ends on its own and is then stopped (``KafkaConnector.starts``).
        """
        try:
            await self._connector.health.wait_until_reachable(self._connector.timings.connect_timeout)
        except BaseException:
            await asyncio.shield(self._consumer.stop())  # never started: marks it closed
            raise
        with self._errors("start a consumer"):
            async with asyncio.timeout(self._connector.timings.connect_timeout):
                await self._connector.starts.run(self._consumer.start, self._consumer.stop)
        if self._subscription is not None:
            topics, listener = self._subscription
            try:
                self._consumer.subscribe(topics=topics, listener=_Listener(listener))
            except BaseException:
                await asyncio.shield(self._consumer.stop())
                raise

    async def stop(self) -> None:
        """Leave the group and disconnect; raises only if the caller itself is cancelled.

        aiokafka's fetcher, as it closes, cancels each fetch still under way and awaits it.
        A fetch that catches its cancel returns, but one that had not started yet (the end
        of an ``asyncio.run`` cancels every task at once) or was sleeping out the backoff
        after a failed fetch (a connection dropped) raises its CancelledError into ``stop``,
        before the client's connections are closed. That cancel is not the caller's: the
        close is finished here (the other fetches are cancelled and waited for, then the
        connections closed), and the caller goes on (a store, a worker, an app closing
        behind it would otherwise stop halfway, and leave the producer open).
        """
        try:
            await self._consumer.stop()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            cancelled = task is not None and task.cancelling() > 0
            # Shielded: a caller cancelled meanwhile still leaves nothing open.
            await asyncio.shield(self._finish_stop())
            if cancelled:
                raise
            log.debug(
                "aiokafka's consumer stop ended early on a cancel that was not the caller's; its close was finished"
            )

    async def _finish_stop(self) -> None:
        """What ``AIOKafkaConsumer.stop`` leaves undone when a cancel escapes it: its fetches, its connections."""
        fetcher = self._consumer._fetcher
        tasks = [getattr(fetcher, "_fetch_task", None), *getattr(fetcher, "_pending_tasks", ())]
        running = [task for task in tasks if task is not None and not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)  # their cancels are theirs: wait does not raise them
        await self._consumer._client.close()

    def subscribe(self, topics: list[str], listener: RebalanceListener) -> None:
        """Join the consumer group for these topics (at ``start``)."""
        self._subscription = (list(topics), listener)

    def rejoin(self) -> None:
        """Ask the group for a rebalance: the member joins again and gets its assignment afresh.

        aiokafka has no public call for it; its coordinator's ``request_rejoin`` is what it
        does itself when the subscription changes.
        """
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is not None:
            coordinator.request_rejoin()

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read these partitions (no group)."""
        with self._errors("assign"):
            self._consumer.assign([_tp(tp) for tp in partitions])

    def assignment(self) -> set[TopicPartition]:
        """The partitions read now."""
        return {TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset``."""
        with self._errors("seek", tp.topic):
            self._consumer.seek(_tp(tp), offset)

    async def seek_to_end(self, partitions: Iterable[TopicPartition]) -> None:
        """Read only new records."""
        with self._errors("seek to the end"):
            await self._consumer.seek_to_end(*[_tp(tp) for tp in partitions])

    async def seek_to_beginning(self, partitions: Iterable[TopicPartition]) -> None:
        """Read from the oldest record kept."""
        with self._errors("seek to the beginning"):
            await self._consumer.seek_to_beginning(*[_tp(tp) for tp in partitions])

    async def getmany(self, timeout: float, max_records: int | None = None) -> list[Record]:
        """Records from the unpaused partitions, waiting up to ``timeout`` seconds."""
        with self._errors("read"):
            try:
                batches = await self._consumer.getmany(timeout_ms=max(0, int(timeout * 1000)), max_records=max_records)
            except kafka_exc.IllegalStateError:
                # No assignment yet (the group is still joining): nothing to return.
                await asyncio.sleep(min(timeout, 0.1))
                return []
        return [
            Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp, r.headers)
            for records in batches.values()
            for r in records
        ]

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit the next offsets to read; a rebalance makes it a :class:`CommitFailedError`."""
        with self._errors("commit"):
            await self._consumer.commit({_tp(tp): offset for tp, offset in offsets.items()})

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop fetching these partitions; the group membership stays."""
        owned = self._consumer.assignment()
        self._consumer.pause(*[t for t in map(_tp, partitions) if t in owned])

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        """Fetch these partitions again."""
        owned = self._consumer.assignment()
        self._consumer.resume(*[t for t in map(_tp, partitions) if t in owned])

    async def position(self, tp: TopicPartition) -> int:
        """The next offset this consumer returns from ``tp``."""
        with self._errors("read the position", tp.topic):
            return int(await self._consumer.position(_tp(tp)))

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The next offset of each partition."""
        with self._errors("read the end offsets"):
            ends = await self._consumer.end_offsets([_tp(tp) for tp in partitions])
        return {TopicPartition(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}

    def high_watermark(self, tp: TopicPartition) -> int | None:
        """The partition's end including undecided transactions, from the last fetch (None: not fetched)."""
        ours = _tp(tp)
        if ours not in self._consumer.assignment():
            return None
        end = self._consumer.highwater(ours)
        return None if end is None else int(end)

    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict[TopicPartition, int | None]:
        """The first offset at or after each timestamp (ms), or None."""
        with self._errors("look up offsets by time"):
            found = await self._consumer.offsets_for_times({_tp(tp): max(0, ts) for tp, ts in timestamps.items()})
        return {
            TopicPartition(tp.topic, tp.partition): (None if hit is None else int(hit.offset))
            for tp, hit in found.items()
        }
