"""Share groups on the memory log: the behaviours the Kafka share consumer is tested for, in-process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from qtasks.config import QueueConfig
from qtasks.connectors import from_url
from qtasks.connectors.base import ACCEPT, RELEASE, ShareRecord, TopicPartition, TopicSpec
from qtasks.connectors.memory_log import MemoryLog
from qtasks.connectors.memory_share import MemoryShareConsumer, share_groups
from qtasks.exc import ConnectorError

if TYPE_CHECKING:
    from qtasks.asyncio import QueueTasks


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


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


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


async def test_a_partitions_acknowledgements_are_all_or_nothing_and_one_lost_lock_keeps_no_renewal_back() -> None:
    # As on Kafka: one offset the member does not hold refuses every acknowledgement of its
    # partition in the request; the consumer renews such a partition again record by record.
    log, clock = _log(4, **{"share.record.lock.duration.ms": "2000"})
    holder, other = await _member(log), await _member(log)
    held = await holder.getmany(0, 4)
    kept, lost = held[:3], held[3]
    clock.now += 1.5
    assert await holder.renew(kept) == []
    clock.now += 1.0  # the lost one's lock ran out
    taken = await other.getmany(0, 10)
    assert [(r.offset, r.delivery_count) for r in taken] == [(lost.offset, 2)]
    tp = TopicPartition("t", 0)
    groups = share_groups(log)
    assert groups.acknowledge("g", holder.member_id, {tp: {kept[0].offset: ACCEPT, lost.offset: ACCEPT}})
    assert await holder.renew(held) == [lost], "only the lost lock is refused"
    clock.now += 1.5
    assert await other.getmany(0, 10) == [], "a lock renewed all along went to another member"
    holder.acknowledge(lost)  # not held here any more: not sent, so the others still count
    for record in kept:
        holder.acknowledge(record)
    await holder.flush_acks()
    other.acknowledge(taken[0])
    await other.flush_acks()
    clock.now += 5
    assert await other.getmany(0, 10) == [], "an accepted record was handed out again"


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


def _share_app(name: str, url: str, **settings: object) -> QueueTasks:
    from qtasks.asyncio import QueueTasks
    from tests.helpers import FAST

    return QueueTasks(name, broker_url=url, **{**FAST, "processing_mode": "share", **settings})  # type: ignore[arg-type]


def _recording_worker(name: str, url: str, **settings: object) -> tuple[QueueTasks, list[int]]:
    """A share-mode app whose task ``work(i)`` returns ``i``, and the list of the ``i`` it ran."""
    worker = _share_app(name, url, **settings)
    ran: list[int] = []

    @worker.task(name="work")
    async def work(i: int) -> int:
        ran.append(i)
        return i

    return worker, ran


async def _take_and_drop(client: QueueTasks) -> ShareRecord:
    """A member that takes the app's first task record and goes away without acknowledging it
    (a worker that died: its locks are released at once, as a broker does when a session's
    connection closes)."""
    broker = client.core.broker
    group = f"{client.group_id}.share"
    await broker.configure_share_group(group, {"share.auto.offset.reset": "earliest"})
    member = broker.share_consumer(group, [client.core.topics.tasks])
    await member.start()
    taken = await member.getmany(1.0, 1)
    await member.stop()
    assert len(taken) == 1 and taken[0].delivery_count == 1
    return taken[0]


async def _dead_runs(client: QueueTasks, uuid: str, runs: int, lease_until: float = 0.0) -> None:
    """The status of a task whose ``runs`` started runs all died (the last one's lease as given)."""
    from qtasks.records import Task

    now = time.time()
    status = Task(
        uuid=uuid,
        task_name="work",
        status="process",
        args=[1],
        created_at=now,
        updated_at=now,
        attempt=runs,
        worker="a-dead-worker",
        lease_until=lease_until,
    )
    await client.core.store.write(status, durable=True)


async def test_a_task_whose_runs_died_as_often_as_the_limit_allows_ends_as_error_and_is_dead_lettered() -> None:
    from qtasks.ops import dead_letters
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    client = _share_app(name, url)
    worker, ran = _recording_worker(name, url, share_delivery_limit=3)

    try:
        poison = await client.add_task("work", 1)
        await _dead_runs(client, poison.uuid, 2)  # two runs started and their workers died
        await worker.start()
        end = await client.wait(poison.uuid, 10)
        assert end.status == "error" and ran == [], "a poison task is not run again"
        assert end.traceback is not None and "DeliveryLimitError" in end.traceback
        assert "started 2 run(s) that never ended" in end.traceback and "share_delivery_limit=3" in end.traceback
        letters = [x.letter for x in await dead_letters(client)]
        assert len(letters) == 1 and poison.uuid in letters[0].reason and "share_delivery_limit=3" in letters[0].reason
        # The worker goes on with the next task.
        assert (await client.add_task("work", 2, timeout=10)).returning == 2
    finally:
        await worker.stop()
        await client.stop()


async def test_a_record_handed_back_until_its_last_delivery_is_sent_afresh_and_runs_once() -> None:
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    client = _share_app(name, url)
    worker, ran = _recording_worker(name, url, share_delivery_limit=2)

    try:
        handle = await client.add_task("work", 1)
        await _take_and_drop(client)  # delivery 1 of 2 went back without a run starting
        await worker.start()
        end = await client.wait(handle.uuid, 10)
        # The last delivery was not run (had it died, nothing would have ended the task):
        # the record went out afresh, and that one ran.
        assert (end.status, end.returning, ran) == ("success", 1, [1])
        tasks = client.core.topics.tasks
        copies = [r for p in range(3) for r in client.core.broker.log.fetch(TopicPartition(tasks, p), 0, 100)]
        assert [dict(r.headers or ()).get("qtasks-again") for r in copies] == [None, b"1"]
    finally:
        await worker.stop()
        await client.stop()


async def test_a_record_redelivered_under_its_dead_runners_lease_is_taken_over_at_once() -> None:
    from qtasks.records import Task
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    client = _share_app(name, url)
    worker = _share_app(name, url)

    @worker.task(name="work")
    async def work(i: int) -> int:
        return i

    try:
        handle = await client.add_task("work", 1)
        taken = await _take_and_drop(client)
        # The dead worker had announced its run, with a lease far ahead, as a long task does.
        now = time.time()
        running = Task(
            uuid=handle.uuid,
            task_name="work",
            status="process",
            args=[1],
            created_at=now,
            updated_at=now,
            attempt=1,
            worker="a-dead-worker",
            lease_until=now + 600,
            source=f"{taken.partition}:{taken.offset}",
        )
        await client.core.store.write(running, durable=True)
        await worker.start()
        end = await client.wait(handle.uuid, 10)  # not 600 s: the lock that went is the lease's proof
        assert (end.status, end.returning, end.attempt) == ("success", 1, 2)
        from qtasks.metrics import snapshot

        metrics = {family.name: family.samples for family in await snapshot(worker)}
        assert metrics["qtasks_share_redelivered"][0].value == 1
        assert metrics["qtasks_share_records_held"][0].value == 0
        assert metrics["qtasks_worker_info"][0].labels["mode"] == "share"
    finally:
        await worker.stop()
        await client.stop()


async def test_a_keyed_task_is_refused_in_share_mode_by_the_client_and_by_the_worker() -> None:
    from qtasks.asyncio import QueueTasks
    from qtasks.ops import dead_letters
    from tests.helpers import FAST, unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    worker, ran = _recording_worker(name, url)

    with pytest.raises(ValueError, match="ordering keys need processing_mode='group'"):
        await worker.add_task("work", 1, key="k")
    client = QueueTasks(name, broker_url=url, **FAST)  # type: ignore[arg-type]  # group mode: keys allowed
    try:
        await worker.start()
        keyed = await client.add_task("work", 1, key="k")
        end = await client.wait(keyed.uuid, 10)
        assert end.status == "error" and ran == []
        assert end.traceback is not None and "processing_mode='share' cannot honour" in end.traceback
        letters = [x.letter for x in await dead_letters(client)]
        assert len(letters) == 1 and "ordering key 'k'" in letters[0].reason
        assert (await client.add_task("work", 2, timeout=10)).returning == 2
    finally:
        await worker.stop()
        await client.stop()


async def test_a_record_whose_lock_ran_out_while_it_waited_here_does_not_take_over_the_worker_it_went_to() -> None:
    from qtasks.records import Task
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    client = _share_app(name, url, tasks_partitions=1)
    app = _share_app(name, url, tasks_partitions=1, concurrency=1, prefetch=1)
    gate = asyncio.Event()
    ran: list[int] = []

    @app.task(name="work")
    async def work(i: int) -> int:
        ran.append(i)
        if i == 1:
            await gate.wait()
        return i

    await client.core.connect()
    log = client.core.broker.log
    clock = Clock()
    share_groups(log).clock = clock  # the group's locks run out when the test says
    thief = MemoryShareConsumer(log, group_id=f"{client.group_id}.share", topics=[client.core.topics.tasks])
    try:
        await app.start()
        worker = app.worker
        assert worker is not None
        first = await client.add_task("work", 1)
        second = await client.add_task("work", 2)
        await _until(lambda: ran == [1] and len(worker._backlog) == 1, "the second task waiting here for the slot")
        clock.now += 60  # the worker froze past its locks: the group hands its records out again
        await thief.start()
        taken = {r.offset: r for r in await thief.getmany(0, 10)}
        assert sorted((o, r.delivery_count) for o, r in taken.items()) == [(0, 2), (1, 2)]
        # The worker the second record went to runs it (announced, its lease far ahead).
        now = time.time()
        running = Task(
            uuid=second.uuid,
            task_name="work",
            status="process",
            args=[2],
            created_at=now,
            updated_at=now,
            attempt=1,
            worker="the-worker-it-went-to",
            lease_until=now + 600,
            source="0:1",
        )
        await client.core.store.write(running, durable=True)
        await _until(lambda: getattr(worker.core.view.head(second.uuid), "status", None) == "process", "the status")
        gate.set()  # the slot frees: the copy that waited here must not run
        assert (await client.wait(first.uuid, 5)).status == "success"
        await asyncio.sleep(1.0)
        head = worker.core.view.head(second.uuid)
        assert ran == [1], "a copy whose lock ran out took the task over from the worker the group gave it to"
        assert head is not None and (head.status, head.worker) == ("process", "the-worker-it-went-to")
        lost = worker.share_locks_lost
        assert lost >= 1
        await asyncio.sleep(1.5)  # past a renewal or more
        assert worker.share_locks_lost == lost, "each lost lock counts once"
    finally:
        await app.stop()
        await thief.stop()
        await client.stop()


async def test_a_copy_of_a_task_that_joined_a_record_dropped_here_is_taken_afresh_not_held_for_ever() -> None:
    from qtasks.connectors.base import TopicPartition as TP
    from qtasks.records import Task
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    client = _share_app(name, url, tasks_partitions=1)
    app, ran = _recording_worker(name, url, tasks_partitions=1, concurrency=2)

    await client.core.connect()
    log = client.core.broker.log
    tasks = client.core.topics.tasks
    thief = MemoryShareConsumer(log, group_id=f"{client.group_id}.share", topics=[tasks])
    await thief.start()
    keeping: asyncio.Task[None] | None = None
    try:
        # Another worker runs the task (not from this record): its first record waits for that lease.
        handle = await client.add_task("work", 1)
        now = time.time()
        running = Task(
            uuid=handle.uuid,
            task_name="work",
            status="process",
            args=[1],
            created_at=now,
            updated_at=now,
            attempt=1,
            worker="another-worker",
            lease_until=now + 600,
            source="0:99",
        )
        await client.core.store.write(running, durable=True)
        await app.start()
        worker = app.worker
        assert worker is not None
        await _until(lambda: handle.uuid in worker._active, "the first record being admitted")
        # A second record of the same task (a producer's retry, the delays topic moving it
        # twice) joins the first one here.
        first = log.fetch(TP(tasks, 0), 0, 1)[0]
        log.append(tasks, 0, first.key, first.value, list(first.headers))
        await _until(lambda: len(worker._active.get(handle.uuid, ())) == 1, "the copy joining the first record")
        # The first record's lock runs out (the group gives it elsewhere), then the lease it waited for ends.
        inflight = share_groups(log)._groups[f"{client.group_id}.share"].partitions[TP(tasks, 0)].inflight
        inflight[0].until = 0.0
        stolen = await thief.getmany(0, 1)
        assert [(r.offset, r.delivery_count) for r in stolen] == [(0, 2)]

        async def keep() -> None:  # the member it went to holds it (its lock renewed)
            while True:
                await thief.renew(stolen)
                await asyncio.sleep(0.5)

        keeping = asyncio.create_task(keep())
        await _until(lambda: worker.share_locks_lost == 1, "the lost lock")
        await client.core.store.write(msgspec.structs.replace(running, lease_until=0.0, updated_at=time.time()))
        end = await client.wait(handle.uuid, 5)
        assert (end.status, end.returning, ran) == ("success", 1, [1]), "the copy held here must run the task"
        await _until(lambda: not worker._share_live, "the copy acknowledged")
    finally:
        if keeping is not None:
            keeping.cancel()
        await app.stop()
        await thief.stop()
        await client.stop()


async def test_an_ended_task_is_acknowledged_while_the_worker_stays_full() -> None:
    from qtasks.connectors.base import TopicPartition as TP
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    client = _share_app(name, url, tasks_partitions=1)
    app = _share_app(name, url, tasks_partitions=1, concurrency=2, prefetch=0)
    release = asyncio.Event()

    @app.task(name="work")
    async def work(i: int) -> int:
        if i:
            await release.wait()
        return i

    @app.events.on.task_success()
    async def slow_hook(task: Any) -> None:  # a webhook, say: the record is finished once it returns
        if task.returning == 0:
            await asyncio.sleep(0.3)

    await client.core.connect()
    log = client.core.broker.log
    tasks = client.core.topics.tasks
    try:
        await app.start()
        long_one = await client.add_task("work", 1)
        quick = await client.add_task("work", 0)
        await client.add_task("work", 2)  # takes the slot the quick one frees: the worker stays full
        assert (await client.wait(quick.uuid, 5)).status == "success"
        inflight = share_groups(log)._groups[f"{client.group_id}.share"].partitions[TP(tasks, 0)].inflight
        await _until(lambda: 2 in inflight, "the third record taken")
        await asyncio.sleep(1.0)
        assert 1 not in inflight, "the quick task's record is still locked: its acknowledgement waits for a fetch"
        release.set()
        assert (await client.wait(long_one.uuid, 5)).status == "success"
    finally:
        release.set()
        await app.stop()
        await client.stop()


async def test_a_copy_of_a_task_that_joined_its_last_delivery_is_acknowledged_with_it() -> None:
    from qtasks.connectors.base import TopicPartition as TP
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    client = _share_app(name, url, tasks_partitions=1)
    app = _share_app(name, url, tasks_partitions=1, share_delivery_limit=2)
    ending = asyncio.Event()

    @app.task(name="work")
    async def work(i: int) -> int:
        return i

    @app.events.on.task_error()
    async def slow_hook(task: Any) -> None:  # the last delivery's ending is under way meanwhile
        ending.set()
        await asyncio.sleep(0.5)

    await client.core.connect()
    log = client.core.broker.log
    tasks = client.core.topics.tasks
    try:
        poison = await client.add_task("work", 1)
        await _dead_runs(client, poison.uuid, 1)  # as many runs died as the limit of 2 allows
        await app.start()
        worker = app.worker
        assert worker is not None
        await asyncio.wait_for(ending.wait(), 5)
        first = log.fetch(TP(tasks, 0), 0, 1)[0]
        log.append(tasks, 0, first.key, first.value, list(first.headers))  # a copy of the task's record
        await _until(lambda: len(worker._active.get(poison.uuid, ())) == 1, "the copy joining the last delivery")
        assert (await client.wait(poison.uuid, 5)).status == "error"
        await _until(lambda: not worker._share_live, "the copy acknowledged with the task's ending")
    finally:
        await app.stop()
        await client.stop()


async def test_a_chord_callback_held_through_graceful_stops_still_runs() -> None:
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    settings: dict[str, object] = {"tasks_partitions": 1, "concurrency": 1, "prefetch": 0, "share_delivery_limit": 2}
    gate = asyncio.Event()

    def worker_app() -> QueueTasks:
        app = _share_app(name, url, **settings)

        @app.task(name="head")
        async def head(i: int) -> int:
            await gate.wait()
            return i

        @app.task(name="callback")
        async def callback(results: list[int]) -> int:
            return sum(results)

        return app

    runner, first, second = worker_app(), worker_app(), worker_app()
    try:
        await runner.start()  # takes the head task and runs it (it has room for one record only)
        handle = await runner.chord("head", [(1,)], "callback")
        await _until(lambda: runner.worker is not None and bool(runner.worker._running), "the head running")
        await first.start()  # takes the callback's record, which waits for the head
        await _until(lambda: first.worker is not None and bool(first.worker._afters), "the callback held")
        await first.stop()  # a scale-in or a deploy: the callback's record goes back to the group
        await second.start()
        await _until(lambda: second.worker is not None and bool(second.worker._afters), "the callback held again")
        gate.set()
        end = await runner.wait(handle.uuid, 10)
        assert (end.status, end.returning) == ("success", 1), end.traceback
    finally:
        gate.set()
        for app in (second, first, runner):
            await app.stop()


async def test_a_share_worker_outlives_a_broker_away_for_longer_than_its_loops_restarts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import qtasks.supervise
    from tests.helpers import unique

    # A failing loop restarts at once here: its 8 restarts (about 11 s otherwise) fit in the outage.
    monkeypatch.setattr(qtasks.supervise, "restart_delay", lambda failures: 0.01)
    url, name = f"memory://{uuid.uuid4().hex}", unique()
    app = _share_app(name, url)

    @app.task(name="work")
    async def work(i: int) -> int:
        return i

    try:
        await app.start()
        worker = app.worker
        assert worker is not None and worker._share is not None
        member = worker._share
        polls = member.getmany
        away = time.monotonic() + 1.5  # past the 8 restarts the supervisor allows a loop

        async def broker_away(timeout: float, max_records: int) -> list[ShareRecord]:
            if time.monotonic() < away:  # what Kafka's member raises while no broker answers
                raise ConnectorError("no broker answers: 127.0.0.1:9092: connection refused", retriable=True)
            return await polls(timeout, max_records)

        member.getmany = broker_away  # type: ignore[method-assign]
        await asyncio.sleep(away - time.monotonic() + 0.5)
        assert worker.error is None, f"the worker stopped while the broker was away: {worker.error}"
        assert (await app.add_task("work", 7, timeout=10)).returning == 7
    finally:
        await app.stop()


async def test_a_full_share_worker_fetches_again_as_soon_as_a_slot_frees() -> None:
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    # One slot and no prefetch: the worker is full after every fetch. It used to look again
    # 50 ms later (200 tasks: 10 s at least); a freed slot now wakes it.
    app = _share_app(name, url, concurrency=1, prefetch=0)

    @app.task(name="work")
    async def work(i: int) -> int:
        return i

    await app.start()
    try:
        handles = await app.add_tasks("work", [(i,) for i in range(200)])
        began = time.monotonic()
        ends = [await app.wait(h.uuid, 30) for h in handles]
        took = time.monotonic() - began
        assert {e.status for e in ends} == {"success"}
        assert took < 5, f"200 one-slot tasks took {took:.1f} s: the poll loop waited for a timer, not the slot"
    finally:
        await app.stop()


async def test_a_run_handed_back_by_a_stopping_worker_is_not_counted_as_a_poison_run() -> None:
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    gate = asyncio.Event()

    def worker() -> QueueTasks:
        # A limit of 2: one run that died would make the task poison; a hand-back must not.
        app = _share_app(name, url, share_delivery_limit=2, stop_timeout=0.2)

        @app.task(name="slow")
        async def slow(i: int) -> int:
            await gate.wait()
            return i

        return app

    first, second, client = worker(), worker(), _share_app(name, url)
    await first.start()
    try:
        handle = await first.add_task("slow", 7)
        await _until(lambda: (h := first.view.head(handle.uuid)) is not None and h.status == "process", "running")
        await first.stop()  # past stop_timeout: the run is handed back
        released = await client.get(handle.uuid)
        assert released is not None and (released.attempt, released.released) == (1, 1), released
        gate.set()
        await second.start()
        end = await second.wait(handle.uuid, 10)
        assert (end.status, end.returning) == ("success", 7), end.traceback
    finally:
        await first.stop()
        await second.stop()
        await client.stop()


async def test_inspect_shows_the_share_groups_workers_and_what_waits() -> None:
    from qtasks import ops
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    gate = asyncio.Event()
    workers = [_share_app(name, url, tasks_partitions=2, concurrency=1, prefetch=0, process_grace=0) for _ in range(2)]
    for app in workers:

        @app.task(name="wait")
        async def wait(i: int) -> int:
            await gate.wait()
            return i

    client = _share_app(name, url, tasks_partitions=2)
    for app in workers:
        await app.start()
    try:
        await client.add_tasks("wait", [(i,) for i in range(6)])
        await _until(lambda: all(app.worker is not None and app.worker._running for app in workers), "both running")
        report = await ops.inspect_group(client)
        assert report.group.endswith("-workers.share") and report.state == "Stable"
        ids = sorted(app.worker.id for app in workers if app.worker is not None)
        assert sorted(w.worker for w in report.workers) == ids
        assert all(w.partitions == [0, 1] and len(w.running) == 1 for w in report.workers), report.workers
        # 6 tasks, 2 running: every record of both partitions is still to be done.
        assert sum(p.lag for p in report.partitions) == 6 and report.lag == 6
        assert all(p.worker == ",".join(ids) for p in report.partitions)
        gate.set()
        await _until(lambda: sum(app.worker.tasks_done for app in workers if app.worker) == 6, "all done")
        await _until(lambda: not any(app.worker and app.worker._share_live for app in workers), "acknowledged")
        assert (await ops.inspect_group(client)).lag == 0
    finally:
        for app in workers:
            await app.stop()


async def test_a_record_sent_afresh_and_fetched_before_its_send_returns_still_runs() -> None:
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    client = _share_app(name, url)
    worker, ran = _recording_worker(name, url, share_delivery_limit=2)

    try:
        handle = await client.add_task("work", 1)
        await _take_and_drop(client)  # delivery 1 of 2 went back without a run starting
        await worker.core.connect()
        producer = worker.core.broker.producer
        sends = producer.send

        async def acked_late(topic: str, value: Any, **kwargs: Any) -> Any:
            # As on Kafka: the record is readable (and may be fetched) before its sender
            # hears it was stored.
            await sends(topic, value, **kwargs)
            if topic != worker.core.topics.tasks:
                return None
            return asyncio.ensure_future(asyncio.sleep(0.3))

        producer.send = acked_late  # type: ignore[method-assign]
        await worker.start()
        end = await client.wait(handle.uuid, 5)
        assert (end.status, end.returning, ran) == ("success", 1, [1])
    finally:
        await worker.stop()
        await client.stop()


async def test_a_hand_back_the_status_view_has_not_read_yet_does_not_make_a_task_poison() -> None:
    from qtasks.records import Task
    from tests.helpers import unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    client = _share_app(name, url)
    worker, ran = _recording_worker(name, url, share_delivery_limit=2)

    member = None
    try:
        handle = await client.add_task("work", 1)
        broker = client.core.broker
        group = f"{client.group_id}.share"
        await broker.configure_share_group(group, {"share.auto.offset.reset": "earliest"})
        member = broker.share_consumer(group, [client.core.topics.tasks])
        await member.start()
        held = await member.getmany(1.0, 1)  # a worker runs it (delivery 1) ...
        assert len(held) == 1
        now = time.time()
        running = Task(
            uuid=handle.uuid,
            task_name="work",
            status="process",
            args=[1],
            created_at=now,
            updated_at=now,
            attempt=1,
            worker="a-stopping-worker",
            lease_until=now + 30,
            source=f"{held[0].partition}:{held[0].offset}",
        )
        await client.core.store.write(running, durable=True)
        await worker.start()
        await _until(lambda: (h := worker.view.head(handle.uuid)) is not None and h.attempt == 1, "the run seen")
        # The worker's status view falls behind (a slow fetch): what is written now reaches it late.
        tail = worker.core.store._consumer
        gets = tail.getmany

        async def late(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(1.0)
            return await gets(*args, **kwargs)

        tail.getmany = late
        await asyncio.sleep(0.6)  # the fetch under way when it fell behind is over
        # ... and stops past stop_timeout: the run is handed back (released), then its record.
        released = msgspec.structs.replace(running, lease_until=0.0, released=1, updated_at=time.time())
        await client.core.store.write(released, durable=True)
        await member.stop()
        member = None
        end = await client.wait(handle.uuid, 10)
        assert (end.status, end.returning, ran) == ("success", 1, [1]), end.traceback
    finally:
        if member is not None:
            await member.stop()
        await worker.stop()
        await client.stop()


async def test_group_mode_counts_no_released_runs() -> None:
    from qtasks.asyncio import QueueTasks
    from tests.helpers import FAST, unique

    url, name = f"memory://{uuid.uuid4().hex}", unique()
    gate = asyncio.Event()
    app = QueueTasks(name, broker_url=url, **{**FAST, "stop_timeout": 0.2})  # type: ignore[arg-type]
    client = QueueTasks(name, broker_url=url, **FAST)  # type: ignore[arg-type]

    @app.task(name="slow")
    async def slow(i: int) -> int:
        await gate.wait()
        return i

    await app.start()
    try:
        handle = await app.add_task("slow", 7)
        await _until(lambda: (h := app.view.head(handle.uuid)) is not None and h.status == "process", "running")
        await app.stop()  # past stop_timeout: the run is handed back, as before share mode
        status = await client.get(handle.uuid)
        assert status is not None and (status.lease_until, status.released) == (0.0, 0), status
    finally:
        gate.set()
        await app.stop()
        await client.stop()
