"""Cancels that race a task's ending, or its worker's death (faulty+memory://).

A cancel either stops the task (it ends as ``cancel``) or comes too late (``cancel()`` says
False, or the task ends as it would have): never one ending for the canceller and another
for everyone else, and never a retry that runs after its chain was cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.runner import TaskRun
from tests.helpers import unique
from tests.unit.test_exactly_once import crash


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def ending(app: QueueTasks, uuid: str) -> Callable[[], bool]:
    """Whether ``app``'s worker runs ``uuid`` and its code is done (its ending is being stored)."""

    def check() -> bool:
        worker = app.worker
        run = worker._running.get(uuid) if worker is not None else None
        return run is not None and run.concluding

    return check


def flaky_generator(app: QueueTasks, runs: list[int]) -> None:
    @app.task(retry=1)
    async def flaky():  # type: ignore[no-untyped-def]
        runs.append(1)
        yield 0
        if len(runs) == 1:
            raise ValueError("the first run fails")


async def test_a_cancel_that_reaches_a_failed_run_as_it_ends_stops_its_retry(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    app = faulty_app()
    runs: list[int] = []
    flaky_generator(app, runs)
    await app.start()
    # The failed run's end marker takes a second to be stored: its ending is under way meanwhile.
    app.broker.faults.delay("delivery", 1.0, topic=app.topics.results, nth=2, times=1)  # type: ignore[attr-defined]
    handle = await app.add_task("flaky")
    await until(ending(app, handle.uuid))
    assert await app.cancel(handle.uuid, "stop it")
    final = await app.wait(handle.uuid, timeout=10)
    assert (final.status, final.cancel_reason, final.retry_child_uuid) == ("cancel", "stop it", None)
    await asyncio.sleep(0.3)
    assert runs == [1]  # no retry ran


async def test_a_cancel_from_another_process_racing_a_failed_run_s_ending_stops_its_retry(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    # The client's view says `new` (a short run's `process` is held back), so it ends the
    # task itself while the worker's run ends as `retry` and hands over to a retry.
    log, name = unique("log"), unique()
    app = faulty_app(log, name)
    client = faulty_app(log, name)
    runs: list[int] = []
    flaky_generator(app, runs)
    await app.start()
    app.broker.faults.delay("delivery", 1.0, topic=app.topics.results, nth=2, times=1)  # type: ignore[attr-defined]
    handle = await client.add_task("flaky")
    await until(ending(app, handle.uuid))
    assert await client.cancel(handle.uuid, "stop it")
    seen = await client.wait(handle.uuid, timeout=10)
    await asyncio.sleep(1.5)
    later = await client.wait(handle.uuid, timeout=10)
    assert (seen.status, later.status) == ("cancel", "cancel")
    assert runs == [1]


async def test_a_cancel_from_another_process_racing_a_short_run_s_success_is_final_everywhere(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    # The canceller saw `cancel`: the run's `success`, stored a moment later, must not replace
    # it there or anywhere else (before, every view ended up saying `success`).
    log, name = unique("log"), unique()
    app = faulty_app(log, name)
    client = faulty_app(log, name)

    @app.task
    async def one():  # type: ignore[no-untyped-def]
        yield 1

    await app.start()
    app.broker.faults.delay("delivery", 1.0, topic=app.topics.results, nth=2, times=1)  # type: ignore[attr-defined]
    handle = await client.add_task("one")
    await until(ending(app, handle.uuid))
    assert await client.cancel(handle.uuid, "too late?")
    assert (await client.wait(handle.uuid, timeout=10)).status == "cancel"
    await until(lambda: app.worker is not None and handle.uuid not in app.worker._running)
    await asyncio.sleep(0.3)  # the worker's ending is read back everywhere
    for view in (client, app):
        task = await view.get(handle.uuid)
        assert task is not None and (task.status, task.cancel_reason) == ("cancel", "too late?")
    # What the run streamed before the cancel won stays readable.
    assert [v async for v in client.stream(handle.uuid, timeout=5)] == [1]


async def test_a_cancel_of_a_task_that_ended_where_the_client_cannot_see_yet_says_false(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    # The client's view lags behind the log (its reads are slow): it still says `new` for a
    # task that has ended. The cancel must not end it a second time, as `cancel`, over its
    # `success` (a client's cancel outranks any ending a worker writes).
    log, name = unique("log"), unique()
    app = faulty_app(log, name)
    client = faulty_app(log, name)
    gate = asyncio.Event()

    @app.task
    async def quick() -> str:
        await gate.wait()
        return "done"

    await app.start()
    handle = await client.add_task("quick")
    await until(lambda: client.view.head(handle.uuid) is not None)
    client.broker.faults.delay("fetch", 3.0, topic=client.topics.status)  # type: ignore[attr-defined]
    await asyncio.sleep(0.7)  # the status reader's fetch under way ends (0.5 s); the next one waits 3 s
    gate.set()
    assert (await app.wait(handle.uuid, timeout=10)).status == "success"
    head = client.view.head(handle.uuid)
    assert head is not None and head.status == "new"
    assert not await client.cancel(handle.uuid, "late")
    client.broker.faults.clear()  # type: ignore[attr-defined]
    await asyncio.sleep(0.3)
    for view in (client, app):
        task = await view.get(handle.uuid)
        assert task is not None and task.status == "success"


async def test_a_cancel_of_a_task_whose_worker_died_ends_it_when_another_worker_takes_it_over(
    faulty_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker dies (no lease released: SIGKILL) and the cancel goes to the control topic,
    # for a worker that is gone. Its replacement starts later: it reads the control topic
    # from its start, so it looks back for a cancel when it takes the task over.
    log, name = unique("log"), unique()
    first = faulty_app(log, name, process_grace=0)
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

    async def no_release(self: TaskRun) -> None:
        return None  # killed: nothing more is written

    monkeypatch.setattr(TaskRun, "release", no_release)
    await crash(first)
    client = faulty_app(log, name)
    assert await client.cancel(handle.uuid, "not wanted any more")
    head = client.view.head(handle.uuid)
    assert head is not None and head.status == "process"  # under the dead worker's lease: only the control record
    monkeypatch.undo()
    second = faulty_app(log, name)
    define(second)
    gate.set()
    await second.start()
    final = await client.wait(handle.uuid, timeout=15)
    assert (final.status, final.cancel_reason) == ("cancel", "not wanted any more")


async def test_a_cancel_of_a_task_whose_worker_let_it_go_ends_it_at_once(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    # A worker that stops releases its runs' leases; with no worker left the task would wait
    # for the next one: the cancel ends it now.
    log, name = unique("log"), unique()
    first = faulty_app(log, name, process_grace=0)
    gate = asyncio.Event()

    @first.task
    async def job() -> str:
        await gate.wait()
        return "ran"

    await first.start()
    handle = await first.add_task("job")
    await first.view.wait_for(handle.uuid, lambda h: h is not None and h.status == "process", 10)
    await crash(first)  # its handler is cancelled: the run releases its lease
    client = faulty_app(log, name)
    released = await client.get(handle.uuid)
    assert released is not None and released.status == "process" and released.lease_until == 0.0
    assert await client.cancel(handle.uuid, "not wanted any more")
    final = await client.wait(handle.uuid, timeout=5)
    assert (final.status, final.cancel_reason) == ("cancel", "not wanted any more")
