"""The engine, through ``qtasks.asyncio.QueueTasks``, under what a real cluster does to it.

- partitions added to the app's topics while its worker and clients run (and a client
  that has not checked the partition counts again yet);
- a broker that accepts TCP connections and never answers (every client call is bounded);
- read-your-writes and cancel from a client in another process, right after a submit;
- a results topic whose ``max.message.bytes`` is below the value a task yields (set
  before the app starts, or lowered while it runs, so that the broker itself refuses it).

Every test talks to the session's real Apache Kafka broker (or to a silent TCP server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaTP
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic, RecordsToDelete
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from qtasks.asyncio import QueueTasks
from qtasks.exc import BrokerUnavailableError, StreamIncompleteError
from qtasks.partitioner import partition_for
from tests.helpers import FAST, silent_server, unique, until

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]


# -- helpers -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def admin_client(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


def leftover_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}


async def group_lag(bootstrap: str, group_id: str, topic: str) -> dict[int, tuple[int, int]]:
    """Partitions of ``topic`` whose committed offset (for ``group_id``) is behind the end: {p: (committed, end)}."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([KafkaTP(topic, p) for p in partitions])
    finally:
        await consumer.stop()
    async with admin_client(bootstrap) as admin:
        committed = await admin.list_consumer_group_offsets(group_id)
    behind = {}
    for tp, end in ends.items():
        done = committed[tp].offset if tp in committed else 0
        if done < end:
            behind[tp.partition] = (done, end)
    return behind


async def until_committed(bootstrap: str, group_id: str, topic: str, timeout: float) -> None:
    """Wait until the group's committed offset of every partition of ``topic`` is its end offset."""
    deadline = time.monotonic() + timeout
    while behind := await group_lag(bootstrap, group_id, topic):
        assert time.monotonic() < deadline, f"{group_id} still behind on {topic} after {timeout} s: {behind}"
        await asyncio.sleep(0.2)


async def until_config(admin: AIOKafkaAdminClient, topic: str, name: str, value: str, timeout: float) -> None:
    """Wait until the broker describes ``topic`` with ``name=value`` (an altered config is in force)."""
    deadline = time.monotonic() + timeout
    while True:
        current = None
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs={name: None})
        for response in await admin.describe_configs([resource]):
            for found in response.to_object()["resources"]:
                for entry in found["config_entries"]:
                    if entry["config_names"] == name:
                        current = entry["config_value"]
        if current == value:
            return
        assert time.monotonic() < deadline, f"{topic} still has {name}={current} after {timeout} s"
        await asyncio.sleep(0.1)


# -- 1. partitions added while the worker and the clients run ---------------------------------


@pytest.mark.timeout(90)
async def test_tasks_on_partitions_added_while_running_run_and_stream_everywhere(
    make_app: Callable[..., QueueTasks], kafka_bootstrap: str
) -> None:
    before, after = 2, 4
    settings = {
        "tasks_partitions": before,
        "results_partitions": before,
        "status_partitions": before,
        "metadata_refresh_interval": 1.0,
    }
    app = make_app(**settings)

    @app.task
    async def count(n: int):
        for i in range(n):
            yield {"i": i}
            await asyncio.sleep(0.01)

    await app.start()
    other = make_app(app.name, **settings)  # a second client, connected before the topics grow
    warm = await other.add_task("count", 2)
    assert [v async for v in other.stream(warm.uuid, timeout=20)] == [{"i": 0}, {"i": 1}]

    topics = app.topics
    async with admin_client(kafka_bootstrap) as admin:
        await admin.create_partitions(
            {name: NewPartitions(total_count=after) for name in (topics.tasks, topics.results, topics.status)}
        )
    started = time.monotonic()

    def grown(a: QueueTasks) -> bool:
        core = a.core
        return (core.tasks_partitions, core.results_partitions, core.store.partitions) == (after, after, after)

    await until(lambda: grown(app) and grown(other), 15, "both apps to follow the new partition counts")
    followed = time.monotonic() - started

    # Submit from both clients, in turn, until each client has tasks on the new partitions
    # and both new partitions have tasks (each uuid lands there with a chance of one half).
    submitted: list[tuple[QueueTasks, str]] = []

    def on_new() -> list[tuple[QueueTasks, str]]:
        return [(c, u) for c, u in submitted if partition_for(u, after) >= before]

    def enough() -> bool:
        new = on_new()
        return {partition_for(u, after) for _, u in new} == {2, 3} and {id(c) for c, _ in new} == {id(app), id(other)}

    for i in range(100):
        task = await (app, other)[i % 2].add_task("count", 5)
        assert task is not None
        submitted.append(((app, other)[i % 2], task.uuid))
        if enough():
            break
    assert enough(), [partition_for(u, after) for _, u in submitted]

    async def check(uuid: str, n: int) -> None:
        expected = [{"i": i} for i in range(n)]
        for reader in (app, other):
            assert [v async for v in reader.stream(uuid, timeout=30)] == expected, (reader.name, uuid)
        for reader in (app, other):
            done = await reader.wait(uuid, timeout=20)
            assert (done.status, done.yield_count, done.returning) == ("success", n, expected), done
            assert done.results_partition == partition_for(uuid, after), done
            seen = await reader.get(uuid)
            assert seen is not None and seen.status == "success"

    await asyncio.gather(*(check(u, 5) for _, u in submitted))
    print(
        f"followed after {followed:.1f} s; {len(submitted)} tasks, {len(on_new())} on the new partitions, "
        f"all done {time.monotonic() - started:.1f} s after the topics grew"
    )


@pytest.mark.timeout(60)
async def test_a_client_yet_to_see_new_partitions_still_finds_a_task_submitted_on_them(
    make_app: Callable[..., QueueTasks], kafka_bootstrap: str
) -> None:
    """Read-your-writes holds for a client whose next partition check is still ahead.

    ``metadata_refresh_interval`` is 30 s by default: for that long after the status topic
    grows, a client reads none of its new partitions. A uuid it does not hold must still be
    looked up where it is (its partition under the current count), not declared unknown.
    """
    before, after = 2, 4
    settings = {
        "tasks_partitions": before,
        "results_partitions": before,
        "status_partitions": before,
        "metadata_refresh_interval": 1.0,
    }
    app = make_app(**settings)

    @app.task
    async def count(n: int):
        for i in range(n):
            yield i

    await app.start()
    stale = make_app(app.name, **{**settings, "metadata_refresh_interval": 3600.0})
    await stale._connect()
    topics = app.topics
    async with admin_client(kafka_bootstrap) as admin:
        await admin.create_partitions(
            {name: NewPartitions(total_count=after) for name in (topics.tasks, topics.results, topics.status)}
        )
    await until(lambda: app.core.store.partitions == after, 15, "the submitting app to follow the new partitions")
    for _ in range(100):
        task = await app.add_task("count", 3)
        assert task is not None
        if partition_for(task.uuid, after) >= before:
            break
    assert partition_for(task.uuid, after) >= before
    assert stale.core.store.partitions == before  # it has not checked the topics again yet

    seen = await stale.get(task.uuid)
    assert seen is not None, f"a task on status partition {partition_for(task.uuid, after)} is unknown to the client"
    assert [v async for v in stale.stream(task.uuid, timeout=20)] == [0, 1, 2]
    done = await stale.wait(task.uuid, 20)
    assert done.status == "success", done


# -- 2. a broker that accepts TCP and never answers -------------------------------------------


@pytest.mark.timeout(60)
async def test_client_calls_against_a_silent_broker_end_within_their_timeout() -> None:
    async with silent_server() as address:
        # connect_timeout (10 s by default) is longer than the callers' deadlines: theirs count.
        app = QueueTasks(name=unique(), broker_url=f"kafka://{address}", **FAST)
        try:
            started = time.monotonic()
            with pytest.raises(BrokerUnavailableError, match=r"could not be submitted within 3 s"):
                await app.add_task("x", timeout=3)
            elapsed = time.monotonic() - started
            assert 2.9 < elapsed < 5, elapsed

            some_uuid = str(uuid_mod.uuid4())
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await app.wait(some_uuid, timeout=3)
            elapsed = time.monotonic() - started
            assert 2.9 < elapsed < 5, elapsed

            started = time.monotonic()
            with pytest.raises(TimeoutError):
                [v async for v in app.stream(some_uuid, timeout=3)]
            elapsed = time.monotonic() - started
            assert 2.9 < elapsed < 5, elapsed
        finally:
            started = time.monotonic()
            await app.close()
            closing = time.monotonic() - started
        assert closing < 1, closing
        await asyncio.sleep(0)
        assert not leftover_tasks(), leftover_tasks()


@pytest.mark.timeout(60)
async def test_a_short_connect_timeout_fails_client_calls_before_their_deadline() -> None:
    async with silent_server() as address:
        app = QueueTasks(name=unique(), broker_url=f"kafka://{address}?connect_timeout=1", **FAST)
        unreachable = re.escape(f"cannot reach Kafka at {address} within 1 s")
        try:
            for call in (
                lambda: app.add_task("x", timeout=3),
                lambda: app.wait(str(uuid_mod.uuid4()), timeout=3),
                lambda: app.get(str(uuid_mod.uuid4())),
                lambda: app.cancel(str(uuid_mod.uuid4())),
            ):
                started = time.monotonic()
                with pytest.raises(BrokerUnavailableError, match=unreachable):
                    await call()
                elapsed = time.monotonic() - started
                assert 0.9 < elapsed < 2.5, elapsed
            started = time.monotonic()
            with pytest.raises(BrokerUnavailableError, match=unreachable):
                [v async for v in app.stream(str(uuid_mod.uuid4()), timeout=3)]
            assert 0.9 < time.monotonic() - started < 2.5
        finally:
            started = time.monotonic()
            await app.close()
            closing = time.monotonic() - started
        assert closing < 1, closing
        await asyncio.sleep(0)
        assert not leftover_tasks(), leftover_tasks()


# -- 3. read-your-writes and cancel from another process ---------------------------------------

#: A client in its own process: connects, says "ready", then for each uuid read from stdin
#: calls get and cancel at once and prints what it saw as one JSON line.
CLIENT_SCRIPT = """
import asyncio, json, sys
from qtasks.asyncio import QueueTasks

async def main() -> None:
    name, url, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    app = QueueTasks(name=name, broker_url=url, **settings)
    await app.get("00000000-0000-0000-0000-000000000000")  # connected before the submits
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if not line:
            break
        seen = await app.get(line)
        cancelled = await app.cancel(line, "changed my mind")
        answer = {"uuid": line, "status": None if seen is None else seen.status, "cancelled": cancelled}
        print(json.dumps(answer), flush=True)
    await app.close()

asyncio.run(main())
"""


@pytest.mark.timeout(90)
async def test_a_client_in_another_process_sees_and_cancels_a_task_the_moment_it_was_submitted(
    make_app: Callable[..., QueueTasks], broker_url: str, kafka_bootstrap: str
) -> None:
    app = make_app()
    ran: list[str] = []

    @app.task
    async def slow(i: int) -> None:
        ran.append(f"slow {i}")
        await asyncio.sleep(30)

    await app._connect()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT_SCRIPT,
        app.name,
        broker_url,
        json.dumps(FAST),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    stderr = asyncio.ensure_future(child.stderr.read())  # drained all along, shown on failure

    async def answer() -> str:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        if not line:
            await asyncio.wait_for(child.wait(), 10)
            pytest.fail(f"the client process ended early (exit {child.returncode}):\n{(await stderr).decode()}")
        return line.decode().strip()

    uuids: list[str] = []
    try:
        assert await answer() == "ready"
        timings = []
        for i in range(20):
            task = await app.add_task("slow", i)
            assert task is not None
            started = time.monotonic()
            child.stdin.write(f"{task.uuid}\n".encode())
            await child.stdin.drain()
            seen = json.loads(await answer())
            timings.append(time.monotonic() - started)
            assert seen == {"uuid": task.uuid, "status": "new", "cancelled": True}, (i, seen)
            uuids.append(task.uuid)
        child.stdin.close()
        code = await asyncio.wait_for(child.wait(), 20)
        assert code == 0, (await stderr).decode()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await stderr
    print(f"get + cancel from another process: max {max(timings):.3f} s, mean {sum(timings) / len(timings):.3f} s")

    # The cancels were written by the other process; this one sees them, and its worker runs none.
    for uuid in uuids:
        done = await app.wait(uuid, 20)
        assert (done.status, done.cancel_reason) == ("cancel", "changed my mind"), done
    await app.start()
    await until_committed(kafka_bootstrap, app.group_id, app.topics.tasks, 20)
    assert ran == []


# -- 4. a value over the results topic's max.message.bytes --------------------------------------


@pytest.mark.timeout(90)
async def test_a_value_over_the_results_topics_limit_is_an_error_and_the_worker_goes_on(
    make_app: Callable[..., QueueTasks], kafka_bootstrap: str
) -> None:
    name = unique()
    async with admin_client(kafka_bootstrap) as admin:
        # One results partition: every task below writes its results to the same partition.
        await admin.create_topics([NewTopic(f"{name}.results", 1, 1, topic_configs={"max.message.bytes": "50000"})])
    app = make_app(name)
    assert app.config.max_record_bytes > 60_000

    @app.task
    async def big(size: int):
        yield "small"
        yield "x" * size
        yield "never"

    @app.task
    async def count(n: int):
        for i in range(n):
            yield i

    await app.start()
    assert app.results_partitions == 1
    task = await app.add_task("big", 60_000)
    assert [v async for v in app.stream(task.uuid, timeout=20)] == ["small"]
    done = await app.wait(task.uuid, 10)
    assert done.status == "error" and done.yield_count == 1, done
    match = re.search(r"is (\d+) bytes encoded, over the results topic's limit of (\d+) bytes", done.traceback or "")
    assert match is not None, done.traceback
    assert int(match.group(1)) > 60_000 and int(match.group(2)) < 50_000, match.group(0)

    # The partition takes the next tasks' results, a value under the topic's limit included.
    fits = await app.add_task("big", 40_000)
    later = [await app.add_task("count", n) for n in (3, 10, 1)]
    assert [v async for v in app.stream(fits.uuid, timeout=20)] == ["small", "x" * 40_000, "never"]
    for t, n in zip(later, (3, 10, 1), strict=True):
        assert [v async for v in app.stream(t.uuid, timeout=20)] == list(range(n))
    for t in [fits, *later]:
        finished = await app.wait(t.uuid, 10)
        assert finished.status == "success", finished

    # Nothing was left uncommitted behind the failed task.
    await until_committed(kafka_bootstrap, app.group_id, app.topics.tasks, 20)


@pytest.mark.timeout(90)
async def test_a_value_over_a_limit_lowered_while_running_is_an_error_and_the_worker_goes_on(
    make_app: Callable[..., QueueTasks], kafka_bootstrap: str
) -> None:
    """The topic's limit changes after the app read it: the broker itself refuses the record."""
    app = make_app(results_partitions=1)

    @app.task
    async def big(size: int):
        yield "small"
        yield "x" * size
        yield "never"

    @app.task
    async def count(n: int):
        for i in range(n):
            yield i

    await app.start()
    warm = await app.add_task("count", 2)
    assert [v async for v in app.stream(warm.uuid, timeout=20)] == [0, 1]
    async with admin_client(kafka_bootstrap) as admin:
        resource = ConfigResource(ConfigResourceType.TOPIC, app.topics.results, configs={"max.message.bytes": "50000"})
        await admin.alter_configs([resource])
        await until_config(admin, app.topics.results, "max.message.bytes", "50000", 10)
    task = await app.add_task("big", 60_000)
    values = [v async for v in app.stream(task.uuid, timeout=20)]
    done = await app.wait(task.uuid, 10)
    assert done.status == "error", done
    # The readable error a refused value makes (runner.conclude), not the last resort's traceback.
    assert "a value of this task was not stored" in (done.traceback or ""), done.traceback
    assert "too large" in (done.traceback or ""), done.traceback
    assert values in ([], ["small"]), values  # "small" may have shared the refused batch
    assert done.lost_from == len(values)  # the stream ends before the value the broker refused

    # The partition takes the next tasks' results.
    later = [await app.add_task("count", n) for n in (3, 10, 1)]
    for t, n in zip(later, (3, 10, 1), strict=True):
        assert [v async for v in app.stream(t.uuid, timeout=20)] == list(range(n))
        finished = await app.wait(t.uuid, 10)
        assert finished.status == "success", finished
    await until_committed(kafka_bootstrap, app.group_id, app.topics.tasks, 20)


async def test_a_stream_whose_values_were_deleted_from_the_results_topic_raises(
    make_app: Callable[..., QueueTasks], kafka_bootstrap: str
) -> None:
    """Records deleted from the log (retention, or DeleteRecords as here) cannot be streamed:
    the stream reads the partition again from its start, then names the missing values."""
    app = make_app()

    @app.task
    async def ten() -> AsyncIterator[int]:
        for i in range(10):
            yield i

    await app.start()
    task = await app.add_task("ten")
    assert (await app.wait(task.uuid, 30)).status == "success"
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await consumer.start()
    await admin.start()
    try:
        # The partition holds this task's records only: delete its first 4 values.
        tp = KafkaTP(app.topics.results, partition_for(task.uuid, app.core.results_partitions))
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        records: list[Any] = []
        deadline = time.monotonic() + 10
        while len(records) < 11 and time.monotonic() < deadline:  # 10 values and the end marker
            batch = await consumer.getmany(tp, timeout_ms=500)
            records += [r for r in batch.get(tp, []) if r.key == task.uuid.encode()]
        assert len(records) == 11, records
        await admin.delete_records({tp: RecordsToDelete(records[4].offset)})
    finally:
        await consumer.stop()
        await admin.close()
    with pytest.raises(StreamIncompleteError) as raised:
        async for _ in app.stream(task.uuid, timeout=30):
            pytest.fail("a value after a missing one was streamed")
    assert raised.value.missing == range(0, 4)
