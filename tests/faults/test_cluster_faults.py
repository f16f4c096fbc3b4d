"""Node faults on a real 3-node Kafka cluster (and a whole-broker outage), with generator tasks streaming.

Each test runs the same scenario: worker processes of a fresh app (topics with
replication factor 3, ``min.insync.replicas`` 2), a client submitting generator tasks at
a steady rate before, during and after the fault, and a live reader on every task's
stream. Then: every task ended in success (none lost), every stream was complete and
in order (read live, and read again from the log), every worker is still alive, and the
raw duplicates of the results topic (the at-least-once cost) are counted. What each
fault cost is printed at the end of the run and kept in docs/kafka.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from qtasks.asyncio import QueueTasks
from tests.faults.report import MEASURED, Measured
from tests.faults.workers import Proc, Workers, executions, read_streams, scan_results, wait_all, workers_of
from tests.helpers import free_port, unique, until
from tests.kafka_fixtures import _local_kafka_class

pytestmark = pytest.mark.kafka

N_VALUES = 20  # values per task, one every DELAY seconds: a task streams for about a second
DELAY = 0.05
RATE = 6.0  # tasks submitted per second, before, during and after the fault
#: Worker settings of every cluster test: the default leases (a status write stalled by a
#: failover must not pass for a dead worker) and the default request timeout; a short group
#: session so that a rebalance fits in the test.
CLUSTER_SETTINGS: dict[str, Any] = {
    "replication_factor": 3,
    "lease_interval": 5.0,
    "lease_timeout": 30.0,
    "kafka_session_timeout_ms": 10_000,
    "kafka_heartbeat_interval_ms": 1_000,
}


# -- the cluster -------------------------------------------------------------------------


async def describe(bootstrap: str) -> list[dict[str, Any]]:
    """Every topic's partitions as the cluster's metadata shows them (leader, replicas, isr)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        return await admin.describe_topics()
    finally:
        await admin.close()


async def coordinator_node(bootstrap: str) -> int:
    """The node that leads ``__consumer_offsets`` (one partition): every group's coordinator."""
    for topic in await describe(bootstrap):
        if topic["topic"] == "__consumer_offsets":
            (partition,) = topic["partitions"]
            return int(partition["leader"])
    raise AssertionError("no __consumer_offsets topic")


async def transaction_coordinator_node(bootstrap: str) -> int:
    """The node that leads ``__transaction_state`` (one partition): every producer's transaction coordinator."""
    for topic in await describe(bootstrap):
        if topic["topic"] == "__transaction_state":
            (partition,) = topic["partitions"]
            return int(partition["leader"])
    raise AssertionError("no __transaction_state topic (no transactional producer started yet)")


async def wait_in_sync(bootstrap: str, timeout: float = 120) -> None:
    """Until every partition of every topic has all its replicas in sync (a node that came back caught up)."""
    deadline = time.monotonic() + timeout
    while True:
        lagging = []
        with contextlib.suppress(Exception):
            lagging = [
                (t["topic"], p["partition"])
                for t in await describe(bootstrap)
                for p in t["partitions"]
                if set(p["isr"]) != set(p["replicas"]) or p["leader"] < 0
            ]
            if not lagging:
                return
        assert time.monotonic() < deadline, f"replicas not in sync after {timeout} s: {lagging[:10]}"
        await asyncio.sleep(0.5)


@pytest.fixture
async def cluster(kafka_cluster: Any) -> AsyncIterator[Any]:
    """The session's cluster, every node up and every replica in sync before and after the test."""
    for node in range(1, kafka_cluster.brokers + 1):
        kafka_cluster.thaw_node(node)
    await asyncio.to_thread(kafka_cluster.start)
    await wait_in_sync(kafka_cluster.bootstrap)
    yield kafka_cluster
    for node in range(1, kafka_cluster.brokers + 1):
        kafka_cluster.thaw_node(node)
    await asyncio.to_thread(kafka_cluster.start)


@pytest.fixture
async def make_workers(tmp_path: Path, cluster: Any) -> AsyncIterator[Callable[..., Workers]]:
    async with workers_of(tmp_path, f"kafka://{cluster.bootstrap}") as make:
        yield make


# -- the scenario ------------------------------------------------------------------------


async def stream_through(
    name: str,
    group: Workers,
    app: QueueTasks,
    fault: Callable[[], Awaitable[None]],
    *,
    workers: list[Proc],
    lead: float = 4.0,
    tail: float = 4.0,
) -> Measured:
    """Tasks submitted and streamed live through ``fault()``; checked and measured afterwards."""
    uuids: list[str] = []
    readers: list[asyncio.Task[tuple[list[Any], list[float]]]] = []
    fault_over = asyncio.Event()

    async def read_live(uuid: str, submitted: float) -> tuple[list[Any], list[float]]:
        values, times = [], [submitted]
        async for value in app.stream(uuid, timeout=600):
            times.append(time.monotonic())
            values.append(value)
        return values, times

    async def submit() -> None:
        stop_at = None
        while stop_at is None or time.monotonic() < stop_at:
            if stop_at is None and fault_over.is_set():
                stop_at = time.monotonic() + tail
            task = await app.add_task("gen", N_VALUES, DELAY)
            assert task is not None
            uuids.append(task.uuid)
            readers.append(asyncio.create_task(read_live(task.uuid, time.monotonic())))
            await asyncio.sleep(1.0 / RATE)

    submitter = asyncio.create_task(submit())
    try:
        await asyncio.sleep(lead)
        await fault()
        fault_end = time.monotonic()
        fault_over.set()
        await submitter
        finals = await wait_all(app, uuids, timeout=240)
        drained = time.monotonic() - fault_end
        live = await asyncio.gather(*readers)
    finally:
        submitter.cancel()
        for reader in readers:
            reader.cancel()

    for w in workers:
        assert w.alive(), f"{w.label} died\n{w.tail()}"
    # Alive and still working: a last round of tasks runs to the end.
    after = [t.uuid for t in await asyncio.gather(*(app.add_task("gen", 3) for _ in range(12))) if t is not None]
    assert {t.status for t in (await wait_all(app, after, timeout=120)).values()} == {"success"}

    expected = list(range(N_VALUES))
    lost = sum(1 for t in finals.values() if t.status != "success")
    replayed = await read_streams(app, uuids)
    incomplete = sum(
        1
        for u, (values, _) in zip(uuids, live, strict=True)
        if [v["i"] for v in values] != expected or [v["i"] for v in replayed[u]] != expected
    )
    scanned = await scan_results(app)
    raw_duplicates = sum(
        len([r for r in scanned[u] if not r.end]) - len({r.seq for r in scanned[u] if not r.end}) for u in uuids
    )
    reruns = sum(max(0, len(executions(scanned[u])) - 1) for u in uuids)
    stall = max(later - earlier for _, times in live for earlier, later in itertools.pairwise(times))
    measured = Measured(name, len(uuids), N_VALUES, lost, incomplete, raw_duplicates, reruns, stall, drained)
    MEASURED.append(measured)
    print(measured.line())  # in the captured output of a failing test
    assert lost == 0, {u: (t.status, t.traceback) for u, t in finals.items() if t.status != "success"}
    assert incomplete == 0, measured
    return measured


async def start_group(make_workers: Callable[..., Workers], count: int, **settings: Any) -> tuple[Workers, list[Proc]]:
    group = make_workers(**CLUSTER_SETTINGS, **settings)
    workers = [group.start_worker(concurrency=8) for _ in range(count)]
    await group.wait_assigned(workers)
    return group, workers


def node_port(cluster: Any, node: int) -> int:
    return int(cluster.ports[node - 1])


# -- 0. the topics -----------------------------------------------------------------------------


@pytest.mark.timeout(420)  # the first cluster test: it waits for the session's cluster to start
@pytest.mark.parametrize(
    ("settings", "replicas", "insync"),
    [
        ({"replication_factor": 3}, 3, "2"),
        # The cluster's own default is 2: these prove the app sets it on its topics.
        ({"replication_factor": 1}, 1, "1"),
        ({"replication_factor": 3, "min_insync_replicas": 3}, 3, "3"),
    ],
)
async def test_an_app_makes_its_topics_with_its_replicas_and_min_insync(
    cluster: Any, settings: dict[str, Any], replicas: int, insync: str
) -> None:
    app = QueueTasks(name=unique("rf"), broker_url=f"kafka://{cluster.bootstrap}", **settings)
    try:
        await app._connect()
        names = [app.topics.tasks, app.topics.results, app.topics.status, app.topics.control, app.topics.dlq]
        admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
        await admin.start()
        try:
            resources = [
                ConfigResource(ConfigResourceType.TOPIC, n, configs={"min.insync.replicas": None}) for n in names
            ]
            found = {
                r["resource_name"]: e["config_value"]
                for response in await admin.describe_configs(resources)
                for r in response.to_object()["resources"]
                for e in r["config_entries"]
            }
            described = {t["topic"]: t for t in await admin.describe_topics(names)}
        finally:
            await admin.close()
    finally:
        await app.close()
    assert found == dict.fromkeys(names, insync)
    for name in names:
        assert {len(p["replicas"]) for p in described[name]["partitions"]} == {replicas}, described[name]


# -- 1. kill -9 of a node, back 10 s later ----------------------------------------------------


@pytest.mark.timeout(420)
async def test_kill_9_of_a_node_and_back_10_s_later(cluster: Any, make_workers: Callable[..., Workers]) -> None:
    group, workers = await start_group(make_workers, 3)
    app = await group.client()
    victim = await coordinator_node(cluster.bootstrap)

    async def fault() -> None:
        await asyncio.to_thread(cluster.kill_node, victim)
        assert cluster.node_pid(victim) is None
        await asyncio.sleep(10)
        await asyncio.to_thread(cluster.start)

    await stream_through(
        f"kill -9 of node {victim} (the group coordinator), back after 10 s", group, app, fault, workers=workers
    )


# -- 1b. the same in share mode: the node that keeps the share groups' state ------------------


async def leader_of(bootstrap: str, topic: str) -> int:
    """The node that leads ``topic``'s first partition."""
    for described in await describe(bootstrap):
        if described["topic"] == topic:
            return int(described["partitions"][0]["leader"])
    raise AssertionError(f"no topic {topic}")


@pytest.mark.timeout(420)
async def test_kill_9_of_a_node_in_share_mode_and_back_10_s_later(
    cluster: Any, make_workers: Callable[..., Workers]
) -> None:
    # Four workers on three tasks partitions: one partition is shared by two of them.
    group = make_workers(**CLUSTER_SETTINGS, processing_mode="share", tasks_partitions=3)
    workers = [group.start_worker(concurrency=8) for _ in range(4)]
    await group.wait_sharing(workers)
    app = await group.client()
    # The share coordinator: it keeps every share partition's state (its locks and acknowledgements).
    victim = await leader_of(cluster.bootstrap, "__share_group_state")

    async def fault() -> None:
        await asyncio.to_thread(cluster.kill_node, victim)
        assert cluster.node_pid(victim) is None
        await asyncio.sleep(10)
        await asyncio.to_thread(cluster.start)

    await stream_through(
        f"share mode: kill -9 of node {victim} (the share coordinator), back after 10 s",
        group,
        app,
        fault,
        workers=workers,
    )


@pytest.mark.timeout(240)
async def test_a_share_member_with_room_for_one_record_locks_one_though_three_nodes_lead(cluster: Any) -> None:
    """A fetch locks at least one record per leader asked: with less room than leaders, only
    as many leaders are asked (in turn), so nothing is locked that the worker cannot start."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import NewTopic

    from qtasks.config import QueueConfig
    from qtasks.connectors.kafka import KafkaConnector

    topic, group = unique("lead"), unique("group")
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, 3)])
    finally:
        await admin.close()
    leaders = {
        int(p["leader"]) for t in await describe(cluster.bootstrap) if t["topic"] == topic for p in t["partitions"]
    }
    assert len(leaders) >= 2, f"the partitions' leaders are not spread: {leaders}"
    producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap)
    await producer.start()
    try:
        for i in range(30):
            await producer.send(topic, b"v", partition=i % 3)
        await producer.flush()
    finally:
        await producer.stop()
    connector = KafkaConnector(f"kafka://{cluster.bootstrap}", QueueConfig())
    await connector.start()
    try:
        await connector.configure_share_group(group, {"share.auto.offset.reset": "earliest"})
        member = connector.share_consumer(group, [topic])
        await member.start()
        try:
            assert await member.wait_assigned(30)
            handled, largest = 0, 0
            deadline = time.monotonic() + 60
            while handled < 30 and time.monotonic() < deadline:
                got = await member.getmany(1.0, 1)
                largest = max(largest, len(got))
                for record in got:
                    member.acknowledge(record)
                handled += len(got)
            assert handled == 30 and largest == 1, (handled, largest)
        finally:
            await member.stop()
    finally:
        await connector.stop()


# -- 2. a rolling restart of all three -----------------------------------------------------


@pytest.mark.timeout(600)
async def test_rolling_restart_of_all_three_nodes(cluster: Any, make_workers: Callable[..., Workers]) -> None:
    group, workers = await start_group(make_workers, 3)
    app = await group.client()

    async def fault() -> None:
        # As an operator does it: one node at a time (SIGTERM: a controlled shutdown), and the
        # next only once the one that came back has caught up (every replica in sync).
        for node in range(1, cluster.brokers + 1):
            before = cluster.node_pid(node)
            await asyncio.to_thread(cluster.stop_node, node)
            assert cluster.node_pid(node) is None
            await asyncio.to_thread(cluster.start)
            assert cluster.node_pid(node) not in (None, before)
            await wait_in_sync(cluster.bootstrap)

    await stream_through("rolling restart of the 3 nodes", group, app, fault, workers=workers)


# -- 3. a node frozen (SIGSTOP) for 30 s ------------------------------------------------------


@pytest.mark.timeout(480)
async def test_a_node_frozen_for_30_s(cluster: Any, make_workers: Callable[..., Workers]) -> None:
    group, workers = await start_group(make_workers, 3)
    app = await group.client()
    victim = await coordinator_node(cluster.bootstrap)

    async def fault() -> None:
        await asyncio.to_thread(cluster.freeze_node, victim)
        assert cluster.node_state(victim) == "T"  # stopped
        try:
            await asyncio.sleep(30)
        finally:
            cluster.thaw_node(victim)

    await stream_through(f"node {victim} (the group coordinator) frozen 30 s", group, app, fault, workers=workers)


# -- 4. rebalance churn: workers 1 -> 3 -> 1 -----------------------------------------------------


@pytest.mark.timeout(420)
async def test_rebalance_churn_one_three_one_workers(cluster: Any, make_workers: Callable[..., Workers]) -> None:
    group, workers = await start_group(make_workers, 1)
    app = await group.client()
    first = workers[0]

    async def fault() -> None:
        joined = [group.start_worker(concurrency=8) for _ in range(2)]
        workers.extend(joined)
        await until(lambda: all(w.assignments() for w in joined), 60, "two workers joined")
        await asyncio.sleep(5)
        for w in joined:
            w.popen.send_signal(signal.SIGTERM)
        for w in joined:
            code = await asyncio.to_thread(w.popen.wait, 60)
            assert code == 0, f"{w.label} did not stop gracefully (exit code {code})\n{w.tail()}"
            workers.remove(w)
        await until(lambda: sorted(first.assignments()[-1]) == list(range(6)), 60, "worker1 has every partition")

    await stream_through("rebalance churn: workers 1 -> 3 -> 1", group, app, fault, workers=workers)
    assert first.alive()


# -- 5. exactly-once through a kill -9 of the transaction coordinator and of a worker ---------------


@pytest.mark.timeout(420)
async def test_exactly_once_through_a_kill_9_of_the_transaction_coordinator_and_a_worker(
    cluster: Any, make_workers: Callable[..., Workers]
) -> None:
    group, workers = await start_group(make_workers, 3, processing_guarantee="exactly_once")
    app = await group.client()
    victim = await transaction_coordinator_node(cluster.bootstrap)
    doomed = workers[0]

    async def fault() -> None:
        # The node and a worker at once: the worker's open transactions are left to the
        # coordinator that is failing over.
        doomed.popen.kill()
        workers.remove(doomed)
        await asyncio.to_thread(cluster.kill_node, victim)
        assert cluster.node_pid(victim) is None
        await asyncio.sleep(10)
        await asyncio.to_thread(cluster.start)

    measured = await stream_through(
        f"exactly-once: kill -9 of node {victim} (the transaction coordinator) and of a worker, node back after 10 s",
        group,
        app,
        fault,
        workers=workers,
    )
    # Read back as a read_committed consumer (the client runs exactly-once): not one record twice.
    assert (measured.raw_duplicates, measured.reruns) == (0, 0), measured


# -- 5. a single broker away for 60 s --------------------------------------------------------------


@pytest.fixture
def lone_broker() -> Iterator[Any]:
    """A single-node broker of this test's own (the session's broker is shared by the other suites)."""
    broker = _local_kafka_class()()
    broker.start(timeout=240)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.timeout(600)
async def test_the_only_broker_away_for_60_s(lone_broker: Any, tmp_path: Path) -> None:
    async with workers_of(tmp_path, f"kafka://{lone_broker.bootstrap}") as make:
        group = make(kafka_session_timeout_ms=10_000, kafka_heartbeat_interval_ms=1_000)
        port = free_port()
        workers = [group.start_worker(concurrency=8, metrics_port=port), group.start_worker(concurrency=8)]
        await group.wait_assigned(workers)
        app = await group.client()
        probes = f"http://127.0.0.1:{port}"
        readiness: list[tuple[float, int]] = []  # (seconds since the kill, /readyz status)

        async def fault() -> None:
            async with httpx.AsyncClient(timeout=5) as client:
                assert (await client.get(f"{probes}/readyz")).status_code == 200
                await asyncio.to_thread(lone_broker.kill_node, 1)
                killed = time.monotonic()
                assert lone_broker.node_pid(1) is None
                while time.monotonic() - killed < 60:
                    readiness.append((time.monotonic() - killed, (await client.get(f"{probes}/readyz")).status_code))
                    # Alive all along: an outage is no reason to restart the process.
                    assert (await client.get(f"{probes}/healthz")).status_code == 200
                    await asyncio.sleep(1)
            await asyncio.to_thread(lone_broker.start)

        await stream_through("the only broker killed (-9), back after 60 s", group, app, fault, workers=workers)
        # Not ready while the broker was away (seen within 30 s of the kill), ready again after.
        assert any(status == 503 for at, status in readiness if at < 30), readiness
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(f"{probes}/readyz")).status_code == 200
