"""Share mode (``processing_mode="share"``) with worker processes on a real Kafka broker.

More workers than partitions, a worker killed while it holds locked tasks, and a poison
task that kills every worker it runs on: what the share group promises, proved the way a
user meets it. The processes and what is read back are in :mod:`tests.faults.workers`.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from qtasks.ops import dead_letters
from tests.faults.workers import (
    Workers,
    check_values,
    end_markers,
    executions,
    read_streams,
    running_on,
    scan_results,
    wait_all,
    workers_of,
)
from tests.helpers import until

pytestmark = pytest.mark.kafka

SHARE = {"processing_mode": "share", "tasks_partitions": 2}


@pytest.fixture
async def make_cluster(tmp_path: Path, broker_url: str) -> AsyncIterator[Callable[..., Workers]]:
    async with workers_of(tmp_path, broker_url) as make:
        yield make


@pytest.mark.timeout(240)
async def test_eight_workers_on_two_partitions_all_run_tasks_each_once_and_every_stream_is_complete(
    make_cluster: Callable[..., Workers],
) -> None:
    cluster = make_cluster(**SHARE)
    workers = [cluster.start_worker(concurrency=2) for _ in range(8)]
    await cluster.wait_sharing(workers)
    app = await cluster.client()

    n_tasks, n_values = 64, 6
    tasks = await app.add_tasks("gen", [(n_values, 0.25)] * n_tasks)
    uuids = [t.uuid for t in tasks]
    finals = await wait_all(app, uuids, timeout=180)

    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    assert {t.attempt for t in finals.values()} == {1}
    per_worker = {w.label: sum(1 for t in finals.values() if w.ran(t)) for w in workers}
    print(f"tasks per worker (2 partitions, 8 workers): {per_worker}")
    assert all(per_worker.values()), f"every worker takes part past the partition count: {per_worker}"
    scanned = await scan_results(app)
    assert all(executions(scanned[u]) == [1] for u in uuids), "a task ran twice without a fault"
    streams = await read_streams(app, uuids)
    for u in uuids:
        check_values(streams[u], n_values)
    for w in workers:
        assert w.alive(), w.tail()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "partitions",
    [
        pytest.param(1, id="sharing-its-partition"),  # the survivor shares it: the records come at once
        pytest.param(2, id="alone-on-its-partition"),  # it comes to the survivor after the session timeout
    ],
)
async def test_kill_9_of_a_worker_holding_locked_tasks_hands_them_to_another_without_waiting_for_locks(
    make_cluster: Callable[..., Workers], partitions: int
) -> None:
    # Locks and leases of 30 s: the orphans must come back long before either runs out.
    cluster = make_cluster(
        **{**SHARE, "tasks_partitions": partitions},
        lease_timeout=30.0,
        lease_interval=1.0,
        process_grace=0.2,
        kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=1000,
    )
    victim = cluster.start_worker(concurrency=6)
    await cluster.wait_sharing([victim])
    app = await cluster.client()
    n_tasks, n_values = 9, 20
    tasks = await app.add_tasks("gen", [(n_values, 0.3)] * n_tasks)
    uuids = [t.uuid for t in tasks]
    await until(lambda: len(running_on(app, uuids, victim)) == 6, 60, "6 tasks running on the victim")
    # A survivor with room for them all joins; the victim holds 6 locks (and runs them).
    survivor = cluster.start_worker(concurrency=12)
    await cluster.wait_sharing([survivor])
    victim.popen.kill()
    killed = time.monotonic()
    await asyncio.to_thread(victim.popen.wait, 10)
    orphans = running_on(app, uuids, victim)
    assert len(orphans) == 6, orphans

    def taken_over() -> bool:
        return all((h := app.view.head(u)) is not None and survivor.ran(h) for u in orphans)

    await until(taken_over, 25, "the orphans running on the survivor")
    taken = time.monotonic() - killed
    if partitions == 1:
        assert taken < 5, f"sharing the partition, the survivor gets the released locks at once: {taken:.1f} s"
    finals = await wait_all(app, uuids, timeout=120)
    drained = time.monotonic() - killed
    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    # Its connections closed with it, so the broker released its locks at once: the
    # survivor took them over as the second delivery (alone on a partition, once the
    # group's 6 s session timeout gave the partition on), without waiting for the leases.
    assert drained < 25, f"the orphans waited for a lock or a lease to run out: {drained:.1f} s"
    for u in orphans:
        assert finals[u].attempt == 2 and survivor.ran(finals[u]), finals[u]
    assert "its lock is gone: delivery 2 of the record came here" in survivor.log()
    scanned = await scan_results(app)
    assert all(executions(scanned[u]) in ([1, 2], [2]) for u in orphans)
    streams = await read_streams(app, uuids)
    for u in uuids:
        check_values(streams[u], n_values)
    print(
        f"{partitions} partition(s): {len(orphans)} tasks taken over {taken:.1f} s after the kill, "
        f"all done {drained:.1f} s after it (locks and leases: 30 s)"
    )


@pytest.mark.timeout(240)
async def test_a_task_that_kills_every_worker_it_runs_on_stops_at_the_delivery_limit(
    make_cluster: Callable[..., Workers],
) -> None:
    cluster = make_cluster(**SHARE, share_delivery_limit=3, lease_timeout=30.0, lease_interval=1.0)
    workers = [cluster.start_worker(concurrency=2) for _ in range(3)]
    await cluster.wait_sharing(workers)
    app = await cluster.client()

    # It kills its worker 0.5 s in: the first run, past process_grace, is in the status by then.
    poison = await app.add_task("kill_my_worker", 0.5)
    end = await app.wait(poison.uuid, timeout=120)

    dead = [w for w in workers if not w.alive()]
    assert len(dead) == 2, "runs 1 and 2 each killed a worker; a third run is not started"
    assert end.status == "error" and end.traceback is not None, end
    assert "DeliveryLimitError" in end.traceback and "started 2 run(s) that never ended" in end.traceback, end
    letters = [x.letter for x in await dead_letters(app)]
    assert [poison.uuid in letter.reason for letter in letters] == [True], letters
    # The worker left goes on with the next task.
    assert (await app.add_task("gen", 2, timeout=60)).status == "success"


@pytest.mark.timeout(240)
async def test_a_worker_frozen_past_its_locks_stops_the_runs_taken_over_when_it_wakes(
    make_cluster: Callable[..., Workers],
) -> None:
    # Locks and leases of 3 s; the worker is frozen (SIGSTOP) for 8 s while it runs tasks.
    cluster = make_cluster(**{**SHARE, "tasks_partitions": 1}, lease_timeout=3.0, lease_interval=0.5, process_grace=0.2)
    frozen = cluster.start_worker(concurrency=4)
    await cluster.wait_sharing([frozen])
    app = await cluster.client()
    n_tasks, n_values = 4, 30
    tasks = await app.add_tasks("gen", [(n_values, 0.2)] * n_tasks)
    uuids = [t.uuid for t in tasks]
    await until(lambda: len(running_on(app, uuids, frozen)) == n_tasks, 60, "the tasks running on one worker")
    other = cluster.start_worker(concurrency=4)
    await cluster.wait_sharing([other])
    frozen.popen.send_signal(signal.SIGSTOP)
    try:
        # Its locks run out: the other worker gets the records and takes the tasks over.
        await until(lambda: all(other.ran(h) for u in uuids if (h := app.view.head(u))), 30, "taken over")
    finally:
        frozen.popen.send_signal(signal.SIGCONT)
    finals = await wait_all(app, uuids, timeout=120)
    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    # Both attempts ran (at least once), but the woken worker's runs stopped as soon as it read
    # that they were taken over: only the other worker's attempt ends. The stream drops the
    # values streamed twice.
    scanned = await scan_results(app)
    assert all(executions(scanned[u]) == [1, 2] for u in uuids), {u: executions(scanned[u]) for u in uuids}
    assert all(end_markers(scanned[u]) == [(2, "success")] for u in uuids), {u: end_markers(scanned[u]) for u in uuids}
    streams = await read_streams(app, uuids)
    for u in uuids:
        check_values(streams[u], n_values)
    # Awake, it learns its runs were taken over (from the status topic, or from its lost locks
    # first), stops them, and goes on with new tasks.
    await until(lambda: frozen.log().count("was taken over by worker") == n_tasks, 30, "its runs stopped")
    assert frozen.alive(), frozen.tail()
    more = await app.add_tasks("gen", [(2, 0.0)] * 8)
    ends = await wait_all(app, [t.uuid for t in more], timeout=60)
    assert {t.status for t in ends.values()} == {"success"}
