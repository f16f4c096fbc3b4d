"""Exactly-once on memory://: crashes, zombies, timeouts and rebalances leave every value exactly once.

A crash here is what SIGKILL leaves behind: the worker's runs stop where they are, its
open transactions are neither committed nor aborted, and it leaves the group. The real
broker proves the same with processes (tests/faults/test_exactly_once_kafka.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.connectors import TopicPartition
from qtasks.partitioner import partition_for
from qtasks.records import ResultRecord, decode_result
from qtasks.transactions import transactional_id
from tests.engine_suite import status_log
from tests.helpers import unique

EOS = {"processing_guarantee": "exactly_once"}


async def crash(app: QueueTasks) -> None:
    """Stop a worker as SIGKILL would: no commit, no abort, its membership gone."""
    worker = app.worker
    assert worker is not None
    worker._stopping = True
    handlers = list(worker._handlers)
    for handler in handlers:
        handler.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    await worker.supervisor.stop()
    await worker._consumer.stop()
    await worker._control.stop()
    worker._pool.shutdown(wait=False, cancel_futures=True, cancel_running=True)
    worker._started = False


async def committed_results(app: QueueTasks) -> dict[str, list[ResultRecord]]:
    """Every result record a read_committed reader finds, by uuid, in order."""
    core = app.core
    consumer = core.broker.consumer(None, client_id="scan")
    await consumer.start()
    tps = [TopicPartition(core.topics.results, p) for p in range(core.results_partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(tps)
    ends = await consumer.end_offsets(tps)
    found: dict[str, list[ResultRecord]] = defaultdict(list)
    try:
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for record in await consumer.getmany(0.2):
                assert record.key is not None
                found[record.key.decode()].append(decode_result(record.value))
    finally:
        await consumer.stop()
    return found


def assert_exactly_once(found: dict[str, list[ResultRecord]], uuids: list[str], n: int) -> None:
    """Each task: seqs 0..n-1 once each, and one end marker."""
    for uuid in uuids:
        records = found[uuid]
        values = [r.seq for r in records if not r.end]
        dup = [seq for seq, count in Counter(values).items() if count > 1]
        assert not dup, f"{uuid}: seqs {dup} committed more than once"
        assert sorted(values) == list(range(n)), (uuid, values)
        assert len([r for r in records if r.end]) == 1, (uuid, records)


async def until(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def committed_at_least(app: QueueTasks, uuids: list[str], n: int) -> Callable[[], Any]:
    async def check() -> bool:
        found = await committed_results(app)
        return all(len([r for r in found[u] if not r.end]) >= n for u in uuids)

    return check


def register_counting(
    app: QueueTasks, n_calls: Counter[tuple[str, int]] | None = None, hold: asyncio.Event | None = None
) -> None:
    """``gen(n, pause)`` on ``app``; with ``hold``, each run waits for it before its value 5."""

    @app.task(echo=True)
    async def gen(self: Any, n: int, pause: float = 0.01) -> Any:
        for i in range(n):
            if n_calls is not None:
                n_calls[(str(self.ctx.task_uuid), i)] += 1
            if hold is not None and i == 5:
                await hold.wait()
            await asyncio.sleep(pause)
            yield i


async def submit_spread(app: QueueTasks, per_partition: int, *args: Any) -> list[str]:
    """Submit ``gen`` tasks until every tasks partition has at least ``per_partition`` of them."""
    uuids: list[str] = []
    counts: Counter[int] = Counter()
    partitions = app.core.tasks_partitions if app.core.connected else app.config.tasks_partitions
    while min(counts[p] for p in range(partitions)) < per_partition:
        assert len(uuids) < 100, "uuids land on partitions by chance, but not this unevenly"
        uuid = (await app.add_task("gen", *args)).uuid
        uuids.append(uuid)
        counts[partition_for(uuid, partitions)] += 1
    return uuids


async def test_a_worker_killed_mid_generator_leaves_every_value_exactly_once(make_app: Any) -> None:
    name = unique()
    a, b = make_app(name, **EOS), make_app(name, **EOS)
    register_counting(a)
    register_counting(b)
    await a.start()
    tasks = [await a.add_task("gen", 40) for _ in range(6)]
    uuids = [t.uuid for t in tasks]
    await until(committed_at_least(a, uuids, 5), 20, "5 committed values of each task")
    await crash(a)
    await b.start()
    finals = [await b.wait(u, 30) for u in uuids]
    assert {t.status for t in finals} == {"success"}
    assert {t.attempt for t in finals} == {2}
    assert {t.yield_count for t in finals} == {40}
    assert_exactly_once(await committed_results(b), uuids, 40)
    for u in uuids:
        assert [v async for v in b.stream(u, timeout=10)] == list(range(40))


async def test_a_checkpointing_generator_goes_on_from_its_checkpoint_after_a_crash(make_app: Any) -> None:
    name = unique()
    a, b = make_app(name, **EOS), make_app(name, **EOS)
    calls: Counter[int] = Counter()
    resumed_from: list[Any] = []

    def register(app: QueueTasks) -> None:
        @app.task(echo=True)
        async def crunch(self: Any, n: int) -> Any:
            state = self.ctx.resume_state
            resumed_from.append(state)
            for i in range(state["next"] if state else 0, n):
                calls[i] += 1  # the expensive step
                await asyncio.sleep(0.01)
                yield i * i
                self.ctx.checkpoint({"next": i + 1})

    register(a)
    register(b)
    await a.start()
    task = await a.add_task("crunch", 60)
    await until(committed_at_least(a, [task.uuid], 20), 20, "20 committed values")
    await crash(a)
    await b.start()
    final = await b.wait(task.uuid, 30)
    assert (final.status, final.attempt, final.yield_count) == ("success", 2, 60)
    assert resumed_from[0] is None and resumed_from[1]["next"] >= 20
    # Only the steps after the last committed checkpoint ran twice, never the whole prefix.
    assert all(calls[i] == 1 for i in range(resumed_from[1]["next"])), calls
    assert sum(calls.values()) - 60 <= 60 - resumed_from[1]["next"]
    assert_exactly_once(await committed_results(b), [task.uuid], 60)
    assert [v async for v in b.stream(task.uuid, timeout=10)] == [i * i for i in range(60)]
    # Resumed from a checkpoint, the run does not know the values before it: returning is the count.
    assert (final.returning, final.returning_truncated) == (60, True)


@pytest.mark.parametrize("mode", ["warn", "error"])
async def test_a_resumed_generator_that_yields_other_values_is_caught(
    make_app: Any, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique()
    a, b = make_app(name, resume_mismatch=mode, **EOS), make_app(name, resume_mismatch=mode, **EOS)

    @a.task
    async def gen(n: int) -> Any:
        for i in range(n):
            await asyncio.sleep(0.01)
            yield i

    @b.task(name="gen")
    async def other(n: int) -> Any:  # not deterministic: the next attempt yields other values
        for i in range(n):
            await asyncio.sleep(0.01)
            yield -i - 1

    await a.start()
    task = await a.add_task("gen", 40)
    await until(committed_at_least(a, [task.uuid], 5), 20, "5 committed values")
    await crash(a)
    with caplog.at_level(logging.WARNING, logger="qtasks.worker"):
        await b.start()
        final = await b.wait(task.uuid, 30)
    if mode == "error":
        assert final.status == "error"
        assert final.traceback is not None and "not deterministic" in final.traceback
    else:
        assert final.status == "success"
        assert "not deterministic" in caplog.text
    found = await committed_results(b)
    values = [r.seq for r in found[task.uuid] if not r.end]
    assert len(values) == len(set(values))  # never a seq twice, whatever the generator does


async def test_a_fenced_worker_commits_nothing_more_and_takes_its_tasks_up_again(make_app: Any) -> None:
    app = make_app(**EOS)
    register_counting(app)
    await app.start()
    task = await app.add_task("gen", 40)
    await until(committed_at_least(app, [task.uuid], 5), 20, "5 committed values")
    core = app.core
    assert app.worker is not None
    tp = TopicPartition(core.topics.tasks, partition_for(task.uuid, core.tasks_partitions))
    # What the partition's next owner does first: take its transactional id over.
    usurper = core.broker.transactional_producer(transactional_id(app.worker.group_id, tp))
    await usurper.start()
    final = await app.wait(task.uuid, 30)
    assert (final.status, final.attempt, final.yield_count) == ("success", 2, 40)
    assert_exactly_once(await committed_results(app), [task.uuid], 40)


async def test_a_transaction_past_its_timeout_is_dropped_and_its_tasks_go_on(make_app: Any, broker_url: str) -> None:
    app = QueueTasks(
        name=unique(),
        broker_url=f"faulty+{broker_url}",
        eos_transaction_timeout=1.0,
        eos_commit_interval=0.05,
        **EOS,
    )
    register_counting(app)
    try:
        await app.start()
        tasks = [await app.add_task("gen", 30) for _ in range(3)]
        uuids = [t.uuid for t in tasks]
        await until(committed_at_least(app, uuids, 3), 20, "3 committed values of each task")
        app.core.broker.faults.delay("txn_commit", 1.3, times=1)  # type: ignore[attr-defined]
        finals = [await app.wait(u, 30) for u in uuids]
        assert {t.status for t in finals} == {"success"}
        assert max(t.attempt for t in finals) == 2  # the task of the timed-out partition ran again
        assert_exactly_once(await committed_results(app), uuids, 30)
    finally:
        await app.stop()


async def test_a_task_error_mid_chunk_commits_its_values_and_its_error(make_app: Any) -> None:
    app = make_app(**EOS)

    @app.task
    async def breaks(n: int) -> Any:
        for i in range(n):
            yield i
        raise RuntimeError("broke after the values")

    await app.start()
    final = await app.add_task("breaks", 3, timeout=10)
    assert final is not None and final.status == "error" and "broke after" in (final.traceback or "")
    found = await committed_results(app)
    assert [r.seq for r in found[final.uuid] if not r.end] == [0, 1, 2]
    assert [r.status for r in found[final.uuid] if r.end] == ["error"]


async def test_a_rebalance_mid_transaction_moves_tasks_without_a_value_twice(make_app: Any) -> None:
    name = unique()
    # Room for every task: a's runs all wait at value 5 (submit_spread may submit a dozen or more).
    a, b = make_app(name, concurrency=100, **EOS), make_app(name, concurrency=100, **EOS)
    hold = asyncio.Event()
    register_counting(a, hold=hold)  # a's runs wait at value 5 until b took its partitions
    register_counting(b)
    await a.start()
    uuids = await submit_spread(a, 2, 50, 0.01)  # tasks on every partition: b gets some of them
    await until(committed_at_least(a, uuids, 3), 20, "3 committed values of each task")
    worker = await b.start()  # the group rebalances: some partitions move to b while their tasks run

    async def moved() -> bool:
        return bool(worker._owned)

    await until(moved, 20, "b owns partitions")
    hold.set()
    finals = [await b.wait(u, 30) for u in uuids]
    assert {t.status for t in finals} == {"success"}
    assert {t.attempt for t in finals} <= {1, 2} and max(t.attempt for t in finals) == 2
    assert_exactly_once(await committed_results(b), uuids, 50)


async def test_a_bad_record_goes_to_the_dead_letter_topic_in_the_transaction(make_app: Any) -> None:
    app = make_app(**EOS)

    @app.task
    async def ok() -> int:
        return 1

    await app.start()
    core = app.core
    await core.broker.producer.send(core.topics.tasks, b"not json", key=b"bad", partition=0)
    assert (await app.add_task("ok", timeout=10)) is not None
    consumer = core.broker.consumer(None)
    await consumer.start()
    dlq = TopicPartition(core.topics.dlq, 0)
    consumer.assign([dlq])
    await consumer.seek_to_beginning([dlq])

    async def dead_letters() -> bool:
        return bool(await consumer.getmany(0.1))

    await until(dead_letters, 10, "the dead letter")
    await consumer.stop()


async def test_a_rebalance_storm_on_one_worker_runs_no_task_twice(make_app: Any) -> None:
    """Partitions that stay on the worker keep their transaction; a record fetched again after
    the rebalance finds its task's ending in that transaction and is skipped, not run again."""
    app = make_app(concurrency=64, eos_commit_interval=0.05, **EOS)

    @app.task
    async def gen(n: int) -> Any:
        for i in range(n):
            await asyncio.sleep(0.002)
            yield i

    await app.start()
    uuids = [(await app.add_task("gen", 5)).uuid for _ in range(400)]
    worker = app.worker
    assert worker is not None

    async def storm() -> None:
        while True:
            await asyncio.sleep(0.013)
            worker._consumer.rejoin()

    stormy = asyncio.create_task(storm())
    try:
        finals = [await app.wait(u, 60) for u in uuids]
    finally:
        stormy.cancel()
    assert {t.status for t in finals} == {"success"}
    assert {t.attempt for t in finals} == {1}
    assert_exactly_once(await committed_results(app), uuids, 5)


async def test_a_run_stopped_while_its_value_waits_for_a_commit_counts_only_what_was_sent(
    make_app: Any, broker_url: str
) -> None:
    app = QueueTasks(name=unique(), broker_url=f"faulty+{broker_url}", **{**EOS, "eos_commit_interval": 0.05})

    @app.task(max_time=0.5)
    async def gen() -> Any:
        i = 0
        while True:
            await asyncio.sleep(0.005)
            yield i
            i += 1

    try:
        await app.start()
        app.core.broker.faults.delay("txn_commit", 0.2)  # type: ignore[attr-defined]
        uuids = [(await app.add_task("gen")).uuid for _ in range(6)]
        finals = [await app.wait(u, 30) for u in uuids]
        found = await committed_results(app)
        for task in finals:
            assert task.status == "error" and "max_time" in (task.traceback or "")
            values = sorted(r.seq for r in found[task.uuid] if not r.end)
            assert values == list(range(task.yield_count)), (task.yield_count, values[-3:])
            assert [r.seq for r in found[task.uuid] if r.end] == [task.yield_count]
            assert task.returning == list(range(task.yield_count))
    finally:
        await app.stop()


async def test_sends_that_wait_for_the_broker_are_drained_before_each_commit(make_app: Any, broker_url: str) -> None:
    """Slow sends (every one waits 2 ms) are under way while commits start: each commit waits
    for them, and the progress it carries counts exactly what its transaction holds."""
    name = unique()
    a = QueueTasks(name=name, broker_url=f"faulty+{broker_url}", **{**EOS, "eos_commit_interval": 0.02})
    b = make_app(name, **EOS)
    register_counting(a)
    register_counting(b)
    try:
        await a.start()
        a.core.broker.faults.delay("txn_send", 0.002)  # type: ignore[attr-defined]
        uuids = [(await a.add_task("gen", 60, 0.001)).uuid for _ in range(8)]
        await until(committed_at_least(a, uuids, 10), 20, "10 committed values of each task")
        await crash(a)
    finally:
        await a.stop()
    await b.start()
    finals = [await b.wait(u, 30) for u in uuids]
    assert {t.status for t in finals} == {"success"}
    assert_exactly_once(await committed_results(b), uuids, 60)


async def test_at_least_once_a_checkpoint_is_stored_with_the_lease_and_a_takeover_goes_on_from_it(
    make_app: Any,
) -> None:
    name = unique()
    a, b = make_app(name), make_app(name)  # at least once: FAST leases (renewed every 0.5 s, 3 s long)
    calls: Counter[int] = Counter()
    resumed_from: list[Any] = []

    def register(app: QueueTasks) -> None:
        @app.task(echo=True)
        async def crunch(self: Any, n: int) -> Any:
            state = self.ctx.resume_state
            resumed_from.append(state)
            for i in range(state["next"] if state else 0, n):
                calls[i] += 1
                await asyncio.sleep(0.02)
                yield i
                self.ctx.checkpoint({"next": i + 1})

    register(a)
    register(b)
    await a.start()
    task = await a.add_task("crunch", 100)

    async def checkpointed() -> bool:
        current = a.view.get(task.uuid)
        return current is not None and current.checkpoint_seq >= 20

    await until(checkpointed, 20, "a checkpoint past value 20 in the status")
    await crash(a)
    await b.start()  # takes the task over once its lease has run out
    final = await b.wait(task.uuid, 30)
    assert (final.status, final.attempt, final.yield_count) == ("success", 2, 100)
    assert resumed_from[1]["next"] >= 20
    assert all(calls[i] == 1 for i in range(resumed_from[1]["next"]))
    # Values after the checkpoint may come twice in the topic; the stream shows each once.
    assert [v async for v in b.stream(task.uuid, timeout=10)] == list(range(100))


async def test_a_client_in_the_worker_s_process_sees_an_ending_only_once_it_is_committed(broker_url: str) -> None:
    app = QueueTasks(name=unique(), broker_url=f"faulty+{broker_url}", **EOS)
    seen: list[str] = []
    returned = asyncio.Event()

    @app.task(echo=True)
    async def quick(self: Any) -> str:
        seen.append((await self.ctx.get_metadata()).status)  # a run sees itself running at once
        returned.set()
        return "done"

    try:
        await app.start()
        app.core.broker.faults.delay("txn_commit", 2.0)  # type: ignore[attr-defined]
        task = await app.add_task("quick")
        await returned.wait()
        await asyncio.sleep(0.3)  # its ending is in the open transaction by now, far from committed
        early = await app.get(task.uuid)
        assert early is not None and early.status != "success"
        done = await app.wait(task.uuid, 30)
        # What app.wait (and app.get) answer is committed: a read_committed reader finds it.
        assert done.status == "success" and await status_log(app, task.uuid) == ["new", "process", "success"]
        assert seen == ["process"]
    finally:
        await app.stop()


async def test_a_commit_that_never_answers_loses_the_partition_within_the_transaction_timeout(
    broker_url: str,
) -> None:
    """No commit waits forever: past eos_transaction_timeout the partition is dropped and taken up again."""
    settings = {**EOS, "eos_commit_interval": 0.05, "eos_transaction_timeout": 0.5}
    app = QueueTasks(name=unique(), broker_url=f"faulty+{broker_url}", **settings)
    register_counting(app)
    try:
        await app.start()
        app.core.broker.faults.delay("txn_commit", 10.0, times=1)  # type: ignore[attr-defined]
        task = await app.add_task("gen", 20, 0.01)
        started = time.monotonic()
        done = await app.wait(task.uuid, 30)
        assert done.status == "success" and time.monotonic() - started < 5.0
        assert_exactly_once(await committed_results(app), [task.uuid], 20)
    finally:
        await app.stop()
