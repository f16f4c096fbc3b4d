"""Exactly-once: a transactional producer per transactional id, over aiokafka's transactions.

aiokafka 0.14 implements transactions but not KIP-447 (its
``send_offsets_to_transaction`` carries a group id only), so the engine keeps one
transactional producer per tasks partition; the next owner's ``start``
(InitProducerId) fences the previous one and aborts its open transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer
from aiokafka import TopicPartition as KafkaTP
from aiokafka import errors as kafka_exc

from qtasks.connectors.base import TopicPartition
from qtasks.connectors.kafka.deliveries import Deliveries, deliveries_of, read_when_sender_dies
from qtasks.connectors.kafka.errors import kafka_errors, map_error
from qtasks.connectors.kafka.health import pace_metadata_updates
from qtasks.connectors.kafka.options import _BATCH_SIZE
from qtasks.connectors.kafka.sizes import batch_size
from qtasks.exc import ConnectorError, ProducerFencedError, RecordTooLargeError

if TYPE_CHECKING:
    from qtasks.connectors.kafka.connector import KafkaConnector

log = logging.getLogger("qtasks.kafka")

#: Errors after which this producer can commit nothing more: a newer one took the id over,
#: or the coordinator aborted a transaction open past its timeout (and bumped the epoch).
_FENCED: tuple[type[BaseException], ...] = (
    kafka_exc.ProducerFenced,
    kafka_exc.InvalidProducerEpoch,
    kafka_exc.TransactionCoordinatorFenced,
)


def _fenced(transactional_id: str, exc: BaseException | None = None) -> ProducerFencedError:
    why = f": {exc!r}" if exc is not None else ""
    return ProducerFencedError(
        f"the producer of transactional id {transactional_id!r} was fenced (a newer owner of its "
        f"partition, or a transaction past its timeout){why}"
    )


class KafkaTxnProducer:
    """One aiokafka transactional producer; a fenced or broken one raises :class:`ProducerFencedError`."""

    def __init__(self, connector: KafkaConnector, transactional_id: str) -> None:
        self._connector = connector
        self.transactional_id = transactional_id
        self._client: AIOKafkaProducer | None = None
        self._in_txn = False
        self._beginning: asyncio.Lock | None = None
        #: One past the highest offset each partition's deliveries reported.
        self._ends: dict[tuple[str, int], int] = {}
        self._deliveries: dict[tuple[str, int], Deliveries] = {}

    async def start(self) -> None:
        """Connect and register the id (InitProducerId): an older producer of it is fenced."""
        c = self._connector
        client = AIOKafkaProducer(
            **c.options,
            client_id=f"{c.client_id}-{self.transactional_id}",
            transactional_id=self.transactional_id,
            transaction_timeout_ms=int(c.config.eos_transaction_timeout * 1000),
            linger_ms=c.config.kafka_linger_ms,
            max_batch_size=_BATCH_SIZE,
            max_request_size=c.largest_limit() + 64 * 1024,
            request_timeout_ms=c.config.kafka_request_timeout_ms,
            metadata_max_age_ms=int(c.timings.metadata_max_age * 1000),
        )
        pace_metadata_updates(client.client)
        with self._errors("start a transactional producer"):
            async with asyncio.timeout(c.timings.connect_timeout + c.config.eos_transaction_timeout):
                await c.starts.run(
                    client.start,
                    functools.partial(self._close, client),
                    bootstrapped=lambda: client.client._sync_task is not None,
                )
        self._client = client
        read_when_sender_dies(client)

    async def stop(self) -> None:
        """Abort the open transaction (if it still can, within a bound) and disconnect."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if self._in_txn and not self._broken(client):
                async with asyncio.timeout(self._connector.config.kafka_request_timeout_ms / 1000):
                    await client.abort_transaction()
        except (kafka_exc.KafkaError, TimeoutError, AssertionError):
            pass  # the coordinator aborts it at its timeout, or the next owner's start does
        finally:
            self._in_txn = False
            await self._close(client)

    async def _close(self, client: AIOKafkaProducer) -> None:
        """Stop the aiokafka producer, bounded: its stop waits for every batch to be delivered,
        which never happens while its sender looks for a coordinator that is gone; past the
        bound its sender is cancelled and its connections closed."""
        try:
            async with asyncio.timeout(self._connector.config.kafka_request_timeout_ms / 1000):
                await client.stop()
        except TimeoutError:
            log.warning("the producer of %s did not stop in time; closing its connections", self.transactional_id)
            with contextlib.suppress(Exception):
                await client._sender.close()
            with contextlib.suppress(Exception):
                await client.client.close()

    def _errors(self, action: str, topic: str | None = None) -> Any:
        c = self._connector
        return kafka_errors(action, servers=c.where, topic=topic, health=c.health)

    @property
    def client(self) -> AIOKafkaProducer:
        if self._client is None:
            raise ConnectorError("the transactional producer is not started", retriable=False)
        return self._client

    @staticmethod
    def _broken(client: AIOKafkaProducer) -> bool:
        manager = client._txn_manager
        return manager is not None and manager.is_fatal_error()

    def _check(self) -> AIOKafkaProducer:
        client = self.client
        if self._broken(client):
            raise _fenced(self.transactional_id)
        return client

    async def _begin(self, client: AIOKafkaProducer) -> None:
        if self._in_txn:
            return
        if self._beginning is None:
            self._beginning = asyncio.Lock()
        async with self._beginning:  # concurrent first sends begin one transaction
            if not self._in_txn:
                try:
                    with self._errors("begin a transaction"):
                        await client.begin_transaction()
                except AssertionError as exc:  # aiokafka's state machine refuses: treat the producer as lost
                    raise _fenced(self.transactional_id, exc) from exc
                self._in_txn = True

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        partition: int,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]:
        """Enqueue a record in the transaction (the first send opens it); return its delivery."""
        limit = self._connector.batch_limit(topic)
        if batch_size(key, value, headers) > limit:
            raise RecordTooLargeError(f"a record for {topic} is over the topic's limit of {limit} bytes per batch")
        client = self._check()
        await self._begin(client)
        try:
            with self._errors("send in a transaction", topic):
                fut: asyncio.Future[Any] = await client.send(
                    topic, value, key=key, partition=partition, headers=headers
                )
        except ConnectorError as exc:
            if isinstance(exc.__cause__, _FENCED):
                raise _fenced(self.transactional_id, exc.__cause__) from exc
            raise
        return self._mapped(fut, topic, partition)

    def _mapped(self, fut: asyncio.Future[Any], topic: str, partition: int) -> asyncio.Future[Any]:
        """The delivery as the engine sees it (the commit reports a failure; never "never retrieved")."""
        return deliveries_of(self._deliveries, self, None, topic, partition).add(fut)

    def delivered(self, deliveries: Deliveries, result: Any) -> None:
        """A record is stored: the partition's end moves past it."""
        key = (deliveries.topic, deliveries.partition)
        if result.offset >= self._ends.get(key, 0):
            self._ends[key] = result.offset + 1

    def failed(self, deliveries: Deliveries, exc: BaseException) -> BaseException:
        """A record failed: fenced, or its error as a ConnectorError."""
        if isinstance(exc, _FENCED):
            return _fenced(self.transactional_id, exc)
        topic = deliveries.topic
        c = self._connector
        return map_error(exc, f"deliver to {topic}[{deliveries.partition}]", servers=c.where, topic=topic)

    def known_end(self, topic: str, partition: int) -> int | None:
        """One past the highest offset this producer's deliveries to the partition reported (None: none yet)."""
        return self._ends.get((topic, partition))

    async def send_offsets(self, offsets: dict[TopicPartition, int], group_id: str) -> None:
        """Add the group's offsets to the transaction."""
        client = self._check()
        await self._begin(client)
        await self._finish(
            "add offsets to a transaction",
            client.send_offsets_to_transaction(
                {KafkaTP(tp.topic, tp.partition): o for tp, o in offsets.items()}, group_id
            ),
        )

    async def commit(self) -> None:
        """Commit the open transaction (nothing open: nothing to do)."""
        client = self._check()
        if not self._in_txn:
            return
        self._in_txn = False
        await self._finish("commit a transaction", client.commit_transaction())

    async def abort(self) -> None:
        """Abort the open transaction."""
        client = self._check()
        if not self._in_txn:
            return
        self._in_txn = False
        await self._finish("abort a transaction", client.abort_transaction())

    async def _finish(self, action: str, call: Any) -> None:
        """Await a transaction call, bounded by the transaction timeout; fenced errors as such."""
        try:
            with self._errors(action):
                async with asyncio.timeout(self._connector.config.eos_transaction_timeout):
                    await call
        except ConnectorError as exc:
            if isinstance(exc.__cause__, _FENCED):
                raise _fenced(self.transactional_id, exc.__cause__) from exc
            raise
        except AssertionError as exc:  # aiokafka's state machine refuses: the producer is broken
            raise _fenced(self.transactional_id, exc) from exc
