"""Exactly-once on a real Kafka broker: worker processes killed, frozen and stalled mid-run.

Every check reads the results topic back as a ``read_committed`` consumer (the client
runs exactly-once) and asks for each task's values ``0..n-1`` once each and one end
marker: what a consumer of the topic that is not qtasks sees.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from qtasks.records import ResultRecord
from tests.faults.workers import (
    Workers,
    check_values,
    read_streams,
    running_on,
    scan_results,
    wait_all,
    workers_of,
)
from tests.helpers import until

pytestmark = pytest.mark.kafka

EOS = {
    "processing_guarantee": "exactly_once",
    "kafka_session_timeout_ms": 6000,
    "kafka_heartbeat_interval_ms": 1000,
}


@pytest.fixture
async def make_cluster(tmp_path: Path, broker_url: str) -> AsyncIterator[Callable[..., Workers]]:
    async with workers_of(tmp_path, broker_url) as make:
        yield make


def exactly_once(scanned: dict[str, list[ResultRecord]], uuids: list[str], n: int) -> int:
    """Assert every task's values 0..n-1 once each and one end marker; return the value records seen."""
    seen = 0
    for u in uuids:
        seqs = [r.seq for r in scanned[u] if not r.end]
        twice = sorted(s for s, c in Counter(seqs).items() if c > 1)
        assert not twice, f"{u}: seqs {twice} are in the results topic more than once"
        assert sorted(seqs) == list(range(n)), (u, seqs)
        assert len([r for r in scanned[u] if r.end]) == 1, (u, scanned[u])
        seen += len(seqs)
    return seen


def asyncio_noise(log: str) -> list[str]:
    """asyncio's ERROR lines about futures and tasks left behind (a fenced producer leaves none)."""
    return re.findall(r".*(?:exception was never retrieved|destroyed but it is pending).*", log)


# -- 1. three workers, one killed with SIGKILL --------------------------------------------------


@pytest.mark.timeout(300)
async def test_three_workers_one_killed_leave_every_value_exactly_once(make_cluster: Callable[..., Workers]) -> None:
    cluster = make_cluster(**EOS)
    workers = [cluster.start_worker(concurrency=16) for _ in range(3)]
    await cluster.wait_assigned(workers)
    app = await cluster.client()
    victim = workers[0]

    n_tasks, n_values = 300, 20
    tasks = await asyncio.gather(*(app.add_task("gen", n_values, 0.05) for _ in range(n_tasks)))
    uuids = [t.uuid for t in tasks]
    await until(lambda: len(running_on(app, uuids, victim)) >= 8, 60, "8 tasks running on the victim")
    await asyncio.sleep(0.5)
    victim.popen.kill()
    await asyncio.to_thread(victim.popen.wait, 10)

    finals = await wait_all(app, uuids, timeout=180)
    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    taken_over = [t for t in finals.values() if t.attempt > 1]
    assert taken_over, "the kill hit no running task"
    assert {t.yield_count for t in finals.values()} == {n_values}

    scanned = await scan_results(app)
    assert exactly_once(scanned, uuids, n_values) == n_tasks * n_values
    streams = await read_streams(app, uuids)
    for u in uuids:
        check_values(streams[u], n_values)
    print(
        f"exactly-once, SIGKILL of 1 of 3 workers: {n_tasks} tasks x {n_values} values, "
        f"{len(taken_over)} taken over, 0 duplicate records"
    )


# -- 2. a zombie: frozen past its session, then resumed ------------------------------------------


@pytest.mark.timeout(300)
async def test_a_worker_frozen_past_its_session_commits_nothing_when_it_wakes(
    make_cluster: Callable[..., Workers],
) -> None:
    cluster = make_cluster(**EOS)
    zombie, survivor = cluster.start_worker(concurrency=8), cluster.start_worker(concurrency=8)
    await cluster.wait_assigned([zombie, survivor])
    app = await cluster.client()

    n_tasks, n_values = 24, 40
    tasks = await asyncio.gather(*(app.add_task("gen", n_values, 0.1) for _ in range(n_tasks)))
    uuids = [t.uuid for t in tasks]
    await until(lambda: len(running_on(app, uuids, zombie)) >= 4, 60, "4 tasks running on the zombie-to-be")
    await asyncio.sleep(0.5)
    zombie.popen.send_signal(signal.SIGSTOP)
    try:
        # Its session runs out, the survivor gets every partition and fences the zombie's producers.
        await until(
            lambda: sorted(survivor.assignments()[-1]) == list(range(6)), 60, "the survivor owning every partition"
        )
        await asyncio.sleep(2.0)  # the survivor takes the zombie's tasks over meanwhile
    finally:
        zombie.popen.send_signal(signal.SIGCONT)

    finals = await wait_all(app, uuids, timeout=180)
    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    scanned = await scan_results(app)
    exactly_once(scanned, uuids, n_values)
    streams = await read_streams(app, uuids)
    for u in uuids:
        check_values(streams[u], n_values)
    # Awake, its sends and commits were refused (fenced): it dropped those partitions and
    # rejoined the group (which may hand them back to it: a task can move twice).
    assert "drops" in zombie.log(), zombie.tail()
    assert not asyncio_noise(zombie.log()), zombie.tail()
    assert zombie.alive(), zombie.tail()
    # Awake again, it works: it rejoins the group and runs tasks to the end.
    after = await asyncio.gather(*(app.add_task("gen", 3) for _ in range(12)))
    done = await wait_all(app, [t.uuid for t in after], timeout=120)
    assert {t.status for t in done.values()} == {"success"}


# -- 3. a checkpointing generator resumes after a kill ----------------------------------------------


@pytest.mark.timeout(240)
async def test_a_checkpointing_generator_resumes_from_its_checkpoint_after_a_kill(
    make_cluster: Callable[..., Workers],
) -> None:
    cluster = make_cluster(**EOS)
    first, second = cluster.start_worker(concurrency=4), cluster.start_worker(concurrency=4)
    await cluster.wait_assigned([first, second])
    app = await cluster.client()

    n = 60
    task = await app.add_task("crunch", n, 0.1)
    seen: list[dict[str, int]] = []

    async def follow() -> None:
        async for value in app.stream(task.uuid, timeout=180):
            seen.append(value)

    reader = asyncio.create_task(follow())
    await until(lambda: len(seen) >= 20, 60, "20 committed values")
    (victim,) = [w for w in (first, second) if seen[-1]["pid"] == w.pid]
    victim.popen.kill()
    await asyncio.to_thread(victim.popen.wait, 10)
    await asyncio.wait_for(reader, 120)

    final = (await wait_all(app, [task.uuid], timeout=60))[task.uuid]
    assert (final.status, final.attempt, final.yield_count) == ("success", 2, n)
    check_values(seen, n)
    exactly_once(await scan_results(app), [task.uuid], n)

    steps = Counter(int(m.group(1)) for w in (first, second) for m in re.finditer(rf"STEP {task.uuid} (\d+) ", w.log()))
    redone = sorted(i for i, c in steps.items() if c > 1)
    # Only the steps after the last committed checkpoint ran again (at most one commit's worth),
    # never the prefix the victim had committed.
    assert len(redone) <= 5, redone
    assert all(i >= 15 for i in redone), redone
    assert sorted(steps) == list(range(n))


# -- 4. a transaction past its timeout --------------------------------------------------------------


async def open_transaction(bootstrap: str, topics: list[str]) -> bool:
    """Whether some partition of ``topics`` holds records of a transaction not ended yet: its
    last stable offset (a read_committed consumer's end) is behind its high watermark."""
    committed = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    everything = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await committed.start()
    await everything.start()
    try:
        cluster = await committed._client.fetch_all_metadata()
        tps = [TopicPartition(t, p) for t in topics for p in cluster.partitions_for_topic(t) or ()]
        assert tps, topics
        stable, high = await committed.end_offsets(tps), await everything.end_offsets(tps)
        return any(stable[tp] < high[tp] for tp in tps)
    finally:
        await committed.stop()
        await everything.stop()


@pytest.mark.timeout(300)
async def test_a_worker_stalled_past_the_transaction_timeout_loses_nothing_and_repeats_nothing(
    make_cluster: Callable[..., Workers], tmp_path: Path, kafka_bootstrap: str
) -> None:
    # The stall (25 s) is past the transaction timeout (10 s) plus the broker's check for
    # timed-out transactions (every 10 s by default) and inside the session (45 s): the
    # broker aborts the open transactions and fences their producers; the worker finds out
    # at its next commit, drops its partitions, rejoins, and its tasks go on.
    # Commits every second, values at twelve different paces: whenever the stall begins, some
    # partition has a transaction under way on the broker (one that began, not yet committed).
    settings = {**EOS, "eos_transaction_timeout": 10.0, "eos_commit_interval": 1.0, "kafka_session_timeout_ms": 45_000}
    cluster = make_cluster(**settings)
    worker = cluster.start_worker(concurrency=16)
    await cluster.wait_assigned([worker])
    app = await cluster.client()

    n_tasks, n_values = 12, 60  # 3 to 10 s each: they send through the stalls, a second one too
    tasks = await asyncio.gather(*(app.add_task("gen", n_values, 0.05 + 0.011 * k) for k in range(n_tasks)))
    uuids = [t.uuid for t in tasks]
    await until(lambda: len(running_on(app, uuids, worker)) >= 12, 60, "12 tasks running")
    await asyncio.sleep(1.0)
    started = time.monotonic()
    # The broker aborts (and fences) only a transaction that is open on its side. A stall that
    # begins just as the last commits ended, before any partition's next send reached the
    # broker, leaves none open: then nothing times out. So the stall is judged on the broker:
    # a transaction ending as it began has its markers written within milliseconds, and one
    # still open two seconds in stays open until its timeout. If none is, it is cut short and
    # another one begins.
    for attempt in range(4):
        marker, release = tmp_path / f"blocked{attempt}", tmp_path / f"release{attempt}"
        blocker = await app.add_task("block_once", 25.0, str(marker), str(release))
        await until(marker.exists, 60, "the stall to begin")
        await asyncio.sleep(2.0)
        if await open_transaction(kafka_bootstrap, [app.topics.results, app.topics.status]):
            break
        release.touch()
        await wait_all(app, [blocker.uuid], timeout=60)
    else:
        raise AssertionError("four stalls began with no transaction of the worker open on the broker")

    finals = await wait_all(app, [*uuids, blocker.uuid], timeout=180)
    assert {t.status for t in finals.values()} == {"success"}
    assert "drops" in worker.log(), worker.tail()
    assert not asyncio_noise(worker.log()), worker.tail()
    exactly_once(await scan_results(app), uuids, n_values)
    streams = await read_streams(app, uuids)
    for u in uuids:
        check_values(streams[u], n_values)
    print(
        f"exactly-once, a 25 s stall past a 10 s transaction timeout (stall {attempt + 1}): "
        f"all done {time.monotonic() - started:.1f} s later"
    )
