"""The memory log's transactions behave as Kafka's: fencing, read_committed, atomic offsets, timeouts."""

from __future__ import annotations

import asyncio

import pytest

from qtasks.connectors import TopicPartition, TopicSpec
from qtasks.connectors.memory import MemoryConnector
from qtasks.exc import ProducerFencedError
from tests.helpers import unique

TP = TopicPartition("t", 0)


@pytest.fixture
async def conn() -> MemoryConnector:
    c = MemoryConnector(f"memory://{unique()}", read_committed=True, transaction_timeout=60)
    await c.ensure_topics([TopicSpec("t", 1), TopicSpec("s", 1, compacted=True, config={"delete.retention.ms": "0"})])
    return c


async def read(conn: MemoryConnector, tp: TopicPartition = TP, *, committed: bool = True) -> list[bytes | None]:
    consumer = conn.consumer()
    consumer.read_committed = committed
    consumer.assign([tp])
    return [r.value for r in await consumer.getmany(0.05)]


async def test_read_committed_sees_a_transaction_only_once_committed(conn: MemoryConnector) -> None:
    txn = conn.transactional_producer("p0")
    await txn.start()
    await conn.producer.send("t", b"plain-before", key=None, partition=0)
    await txn.send("t", b"in-txn", key=None, partition=0)
    await conn.producer.send("t", b"plain-after", key=None, partition=0)
    assert await read(conn) == [b"plain-before"]  # the open transaction holds back what follows it
    assert await read(conn, committed=False) == [b"plain-before", b"in-txn", b"plain-after"]
    assert (await conn.consumer().end_offsets([TP]))[TP] == 1
    await txn.commit()
    assert await read(conn) == [b"plain-before", b"in-txn", b"plain-after"]
    # The commit marker takes an offset, as in Kafka: the end is 4, with 3 records.
    assert (await conn.consumer().end_offsets([TP]))[TP] == 4


async def test_an_aborted_transaction_is_never_seen_and_its_offsets_never_committed(conn: MemoryConnector) -> None:
    txn = conn.transactional_producer("p0")
    await txn.start()
    await txn.send("t", b"lost", key=None, partition=0)
    await txn.send_offsets({TopicPartition("tasks", 0): 7}, "group")
    await txn.abort()
    await txn.send("t", b"kept", key=None, partition=0)
    await txn.send_offsets({TopicPartition("tasks", 0): 9}, "group")
    assert conn.log.committed("group", TopicPartition("tasks", 0)) is None
    await txn.commit()
    assert await read(conn) == [b"kept"]
    assert conn.log.committed("group", TopicPartition("tasks", 0)) == 9


async def test_a_new_producer_of_the_id_fences_the_old_one_and_aborts_its_transaction(conn: MemoryConnector) -> None:
    old = conn.transactional_producer("p0")
    await old.start()
    await old.send("t", b"zombie", key=None, partition=0)
    await old.send_offsets({TopicPartition("tasks", 0): 5}, "group")
    new = conn.transactional_producer("p0")
    await new.start()
    with pytest.raises(ProducerFencedError):
        await old.send("t", b"more", key=None, partition=0)
    with pytest.raises(ProducerFencedError):
        await old.commit()
    await new.send("t", b"owner", key=None, partition=0)
    await new.commit()
    assert await read(conn) == [b"owner"]
    assert conn.log.committed("group", TopicPartition("tasks", 0)) is None
    await old.stop()  # a fenced producer stops quietly


async def test_a_transaction_past_its_timeout_is_aborted_and_its_producer_fenced(conn: MemoryConnector) -> None:
    now = [1000.0]
    conn.log.clock = lambda: now[0]
    txn = conn.transactional_producer("p0")
    await txn.start()
    await txn.send("t", b"slow", key=None, partition=0)
    assert await read(conn) == []
    now[0] += 61  # past the 60 s timeout: a reader's fetch finds it expired
    assert await read(conn) == []
    assert (await conn.consumer().end_offsets([TP]))[TP] == 2  # the record and the abort marker
    with pytest.raises(ProducerFencedError):
        await txn.commit()


async def test_compaction_never_drops_a_committed_value_for_one_in_an_open_transaction(conn: MemoryConnector) -> None:
    s = TopicPartition("s", 0)
    await conn.producer.send("s", b"committed", key=b"k", partition=0)
    txn = conn.transactional_producer("p0")
    await txn.start()
    await txn.send("s", b"pending", key=b"k", partition=0)
    conn.log.compact("s")
    await txn.abort()
    conn.log.compact("s")
    assert await read(conn, s) == [b"committed"]


async def test_a_reader_waiting_at_the_stable_offset_wakes_when_the_transaction_commits(
    conn: MemoryConnector,
) -> None:
    txn = conn.transactional_producer("p0")
    await txn.start()
    await txn.send("t", b"v", key=None, partition=0)
    consumer = conn.consumer()
    await consumer.start()
    consumer.assign([TP])
    waiting = asyncio.ensure_future(consumer.getmany(5.0))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await txn.commit()
    records = await asyncio.wait_for(waiting, 1.0)
    assert [r.value for r in records] == [b"v"]
