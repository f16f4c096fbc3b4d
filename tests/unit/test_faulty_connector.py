"""The faulty connector fails, delays and cuts off I/O exactly as its plan says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.config import QueueConfig
from qtasks.connectors import TopicPartition, TopicSpec, from_url
from qtasks.connectors.faulty import FaultyConnector, FaultyConsumer, Op
from qtasks.connectors.memory import MemoryConnector
from qtasks.exc import BrokerUnavailableError, ConnectorError, RecordTooLargeError
from tests.helpers import FAST, unique

TP = TopicPartition("t", 0)


@pytest.fixture
async def broker() -> FaultyConnector:
    b = FaultyConnector(MemoryConnector(f"memory://{unique()}"))
    await b.ensure_topics([TopicSpec("t", 2), TopicSpec("u", 1)])
    b.faults.clear()
    return b


async def held(broker: FaultyConnector, tp: TopicPartition = TP) -> list[bytes | None]:
    consumer = broker.inner.consumer()
    consumer.assign([tp])
    return [r.value for r in await consumer.getmany(0)]


async def reader(broker: FaultyConnector, group: str | None = None) -> FaultyConsumer:
    consumer = broker.consumer(group)
    if group:
        consumer.subscribe(["t"], Listener())
    else:
        consumer.assign([TP])
    await consumer.start()
    return consumer


class Listener:
    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass


async def test_the_nth_send_fails_times_in_a_row_then_sends_pass(broker: FaultyConnector) -> None:
    broker.faults.fail("send", nth=2, times=2)
    await broker.producer.send("t", b"1", key=None, partition=0)
    for _ in range(2):
        with pytest.raises(ConnectorError, match="injected fault") as failed:
            await broker.producer.send("t", b"x", key=None, partition=0)
        assert failed.value.retriable
    await broker.producer.send("t", b"2", key=None, partition=0)
    assert await held(broker) == [b"1", b"2"]
    assert broker.faults.calls["send"] == 4


async def test_a_fault_with_a_topic_applies_only_to_that_topic(broker: FaultyConnector) -> None:
    broker.faults.fail("send", topic="u", error=RecordTooLargeError("too big"))
    await broker.producer.send("t", b"fine", key=None, partition=0)
    with pytest.raises(RecordTooLargeError):
        await broker.producer.send("u", b"big", key=None, partition=0)
    assert await held(broker) == [b"fine"]


async def test_a_failed_delivery_loses_the_records_behind_it_and_the_next_flush_raises_once(
    broker: FaultyConnector,
) -> None:
    broker.faults.fail("delivery", error=BrokerUnavailableError("timed out"))
    delivery = await broker.producer.send("t", b"lost", key=None, partition=0)
    behind = await broker.producer.send("t", b"lost too", key=None, partition=0)
    elsewhere = await broker.producer.send("t", b"kept", key=None, partition=1)
    assert delivery is not None and behind is not None and elsewhere is None
    for pending in (delivery, behind):
        with pytest.raises(BrokerUnavailableError):
            await pending
    with pytest.raises(BrokerUnavailableError, match="timed out"):
        await broker.producer.flush()
    await broker.producer.flush()  # a failure is reported by one flush only
    assert await broker.producer.send("t", b"later", key=None, partition=0) is None
    assert await held(broker) == [b"later"]
    assert await held(broker, TopicPartition("t", 1)) == [b"kept"]


async def test_a_failed_delivery_nobody_awaits_is_still_reported_by_flush(broker: FaultyConnector) -> None:
    broker.faults.fail("delivery")
    assert await broker.producer.send("t", b"x", key=None, partition=0) is not None
    with pytest.raises(ConnectorError, match="injected fault"):
        await broker.producer.flush()


async def test_a_delayed_delivery_is_written_late_in_order_and_flush_waits_for_it(broker: FaultyConnector) -> None:
    broker.faults.delay("delivery", 0.1, times=1)
    slow = await broker.producer.send("t", b"a", key=None, partition=0)
    queued = await broker.producer.send("t", b"b", key=None, partition=0)  # behind "a" in its partition
    other = await broker.producer.send("t", b"c", key=None, partition=1)  # another partition does not wait
    assert slow is not None and queued is not None and other is None
    assert await held(broker) == []
    assert await held(broker, TopicPartition("t", 1)) == [b"c"]
    started = time.monotonic()
    await broker.producer.flush()
    assert time.monotonic() - started >= 0.09
    assert await held(broker) == [b"a", b"b"]
    assert await broker.producer.send("t", b"d", key=None, partition=0) is None  # nothing pending: direct again


async def test_flush_fails_as_planned(broker: FaultyConnector) -> None:
    broker.faults.fail("flush", nth=2)
    await broker.producer.flush()
    with pytest.raises(ConnectorError):
        await broker.producer.flush()
    await broker.producer.flush()
    assert broker.faults.calls["flush"] == 3


async def test_a_delayed_fetch_waits_before_reading(broker: FaultyConnector) -> None:
    await broker.producer.send("t", b"x", key=None, partition=0)
    consumer = await reader(broker)
    broker.faults.delay("fetch", 0.1, times=1)
    started = time.monotonic()
    assert [r.value for r in await consumer.getmany(1.0)] == [b"x"]
    assert time.monotonic() - started >= 0.09
    started = time.monotonic()
    assert await consumer.getmany(0) == []
    assert time.monotonic() - started < 0.09


async def test_a_held_fetch_waits_until_released_and_other_topics_go_on(broker: FaultyConnector) -> None:
    await broker.producer.send("t", b"x", key=None, partition=0)
    await broker.producer.send("u", b"y", key=None, partition=0)
    consumer = await reader(broker)  # reads t
    other = broker.consumer()
    other.assign([TopicPartition("u", 0)])
    held = broker.faults.hold("fetch", topic="t")
    fetch = asyncio.ensure_future(consumer.getmany(1.0))
    assert [r.value for r in await other.getmany(1.0)] == [b"y"]  # not held
    await asyncio.sleep(0.05)
    assert not fetch.done() and held.waiting == 1 and not held.released
    held.release()
    assert [r.value for r in await fetch] == [b"x"] and held.waiting == 0
    assert await asyncio.wait_for(consumer.getmany(0), 1.0) == []  # released: the rule is gone
    with pytest.raises(ValueError, match="delay it"):
        broker.faults.hold("delivery")


async def test_clear_lets_held_calls_go(broker: FaultyConnector) -> None:
    consumer = await reader(broker)
    held = broker.faults.hold("fetch")
    fetch = asyncio.ensure_future(consumer.getmany(0))
    await asyncio.sleep(0.05)
    assert held.waiting == 1
    broker.faults.clear()
    assert await asyncio.wait_for(fetch, 1.0) == []


async def test_consumer_faults_with_a_topic_hit_only_consumers_reading_it(broker: FaultyConnector) -> None:
    broker.faults.fail("fetch", topic="u", times=5)
    consumer = await reader(broker)  # reads t
    assert await consumer.getmany(0) == []
    other = broker.consumer()
    other.assign([TopicPartition("u", 0)])
    with pytest.raises(ConnectorError):
        await other.getmany(0)


CONSUMER_CALLS: dict[Op, Callable[[FaultyConsumer], Awaitable[Any]]] = {
    "fetch": lambda c: c.getmany(0),
    "commit": lambda c: c.commit({TP: 0}),
    "seek": lambda c: c.seek(TP, 0),
    "end_offsets": lambda c: c.end_offsets([TP]),
}


@pytest.mark.parametrize("op", list(CONSUMER_CALLS))
async def test_each_consumer_operation_fails_on_its_nth_call(broker: FaultyConnector, op: Op) -> None:
    consumer = await reader(broker, "g")
    await consumer.getmany(0)  # joins the group: commits are allowed
    broker.faults.clear()
    broker.faults.fail(op, nth=2)
    call = CONSUMER_CALLS[op]
    await call(consumer)
    with pytest.raises(ConnectorError, match="injected fault"):
        await call(consumer)
    await call(consumer)
    assert broker.faults.calls[op] == 3


async def test_the_seeks_and_offset_lookups_share_their_operation(broker: FaultyConnector) -> None:
    consumer = await reader(broker)
    broker.faults.fail("seek", times=2)
    broker.faults.fail("end_offsets")
    for call in (consumer.seek_to_end([TP]), consumer.seek_to_beginning([TP]), consumer.offsets_for_times({TP: 0})):
        with pytest.raises(ConnectorError):
            await call


async def test_start_and_ensure_topics_fail_as_planned() -> None:
    broker = FaultyConnector(MemoryConnector(f"memory://{unique()}"))
    await broker.inner.ensure_topics([TopicSpec("t", 1)])
    broker.faults.fail("start", times=2)
    broker.faults.fail("ensure_topics", topic="t")
    with pytest.raises(ConnectorError):
        await broker.start()
    consumer = broker.consumer()
    consumer.assign([TP])
    with pytest.raises(ConnectorError):
        await consumer.start()
    await broker.start()
    await broker.ensure_topics([TopicSpec("other", 1)])
    with pytest.raises(ConnectorError):
        await broker.ensure_topics([TopicSpec("t", 1)])
    await broker.ensure_topics([TopicSpec("t", 1)])


async def test_an_outage_fails_every_operation_with_a_retriable_error_until_up(broker: FaultyConnector) -> None:
    consumer = await reader(broker, "g")
    await consumer.getmany(0)
    broker.faults.delay("delivery", 0.05, times=1)
    pending = await broker.producer.send("t", b"in flight", key=None, partition=0)
    assert pending is not None
    broker.faults.down()
    calls: list[Awaitable[Any]] = [
        broker.start(),
        broker.ensure_topics([TopicSpec("t", 2)]),
        broker.producer.send("t", b"x", key=None, partition=0),
        consumer.getmany(0),
        consumer.commit({TP: 0}),
        consumer.seek(TP, 0),
        consumer.end_offsets([TP]),
        broker.producer.flush(),
    ]
    for call in calls:
        with pytest.raises(BrokerUnavailableError) as failed:
            await call
        assert failed.value.retriable
    with pytest.raises(BrokerUnavailableError):  # a record still in flight when it went down is lost
        await pending
    await consumer.stop()  # stopping never fails
    broker.faults.up()
    with pytest.raises(BrokerUnavailableError):  # its failure is reported by the next flush
        await broker.producer.flush()
    await broker.producer.send("t", b"after", key=None, partition=0)
    await broker.producer.flush()
    assert await held(broker) == [b"after"]


async def test_calls_are_counted_and_clear_forgets_the_plan(broker: FaultyConnector) -> None:
    broker.faults.fail("send", times=10)
    broker.faults.down()
    broker.faults.clear()
    assert not broker.faults.is_down and not broker.faults.calls
    await broker.producer.send("t", b"x", key=None, partition=0)
    assert broker.faults.calls == {"send": 1, "delivery": 1}


def test_an_unknown_operation_or_a_count_below_one_is_an_error() -> None:
    broker = FaultyConnector(MemoryConnector())
    with pytest.raises(ValueError, match="unknown operation 'recv'"):
        broker.faults.fail("recv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 or more"):
        broker.faults.fail("send", nth=0)
    with pytest.raises(ValueError, match="1 or more"):
        broker.faults.delay("send", 1.0, times=0)


def test_a_faulty_url_wraps_the_connector_of_the_rest_of_it() -> None:
    name = unique()
    broker = from_url(f"faulty+memory://{name}", QueueConfig())
    assert isinstance(broker, FaultyConnector) and isinstance(broker.inner, MemoryConnector)
    assert broker.url == f"faulty+memory://{name}"
    assert broker.inner.log is MemoryConnector(f"memory://{name}").log
    app = QueueTasks(name=unique(), broker_url=f"faulty+memory://{name}")
    assert isinstance(app.broker, FaultyConnector)


async def test_an_app_runs_tasks_on_a_slow_faulty_broker() -> None:
    app = QueueTasks(name=unique(), broker_url=f"faulty+memory://{unique()}", **FAST)
    assert isinstance(app.broker, FaultyConnector)
    app.broker.faults.delay("delivery", 0.01)
    app.broker.faults.delay("fetch", 0.01)

    @app.task
    async def count(n: int):
        for i in range(n):
            yield i

    try:
        await app.start()
        task = await app.add_task("count", 3)
        assert [v async for v in app.stream(task.uuid)] == [0, 1, 2]
        done = await app.wait(task.uuid, timeout=10)
        assert done is not None and done.status == "success"
        assert app.broker.faults.calls["delivery"] > 3
    finally:
        await app.stop(timeout=2)
    await asyncio.sleep(0)
