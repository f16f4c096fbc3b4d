"""Ordering keys (``add_task(key=...)``), end to end, for every connector.

``tests/unit`` runs it on ``memory://`` and ``tests/integration`` on a real Kafka broker.
Each run records when it started and ended; runs of one key must never overlap and must
come in submission order, while runs of different keys may overlap.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.partitioner import partition_for


def same_partition_keys(partitions: int, n: int = 2) -> list[str]:
    """``n`` keys whose tasks share one partition (keys run in parallel beyond partitions)."""
    found: dict[int, list[str]] = {}
    for i in range(1000):
        key = f"device-{i}"
        keys = found.setdefault(partition_for(key, partitions), [])
        keys.append(key)
        if len(keys) == n:
            return keys
    raise AssertionError("no keys found")


def recording(app: QueueTasks, log: list[tuple[str, int, float, float]]) -> None:
    @app.task
    async def step(key: str, i: int, pause: float = 0.01) -> int:
        started = time.monotonic()
        await asyncio.sleep(pause)
        log.append((key, i, started, time.monotonic()))
        return i


def check_in_order(log: list[tuple[str, int, float, float]], key: str, n: int) -> None:
    runs = [(i, start, end) for k, i, start, end in log if k == key]
    assert [i for i, _, _ in runs] == list(range(n)), runs
    for (_, _, end), (_, start, _) in itertools.pairwise(runs):
        assert start >= end, "two runs of one key overlapped"


async def test_tasks_of_one_key_run_one_at_a_time_in_order_and_keys_run_in_parallel(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app(concurrency=8)
    log: list[tuple[str, int, float, float]] = []
    recording(app, log)
    await app.start()
    first, second = same_partition_keys(app.config.tasks_partitions)
    rng = random.Random(7)
    handles = []
    for i in range(20):
        for key in (first, second):
            handles.append(await app.add_task("step", key, i, rng.uniform(0.0, 0.03), key=key))
    for handle in handles:
        assert (await app.wait(handle.uuid, timeout=60)).status == "success"
    check_in_order(log, first, 20)
    check_in_order(log, second, 20)
    overlapped = any(a[2] < b[3] and b[2] < a[3] for a in log if a[0] == first for b in log if b[0] == second)
    assert overlapped, "two keys of one partition never ran at the same time"
    stored = await app.get(handles[0].uuid)
    assert stored is not None and stored.key == first


async def test_submission_order_wins_over_priority_within_a_key(app: QueueTasks) -> None:
    log: list[tuple[str, int, float, float]] = []
    recording(app, log)
    gate = asyncio.Event()

    @app.task
    async def hold() -> None:
        await gate.wait()

    await app.start()
    blocker = await app.add_task("hold", key="k")
    handles = [await app.add_task("step", "k", i, priority=10 - i, key="k") for i in range(5)]
    await asyncio.sleep(0.3)
    assert log == []  # all wait for the key's first task
    gate.set()
    await app.wait(blocker.uuid, timeout=20)
    for handle in handles:
        await app.wait(handle.uuid, timeout=20)
    check_in_order(log, "k", 5)


async def test_a_retry_of_a_keyed_task_runs_before_the_next_task_of_its_key(app: QueueTasks) -> None:
    order: list[str] = []

    @app.task(retry=1)
    async def flaky(name: str) -> None:
        order.append(name)
        if name == "first" and order.count("first") == 1:
            raise RuntimeError("fails once")

    await app.start()
    first = await app.add_task("flaky", "first", key="k")
    second = await app.add_task("flaky", "second", key="k")
    assert (await app.wait(first.uuid, timeout=30)).status == "success"  # through its retry
    assert (await app.wait(second.uuid, timeout=30)).status == "success"
    assert order == ["first", "first", "second"]


async def test_a_queued_keyed_task_can_be_cancelled_and_the_key_goes_on(app: QueueTasks) -> None:
    log: list[tuple[str, int, float, float]] = []
    recording(app, log)
    gate = asyncio.Event()

    @app.task
    async def hold() -> None:
        await gate.wait()

    await app.start()
    blocker = await app.add_task("hold", key="k")
    doomed = await app.add_task("step", "k", 0, key="k")
    after = await app.add_task("step", "k", 1, key="k")
    assert await doomed.cancel("not needed")
    gate.set()
    assert (await app.wait(blocker.uuid, timeout=20)).status == "success"
    assert (await app.wait(doomed.uuid, timeout=20)).status == "cancel"
    assert (await app.wait(after.uuid, timeout=20)).status == "success"
    assert [i for _, i, _, _ in log] == [1]


async def test_cancelling_a_keyed_task_during_its_retry_backoff_lets_the_key_go_on_at_once(
    make_app: Callable[..., QueueTasks],
) -> None:
    """Found by review: the key waited for the cancelled retry, which the delays loop drops, so
    the key's next task waited for the whole bound (retry_backoff_max + 2 * lease_timeout + 30 s)."""
    app = make_app(retry_backoff_base=1.5, retry_backoff_max=1.5)  # a backoff of seconds: the delays topic
    ran: list[str] = []

    @app.task(retry=2)
    async def step(name: str, fail: bool = False) -> str:
        ran.append(name)
        if fail:
            raise RuntimeError("fails")
        return name

    await app.start()
    first = await app.add_task("step", "A", fail=True, key="k")
    second = await app.add_task("step", "B", key="k")
    await app.view.wait_for(first.uuid, lambda head: head is not None and head.status == "retry", 20)
    assert await app.cancel(first.uuid, "enough")  # follows the chain: the retry waiting in the delays topic
    assert (await app.wait(first.uuid, timeout=20)).status == "cancel"
    started = time.monotonic()
    assert (await app.wait(second.uuid, timeout=20)).status == "success"
    assert time.monotonic() - started < 10  # not the key's retry bound
    assert ran == ["A", "B"]


async def test_a_keyed_retry_cancelled_while_the_next_worker_waits_for_it_lets_the_key_go_on(
    make_app: Callable[..., QueueTasks],
) -> None:
    """The worker stops during the retry's backoff; the next one reads the failed task's record
    again and waits for the retry too, until the chain is cancelled: the key then goes on at once."""
    ran: list[str] = []

    def app_of(name: str | None = None) -> QueueTasks:
        app = make_app(name, retry_backoff_base=20.0, retry_backoff_max=20.0)  # 10 to 20 s

        @app.task(retry=1)
        async def step(name: str, fail: bool = False) -> str:
            ran.append(name)
            if fail:
                raise RuntimeError("fails")
            return name

        return app

    first_app = app_of()
    await first_app.start()
    first = await first_app.add_task("step", "A", fail=True, key="k")
    second = await first_app.add_task("step", "B", key="k")
    await first_app.view.wait_for(first.uuid, lambda head: head is not None and head.status == "retry", 20)
    await first_app.stop()  # its retry waits in the delays topic
    second_app = app_of(first_app.name)
    worker = await second_app.start()
    await until_true(lambda: "k" in worker._key_retries)  # the next worker waits for the retry too
    assert await second_app.cancel(first.uuid, "enough")
    started = time.monotonic()
    assert (await second_app.wait(second.uuid, timeout=20)).status == "success"
    assert time.monotonic() - started < 10  # not the key's retry bound
    assert ran == ["A", "B"]


async def test_a_delayed_keyed_task_takes_its_place_in_the_key_when_it_comes_due(app: QueueTasks) -> None:
    log: list[tuple[str, int, float, float]] = []
    recording(app, log)
    await app.start()
    later = await app.add_task("step", "k", 1, key="k", countdown=1.2)
    now = await app.add_task("step", "k", 0, key="k")
    assert (await app.wait(later.uuid, timeout=30)).status == "success"
    assert (await app.wait(now.uuid, timeout=30)).status == "success"
    check_in_order(log, "k", 2)
    stored = await app.get(later.uuid)
    assert stored is not None and stored.key == "k" and stored.started_at >= later.task.not_before


@pytest.mark.parametrize(("key", "error"), [(5, TypeError), ("", ValueError), ("x" * 257, ValueError)])
async def test_a_bad_key_is_refused_before_anything_is_sent(app: QueueTasks, key: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="key must be"):
        await app.add_task("anything", key=key)
    with pytest.raises(error, match="key must be"):
        await app.add_tasks("anything", [()], key=key)


async def test_a_rebalance_right_after_a_keyed_task_ends_leaves_its_key_free(
    app: QueueTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's callback may run between a handler's end and its done-callbacks: the key it
    gave up must not be counted as held again (found by review: the key then never ran)."""
    from qtasks import worker as worker_module

    release = worker_module.Worker._release_key

    rebalances: list[asyncio.Future[None]] = []

    def release_then_rebalance(self: Any, rec: Any) -> None:
        release(self, rec)
        if rec.args == ["k", 0]:
            rebalances.append(asyncio.ensure_future(self.on_partitions_assigned(set(self._owned))))

    monkeypatch.setattr(worker_module.Worker, "_release_key", release_then_rebalance)
    log: list[tuple[str, int, float, float]] = []
    recording(app, log)
    await app.start()
    first = await app.add_task("step", "k", 0, key="k")
    assert (await app.wait(first.uuid, timeout=20)).status == "success"
    await asyncio.sleep(0.2)
    assert len(rebalances) == 1 and rebalances[0].done()
    second = await app.add_task("step", "k", 1, key="k")
    assert (await app.wait(second.uuid, timeout=20)).status == "success"


async def test_a_busy_key_does_not_stop_other_partitions_or_the_retry_it_waits_for(
    make_app: Callable[..., QueueTasks],
) -> None:
    """Records queued behind a key take no slot and do not pause the other partitions (found by
    review: with prefetch 0 they paused every partition, and a keyed retry waited its bound)."""
    app = make_app(concurrency=2, prefetch=0)
    order: list[tuple[str, int]] = []
    gate = asyncio.Event()

    @app.task(retry=1)
    async def work(key: str, i: int, hold: bool = False) -> None:
        order.append((key, i))
        if hold:
            await gate.wait()
        if key == "flaky" and i == 0 and order.count(("flaky", 0)) == 1:
            raise RuntimeError("fails once")

    await app.start()
    hot = "hot-key"
    busy = [await app.add_task("work", hot, i, True, key=hot) for i in range(6)]  # the first holds the key
    partitions = app.config.tasks_partitions
    elsewhere = next(
        k for k in (f"other-{i}" for i in range(100)) if partition_for(k, partitions) != partition_for(hot, partitions)
    )
    quick = await app.add_task("work", elsewhere, 0, key=elsewhere)
    assert (await app.wait(quick.uuid, timeout=20)).status == "success"  # while the busy key still waits
    assert not gate.is_set()
    flaky = [await app.add_task("work", "flaky", i, key="flaky") for i in range(4)]
    for handle in flaky:
        assert (await app.wait(handle.uuid, timeout=20)).status == "success"
    assert [i for k, i in order if k == "flaky"] == [0, 0, 1, 2, 3]  # the retry first, without waiting its bound
    gate.set()
    for handle in busy:
        assert (await app.wait(handle.uuid, timeout=20)).status == "success"


async def test_a_keyed_retry_behind_a_partition_paused_for_its_key_queue_runs_first_and_soon(
    make_app: Callable[..., QueueTasks],
) -> None:
    """Found by review: the partition paused for its key queue was never read past the retry
    child at its end, so the key waited its whole bound and the retry ran last."""
    app = make_app(concurrency=2, prefetch=0, tasks_partitions=1)
    order: list[int] = []

    @app.task(retry=1)
    async def step(i: int) -> int:
        order.append(i)
        if i == 0 and order.count(0) == 1:
            await asyncio.sleep(0.3)  # the key's queue fills past its limit meanwhile
            raise RuntimeError("fails once")
        return i

    await app.start()
    started = time.monotonic()
    handles = await app.add_tasks("step", [(i,) for i in range(100)], key="device-42")
    for handle in handles:
        assert (await app.wait(handle.uuid, timeout=60)).status == "success"
    assert order == [0, *range(100)]  # the retry of 0 first, then 1, 2, ...
    assert time.monotonic() - started < 20  # not the key's retry bound


async def test_a_keyed_retry_made_while_its_worker_stops_runs_first_on_the_next_worker(
    make_app: Callable[..., QueueTasks],
) -> None:
    """Found by review: the failed task's record was committed as its worker stopped, so the
    next worker never knew that the key waited for a retry, and ran the key's later tasks first."""
    order: list[int] = []

    def app_of(name: str | None = None) -> QueueTasks:
        app = make_app(name, concurrency=2) if name else make_app(concurrency=2)

        @app.task(retry=1)
        async def step(i: int, fail: bool = False) -> int:
            order.append(i)
            if fail and order.count(i) == 1:
                await asyncio.sleep(0.5)
                raise RuntimeError("fails once")
            return i

        return app

    first_app = app_of()
    await first_app.start()
    first = await first_app.add_task("step", 0, True, key="device-42")
    rest = [await first_app.add_task("step", i, key="device-42") for i in (1, 2, 3)]
    await until_true(lambda: order == [0])
    await first_app.stop()  # the first task fails while its worker stops
    assert order == [0]
    second_app = app_of(first_app.name)
    await second_app.start()
    for handle in [first, *rest]:
        await second_app.wait(handle.uuid, timeout=30)
    assert order == [0, 0, 1, 2, 3]  # the retry of 0 before 1, 2 and 3


async def until_true(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_a_partition_paused_for_its_keys_queue_is_read_again_after_a_rebalance(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app(concurrency=2, prefetch=0, tasks_partitions=1)
    gate = asyncio.Event()
    done: list[int] = []

    @app.task
    async def work(i: int) -> None:
        if i == 0:
            await gate.wait()
        done.append(i)

    worker = await app.start()
    handles = [await app.add_task("work", i, key="hot") for i in range(80)]  # more than the queue's limit of 64
    await app.view.wait_for(handles[0].uuid, lambda h: h is not None and h.status == "process", 20)
    for _ in range(100):
        if worker._key_paused:
            break
        await asyncio.sleep(0.05)
    assert worker._key_paused  # the partition holds too many records behind the key
    worker._consumer.rejoin()  # a rebalance gives the same partition back
    await asyncio.sleep(0.5)
    gate.set()
    for handle in handles:
        assert (await app.wait(handle.uuid, timeout=30)).status == "success"
    assert done == list(range(80))


async def test_a_keys_next_task_starts_at_once_on_an_idle_worker(app: QueueTasks) -> None:
    """Found while testing the queue's pause: the next task of a key waited for the poll loop's
    next pass (half a second) when nothing else was fetched."""
    log: list[tuple[str, int, float, float]] = []
    recording(app, log)
    await app.start()
    handles = [await app.add_task("step", "k", i, 0.0, key="k") for i in range(40)]
    started = time.monotonic()
    for handle in handles:
        assert (await app.wait(handle.uuid, timeout=60)).status == "success"
    assert time.monotonic() - started < 10.0  # 40 half-second waits would take 20 s
    check_in_order(log, "k", 40)
