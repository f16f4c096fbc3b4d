"""Delayed tasks (``countdown``/``eta``), end to end, for every connector.

``tests/unit`` runs it on ``memory://`` and ``tests/integration`` on a real Kafka broker.
Each task records when it started; a task must never start before its due time (the
strict check), and must start within a bound that leaves room for a loaded machine.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.connectors import TopicPartition
from qtasks.delays import AT, DUE, LEVELS
from qtasks.records import TaskRecord, decode_dead_letter, encode

#: How late a delayed task may start here: a sanity bound, far above what is measured (under
#: a second), for a CI machine running several suites at once.
LATE = 20.0


def timed(app: QueueTasks) -> None:
    @app.task
    async def when(tag: str = "") -> dict[str, Any]:
        return {"tag": tag, "at": time.time()}


async def test_a_countdown_task_starts_at_its_time_not_before(app: QueueTasks) -> None:
    timed(app)
    await app.start()
    before = time.time()
    handle = await app.add_task("when", "a", countdown=1.5)
    assert handle.task.status == "new"
    assert before + 1.5 <= handle.task.not_before <= time.time() + 1.5
    stored = await app.get(handle.uuid)
    assert stored is not None and stored.status == "new" and stored.not_before == handle.task.not_before
    done = await app.wait(handle.uuid, timeout=30)
    assert done.status == "success"
    assert handle.task.not_before <= done.returning["at"] < handle.task.not_before + LATE
    assert done.started_at >= handle.task.not_before


async def test_eta_takes_an_aware_datetime_or_unix_time(app: QueueTasks) -> None:
    timed(app)
    await app.start()
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1.2)
    by_datetime = await app.add_task("when", "datetime", eta=soon)
    by_number = await app.add_task("when", "number", eta=time.time() + 1.2)
    for handle in (by_datetime, by_number):
        done = await app.wait(handle.uuid, timeout=30)
        assert done.status == "success"
        assert handle.task.not_before <= done.returning["at"] < handle.task.not_before + LATE
    assert by_datetime.task.not_before == soon.timestamp()


async def test_a_due_time_in_the_past_or_a_zero_countdown_runs_at_once(app: QueueTasks) -> None:
    timed(app)
    await app.start()
    past = await app.add_task("when", eta=time.time() - 3600, timeout=20)
    zero = await app.add_task("when", countdown=0, timeout=20)
    assert past is not None and past.status == "success"
    assert zero is not None and zero.status == "success" and zero.not_before == 0.0


async def test_a_long_delay_hops_down_the_levels_with_one_record_held_per_partition(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()
    timed(app)
    worker = await app.start()
    # 6.5 s: the 4 s level, then the 1 s level (2.5 s are left), then the tasks topic.
    started = time.time()
    handles = await app.add_tasks("when", [(str(i),) for i in range(150)], countdown=6.5)
    due = min(h.task.not_before for h in handles)
    # While they wait: nothing in the worker's backlog or in-memory delay heap, and at
    # most one record held per partition of the delays topic.
    while time.time() < due - 1.5:
        await asyncio.sleep(0.2)
        assert worker.delays.held <= len(LEVELS)
        assert not worker._backlog and not worker._delayed and worker._in_flight == 0
        for handle in handles[:5]:
            waiting = await app.get(handle.uuid)
            assert waiting is not None and waiting.status == "new"
    for handle in handles:
        done = await app.wait(handle.uuid, timeout=60)
        assert done.status == "success"
        assert handle.task.not_before <= done.returning["at"] < handle.task.not_before + LATE
    assert worker.delays.moved >= 150  # each went through a shorter level first
    assert worker.delays.due >= 150
    assert time.time() - started >= 6.5


async def test_a_delayed_task_cancelled_while_it_waits_never_runs(app: QueueTasks) -> None:
    timed(app)
    await app.start()
    handle = await app.add_task("when", countdown=4.0)
    kept = await app.add_task("when", countdown=4.0)
    assert await app.cancel(handle.uuid, "changed my mind")
    done = await app.wait(kept.uuid, timeout=30)
    assert done.status == "success"
    await asyncio.sleep(1.0)
    cancelled = await app.get(handle.uuid)
    assert cancelled is not None and cancelled.status == "cancel"
    assert cancelled.cancel_reason == "changed my mind" and cancelled.started_at == 0.0


async def test_delayed_tasks_outlive_the_worker_that_held_them(make_app: Callable[..., QueueTasks]) -> None:
    name = f"delays{time.time_ns()}"
    first = make_app(name)
    timed(first)
    await first.start()
    handles = await first.add_tasks("when", [(str(i),) for i in range(20)], countdown=3.0)
    await asyncio.sleep(1.0)
    assert first.worker is not None
    await first.stop()  # holding them, before they are due
    second = make_app(name)
    timed(second)
    await second.start()
    for handle in handles:
        done = await second.wait(handle.uuid, timeout=60)
        assert done.status == "success"
        assert done.returning["at"] >= handle.task.not_before


async def test_add_tasks_and_map_take_a_countdown(app: QueueTasks) -> None:
    @app.task
    async def double(x: int) -> dict[str, Any]:
        return {"x": x * 2, "at": time.time()}

    await app.start()
    handles = await double.map([1, 2, 3], countdown=1.2)
    results = [await app.wait(h.uuid, timeout=30) for h in handles]
    assert [r.returning["x"] for r in results] == [2, 4, 6]
    assert all(r.returning["at"] >= h.task.not_before > 0 for r, h in zip(results, handles, strict=True))


async def test_bad_records_in_the_delays_topic_go_to_the_dead_letter_topic(app: QueueTasks) -> None:
    timed(app)
    await app.start()
    core = app.core
    producer = core.broker.producer
    topic = core.topics.delays
    good = TaskRecord(uuid="0b0f4f8e-5f8e-4a59-9d5e-000000000001", task_name="when", created_at=time.time())
    now = repr(time.time()).encode()
    cases = [
        (b"no-headers", encode(good), []),
        (b"bad-due", encode(good), [(DUE, b"soon"), (AT, now)]),
        (None, encode(good), [(DUE, now), (AT, now)]),
    ]
    for key, value, headers in cases:
        delivery = await producer.send(topic, value, key=key, partition=0, headers=headers or None)
        if delivery is not None:
            await delivery
    # A good one behind them still runs.
    handle = await app.add_task("when", "after", countdown=1.2)
    done = await app.wait(handle.uuid, timeout=30)
    assert done.status == "success"
    letters = await read_all(app, core.topics.dlq, 3)
    reasons = sorted(decode_dead_letter(r.value).reason for r in letters)
    assert any("no qtasks-due and qtasks-at header" in r for r in reasons), reasons
    assert any("bad qtasks-due header" in r for r in reasons), reasons
    assert any("no key" in r for r in reasons), reasons
    assert all(decode_dead_letter(r.value).topic == topic for r in letters)


async def test_a_retry_backoff_of_seconds_waits_in_the_delays_topic(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app(retry_backoff_base=3.0, retry_backoff_max=3.0)  # 1.5 to 3 s
    calls: list[float] = []

    @app.task(retry=1)
    async def flaky() -> float:
        calls.append(time.time())
        if len(calls) == 1:
            raise RuntimeError("first try fails")
        return calls[-1]

    worker = await app.start()
    handle = await app.add_task("flaky")
    done = await app.wait(handle.uuid, timeout=30)
    assert done.status == "success" and len(calls) == 2
    first = await app.get(handle.uuid)
    assert first is not None and first.status == "retry" and first.retry_child_uuid == done.uuid
    assert done.not_before - calls[0] >= 1.5 and calls[1] >= done.not_before
    assert worker.delays.due >= 1


@pytest.mark.parametrize(
    ("when", "error"),
    [
        ({"countdown": -1}, ValueError),
        ({"countdown": float("nan")}, ValueError),
        ({"countdown": True}, TypeError),
        ({"countdown": "5"}, TypeError),
        ({"eta": "tomorrow"}, TypeError),
        ({"eta": 1e12}, ValueError),
        ({"countdown": 1, "eta": time.time()}, TypeError),
    ],
)
async def test_a_bad_countdown_or_eta_is_refused_before_anything_is_sent(
    app: QueueTasks, when: dict[str, Any], error: type[Exception]
) -> None:
    timed(app)
    with pytest.raises(error):
        await app.add_task("when", **when)
    with pytest.raises(error):
        await app.add_tasks("when", [()], **when)


async def read_all(app: QueueTasks, topic: str, count: int, timeout: float = 20.0) -> list[Any]:
    """The first ``count`` records of a one-partition topic (waiting for them)."""
    consumer = app.core.broker.consumer(None, client_id="test-read")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning([tp])
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            records += await consumer.getmany(timeout=0.5)
        return records
    finally:
        await consumer.stop()


async def test_a_writer_whose_clock_runs_ahead_does_not_hold_a_level_back(app: QueueTasks) -> None:
    timed(app)
    await app.start()
    core = app.core
    ahead = time.time() + 3600  # its clock says an hour later
    task = TaskRecord(
        uuid="0b0f4f8e-5f8e-4a59-9d5e-000000000002", task_name="when", created_at=ahead, not_before=ahead + 2
    )
    headers = [(DUE, repr(ahead + 2).encode()), (AT, repr(ahead).encode())]
    delivery = await core.broker.producer.send(
        core.topics.delays, encode(task), key=task.uuid.encode(), partition=0, headers=headers
    )
    if delivery is not None:
        await delivery
    handle = await app.add_task("when", "on time", countdown=1.5)  # behind it in the same level
    done = await app.wait(handle.uuid, timeout=30)
    assert done.status == "success" and done.returning["at"] < handle.task.not_before + LATE


async def test_many_tasks_due_at_once_are_taken_no_faster_than_the_worker_runs_them(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app(concurrency=2, prefetch=2)
    timed(app)
    await app.start()
    worker = app.worker
    assert worker is not None
    handles = await app.add_tasks("when", [() for _ in range(300)], countdown=1.5)  # all due in the same second
    held = 0

    async def watch() -> None:
        nonlocal held
        while True:
            held = max(held, len(worker._delayed) + len(worker._backlog))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        for h in handles:
            await app.wait(h.uuid, timeout=60)
    finally:
        watcher.cancel()
    assert held <= 4, held  # concurrency + prefetch, never the 300 at once
    for h in handles:
        done = await app.wait(h.uuid, timeout=30)
        assert done.status == "success" and done.returning["at"] >= h.task.not_before


async def test_a_task_record_due_far_ahead_goes_to_the_delays_topic_not_into_the_worker(app: QueueTasks) -> None:
    timed(app)
    await app.start()
    core = app.core
    worker = app.worker
    assert worker is not None
    route = core.task_route
    # A client whose clock runs an hour ahead sends a task due in 2 s by its clock straight
    # to the tasks topic: here it is due in an hour.
    core.task_route = lambda uuid, not_before, headers=None, *, key=None: route(uuid, 0.0, headers, key=key)  # type: ignore[method-assign]
    try:
        far = await app.add_task("when", "later", eta=time.time() + 3600)
    finally:
        core.task_route = route  # type: ignore[method-assign]
    after = await app.add_task("when", "now", timeout=30)  # the worker goes on
    assert after is not None and after.status == "success"
    records = []
    deadline = time.monotonic() + 30
    while not any(r.key == far.uuid.encode() for r in records):
        assert time.monotonic() < deadline, "the task never reached the delays topic"
        records = []
        for level in range(core.delays_partitions):
            records += await read_all_of(app, TopicPartition(core.topics.delays, level))
    assert worker._delayed == [] and (await app.get(far.uuid)).status == "new"  # type: ignore[union-attr]


async def test_a_task_the_delays_topic_moved_is_held_even_when_the_mover_s_clock_runs_ahead(
    app: QueueTasks, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The worker moving the delays topic runs 8 s ahead of the one taking tasks (found by
    # review: the taker sent it back, the mover moved it again at once, thousands of times).
    from qtasks import scheduler

    class Ahead:
        def time(self) -> float:
            return time.time() + 8.0

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

    monkeypatch.setattr(scheduler, "time", Ahead())
    timed(app)
    worker = await app.start()
    handle = await app.add_task("when", countdown=10)
    done = await app.wait(handle.uuid, timeout=60)
    assert done.status == "success" and done.returning["at"] >= handle.task.not_before  # never early
    assert worker.delays.due == 1  # moved to the tasks topic once, held there until due
    assert "the workers' clocks disagree" in caplog.text  # the operator is told


async def read_all_of(app: QueueTasks, tp: TopicPartition) -> list[Any]:
    """Every record of a partition up to its end now."""
    consumer = app.core.broker.consumer(None, client_id="test-read")
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        records: list[Any] = []
        while await consumer.position(tp) < end:
            records += await consumer.getmany(timeout=0.5)
        return records
    finally:
        await consumer.stop()


async def test_a_countdown_past_the_year_5138_is_refused() -> None:
    from qtasks.validate import check_due

    with pytest.raises(ValueError, match="past the year 5138"):
        check_due(countdown=99e9)
    with pytest.raises(ValueError, match="too large"):
        check_due(countdown=10**400)
    with pytest.raises(ValueError, match="too large"):
        check_due(eta=10**400)
