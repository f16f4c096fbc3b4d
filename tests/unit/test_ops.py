"""What an operator reads from the log (qtasks.ops), on memory://: the group, tasks, dead letters, replays, changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from qtasks import ops
from qtasks.asyncio import QueueTasks
from qtasks.exc import BrokerUnavailableError
from qtasks.records import Task
from tests.helpers import FAST, unique


@pytest.fixture
async def make_app() -> AsyncIterator[Callable[..., QueueTasks]]:
    apps: list[QueueTasks] = []

    def make(**settings: Any) -> QueueTasks:
        app = QueueTasks(name=unique(), broker_url=f"memory://{unique('log')}", **{**FAST, **settings})
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.stop(timeout=2)


async def test_inspect_shows_the_worker_its_partitions_its_running_task_and_the_lag(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app(concurrency=1, prefetch=0, tasks_partitions=1, process_grace=0)
    go_on = asyncio.Event()

    @app.task
    async def held(n: int):  # type: ignore[no-untyped-def]
        yield 0
        await go_on.wait()
        yield n

    worker = await app.start()
    first = await app.add_task("held", 1)
    await app.add_task("held", 2)
    await app.view.wait_for(first.uuid, lambda head: head is not None and head.status == "process", 10)

    report = await ops.inspect_group(app)
    assert report.group == app.group_id and report.state == "Stable"
    [member] = report.workers
    assert member.worker == worker.id and member.partitions == [0]
    assert [t.uuid for t in member.running] == [first.uuid]
    assert member.running[0].started_at > 0 and member.running[0].attempt == 1
    [partition] = report.partitions
    # Two records, none committed: one runs, one waits for the slot.
    assert (partition.end, partition.lag, partition.worker) == (2, 2, worker.id)
    assert report.to_dict()["lag"] == 2
    go_on.set()


async def test_tasks_are_listed_newest_change_first_and_filtered(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()

    @app.task
    def ok(i: int) -> int:
        return i

    @app.task
    def bad() -> None:
        raise ValueError("no")

    await app.start()
    done = [await app.add_task("ok", i, timeout=10) for i in range(3)]
    failed = await app.add_task("bad", timeout=10)
    assert [t.uuid for t in await ops.list_tasks(app, name="ok")] == [t.uuid for t in reversed(done)]
    assert [t.uuid for t in await ops.list_tasks(app, status="error")] == [failed.uuid]
    assert [t.uuid for t in await ops.list_tasks(app, limit=2)] == [failed.uuid, done[-1].uuid]
    assert await ops.list_tasks(app, status="cancel") == []


async def test_dead_letters_are_listed_and_a_usable_one_is_replayed_as_a_new_task(
    make_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()

    @app.task
    def double(x: int) -> int:
        return 2 * x

    # A worker whose decoder has a bug dead-letters good records (kind "undecodable").
    import qtasks.worker

    real = qtasks.worker.decode_task
    broken = True

    def buggy(data: Any, limit: int) -> Any:
        if broken:
            raise KeyError("a bug in the decoder")
        return real(data, limit)

    monkeypatch.setattr(qtasks.worker, "decode_task", buggy)
    await app.start()
    lost = await app.add_task("double", 21)
    await app.broker.producer.send(app.topics.tasks, b"{not json", key=b"junk", partition=0)
    assert (await app.wait(lost.uuid, timeout=10)).status == "error"

    async def both_dead() -> list[ops.Letter]:
        while True:
            if len(letters := await ops.dead_letters(app)) == 2:
                return letters
            await asyncio.sleep(0.02)

    letters = await asyncio.wait_for(both_dead(), 10)
    assert {letter.letter.key for letter in letters} == {lost.uuid.encode(), b"junk"}
    assert all(letter.letter.topic == app.topics.tasks and not letter.cut for letter in letters)

    broken = False  # the fixed worker is deployed: replay
    results = await ops.replay(app, letters)
    by_key = {r.letter.letter.key: r for r in results}
    junk = by_key[b"junk"]
    assert junk.uuid is None and junk.refused is not None and "still does not decode" in junk.refused
    replayed = by_key[lost.uuid.encode()]
    assert replayed.refused is None and replayed.uuid not in (None, lost.uuid)
    # The old uuid follows the replay: waiting on it gives the replay's result.
    final = await app.wait(lost.uuid, timeout=10)
    assert (final.uuid, final.status, final.returning) == (replayed.uuid, "success", 42)
    old = await app.get(lost.uuid)
    assert old is not None and old.status == "retry" and old.retry_child_uuid == replayed.uuid
    # A second replay (a second click) makes no second task.
    again = {r.letter.letter.key: r for r in await ops.replay(app, letters)}[lost.uuid.encode()]
    assert again.uuid is None and again.refused == f"it was replayed already, as task {replayed.uuid}"


async def test_reading_the_dead_letters_gives_up_with_a_clear_error_when_the_broker_does_not_answer(
    make_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()
    await app.start()
    await app.broker.producer.send(app.topics.dlq, b"{}", key=b"k", partition=0)

    async def never(*args: Any, **kwargs: Any) -> list[Any]:
        await asyncio.sleep(0.01)
        return []  # as aiokafka's getmany does while no broker answers

    from qtasks.connectors.memory import MemoryConsumer

    monkeypatch.setattr(MemoryConsumer, "getmany", never)
    with pytest.raises(BrokerUnavailableError, match="could not read the dead-letter topic"):
        await ops.dead_letters(app, timeout=0.5)


async def test_a_letter_whose_value_was_cut_is_not_replayed(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app(max_record_bytes=2_000)
    await app.start()
    await app.broker.producer.send(app.topics.tasks, b"[" * 1_500, key=b"big", partition=0)

    async def dead() -> list[ops.Letter]:
        while True:
            if letters := await ops.dead_letters(app):
                return letters
            await asyncio.sleep(0.02)

    [letter] = await asyncio.wait_for(dead(), 10)
    assert letter.cut and len(letter.letter.value or b"") == 1_000
    [result] = await ops.replay(app, [letter])
    assert result.refused == "its value was cut to fit the dead-letter topic"


async def test_status_changes_come_as_they_are_written(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app(process_grace=0)

    @app.task
    async def two():  # type: ignore[no-untyped-def]
        yield 1
        yield 2

    await app.start()
    seen: list[Task] = []
    ready = asyncio.Event()

    async def follow() -> None:
        async for task in ops.status_changes(app, poll=0.05, ready=ready):
            seen.append(task)
            if task.is_finished:
                return

    follower = asyncio.create_task(follow())
    await asyncio.wait_for(ready.wait(), 10)
    task = await app.add_task("two", timeout=10)
    await asyncio.wait_for(follower, 10)
    assert [(t.uuid, t.status) for t in seen] == [(task.uuid, s) for s in ("new", "process", "success")]
    assert seen[-1].yield_count == 2
