"""Periodic tasks (``@app.periodic``), end to end, for every connector.

``tests/unit`` runs it on ``memory://`` and ``tests/integration`` on a real Kafka broker.
A tick's run is found by its uuid (``tick_uuid``), and its status names the tick in
``not_before``; every run appends to a list shared by the apps of a test, so a tick run
twice anywhere shows.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.periodic import tick_uuid
from qtasks.records import Task, TickRecord, encode
from tests.delays_suite import LATE


def beating(app: QueueTasks, runs: list[float], every: float = 1.0, **options: Any) -> None:
    @app.periodic(every=every, **options)
    async def beat() -> float:
        runs.append(time.time())
        return runs[-1]


async def ticks_between(app: QueueTasks, start: float, end: float, every: float = 1.0) -> dict[float, Task | None]:
    """The status of the run of every tick from ``start`` to ``end`` (None: never submitted)."""
    found: dict[float, Task | None] = {}
    tick = math.floor(start / every) * every
    while tick <= end:
        found[tick] = await app.get(tick_uuid(app.name, "beat", tick))
        tick += every
    return found


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.1)


def check_consecutive(found: dict[float, Task | None], runs: list[float]) -> list[float]:
    """The ticks run: consecutive, each a success that started at or after its tick, each run once."""
    ran = sorted(tick for tick, task in found.items() if task is not None)
    assert ran, found
    assert ran == [ran[0] + i * (ran[1] - ran[0] if len(ran) > 1 else 1) for i in range(len(ran))], ran
    for tick in ran:
        task = found[tick]
        assert task is not None and task.status == "success" and task.not_before == tick, task
        assert tick <= task.started_at < tick + LATE, (tick, task.started_at)
    assert len(runs) == len(ran), (len(runs), ran)
    return ran


async def test_a_periodic_task_runs_once_per_tick(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()
    runs: list[float] = []
    beating(app, runs)
    started = time.time()
    worker = await app.start()
    await until(lambda: len(runs) >= 4, 30, "four ticks")
    await app.stop()
    found = await ticks_between(make_app(app.name), started - 1, time.time())
    ran = check_consecutive(found, runs)
    assert ran[0] <= started + LATE and worker.ticker.submitted == len(ran)


async def test_one_worker_of_the_group_ticks_and_another_takes_over_without_a_gap(
    make_app: Callable[..., QueueTasks],
) -> None:
    name = f"beat{time.time_ns()}"
    runs: list[float] = []
    first, second = make_app(name), make_app(name)
    beating(first, runs)
    beating(second, runs)
    started = time.time()
    a, b = await first.start(), await second.start()
    await until(lambda: [a.ticker.leading, b.ticker.leading].count(True) == 1, 30, "one worker ticking")
    await until(lambda: len(runs) >= 3, 30, "three ticks")
    assert [a.ticker.leading, b.ticker.leading].count(True) == 1
    leader, other = (first, second) if a.ticker.leading else (second, first)
    count = len(runs)
    await leader.stop()  # the other worker takes the ticking over
    await until(lambda: other.worker is not None and other.worker.ticker.leading, 60, "the other worker to tick")
    await until(lambda: len(runs) >= count + 3, 30, "three more ticks")
    await other.stop()
    found = await ticks_between(make_app(name), started - 1, time.time())
    check_consecutive(found, runs)


async def test_a_worker_that_takes_over_before_the_first_tick_was_recorded_still_submits_it(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()
    runs: list[float] = []
    beating(app, runs, every=2.0)
    worker = await app.start()
    await until(lambda: worker.ticker.led_at > 0, 30, "the worker to tick")
    worker.ticker.step_down()  # as a rebalance would, most likely before its first tick
    led = worker.ticker.led_at
    first = math.floor(led / 2.0) * 2.0 + 2.0
    await asyncio.sleep(first + 0.5 - time.time())
    worker.ticker.lead()  # it takes over again, past a tick nobody submitted
    await until(lambda: worker.ticker.led_at > led, 30, "the worker to tick again")
    await until(lambda: len(runs) >= 2, 30, "two ticks")
    await app.stop()
    found = await ticks_between(make_app(app.name), first, time.time(), every=2.0)
    ran = check_consecutive(found, runs)
    assert ran[0] == first, (first, ran)


async def test_a_tick_fired_late_is_not_run_again_after_the_view_dropped_its_ending(
    make_app: Callable[..., QueueTasks],
) -> None:
    # A ticker frozen past a rebalance wakes and fires a tick that the other ticker ran long
    # ago, so long that the view keeps its ending no more: it is read back, not run again.
    app = make_app(status_cache_size=20)
    runs: list[float] = []
    beating(app, runs)

    @app.task
    async def filler() -> int:
        return 1

    started = time.time()
    worker = await app.start()
    await until(lambda: len(runs) >= 1, 30, "a tick")
    worker.ticker.step_down()
    ran = [t for t, task in (await ticks_between(app, started - 1, time.time())).items() if task is not None]
    tick = ran[0]
    for _ in range(40):
        await app.add_task("filler", timeout=10)
    assert app.core.view.head(tick_uuid(app.name, "beat", tick)) is None  # dropped from the view
    count = len(runs)
    spec = worker.registry.get("beat")
    assert spec is not None and spec.schedule is not None
    await worker.ticker._fire(spec, spec.schedule, tick, careful=True)
    await asyncio.sleep(1.0)
    assert len(runs) == count


async def test_a_late_tick_is_read_back_only_when_the_view_dropped_a_task_that_ended_after_it(
    make_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by review: every careful tick read its status partition from the start once the
    # view had dropped anything, and a slow read stopped the ticking loop.
    app = make_app(status_cache_size=5)
    runs: list[float] = []
    beating(app, runs, every=3600.0)

    @app.task
    async def filler() -> int:
        return 1

    worker = await app.start()
    await until(lambda: worker.ticker.led_at > 0, 30, "the worker to lead")
    worker.ticker.step_down()
    submitted = worker.ticker.submitted  # 0, unless an hour began just then
    for _ in range(10):
        await app.add_task("filler", timeout=10)
    assert app.core.view.evicted > 0
    reads: list[str] = []

    async def read_back(uuid: str, timeout: float = 10.0) -> None:
        reads.append(uuid)
        raise TimeoutError  # as a read of a long partition that runs out of time

    monkeypatch.setattr(app.core.store, "_read_back", read_back)
    spec = worker.registry.get("beat")
    assert spec is not None and spec.schedule is not None
    newer = app.core.view.newest_drop + 3600.0  # after every task the view dropped: not read back
    await worker.ticker._fire(spec, spec.schedule, newer, careful=True)
    assert reads == []
    older = math.floor(app.core.view.newest_drop) - 1.0  # a task that ended after it was dropped
    await worker.ticker._fire(spec, spec.schedule, older, careful=True)  # submitted, not a failure
    assert reads == [tick_uuid(app.name, "beat", older)]
    assert worker.ticker.submitted == submitted + 2


@pytest.mark.parametrize("catch_up", ["all", "latest", "skip"])
async def test_ticks_missed_while_no_worker_ran_follow_catch_up(
    make_app: Callable[..., QueueTasks], catch_up: str
) -> None:
    name = f"late{time.time_ns()}"
    grace, every = 20.0, 5.0
    runs: list[float] = []
    app = make_app(name, periodic_grace=grace)
    beating(app, runs, every=every, catch_up=catch_up)
    # The story so far: a worker ticked until 300 s ago, then none ran.
    await app.core.connect()
    last = math.floor((time.time() - 300) / every) * every
    producer = app.core.broker.producer
    for key, record in (
        (b"tick:beat", TickRecord(kind="tick", name="beat", tick=last, uuid=tick_uuid(name, "beat", last), at=last)),
        (b"alive", TickRecord(kind="alive", worker="gone", at=last)),
    ):
        delivery = await producer.send(app.core.topics.schedule, encode(record), key=key, partition=0)
        if delivery is not None:
            await delivery
    worker = await app.start()
    await until(lambda: worker.ticker.led_at > 0, 60, "the worker to tick")
    led = worker.ticker.led_at
    within = [last + every * i for i in range(1, int(grace / every) + 1)]  # missed with a worker's sign in grace
    outage = [t for t in (last + grace + every * i for i in range(1, 200)) if t <= led]
    await until(lambda: len(runs) >= len(within) + {"all": len(outage), "latest": 1, "skip": 0}[catch_up], 60, "runs")
    found = await ticks_between(app, last + every, led, every)
    assert all(found[t] is not None for t in within), within
    submitted = [t for t in outage if found[t] is not None]
    if catch_up == "all":
        assert submitted == outage
    elif catch_up == "latest":
        assert submitted == outage[-1:]
    else:
        assert submitted == []


async def test_a_sign_of_life_from_a_worker_that_ticked_other_tasks_does_not_stop_the_catch_up_policy(
    make_app: Callable[..., QueueTasks],
) -> None:
    # `beat` was out of the code for 5 minutes while a worker ticked the app's other periodic
    # tasks: its missed ticks are ticks no worker ran, so catch_up="skip" passes them over.
    name = f"back{time.time_ns()}"
    grace, every = 20.0, 5.0
    runs: list[float] = []
    app = make_app(name, periodic_grace=grace)
    beating(app, runs, every=every, catch_up="skip")
    await app.core.connect()
    last = math.floor((time.time() - 300) / every) * every
    producer = app.core.broker.producer
    for key, record in (
        (b"tick:beat", TickRecord(kind="tick", name="beat", tick=last, uuid=tick_uuid(name, "beat", last), at=last)),
        (b"alive", TickRecord(kind="alive", worker="gone", at=time.time() - 1, names=["other"])),
    ):
        delivery = await producer.send(app.core.topics.schedule, encode(record), key=key, partition=0)
        if delivery is not None:
            await delivery
    worker = await app.start()
    await until(lambda: worker.ticker.led_at > 0, 60, "the worker to tick")
    led = worker.ticker.led_at
    within = [last + every * i for i in range(1, int(grace / every) + 1)]  # within grace of the last tick
    await until(lambda: len(runs) >= len(within), 60, "runs")
    found = await ticks_between(app, last + every, led, every)
    assert sorted(t for t, task in found.items() if task is not None) == within


async def test_a_ticker_whose_clock_jumps_ahead_follows_catch_up_for_the_gap(
    make_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    from qtasks import periodic

    app = make_app(periodic_grace=5.0)
    runs: list[float] = []
    beating(app, runs, catch_up="skip")
    worker = await app.start()
    await until(lambda: worker.ticker.submitted >= 2, 30, "two ticks")

    class Jumped:  # the clock the ticker reads, an hour ahead (a suspended VM resumed, an NTP step)
        def time(self) -> float:
            return time.time() + 3600

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

    before = worker.ticker.submitted
    monkeypatch.setattr(periodic, "time", Jumped())
    await asyncio.sleep(2.5)
    # the ticks within the grace of its last loop (8 s here), then one a second: not 3,600
    assert worker.ticker.submitted - before <= 30, worker.ticker.submitted - before
    monkeypatch.undo()
    await app.stop()


async def test_periodic_arguments_are_checked_when_the_task_is_registered(app: QueueTasks) -> None:
    with pytest.raises(TypeError, match="cannot take args"):

        @app.periodic(every=10, args=(1, 2))
        async def one(x: int) -> int:
            return x

    @app.periodic(cron="*/5 * * * *", args=(1,), kwargs={"y": 2}, name="sum", retry=2)
    async def add(x: int, y: int) -> int:
        return x + y

    spec = app.registry.get("sum")
    assert spec is not None and spec.retry == 2 and spec.schedule.args == (1,)
    await app.start()
    done = await app.add_task("sum", 3, y=4, timeout=20)  # a periodic task is a task too
    assert done is not None and done.returning == 7


async def test_a_bad_schedule_record_is_passed_over_and_the_ticking_goes_on(
    make_app: Callable[..., QueueTasks],
) -> None:
    name = f"odd{time.time_ns()}"
    runs: list[float] = []
    app = make_app(name)
    beating(app, runs)
    await app.core.connect()
    producer = app.core.broker.producer
    for key, raw in (
        (b"tick:beat", encode(TickRecord(kind="tick", name="beat", tick=1e12, uuid="x", at=time.time()))),
        (b"alive", b"not json"),
    ):
        delivery = await producer.send(app.core.topics.schedule, raw, key=key, partition=0)
        if delivery is not None:
            await delivery
    worker = await app.start()
    await until(lambda: len(runs) >= 2, 30, "two ticks")
    assert worker.error is None and worker.ticker.leading


async def test_a_tick_that_cannot_be_submitted_is_logged_and_the_others_go_on(
    make_app: Callable[..., QueueTasks], caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(max_record_bytes=4000)
    runs: list[float] = []
    beating(app, runs)

    @app.periodic(every=1, args=("x" * 5000,))
    async def too_big(text: str) -> None: ...

    worker = await app.start()
    await until(lambda: len(runs) >= 3, 30, "three ticks of the other task")
    assert worker.error is None and worker.ticker.leading
    assert "periodic task too_big: the tick at" in caplog.text  # said, once per tick
    assert "loop periodic failed" not in caplog.text  # and the loop never failed for it
