"""Share groups on the memory log: the behaviours the Kafka share consumer is tested for, in-process."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from qtasks.config import QueueConfig
from qtasks.connectors import from_url
from qtasks.connectors.base import RELEASE, TopicSpec
from qtasks.connectors.memory_log import MemoryLog
from qtasks.connectors.memory_share import MemoryShareConsumer, share_groups
from qtasks.exc import ConnectorError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _log(records: int, partitions: int = 1, **settings: str) -> tuple[MemoryLog, Clock]:
    log = MemoryLog()
    log.create_topic(TopicSpec("t", partitions))
    for i in range(records):
        log.append("t", i % partitions, None, f"v{i}".encode())
    clock = Clock()
    groups = share_groups(log)
    groups.clock = clock
    groups.configure("g", {"share.auto.offset.reset": "earliest", **settings})
    return log, clock


async def _member(log: MemoryLog) -> MemoryShareConsumer:
    member = MemoryShareConsumer(log, group_id="g", topics=["t"])
    await member.start()
    return member


async def test_every_record_is_handed_out_once_and_a_released_one_again_with_its_count() -> None:
    log, _ = _log(10)
    member = await _member(log)
    first = await member.getmany(0, 100)
    assert [(r.offset, r.delivery_count, r.value) for r in first] == [(i, 1, f"v{i}".encode()) for i in range(10)]
    member.acknowledge(first[3], RELEASE)
    for record in first[:3] + first[4:]:
        member.acknowledge(record)
    assert [(r.offset, r.delivery_count) for r in await member.getmany(0, 100)] == [(3, 2)]
    other = await _member(log)
    assert await other.getmany(0, 100) == []


async def test_two_members_share_one_partition_each_record_to_one() -> None:
    log, _ = _log(10)
    a, b = await _member(log), await _member(log)
    got_a, got_b = await a.getmany(0, 4), await b.getmany(0, 100)
    assert [r.offset for r in got_a] == [0, 1, 2, 3] and [r.offset for r in got_b] == list(range(4, 10))


async def test_a_lock_that_runs_out_hands_the_record_to_another_member_and_a_renewed_one_stays() -> None:
    log, clock = _log(2, **{"share.record.lock.duration.ms": "2000"})
    holder, other = await _member(log), await _member(log)
    kept, dropped = await holder.getmany(0, 2)
    clock.now += 1.5
    assert await holder.renew([kept]) == []
    clock.now += 1.0  # the dropped one's lock ran out, the renewed one has 1 s left
    assert [(r.offset, r.delivery_count) for r in await other.getmany(0, 10)] == [(dropped.offset, 2)]
    holder.acknowledge(dropped)  # too late: another member holds it now
    await holder.flush_acks()
    clock.now += 5
    assert await holder.renew([kept]) == [kept]  # its lock ran out meanwhile


async def test_a_record_handed_out_as_often_as_the_delivery_limit_is_archived() -> None:
    log, clock = _log(1, **{"share.delivery.count.limit": "2", "share.record.lock.duration.ms": "1000"})
    member = await _member(log)
    assert [r.delivery_count for r in await member.getmany(0, 1)] == [1]
    clock.now += 2
    assert [r.delivery_count for r in await member.getmany(0, 1)] == [2]
    clock.now += 2
    assert await member.getmany(0, 1) == []


async def test_stop_releases_what_a_member_holds_and_a_stopped_member_cannot_poll() -> None:
    log, _ = _log(6)
    first = await _member(log)
    held = await first.getmany(0, 6)
    first.acknowledge(held[0])
    await first.stop()
    with pytest.raises(ConnectorError, match="stopped"):
        await first.getmany(0, 1)
    second = await _member(log)
    assert [(r.offset, r.delivery_count) for r in await second.getmany(0, 10)] == [(o, 2) for o in range(1, 6)]


async def test_a_member_waiting_for_records_gets_one_produced_meanwhile() -> None:
    log, _ = _log(0)
    member = await _member(log)
    waiting = asyncio.create_task(member.getmany(5, 10))
    await asyncio.sleep(0.05)
    log.append("t", 0, None, b"late")
    assert [r.value for r in await asyncio.wait_for(waiting, 2)] == [b"late"]


async def test_latest_starts_at_the_end_of_each_partition_when_the_group_first_reads_it() -> None:
    log, _ = _log(3)
    share_groups(log).configure("g2", {"share.auto.offset.reset": "latest"})
    member = MemoryShareConsumer(log, group_id="g2", topics=["t"])
    await member.start()
    assert await member.getmany(0, 10) == []
    log.append("t", 0, None, b"new")
    assert [r.value for r in await member.getmany(0, 10)] == [b"new"]


async def test_the_memory_connector_makes_share_members_of_its_log() -> None:
    connector = from_url(f"memory://{uuid.uuid4().hex}", QueueConfig())
    await connector.start()
    await connector.ensure_topics([TopicSpec("t", 2)])
    await connector.configure_share_group("g", {"share.auto.offset.reset": "earliest"})
    await connector.producer.send("t", b"x", key=None, partition=1)
    member = connector.share_consumer("g", ["t"])
    await member.start()
    assert await member.wait_assigned(1) and member.assignment() == {("t", 0), ("t", 1)}
    assert [(r.partition, r.value) for r in await member.getmany(0, 10)] == [(1, b"x")]
    await member.stop()
    await connector.stop()


async def test_workers_in_share_mode_split_the_tasks_of_one_partition_and_each_runs_once() -> None:
    from qtasks.asyncio import QueueTasks
    from tests.helpers import FAST, unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    ran: list[str] = []
    apps = [
        QueueTasks(
            name, broker_url=url, **{**FAST, "processing_mode": "share", "tasks_partitions": 1, "concurrency": 4}
        )
        for _ in range(3)
    ]
    for app in apps:

        @app.task(name="work")
        async def work(i: int) -> int:
            await asyncio.sleep(0.005)
            ran.append(str(i))
            return i

    for app in apps:
        await app.start()
    try:
        handles = await apps[0].add_tasks("work", [(i,) for i in range(120)])
        ends = [await apps[0].wait(h.uuid, 30) for h in handles]
        assert [e.status for e in ends] == ["success"] * 120
        assert sorted(ran, key=int) == [str(i) for i in range(120)], "a task ran twice or not at all"
        workers = {e.worker for e in ends}
        assert len(workers) == 3, f"one partition, three workers: {len(workers)} took part"
    finally:
        for app in apps:
            await app.stop()


def test_share_mode_is_at_least_once_only() -> None:
    from qtasks.exc import ConfigError

    with pytest.raises(ConfigError, match="at least once only"):
        QueueConfig(processing_mode="share", processing_guarantee="exactly_once")
