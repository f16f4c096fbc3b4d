"""The idempotent producer: size checks, mapped deliveries, recovery after a fatal failure."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_exc

from qtasks.connectors.kafka.deliveries import Deliveries, deliveries_of, read_error, read_when_sender_dies
from qtasks.connectors.kafka.errors import _FATAL, KAFKA_ERRORS, is_fatal, kafka_errors, map_error, mapped
from qtasks.connectors.kafka.health import pace_metadata_updates
from qtasks.connectors.kafka.options import _BATCH_SIZE
from qtasks.connectors.kafka.sizes import BATCH_SLACK, batch_size, headers_size
from qtasks.exc import (
    BrokerUnavailableError,
    ConnectorError,
    RecordTooLargeError,
)

if TYPE_CHECKING:
    from qtasks.connectors.kafka.connector import KafkaConnector

log = logging.getLogger("qtasks.kafka")

#: What a record without headers passes to aiokafka (which only reads it).
_NO_HEADERS: list[tuple[str, bytes]] = []


# -- producer ----------------------------------------------------------------------------


class KafkaProducer:
    """An idempotent ``acks=all`` producer: sizes checked before sending, errors reported once.

    ``send`` refuses a record larger than its topic takes (:class:`RecordTooLargeError`)
    before aiokafka sees it. ``flush`` raises the delivery errors of the records sent since
    the previous flush; after a failure that broke the idempotent state it rebuilds the
    aiokafka producer, so later sends work.
    """

    def __init__(self, connector: KafkaConnector) -> None:
        self._connector = connector
        self._client: AIOKafkaProducer | None = None
        self._batch_size = _BATCH_SIZE
        # The last delivery of each partition. An idempotent producer writes a partition's
        # batches in order, and a failed batch fails the ones after it (their sequence
        # numbers no longer follow), so the last delivery tells both the partition's end
        # and whether anything failed (a ``flush`` reads them as it returns, before any
        # delivery's callback has run).
        self._last: dict[tuple[str, int], asyncio.Future[Any]] = {}
        #: Each partition's deliveries (the callers' view of its records), with its aiokafka name.
        self._deliveries: dict[tuple[str, int], Deliveries] = {}
        self._ends: dict[tuple[str, int], int] = {}
        #: Failed deliveries not reported by a flush yet.
        self._failed: list[tuple[tuple[str, int], BaseException]] = []
        #: When each topic with queued records was first seen missing from the metadata.
        self._missing_since: dict[str, float] = {}
        self._rebuilding: asyncio.Lock | None = None
        self.rebuilds = 0

    def _new_client(self) -> AIOKafkaProducer:
        c = self._connector
        producer = AIOKafkaProducer(
            **c.options,
            client_id=c.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=c.config.kafka_linger_ms,
            max_batch_size=self._batch_size,
            # Our own size check (``send``) is the one that counts; aiokafka's must never
            # refuse first, so its bound is the largest limit the cluster has.
            max_request_size=c.largest_limit() + 64 * 1024,
            request_timeout_ms=c.config.kafka_request_timeout_ms,
            metadata_max_age_ms=int(c.timings.metadata_max_age * 1000),
        )
        pace_metadata_updates(producer.client)
        return producer

    async def start(self) -> None:
        """Connect (the connector has checked that a broker answers)."""
        client = self._new_client()
        with kafka_errors("start the producer", servers=self._connector.where, health=self._connector.health):
            await self._connector.starts.run(client.start, client.stop)
        self._client = client
        read_when_sender_dies(client)

    async def stop(self) -> None:
        """Deliver what is pending, then disconnect."""
        client, self._client = self._client, None
        self._deliveries.clear()
        if client is not None:
            await client.stop()

    @property
    def client(self) -> AIOKafkaProducer:
        if self._client is None:
            raise ConnectorError("the Kafka producer is not started")
        return self._client

    async def resize(self, batch_limit: int) -> None:
        """Keep batches within the smallest limit (a batch over it would be refused whole)."""
        size = min(_BATCH_SIZE, batch_limit)
        if size < self._batch_size:
            self._batch_size = size
            await self._rebuild(f"a topic takes batches of at most {batch_limit} bytes", logging.INFO)

    async def _rebuild(self, why: str, level: int = logging.WARNING) -> None:
        """Replace the aiokafka producer (a new producer id: sequence numbers start again)."""
        if self._rebuilding is None:
            self._rebuilding = asyncio.Lock()
        async with self._rebuilding:
            old = self._client
            if old is None:
                return
            log.log(level, "restarting the Kafka producer: %s", why)
            # Sends wait meanwhile (``_current``): the old producer finishes (or fails)
            # what it holds first, so a partition's records keep their order.
            self._client = None
            try:
                await old.stop()
            finally:
                self._settle()
                # Records still under way keep their own (their futures hold it); the old
                # producer is kept by nothing else.
                self._deliveries.clear()
            await self.start()
            self.rebuilds += 1

    async def _current(self) -> AIOKafkaProducer:
        if self._client is None and self._rebuilding is not None and self._rebuilding.locked():
            async with self._rebuilding:
                pass
        return self.client

    def _settle(self) -> None:
        """Fold finished last deliveries into the known ends and the failures to report."""
        for key, fut in list(self._last.items()):
            if fut.done():
                del self._last[key]
                self._fold(key, fut)

    def _fold(self, key: tuple[str, int], fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._failed.append((key, exc))
            return
        offset = fut.result().offset
        if offset >= self._ends.get(key, 0):
            self._ends[key] = offset + 1

    def known_end(self, topic: str, partition: int) -> int | None:
        """One past the highest offset this producer knows it wrote to the partition (None: none yet)."""
        last = self._last.get((topic, partition))
        if last is not None and last.done():
            self._settle()
        return self._ends.get((topic, partition))

    def check_size(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None = None
    ) -> None:
        """RecordTooLargeError if the record's batch is over what ``topic`` takes."""
        size = batch_size(key, value, headers)
        limit = self._connector.batch_limit(topic)
        if size > limit:
            raise RecordTooLargeError(
                f"a record for {topic} is {len(value or b'')} bytes ({size} bytes as a batch); the topic takes "
                f"at most {limit} bytes per batch (values up to {self._connector.record_limit(topic)} bytes): "
                "it was not sent"
            )

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        partition: int,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Enqueue a record (waits only when the producer's buffer is full); return its delivery.

        Every value a task yields comes through here: the common case (a record well
        under the limit, a partition in the metadata) takes no extra await.
        """
        c = self._connector
        room = len(value or b"") + len(key or b"") + BATCH_SLACK
        if headers:
            room += headers_size(headers)
        if room > c.batch_limit(topic):
            self.check_size(topic, key, value, headers)
        key_ = (topic, partition)
        try:
            client = self._client or await self._current()
            deliveries = self._deliveries_of(topic, partition, client)
            tp = deliveries.tp
            if client.client.cluster.leader_for_partition(tp) is None:  # not in the metadata (yet)
                await self._ensure_partition(client, topic, partition)
            try:
                # Straight to the accumulator: aiokafka's ``send`` would look the topic's
                # partitions up twice (a new set each time), check a size already checked
                # above and pick a partition already picked.
                fut: asyncio.Future[Any] = await client._message_accumulator.add_message(
                    tp, key, value, client._request_timeout_ms / 1000, headers=headers or _NO_HEADERS
                )
            except _FATAL as exc:
                # The sender died (its error is kept by the accumulator): start again, once.
                await self._rebuild(f"it failed: {exc!r}")
                client = self.client
                fut = await client.send(topic, value, key=key, partition=partition, headers=headers)
                deliveries = self._deliveries_of(topic, partition, client)
        except ConnectorError:
            raise
        except KAFKA_ERRORS as exc:
            raise mapped(exc, "send", servers=c.where, topic=topic, health=c.health) from exc
        previous = self._last.get(key_)
        if previous is not None and previous.done():
            self._fold(key_, previous)
        self._last[key_] = fut
        # The delivery as the engine sees it: a failure is a ConnectorError (marked as
        # retrieved: a caller that does not await it learns of it from the next ``flush``),
        # and a fatal one restarts the producer that sent it, if it is still the current one.
        return deliveries.add(fut)

    def _deliveries_of(self, topic: str, partition: int, sender: AIOKafkaProducer | None) -> Deliveries:
        """The deliveries of the partition's records that ``sender`` sends."""
        return deliveries_of(self._deliveries, self, sender, topic, partition)

    def delivered(self, deliveries: Deliveries, result: Any) -> None:
        """A record is stored (the partition's end is read from its last delivery, when asked)."""

    def failed(self, deliveries: Deliveries, exc: BaseException) -> BaseException:
        """A record failed: its error as a ConnectorError; a fatal one restarts its producer."""
        topic = deliveries.topic
        sender = deliveries.sender
        if is_fatal(exc) and sender is not None and sender is self._client:
            asyncio.get_running_loop().create_task(self._rebuild_once(sender, f"a delivery failed: {exc!r}"))
        where = f"deliver to {topic}[{deliveries.partition}]"
        return map_error(exc, where, servers=self._connector.where, topic=topic)

    async def _rebuild_once(self, sender: AIOKafkaProducer, why: str) -> None:
        """Rebuild after a fatal delivery failure, unless another rebuild replaced ``sender`` already."""
        if self._rebuilding is not None and self._rebuilding.locked():
            async with self._rebuilding:
                pass
        if self._client is sender:
            await self._rebuild(why)

    async def _ensure_partition(self, producer: AIOKafkaProducer, topic: str, partition: int) -> None:
        """The topic's metadata, within ``max_block``; a refresh for a partition not seen yet."""
        client = producer.client
        known = client.cluster.partitions_for_topic(topic)
        if known and partition in known:
            return
        timing = self._connector.timings
        try:
            async with asyncio.timeout(timing.max_block):
                known = await client._wait_on_metadata(topic)
                if partition not in known:
                    await client.force_metadata_update()
                    known = client.cluster.partitions_for_topic(topic) or set()
        except TimeoutError:
            if not self._connector.health.reachable:
                raise BrokerUnavailableError(
                    f"send to {topic}: Kafka at {self._connector.where} is unreachable"
                ) from None
            raise ConnectorError(
                f"send: topic {topic!r} is not in the cluster's metadata after {timing.max_block:g} s "
                "(it does not exist or was deleted)",
                retriable=True,
            ) from None
        if partition not in known:
            raise ConnectorError(f"send: topic {topic!r} has no partition {partition} (it has {len(known)})")

    async def flush(self) -> None:
        """Wait until every enqueued record is written; raise the delivery errors since the last flush.

        Records queued for a topic that disappeared from the cluster are failed once it
        has been missing for ``max_block`` seconds, instead of retried for the request timeout.
        """
        client = await self._current()
        waiter = asyncio.ensure_future(client.flush())
        try:
            while not waiter.done():
                await asyncio.wait([waiter], timeout=0.25)
                if not waiter.done():
                    self._fail_orphans(client)
        finally:
            if not waiter.done():
                waiter.cancel()
        self._settle()
        failed, self._failed = self._failed, []
        if not failed:
            return
        if any(is_fatal(exc) for _, exc in failed):
            await self._rebuild_once(client, f"a delivery failed: {failed[0][1]!r}")
        (topic, partition), first = failed[0]
        error = map_error(first, f"deliver to {topic}[{partition}]", servers=self._connector.where, topic=topic)
        more = f" (and {len(failed) - 1} more partition(s))" if len(failed) > 1 else ""
        raise type(error)(f"a record was not delivered{more}: {error}", retriable=error.retriable) from first

    def _fail_orphans(self, client: AIOKafkaProducer) -> None:
        """Fail batches queued for topics missing from the metadata for ``max_block`` seconds.

        aiokafka keeps such a batch until ``request_timeout_ms`` and asks for metadata in a
        loop meanwhile; a deleted topic never comes back, so the wait only burns CPU.
        """
        cluster = client.client.cluster
        accumulator = client._message_accumulator
        now = time.monotonic()
        topics = {tp.topic for tp in accumulator._batches}
        for topic in list(self._missing_since):
            if topic not in topics or cluster.partitions_for_topic(topic) is not None:
                del self._missing_since[topic]
        for topic in topics:
            if cluster.partitions_for_topic(topic) is not None:
                continue
            since = self._missing_since.setdefault(topic, now)
            if now - since < self._connector.timings.max_block:
                continue
            error = kafka_exc.UnknownTopicOrPartitionError(f"topic {topic!r} is gone from the cluster")
            for tp in [tp for tp in accumulator._batches if tp.topic == topic]:
                for batch in accumulator._batches.pop(tp):
                    if batch._retry_count:
                        # Sent once and put back for a retry: aiokafka's done callback of its
                        # first send takes it out of the in-flight set again (KeyError otherwise).
                        accumulator._pending_batches.add(batch)
                    batch.failure(exception=error)
                    # Its drain waiter failed too, and no sender will ever wait on it: read
                    # its error, or asyncio logs it as never retrieved when it is collected.
                    read_error(batch._drain_waiter)
            del self._missing_since[topic]

    async def partitions_for(self, topic: str, *, refresh: bool = False) -> int:
        """Partitions of a topic, from the cluster's metadata (asked again with ``refresh``)."""
        client = self.client.client
        c = self._connector
        with kafka_errors("read the partitions", servers=c.where, topic=topic, health=c.health):
            async with asyncio.timeout(c.timings.max_block):
                if refresh:
                    client.add_topic(topic)
                    await client.force_metadata_update()
                partitions = await client._wait_on_metadata(topic)
        return len(partitions)
