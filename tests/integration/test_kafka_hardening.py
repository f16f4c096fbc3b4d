"""The Kafka connector under the failures a real cluster has: size limits, refused
deliveries, silent or missing brokers, deleted topics, outages, new partitions.

Every test talks to a real broker (the session's, or one of its own when it must stop it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka import TopicPartition as KafkaTP
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.conn import CloseReason
from aiokafka.errors import MessageSizeTooLargeError

from qtasks.config import QueueConfig
from qtasks.connectors.base import RebalanceListener, TopicPartition, TopicSpec
from qtasks.connectors.kafka import KEY_ROOM, KafkaConnector, install_log_filter
from qtasks.exc import BrokerUnavailableError, ConnectorError, ProducerFencedError, RecordTooLargeError
from tests.helpers import silent_server, unique, until
from tests.kafka_fixtures import _local_kafka_class

KEY = b"k" * KEY_ROOM


@contextlib.asynccontextmanager
async def connected(bootstrap: str, query: str = "") -> AsyncIterator[KafkaConnector]:
    connector = KafkaConnector(f"kafka://{bootstrap}{query}", QueueConfig())
    await connector.start()
    try:
        yield connector
    finally:
        await connector.stop()


@contextlib.asynccontextmanager
async def admin_client(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def delete_topic(bootstrap: str, topic: str) -> None:
    """Delete `topic` and return once the broker no longer has it.

    DeleteTopics returns when the controller took the deletion; the broker applies it
    when it replays the metadata log, which on a loaded machine can be a moment later,
    and until then it still appends to the topic (50 records sent after DeleteTopics
    were stored, 2 runs in 60 with the cores busy). A broker answers a metadata request
    and checks a produce request against the same metadata: once it no longer lists the
    topic, it refuses appends to it. (On a cluster the broker asked may not be the one
    that leads the partition; the suite's broker is a single one.)
    """
    async with admin_client(bootstrap) as admin:
        response = await admin.delete_topics([topic])
        assert [code for _, code in response.topic_error_codes] == [0], response
        deadline = time.monotonic() + 30
        while topic in await admin.list_topics():
            assert time.monotonic() < deadline, f"the broker still has {topic}"
            await asyncio.sleep(0.01)


class Quiet(RebalanceListener):
    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.assigned -= revoked

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned |= assigned


def leftover_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}


# -- 1. record size limits --------------------------------------------------------------


async def test_record_limit_is_read_from_the_cluster_and_exact_at_the_edge(kafka_bootstrap: str) -> None:
    topic = unique("size")
    async with connected(kafka_bootstrap) as kafka:
        await kafka.ensure_topics([TopicSpec(topic, 1, config={"max.message.bytes": "20000"})])
        assert kafka.broker_limit == 1_048_588  # the broker's message.max.bytes (Kafka's default)
        assert kafka.batch_limit(topic) == 20_000
        limit = kafka.record_limit(topic)
        assert 19_000 < limit < 20_000
        rebuilds = kafka.producer.rebuilds  # batches were resized to the topic's limit
        await kafka.producer.send(topic, b"v" * limit, key=KEY, partition=0)
        await kafka.producer.flush()  # the broker takes a value at the limit
        with pytest.raises(RecordTooLargeError) as caught:
            await kafka.producer.send(topic, b"v" * (limit + 1), key=KEY, partition=0)
        message = str(caught.value)
        assert topic in message and str(limit + 1) in message and "20000" in message
        assert caught.value.retriable is False
        # Nothing else is affected: the same partition takes the next records.
        for i in range(20):
            await kafka.producer.send(topic, b"%d" % i, key=b"u", partition=0)
        await kafka.producer.flush()
        assert kafka.producer.known_end(topic, 0) == 21
        assert kafka.producer.rebuilds == rebuilds


async def test_the_broker_really_refuses_a_batch_over_the_topic_limit(kafka_bootstrap: str) -> None:
    """What the check in send prevents: the broker refuses the whole batch."""
    topic = unique("size")
    async with connected(kafka_bootstrap) as kafka:
        await kafka.ensure_topics([TopicSpec(topic, 1, config={"max.message.bytes": "20000"})])
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await raw.start()
    try:
        with pytest.raises(MessageSizeTooLargeError):
            await raw.send_and_wait(topic, b"v" * 20_001, partition=0)
    finally:
        await raw.stop()


# -- 2. refused deliveries and the producer's recovery -----------------------------------


async def test_a_refused_delivery_is_reported_once_and_the_producer_recovers(kafka_bootstrap: str) -> None:
    topic = unique("refused")
    async with connected(kafka_bootstrap) as kafka:
        await kafka.ensure_topics([TopicSpec(topic, 1, config={"max.message.bytes": "20000"})])
        # Pretend the limit was not known, so the broker itself refuses the record.
        kafka.topic_limits[topic] = 1_000_000
        rebuilds = kafka.producer.rebuilds
        await kafka.producer.send(topic, b"v" * 30_000, key=b"u", partition=0)
        with pytest.raises(RecordTooLargeError) as caught:
            await kafka.producer.flush()
        assert caught.value.retriable is False and topic in str(caught.value)
        assert kafka.producer.rebuilds == rebuilds + 1  # the sequence gap would fail every later batch
        await kafka.producer.flush()  # reported once
        for i in range(5):
            await kafka.producer.send(topic, b"%d" % i, key=b"u", partition=0)
        await kafka.producer.flush()
        assert kafka.producer.known_end(topic, 0) == 5


# -- 3. silent brokers, deadlines, deleted topics -----------------------------------------


async def test_start_against_a_silent_broker_fails_within_connect_timeout() -> None:
    async with silent_server() as address:
        kafka = KafkaConnector(f"kafka://{address}?connect_timeout=1", QueueConfig())
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError, match=re.escape(f"cannot reach Kafka at {address} within 1 s")):
            await kafka.start()
        assert time.monotonic() - started < 2.5
        consumer = kafka.consumer(None)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            await consumer.start()
        assert time.monotonic() - started < 2.5
        await kafka.stop()
        await asyncio.sleep(0)
        assert not leftover_tasks()


async def test_a_refused_port_fails_within_connect_timeout() -> None:
    kafka = KafkaConnector("kafka://127.0.0.1:1?connect_timeout=1", QueueConfig())
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match=re.escape("cannot reach Kafka at 127.0.0.1:1 within 1 s")):
        await kafka.start()
    assert 0.9 < time.monotonic() - started < 2.5


async def test_a_callers_deadline_cancels_start_cleanly() -> None:
    async with silent_server() as address:
        kafka = KafkaConnector(f"kafka://{address}", QueueConfig())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await kafka.start()
        started = time.monotonic()
        await kafka.stop()
        assert time.monotonic() - started < 0.5
        consumer = kafka.consumer("g")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await consumer.start()
        await consumer.stop()
        await asyncio.sleep(0)
        assert not leftover_tasks()
    gc.collect()  # an unclosed aiokafka client would warn here (warnings are errors)


async def test_send_to_a_deleted_topic_is_a_clear_error_in_bounded_time(kafka_bootstrap: str) -> None:
    topic = unique("gone")
    async with connected(kafka_bootstrap, "?max_block=2") as kafka:
        await kafka.ensure_topics([TopicSpec(topic, 1)])
        await kafka.producer.send(topic, b"x", key=b"u", partition=0)
        await kafka.producer.flush()
        await delete_topic(kafka_bootstrap, topic)
        started, cpu = time.monotonic(), time.process_time()
        with pytest.raises(ConnectorError, match=topic) as caught:
            for _ in range(200):
                await kafka.producer.send(topic, b"x", key=b"u", partition=0)
                await asyncio.sleep(0.05)
        elapsed, used = time.monotonic() - started, time.process_time() - cpu
        assert elapsed < 6, elapsed
        assert used < 0.5 * elapsed + 0.5, (used, elapsed)  # no busy loop
        assert not isinstance(caught.value, RecordTooLargeError)
        # What was queued before the metadata said so is failed and reported once, in bounded time.
        started = time.monotonic()
        with contextlib.suppress(ConnectorError):
            await kafka.producer.flush()
        assert time.monotonic() - started < 4
        await kafka.producer.flush()


async def test_records_queued_for_a_topic_deleted_under_them_fail_without_noise_from_the_event_loop(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Sent once, refused (the topic is gone), put back for a retry, then failed by the
    # producer: aiokafka's callback of the first send must still find the batch, and its
    # waiters' errors must be read, or asyncio logs errors nobody can act on.
    topic = unique("gone")
    caplog.set_level(logging.ERROR, logger="asyncio")
    async with connected(kafka_bootstrap, "?max_block=1") as kafka:
        await kafka.ensure_topics([TopicSpec(topic, 1)])
        await kafka.producer.send(topic, b"x", key=b"u", partition=0)
        await kafka.producer.flush()
        await delete_topic(kafka_bootstrap, topic)
        deliveries = [await kafka.producer.send(topic, b"x" * 100, key=b"u", partition=0) for _ in range(50)]
        with pytest.raises(ConnectorError, match=topic):
            await kafka.producer.flush()
        assert all(d.done() and d.exception() is not None for d in deliveries)
    gc.collect()
    await asyncio.sleep(0.1)
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


@pytest.mark.parametrize("commit_waits", [True, False], ids=["commit-waits", "commit-after"])
async def test_a_fenced_transactional_producer_fails_its_records_without_noise_from_the_event_loop(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture, commit_waits: bool
) -> None:
    # A newer producer of the id fences the old one; the old one's next partitions are
    # refused, its sender stops, and aiokafka fails every queued batch and the
    # transaction on futures of its own. The engine hears of it from the deliveries and
    # the commit; those futures' errors must be read, or asyncio logs errors nobody can
    # act on. The commit either waits as the fence lands (it reads the transaction's
    # error) or comes once the deliveries failed (it finds the producer broken and reads
    # nothing of aiokafka's).
    topic, tid = unique("fenced"), unique("tid")
    caplog.set_level(logging.ERROR, logger="asyncio")
    async with connected(kafka_bootstrap) as kafka:
        await kafka.ensure_topics([TopicSpec(topic, 3)])
        old = kafka.transactional_producer(tid)
        await old.start()
        try:
            await (await old.send(topic, b"x", key=b"u", partition=0))
            newer = kafka.transactional_producer(tid)
            await newer.start()
            await newer.stop()
            deliveries = [await old.send(topic, b"x" * 100, key=b"u", partition=p % 3) for p in range(60)]
            if not commit_waits:
                await asyncio.wait(deliveries, timeout=30)
            with pytest.raises(ProducerFencedError):
                await old.commit()
            await asyncio.wait(deliveries, timeout=30)
            assert all(d.done() and d.exception() is not None for d in deliveries)
        finally:
            await old.stop()
    # Past aiokafka's retry backoff (0.1 s): a request that was in flight when the sender
    # died has ended by then, and what it left is collected.
    await asyncio.sleep(0.5)
    gc.collect()
    await asyncio.sleep(0.1)
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


# -- 5. partitions added while running ----------------------------------------------------


async def test_a_group_consumer_reads_a_partition_added_while_it_runs(kafka_bootstrap: str) -> None:
    topic = unique("grow")
    async with connected(kafka_bootstrap) as kafka:
        await kafka.ensure_topics([TopicSpec(topic, 1)])
        listener = Quiet()
        consumer = kafka.consumer(unique("g"))
        consumer.subscribe([topic], listener)
        await consumer.start()
        try:
            while not listener.assigned:
                await consumer.getmany(0.1)
            async with admin_client(kafka_bootstrap) as admin:
                await admin.create_partitions({topic: NewPartitions(total_count=2)})
            # CreatePartitions returns once the controller took it; the broker answering
            # Metadata learns of the partition when it has replayed the metadata log, which
            # on a loaded machine can be a moment later.
            deadline = time.monotonic() + 10
            while (count := await kafka.partitions_for(topic, refresh=True)) != 2:
                assert time.monotonic() < deadline, f"the broker still says {count} partition(s)"
                await asyncio.sleep(0.05)
            started = time.monotonic()
            await kafka.producer.send(topic, b"new", key=b"u", partition=1)
            await kafka.producer.flush()
            seen: list[Any] = []
            while not seen:
                seen = [r for r in await consumer.getmany(0.2) if r.partition == 1]
                assert time.monotonic() - started < kafka.timings.metadata_max_age + 5
            print(f"new partition read after {time.monotonic() - started:.1f} s")
            assert seen[0].value == b"new"
        finally:
            await consumer.stop()


# -- a broker of our own, to freeze and to stop -------------------------------------------


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    broker = _local_kafka_class()(data_dir=tmp_path_factory.mktemp("kafka"))
    broker.start(timeout=240)
    try:
        yield broker
    finally:
        broker.stop()


def broker_pid(broker: Any) -> int:
    return int((Path(broker.data_dir) / "kafka.pid").read_text().strip())


async def test_a_callers_deadline_bounds_send_flush_and_end_offsets_on_a_frozen_broker(own_broker: Any) -> None:
    """A broker that keeps its connections but answers nothing (SIGSTOP)."""
    topic = unique("frozen")
    async with connected(own_broker.bootstrap) as kafka:
        await kafka.ensure_topics([TopicSpec(topic, 1)])
        await kafka.producer.send(topic, b"before", key=b"u", partition=0)
        await kafka.producer.flush()
        consumer = kafka.consumer(None)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            assert await consumer.end_offsets([tp]) == {tp: 1}
            os.kill(broker_pid(own_broker), signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(1):
                        await kafka.producer.send(topic, b"during", key=b"u", partition=0)
                        await kafka.producer.flush()
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(1):
                        await consumer.end_offsets([tp])
                assert time.monotonic() - started < 3
            finally:
                os.kill(broker_pid(own_broker), signal.SIGCONT)
            # The record enqueued before the deadline is delivered once the broker answers again.
            async with asyncio.timeout(30):
                await kafka.producer.flush()
            assert kafka.producer.known_end(topic, 0) == 2
            assert await consumer.end_offsets([tp]) == {tp: 2}
        finally:
            started = time.monotonic()
            await consumer.stop()
    assert time.monotonic() - started < 5
    await asyncio.sleep(0)
    assert not leftover_tasks()


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_an_outage_logs_one_warning_and_one_info(own_broker: Any) -> None:
    topic = unique("outage")
    collect = Collect()
    logging.getLogger().addHandler(collect)
    ours = logging.getLogger("qtasks.kafka")
    level = ours.level
    ours.setLevel(logging.INFO)
    demoted = install_log_filter().demoted
    try:
        async with connected(own_broker.bootstrap) as kafka:
            await kafka.ensure_topics([TopicSpec(topic, 1)])
            listener = Quiet()
            consumer = kafka.consumer(unique("g"))
            consumer.subscribe([topic], listener)
            await consumer.start()
            received: list[bytes | None] = []
            stop = asyncio.Event()

            async def produce() -> None:
                n = 0
                while not stop.is_set():
                    with contextlib.suppress(ConnectorError, TimeoutError):
                        await kafka.producer.send(topic, b"%d" % n, key=b"u", partition=0)
                        n += 1
                        async with asyncio.timeout(0.5):
                            await kafka.producer.flush()
                    await asyncio.sleep(0.1)

            async def consume() -> None:
                while not stop.is_set():
                    with contextlib.suppress(ConnectorError):
                        received.extend(r.value for r in await consumer.getmany(0.2))

            loops = [asyncio.create_task(produce()), asyncio.create_task(consume())]
            try:
                await until(lambda: received, 20, "a record")
                down = time.monotonic()
                await asyncio.to_thread(own_broker.stop)
                await until(lambda: not kafka.reachable, 15, "the outage to be seen")
                assert kafka.unreachable_since is not None
                await asyncio.sleep(max(0.0, 10 - (time.monotonic() - down)))
                await asyncio.to_thread(own_broker.start, 240)
                await until(lambda: kafka.reachable, 30, "the broker to be reachable again")
                seen = len(received)
                await until(lambda: len(received) > seen, 30, "a record after the outage")
            finally:
                stop.set()
                await asyncio.gather(*loops)
                await consumer.stop()
    finally:
        logging.getLogger().removeHandler(collect)
        ours.setLevel(level)
    mine = [r for r in collect.records if r.name == "qtasks.kafka" and r.levelno >= logging.INFO]
    others = [r for r in collect.records if r.name != "qtasks.kafka" and r.levelno >= logging.WARNING]
    summary = [(r.name, r.levelname, r.getMessage()[:120]) for r in mine + others]
    print(*summary, f"aiokafka records kept at DEBUG: {install_log_filter().demoted - demoted}", sep="\n")
    assert [r.levelno for r in mine] == [logging.WARNING, logging.INFO], summary
    assert "is back after" in mine[1].getMessage()
    assert len(others) <= 5, summary


async def test_an_outage_keeps_the_clients_idle(own_broker: Any) -> None:
    """A stopped broker costs the clients little CPU and few log records.

    A broker that shuts down first answers that its partitions have no leader (-1), then
    closes its port. aiokafka's producer, holding a batch for a leaderless partition, asks
    for metadata again as soon as an update fails (connection refused, within
    microseconds): without ``pace_metadata_updates`` this client set used 80-98 % of a core
    and the filter saw 45,000-64,000 aiokafka records in 10 s; with it, 2-3 % and about 60
    records a second (the fetchers' and the coordinator's own retries, 100 ms apart).
    The records are sent every 10 ms while the broker stops, so the producer has them
    queued when the broker says "no leader" (that window lasts 100-650 ms).

    Bounds, over 8 s: CPU below 15 % of one core (the set uses about 3 % while the broker
    is up; the busy loop takes the whole core), and fewer than 1,000 aiokafka records (the
    paced clients log about 500; the busy loop 3,000 and more a second).
    """
    topic = unique("idle")
    outage = 8.0
    seen = install_log_filter()
    async with connected(own_broker.bootstrap) as kafka:
        await kafka.ensure_topics([TopicSpec(topic, 1)])
        tp = TopicPartition(topic, 0)
        listener = Quiet()
        group = kafka.consumer(unique("g"))
        group.subscribe([topic], listener)
        reader = kafka.consumer(None)
        await group.start()
        await reader.start()
        reader.assign([tp])
        received: list[bytes | None] = []
        stop = asyncio.Event()

        async def produce() -> None:
            n = 0
            while not stop.is_set():
                with contextlib.suppress(ConnectorError, TimeoutError):
                    await kafka.producer.send(topic, b"%d" % n, key=b"u", partition=0)
                    n += 1
                    async with asyncio.timeout(0.5):
                        await kafka.producer.flush()
                await asyncio.sleep(0.01)

        async def consume(consumer: Any, into: list[bytes | None]) -> None:
            while not stop.is_set():
                try:
                    into.extend(r.value for r in await consumer.getmany(0.5))
                except ConnectorError:
                    await asyncio.sleep(0.1)

        loops = [
            asyncio.create_task(produce()),
            asyncio.create_task(consume(group, received)),
            asyncio.create_task(consume(reader, [])),
        ]
        try:
            await until(lambda: received and listener.assigned, 20, "a record and an assignment")
            await asyncio.to_thread(own_broker.stop)
            await until(lambda: not kafka.reachable, 15, "the outage to be seen")
            records, cpu, started = seen.seen, time.process_time(), time.monotonic()
            await asyncio.sleep(outage)
            records, cpu = seen.seen - records, time.process_time() - cpu
            share = cpu / (time.monotonic() - started)
            leader = kafka.producer.client.client.cluster.leader_for_partition(KafkaTP(tp.topic, tp.partition))
            print(
                f"outage of {outage:g} s: CPU {cpu:.2f} s ({share:.1%} of a core), {records} aiokafka records, "
                f"producer's leader for {topic}[0]: {leader}"
            )
            await asyncio.to_thread(own_broker.start, 240)
            await until(lambda: kafka.reachable, 30, "the broker to be reachable again")
            count = len(received)
            await until(lambda: len(received) > count, 30, "a record after the outage")  # the clients work again
        finally:
            stop.set()
            await asyncio.gather(*loops)
            await reader.stop()
            await group.stop()
    assert share < 0.15, (cpu, records)
    assert records < 1_000, (cpu, records)


async def _a_dropped_fetch_waiting_out_its_backoff(
    kafka: KafkaConnector, topic: str
) -> tuple[Any, Any, asyncio.Task[Any]]:
    """A started consumer of ``topic`` whose fetch in flight lost its connection and now
    sleeps out aiokafka's retry backoff (the fetch, the consumer, its aiokafka client)."""
    consumer = kafka.consumer(None, max_wait_ms=5_000)  # an empty fetch waits at the broker
    await consumer.start()
    consumer.assign([TopicPartition(topic, 0)])
    inner = consumer._consumer
    fetcher = inner._fetcher
    # Long enough that the stop surely lands in it (aiokafka's default is 0.1 s).
    fetcher._retry_backoff = 60.0
    await until(lambda: bool(fetcher._pending_tasks), 10, "a fetch in flight")
    (fetch,) = fetcher._pending_tasks
    for conn in list(inner._client._conns.values()):  # the broker's connection drops
        conn.close(reason=CloseReason.CONNECTION_BROKEN)

    def backing_off() -> bool:
        waiting_on = fetch.get_coro().cr_await  # the fetch coroutine's own await
        return getattr(getattr(waiting_on, "cr_code", None), "co_name", "") == "sleep"

    await until(backing_off, 10, "the failed fetch to sleep out its backoff")
    assert not fetch.done()
    return consumer, inner, fetch


async def test_a_consumer_stopped_while_a_dropped_fetch_backs_off_stops_whole(kafka_bootstrap: str) -> None:
    # aiokafka cancels that fetch and awaits it: its CancelledError came out of stop()
    # before the connections were closed, and the caller (a store, an app closing) went
    # no further, as if it had been cancelled itself.
    topic = unique("drop")
    async with connected(kafka_bootstrap) as kafka:
        await kafka.ensure_topics([TopicSpec(topic, 1)])
        consumer, inner, fetch = await _a_dropped_fetch_waiting_out_its_backoff(kafka, topic)
        async with asyncio.timeout(10):
            await consumer.stop()  # returns: the cancel was aiokafka's, not ours
        assert fetch.cancelled()
        assert inner._client._sync_task is None
        assert not [conn for conn in inner._client._conns.values() if conn.connected()]
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_consumer_stop_that_is_cancelled_still_closes_the_connections(kafka_bootstrap: str) -> None:
    topic = unique("drop")
    async with connected(kafka_bootstrap) as kafka:
        await kafka.ensure_topics([TopicSpec(topic, 1)])
        consumer, inner, fetch = await _a_dropped_fetch_waiting_out_its_backoff(kafka, topic)
        stopping = asyncio.ensure_future(consumer.stop())
        await asyncio.sleep(0)  # the stop is under way
        stopping.cancel()  # and its caller gives up
        with pytest.raises(asyncio.CancelledError):
            await stopping
        # The close goes on to its end all the same.
        await until(lambda: not [c for c in inner._client._conns.values() if c.connected()], 10, "the close to end")
        await until(fetch.done, 10, "the fetch to end")
        assert inner._client._sync_task is None
