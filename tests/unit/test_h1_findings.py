"""Adversarial findings (h1): each test fails on the engine as it stands."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from tests.helpers import FAST, unique


@pytest.fixture
async def faulty_app() -> AsyncIterator[Callable[..., QueueTasks]]:
    apps: list[QueueTasks] = []

    def make(log: str | None = None, **settings: Any) -> QueueTasks:
        app = QueueTasks(
            name=settings.pop("name", None) or unique(),
            broker_url=f"faulty+memory://{log or unique('log')}",
            **{**FAST, **settings},
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.broker.faults.clear()  # type: ignore[attr-defined]
        await app.stop(timeout=2)


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_cancel_that_reaches_a_run_while_it_ends_as_retry_cancels_the_retry(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    """cancel() says True, so the chain must not go on: the retry the failing run hands over to
    must never run (docs: cancel follows the retry chain; a cancel during the backoff cancels the child)."""
    app = faulty_app()
    runs: list[int] = []

    @app.task(retry=1)
    async def flaky():  # type: ignore[no-untyped-def]
        runs.append(1)
        yield 0
        if len(runs) == 1:
            raise ValueError("the first run fails")

    await app.start()
    # The failing run's end marker (its second result record) takes a second to be stored:
    # the run is concluding (its code is done, its retry not yet submitted) meanwhile.
    app.broker.faults.delay("delivery", 1.0, topic=app.topics.results, nth=2, times=1)  # type: ignore[attr-defined]
    handle = await app.add_task("flaky")
    worker = app.worker
    assert worker is not None
    await until(lambda: (run := worker._running.get(handle.uuid)) is not None and run.concluding)
    assert await app.cancel(handle.uuid, "stop it")
    final = await app.wait(handle.uuid, timeout=10)
    await asyncio.sleep(0.3)
    assert (final.status, final.cancel_reason) == ("cancel", "stop it")
    assert len(runs) == 1, "the retry ran although its chain was cancelled"


async def test_a_cancel_from_another_process_is_not_undone_by_the_retry_of_the_run_it_raced(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    """A client (another process) cancels a task its view says is new while the worker's short
    run is ending as retry: the client's durable `cancel` is later replaced by `retry`, and the
    retry runs to success: the canceller saw one ending, everyone else another."""
    log, name = unique("log"), unique()
    app = faulty_app(log, name=name)
    client = faulty_app(log, name=name)
    runs: list[int] = []

    @app.task(retry=1)
    async def flaky():  # type: ignore[no-untyped-def]
        runs.append(1)
        yield 0
        if len(runs) == 1:
            raise ValueError("the first run fails")

    await app.start()
    app.broker.faults.delay("delivery", 1.0, topic=app.topics.results, nth=2, times=1)  # type: ignore[attr-defined]
    handle = await client.add_task("flaky")
    worker = app.worker
    assert worker is not None
    await until(lambda: (run := worker._running.get(handle.uuid)) is not None and run.concluding)
    assert await client.cancel(handle.uuid, "stop it")
    seen = await client.wait(handle.uuid, timeout=10)
    await asyncio.sleep(1.5)
    later = await client.wait(handle.uuid, timeout=10)
    assert (seen.status, later.status, later.uuid) == ("cancel", "cancel", handle.uuid)
    assert len(runs) == 1


async def test_a_task_record_over_the_worker_s_limit_ends_its_task_instead_of_leaving_it_new(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    """A client whose max_record_bytes is above the worker's submits a task the worker cannot
    decode: the record is dead-lettered (cut), but its task stays `new` for ever, so
    `wait`/`result` never return. The dead letter's key is the task's uuid."""
    log, name = unique("log"), unique()
    worker_app = faulty_app(log, name=name)
    client = faulty_app(log, name=name, max_record_bytes=3_000_000)

    @worker_app.task
    def size(text: str) -> int:
        return len(text)

    await worker_app.start()
    handle = await client.add_task("size", "x" * 1_500_000)
    task = await client.wait(handle.uuid, timeout=5)  # TimeoutError: still `new`
    assert task.status == "error" and "over the limit" in (task.traceback or "")


async def test_cancelling_a_keyed_task_during_its_retry_backoff_lets_the_key_go_on_at_once(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    """docs/ordering.md: "A cancelled task ends as cancel when its turn comes, and the key goes
    on at once". A keyed task that failed waits for its retry (backoff >= 1 s: the delays topic);
    cancelling the chain there cancels the retry, which the delays loop then drops, so it never
    reaches the worker whose key waits for it: the key's next task waits for the whole bound
    (retry_backoff_max + 2 * lease_timeout + 30 s; 150 s with the defaults)."""
    app = faulty_app(retry_backoff_base=1.5, retry_backoff_max=1.5)
    ran: list[str] = []

    @app.task(retry=2)
    def step(name: str, fail: bool = False) -> str:
        ran.append(name)
        if fail:
            raise ValueError("fails")
        return name

    await app.start()
    first = await app.add_task("step", "A", fail=True, key="k")
    second = await app.add_task("step", "B", key="k")
    await app.view.wait_for(first.uuid, lambda head: head is not None and head.status == "retry", 10)
    assert await app.cancel(first.uuid, "enough")
    assert (await app.wait(first.uuid, timeout=5)).status == "cancel"
    done = await app.wait(second.uuid, timeout=10)  # TimeoutError: B waits ~37.5 s here
    assert done.status == "success" and ran == ["A", "B"]


async def test_a_cancel_of_a_task_whose_worker_died_is_not_lost_on_the_worker_that_takes_it_over(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    """cancel() of a `process` task only sends a control record, which workers read from its end:
    a worker that starts after the cancel (the dead worker's replacement) never sees it, takes the
    task over once the lease runs out, and runs it to success although cancel() said True."""
    from tests.unit.test_exactly_once import crash

    log, name = unique("log"), unique()
    first = faulty_app(log, name=name, process_grace=0)
    gate = asyncio.Event()

    def define(app: QueueTasks) -> None:
        @app.task
        async def job() -> str:
            await gate.wait()
            return "ran"

    define(first)
    await first.start()
    handle = await first.add_task("job")
    await first.view.wait_for(handle.uuid, lambda h: h is not None and h.status == "process", 10)
    await crash(first)  # the worker dies (SIGKILL): its lease runs out in lease_timeout
    client = faulty_app(log, name=name)
    assert await client.cancel(handle.uuid, "not wanted any more")
    second = faulty_app(log, name=name)  # the dead worker's replacement starts
    define(second)
    gate.set()
    await second.start()
    final = await client.wait(handle.uuid, timeout=15)
    assert (final.status, final.cancel_reason) == ("cancel", "not wanted any more")


async def test_a_delays_record_with_a_null_key_header_loses_no_delayed_task(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    """A delays-topic record whose `qtasks-key` header has no value (Kafka headers may be null)
    makes the delays loop raise (AttributeError) instead of dead-lettering it. The supervisor
    restarts the loop on the same consumer, whose position is already past the whole batch: the
    delayed tasks read with it are never moved on (and the next commit passes them): lost, `new`
    for ever."""
    import json
    import time
    import uuid

    from qtasks.delays import AT, DUE, KEY

    app = faulty_app()

    @app.task
    def quick(x: int) -> int:
        return x

    await app.start()
    handle = await app.add_task("quick", 1, countdown=2)  # level 0 (partition 0), held there for 1 s
    now = time.time()
    other = str(uuid.uuid4())
    value = json.dumps({"uuid": other, "task_name": "quick", "created_at": now, "args": [2]}).encode()
    headers = [(DUE, repr(now).encode()), (AT, repr(now).encode()), (KEY, None)]
    await app.broker.producer.send(app.topics.delays, value, key=other.encode(), partition=0, headers=headers)  # type: ignore[arg-type]
    task = await app.wait(handle.uuid, timeout=10)  # TimeoutError: the delayed task is lost
    assert task.status == "success"


async def test_two_replays_of_one_dead_letter_at_once_run_its_task_once(
    faulty_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ops.replay checks "replayed already" and then submits: two replays at once (the
    dashboard's Replay button clicked twice, two operators) both pass the check and both submit,
    so the task runs twice and one of the new tasks is named by no status."""
    import qtasks.worker
    from qtasks import ops

    app = faulty_app()
    runs: list[int] = []

    @app.task
    def double(x: int) -> int:
        runs.append(x)
        return 2 * x

    real = qtasks.worker.decode_task
    broken = True

    def buggy(data: Any, limit: int) -> Any:
        if broken:
            raise KeyError("a bug in the decoder")
        return real(data, limit)

    monkeypatch.setattr(qtasks.worker, "decode_task", buggy)
    await app.start()
    lost = await app.add_task("double", 21)
    assert (await app.wait(lost.uuid, timeout=10)).status == "error"
    letters: list[ops.Letter] = []
    while not letters:
        letters = await ops.dead_letters(app)
        await asyncio.sleep(0.02)
    broken = False
    # Each submission takes a moment, as on a real broker.
    app.broker.faults.delay("send", 0.2, topic=app.topics.tasks, times=2)  # type: ignore[attr-defined]
    first, second = await asyncio.gather(ops.replay(app, letters), ops.replay(app, letters))
    replayed = [r.uuid for r in first + second if r.uuid is not None]
    await asyncio.sleep(0.5)
    assert len(replayed) == 1 and runs == [21]


async def test_a_pass_of_the_delays_loop_that_fails_loses_no_delayed_task_read_in_it(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    """Any failure inside one pass of the delays loop (here: the dead letter of a bad record in the
    same batch is refused once) restarts the loop on the same consumer, past the batch: the good
    delayed task read with it is never moved on, and the next commit goes past it."""
    import time
    import uuid

    from qtasks.delays import AT
    from qtasks.exc import ConnectorError

    app = faulty_app()

    @app.task
    def quick(x: int) -> int:
        return x

    await app.start()
    handle = await app.add_task("quick", 1, countdown=2)  # level 0 (partition 0), held there for 1 s
    bad = str(uuid.uuid4())  # no due header: a bad record, dead-lettered in the same pass
    await app.broker.producer.send(
        app.topics.delays, b"{}", key=bad.encode(), partition=0, headers=[(AT, repr(time.time()).encode())]
    )
    app.broker.faults.fail("send", topic=app.topics.dlq, error=ConnectorError("refused", retriable=False))  # type: ignore[attr-defined]
    task = await app.wait(handle.uuid, timeout=10)  # TimeoutError: lost
    assert task.status == "success"
