"""The share-group consumer (KIP-932) on the real broker: records handed out with locks, acknowledged one by one.

Most tests prove the consumer itself (issue #14), the way a worker leans on it; the last
one runs workers in share mode (``processing_mode="share"``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import AIOKafkaConnection, create_conn

from qtasks.config import QueueConfig
from qtasks.connectors.kafka import KafkaConnector
from qtasks.connectors.kafka.share import wire
from qtasks.connectors.kafka.share.consumer import ShareConsumer, ShareRecord
from qtasks.exc import ConnectorError
from tests.helpers import unique

if TYPE_CHECKING:
    from qtasks.asyncio import QueueTasks

Group = Callable[..., Awaitable[ShareConsumer]]


def _address(bootstrap: str) -> tuple[str, int]:
    host, port = bootstrap.rsplit(":", 1)
    return host, int(port)


async def _connect(host: str, port: int) -> AIOKafkaConnection:
    return await create_conn(host, port, client_id="qtasks-share-test", request_timeout_ms=60_000)


@pytest.fixture
def partitions() -> int:
    return 1


@pytest.fixture
async def topic(kafka_bootstrap: str, partitions: int) -> AsyncIterator[str]:
    name = unique("share")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    yield name


async def _produce(bootstrap: str, topic: str, count: int, partitions: int = 1) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for i in range(count):
            await producer.send(topic, f"v{i // partitions}".encode(), partition=i % partitions)
        await producer.flush()
    finally:
        await producer.stop()


@pytest.fixture
def group_settings() -> dict[str, str]:
    return {}


@pytest.fixture
async def member(kafka_bootstrap: str, topic: str, group_settings: dict[str, str]) -> AsyncIterator[Group]:
    """Members of one share group on ``topic``, which reads from the earliest offset."""
    group = unique("group")
    host, port = _address(kafka_bootstrap)
    conn = await _connect(host, port)
    try:
        # Share groups start at the latest offset by default: a task queue wants every record.
        settings = {"share.auto.offset.reset": "earliest", **group_settings}
        answers = await conn.send(wire.alter_group_configs(group, settings))
    finally:
        conn.close()
    assert [(a.error, a.message) for a in answers] == [(0, None)]
    members: list[ShareConsumer] = []
    opened: list[AIOKafkaConnection] = []

    async def connect(host: str, port: int) -> AIOKafkaConnection:
        conn = await _connect(host, port)
        opened.append(conn)
        return conn

    async def make() -> ShareConsumer:
        consumer = ShareConsumer(connect=connect, bootstrap=[(host, port)], group_id=group, topics=[topic])
        await consumer.start()
        members.append(consumer)
        return consumer

    yield make
    for consumer in members:
        await consumer.stop()
    # A share session lives as long as its connection: one left open would hold its locks.
    assert [c for c in opened if c.connected()] == [], "a stopped member left a connection open"


async def _until_assigned(consumer: ShareConsumer, timeout: float = 30) -> None:
    assert await consumer.wait_assigned(timeout), "no partition was shared with the member"


async def _take(consumer: ShareConsumer, want: int, timeout: float = 30, max_records: int = 50) -> list[ShareRecord]:
    """Records until ``want`` came or ``timeout`` passed (acknowledging nothing)."""
    got: list[ShareRecord] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got.extend(await consumer.getmany(0.5, min(max_records, want - len(got))))
    return got


async def test_a_member_gets_every_record_once_and_a_released_one_again_with_its_count(
    kafka_bootstrap: str, topic: str, member: Group
) -> None:
    await _produce(kafka_bootstrap, topic, 100)
    consumer = await member()
    await _until_assigned(consumer)
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + 60
    while len({o for o, _ in seen}) < 100 or not any(o == 7 and n == 2 for o, n in seen):
        assert time.monotonic() < deadline, f"{len(seen)} deliveries: {sorted(seen)[:20]}..."
        for record in await consumer.getmany(0.5, 20):
            assert record.value == f"v{record.offset}".encode()
            seen.append((record.offset, record.delivery_count))
            first_of_seven = record.offset == 7 and record.delivery_count == 1
            consumer.acknowledge(record, wire.RELEASE if first_of_seven else wire.ACCEPT)
    assert sorted(o for o, _ in seen) == sorted([*range(100), 7])
    assert sorted(n for o, n in seen if o == 7) == [1, 2]
    await consumer.flush_acks()
    # Every record accepted: a new member of the group is handed nothing.
    other = await member()
    await _until_assigned(other)
    assert await _take(other, 1, timeout=3) == []


async def test_two_members_on_one_partition_split_its_records_each_once(
    kafka_bootstrap: str, topic: str, member: Group
) -> None:
    await _produce(kafka_bootstrap, topic, 300)
    consumers = [await member(), await member()]
    for consumer in consumers:
        await _until_assigned(consumer)
    handled: dict[int, list[int]] = collections.defaultdict(list)
    done = asyncio.Event()

    async def work(i: int, consumer: ShareConsumer) -> None:
        while not done.is_set():
            records = await consumer.getmany(0.3, 5)
            assert len(records) <= 5, "a fetch locked more records than the member asked for"
            for record in records:
                await asyncio.sleep(0.005)  # a task's work: the other member gets the next records meanwhile
                handled[i].append(record.offset)
                consumer.acknowledge(record)
            if sum(map(len, handled.values())) >= 300:
                done.set()

    await asyncio.wait_for(asyncio.gather(*(work(i, c) for i, c in enumerate(consumers))), 90)
    offsets = sorted(o for v in handled.values() for o in v)
    assert offsets == list(range(300)), "a record was lost or handled twice"
    assert all(handled[i] for i in range(2)), f"one member did all: {[len(handled[i]) for i in range(2)]}"


async def test_a_member_whose_connections_drop_hands_its_locked_records_to_another_at_once(
    kafka_bootstrap: str, topic: str, member: Group
) -> None:
    # What a worker killed with -9 does: its sockets close, it says nothing. The broker ends
    # its share session with the connection and releases its locks then, not after 30 s.
    await _produce(kafka_bootstrap, topic, 10)
    lost = await member()
    await _until_assigned(lost)
    held = await _take(lost, 10)
    assert sorted(r.offset for r in held) == list(range(10))
    assert lost.lock_ms is not None and lost.lock_ms >= 15_000
    for session in list(lost._sessions.values()):
        session.conn.close()
    started = time.monotonic()
    heir = await member()
    await _until_assigned(heir)
    again = await _take(heir, 10)
    assert sorted((r.offset, r.delivery_count) for r in again) == [(o, 2) for o in range(10)]
    assert time.monotonic() - started < lost.lock_ms / 1000, "the records waited for their locks to run out"


async def test_stop_releases_what_a_member_holds_and_has_not_acknowledged(
    kafka_bootstrap: str, topic: str, member: Group
) -> None:
    await _produce(kafka_bootstrap, topic, 6)
    first = await member()
    await _until_assigned(first)
    held = await _take(first, 6)
    first.acknowledge(held[0])  # one done; five held when it stops
    await first.stop()
    second = await member()
    await _until_assigned(second)
    again = await _take(second, 5, timeout=10)
    assert sorted((r.offset, r.delivery_count) for r in again) == [(o, 2) for o in range(1, 6)]


async def _four_held_and_another_member(
    bootstrap: str, topic: str, member: Group
) -> tuple[ShareConsumer, list[ShareRecord], ShareConsumer]:
    """4 records, all locked by one member (2 s locks), and a second member of the group."""
    await _produce(bootstrap, topic, 4)
    holder = await member()
    await _until_assigned(holder)
    held = sorted(await _take(holder, 4), key=lambda r: r.offset)
    assert [r.offset for r in held] == [0, 1, 2, 3] and holder.lock_ms == 2000
    other = await member()
    await _until_assigned(other)
    return holder, held, other


@pytest.mark.parametrize("group_settings", [{"share.record.lock.duration.ms": "2000"}])
async def test_a_renewed_lock_outlives_its_duration_and_an_unrenewed_one_goes_to_another_member(
    kafka_bootstrap: str, topic: str, member: Group
) -> None:
    # A long task keeps its record by renewing the lock; the broker hands out again only
    # what its holder stopped renewing. (The test broker lets a group set 2 s locks.)
    holder, held, other = await _four_held_and_another_member(kafka_bootstrap, topic, member)
    kept, dropped = held[:3], held[3]
    handed: list[ShareRecord] = []
    renewing_until = time.monotonic() + 5  # 2.5 times the lock
    while time.monotonic() < renewing_until:
        assert await holder.renew(kept) == []
        for record in await other.getmany(0.5, 10):
            handed.append(record)
            other.acknowledge(record)
    assert [(r.offset, r.delivery_count) for r in handed] == [(dropped.offset, 2)], "only the one not renewed moves"
    for record in kept:
        holder.acknowledge(record)
    await holder.flush_acks()
    await other.flush_acks()
    assert await _take(other, 1, timeout=3) == [], "an accepted record was handed out again"


@pytest.mark.parametrize("group_settings", [{"share.record.lock.duration.ms": "2000"}])
async def test_acknowledgements_sent_while_a_fetch_waits_on_the_same_session_count(
    kafka_bootstrap: str, topic: str, member: Group
) -> None:
    # A fetch and an acknowledgement on one connection are served in the order sent, each
    # with its own session epoch: both count, nothing is handed out again.
    await _produce(kafka_bootstrap, topic, 5)
    consumer = await member()
    await _until_assigned(consumer)
    held = await _take(consumer, 5)
    # Nothing left: it waits at the broker (well within the 2 s locks, which the
    # acknowledgement queued behind it must beat).
    waiting = asyncio.create_task(consumer.getmany(0.6, 5))
    await asyncio.sleep(0.2)
    for record in held:
        consumer.acknowledge(record)
    await consumer.flush_acks()
    assert await waiting == []
    other = await member()
    await _until_assigned(other)
    # Not counted, they would come back at once (a lost session) or after their 2 s locks.
    assert await _take(other, 1, timeout=3) == []
    await _produce(kafka_bootstrap, topic, 1)  # and the other member does fetch: it gets the next one
    assert [(r.offset, r.delivery_count) for r in await _take(other, 1)] == [(5, 1)]


async def test_a_member_stopped_while_it_polls_takes_nothing_more_and_its_poll_loop_ends(
    kafka_bootstrap: str, topic: str, member: Group
) -> None:
    consumer = await member()
    await _until_assigned(consumer)
    taken: list[ShareRecord] = []

    async def poll_loop() -> None:
        while True:
            taken.extend(await consumer.getmany(0.5, 5))

    loop = asyncio.create_task(poll_loop())
    await asyncio.sleep(0.8)
    await consumer.stop()
    await _produce(kafka_bootstrap, topic, 5)
    with pytest.raises(ConnectorError, match="stopped"):
        await asyncio.wait_for(loop, 5)
    assert taken == []
    other = await member()
    await _until_assigned(other)
    assert sorted((r.offset, r.delivery_count) for r in await _take(other, 5)) == [(o, 1) for o in range(5)]


@pytest.mark.parametrize(("partitions", "group_settings"), [(4, {"share.record.lock.duration.ms": "2000"})])
async def test_a_member_that_loses_partitions_still_acknowledges_what_it_took_from_them(
    kafka_bootstrap: str, topic: str, member: Group
) -> None:
    await _produce(kafka_bootstrap, topic, 40, partitions=4)
    first = await member()
    await _until_assigned(first)
    deadline = time.monotonic() + 20
    while len(first.assignment()) < 4:
        assert time.monotonic() < deadline, first.assignment()
        await asyncio.sleep(0.1)
        await first.getmany(0.1, 1) if not first.assignment() else None
    held: list[ShareRecord] = []
    working = True

    async def keep_locks() -> None:  # still working on them: the 2 s locks are renewed
        while working:
            assert await first.renew(list(held)) == []
            await asyncio.sleep(0.4)

    renewing = asyncio.create_task(keep_locks())
    deadline = time.monotonic() + 20
    while len(held) < 40:
        assert time.monotonic() < deadline and not renewing.done(), (len(held), renewing)
        held.extend(await first.getmany(0.3, 40 - len(held)))
    second = await member()
    deadline = time.monotonic() + 20
    while len(first.assignment()) == 4:  # the coordinator moves some partitions to the newcomer
        assert time.monotonic() < deadline, "no partition moved to the second member"
        assert not renewing.done(), renewing
        await asyncio.sleep(0.2)
    working = False
    await renewing
    for record in held:
        first.acknowledge(record)
    await first.getmany(0.2, 1)  # the acknowledgements ride on the next fetch
    await first.flush_acks()
    # Not acknowledged, they would come back once their 2 s locks ran out.
    again = await _take(second, 1, timeout=4)
    assert again == [], [(r.partition, r.offset, r.delivery_count) for r in again]


async def test_the_connector_sets_a_share_groups_settings_and_makes_its_members(
    kafka_bootstrap: str, topic: str
) -> None:
    connector = KafkaConnector(f"kafka://{kafka_bootstrap}", QueueConfig())
    await connector.start()
    try:
        group = unique("group")
        await connector.configure_share_group(group, {"share.auto.offset.reset": "earliest"})
        with pytest.raises(ConnectorError, match="refused"):
            await connector.configure_share_group(group, {"share.record.lock.duration.ms": "10"})  # under the minimum
        await _produce(kafka_bootstrap, topic, 3)
        consumer = connector.share_consumer(group, [topic])
        await consumer.start()
        try:
            await _until_assigned(consumer)
            got = await _take(consumer, 3)
            assert sorted((r.offset, r.delivery_count) for r in got) == [(0, 1), (1, 1), (2, 1)]
        finally:
            await consumer.stop()
    finally:
        await connector.stop()


async def test_workers_in_share_mode_outnumber_the_partitions_and_run_each_task_once(kafka_bootstrap: str) -> None:
    from qtasks.asyncio import QueueTasks
    from tests.helpers import FAST

    name = unique()
    ran: list[int] = []
    settings = {**FAST, "processing_mode": "share", "tasks_partitions": 1, "concurrency": 4}
    apps = [QueueTasks(name, broker_url=f"kafka://{kafka_bootstrap}", **settings) for _ in range(4)]
    for app in apps:

        @app.task(name="work")
        async def work(i: int) -> int:
            await asyncio.sleep(0.01)
            ran.append(i)
            return i

    for app in apps:
        await app.start()
    try:
        # A member is told its share of the partition a heartbeat or two after it joins: up to
        # about 1.5 s on a loaded machine, longer than the 200 tasks take. The tasks go once
        # every worker can fetch them.
        for app in apps:
            assert app.worker is not None and app.worker._share is not None
            assert await app.worker._share.wait_assigned(30), f"{app.worker.id} was given no partition"
        handles = await apps[0].add_tasks("work", [(i,) for i in range(200)])
        ends = [await apps[0].wait(h.uuid, 60) for h in handles]
        assert [e.status for e in ends] == ["success"] * 200
        assert sorted(ran) == list(range(200)), "a task ran twice or not at all"
        per_worker = collections.Counter(e.worker for e in ends)
        assert len(per_worker) == 4, f"one partition, four workers: {dict(per_worker)}"
        print(f"tasks per worker: {sorted(per_worker.values())}")
    finally:
        for app in apps:
            await app.stop()


def _share_apps(bootstrap: str, name: str, count: int, **settings: object) -> list[QueueTasks]:
    from qtasks.asyncio import QueueTasks
    from tests.helpers import FAST

    merged = {**FAST, "processing_mode": "share", "tasks_partitions": 1, **settings}
    return [QueueTasks(name, broker_url=f"kafka://{bootstrap}", **merged) for _ in range(count)]  # type: ignore[arg-type]


async def test_a_task_longer_than_its_lock_renews_it_and_runs_once(kafka_bootstrap: str) -> None:
    # Locks of 2 s (lease_timeout): the task runs 7 s, two workers share the partition.
    apps = _share_apps(kafka_bootstrap, unique(), 2, lease_timeout=2.0, lease_interval=0.5)
    runs: list[float] = []
    for app in apps:

        @app.task(name="long")
        async def long(seconds: float) -> str:
            runs.append(seconds)
            await asyncio.sleep(seconds)
            return "done"

    for app in apps:
        await app.start()
    try:
        end = await apps[0].add_task("long", 7.0, timeout=60)
        assert (end.status, end.returning, end.attempt) == ("success", "done", 1)
        assert len(runs) == 1, "its lock ran out and the other worker ran it too"
    finally:
        for app in apps:
            await app.stop()


async def test_a_graceful_stop_hands_back_the_records_it_holds_at_once(kafka_bootstrap: str) -> None:
    # Locks of 30 s: records a stopping worker held come to the next one at once, not in 30 s.
    name = unique()
    first, second = _share_apps(kafka_bootstrap, name, 2, lease_timeout=30.0, lease_interval=1.0, concurrency=2)
    ran: dict[str, list[int]] = {"first": [], "second": []}
    two_done = asyncio.Event()
    for label, app in (("first", first), ("second", second)):

        @app.task(name="work")
        async def work(i: int, label: str = label) -> int:
            await asyncio.sleep(0.3)
            ran[label].append(i)
            if len(ran["first"]) >= 2:
                two_done.set()
            return i

    await first.start()
    try:
        handles = await first.add_tasks("work", [(i,) for i in range(20)])
        await asyncio.wait_for(two_done.wait(), 30)
        await first.stop()  # ends what it runs; what it holds and has not started goes back
        stopped = time.monotonic()
        await second.start()
        ends = [await second.wait(h.uuid, 60) for h in handles]
        assert {e.status for e in ends} == {"success"}
        assert time.monotonic() - stopped < 20, "the held records waited for their locks to run out"
        assert sorted(ran["first"] + ran["second"]) == list(range(20)), "a task ran twice or not at all"
        assert ran["second"], ran
    finally:
        await first.stop()
        await second.stop()


@pytest.mark.parametrize("group_settings", [{"share.record.lock.duration.ms": "2000"}])
async def test_one_lost_lock_does_not_keep_the_other_locks_of_its_partition_from_being_renewed(
    kafka_bootstrap: str, topic: str, member: Group
) -> None:
    # The broker applies a partition's acknowledgements all or nothing: a renewal that names
    # one record whose lock ran out (a worker that froze past it) is refused as a whole. A
    # worker renews everything it holds, the lost one included, every third of a lock: the
    # records it still holds must keep their locks all the same.
    holder, held, other = await _four_held_and_another_member(kafka_bootstrap, topic, member)
    kept, lost = held[:3], held[3]
    deadline = time.monotonic() + 10
    taken: list[ShareRecord] = []
    while not taken and time.monotonic() < deadline:
        assert await holder.renew(kept) == []
        taken = await other.getmany(0.5, 10)
    assert [(r.offset, r.delivery_count) for r in taken] == [(lost.offset, 2)]
    other.acknowledge(taken[0])
    await other.flush_acks()
    handed: list[ShareRecord] = []
    renewing_until = time.monotonic() + 5  # 2.5 times the lock
    while time.monotonic() < renewing_until:
        assert await holder.renew([*kept, lost]) == [lost], "only the lost lock is refused"
        handed.extend(await other.getmany(0.5, 10))
    assert handed == [], "a lock the holder renewed all along went to another member"
    for record in kept:
        holder.acknowledge(record)
    await holder.flush_acks()


async def test_inspect_describes_the_share_group_its_members_and_its_lag(kafka_bootstrap: str) -> None:
    from qtasks import ops

    name = unique()
    gate = asyncio.Event()
    workers = _share_apps(kafka_bootstrap, name, 2, concurrency=1, prefetch=0, process_grace=0)
    for app in workers:

        @app.task(name="wait")
        async def wait(i: int) -> int:
            await gate.wait()
            return i

    (client,) = _share_apps(kafka_bootstrap, name, 1)
    for app in workers:
        await app.start()
    try:
        await client.add_tasks("wait", [(i,) for i in range(5)])
        ids = sorted(app.worker.id for app in workers if app.worker is not None)
        deadline = time.monotonic() + 30
        # Until both members share the partition and run a task, as the broker tells it: the
        # coordinator hands a joining member its partition a heartbeat or two later, and the
        # other member's assignment can be empty for a moment meanwhile.
        while True:
            report = await ops.inspect_group(client)
            members = sorted(w.worker for w in report.workers)
            if members == ids and all(w.running and w.partitions == [0] for w in report.workers):
                break
            assert time.monotonic() < deadline, report
            await asyncio.sleep(0.2)
        assert report.group == f"{name}-workers.share" and report.state == "Stable"
        (partition,) = report.partitions
        assert partition.end == 5 and partition.lag == 5 and partition.worker == ",".join(ids), partition
        gate.set()
        while (await ops.inspect_group(client)).lag:
            assert time.monotonic() < deadline + 30, "the lag never went down to 0"
            await asyncio.sleep(0.2)
    finally:
        for app in workers:
            await app.stop()
        await client.stop()
