"""What an operator reads from the log (qtasks.ops), on memory://: the group, tasks, dead letters, replays, changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from qtasks import ops
from qtasks.asyncio import QueueTasks
from qtasks.exc import BrokerUnavailableError, ConnectorError
from qtasks.records import Task
from tests.helpers import FAST, unique


@pytest.fixture
async def make_app() -> AsyncIterator[Callable[..., QueueTasks]]:
    apps: list[QueueTasks] = []

    def make(name: str | None = None, broker_url: str | None = None, **settings: Any) -> QueueTasks:
        url = broker_url or f"memory://{unique('log')}"
        app = QueueTasks(name=name or unique(), broker_url=url, **{**FAST, **settings})
        apps.append(app)
        return app

    yield make
    for app in apps:
        if (faults := getattr(app.broker, "faults", None)) is not None:
            faults.clear()
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


class DeadTask:
    """A task its worker dead-lettered (its decoder had a bug), and the letter; ``fix()`` deploys the fix."""

    def __init__(self, app: QueueTasks, monkeypatch: pytest.MonkeyPatch) -> None:
        import qtasks.worker

        self.app, self.runs, self.broken = app, list[int](), True
        real = qtasks.worker.decode_task

        def buggy(data: Any, limit: int) -> Any:
            if self.broken:
                raise KeyError("a bug in the decoder")
            return real(data, limit)

        monkeypatch.setattr(qtasks.worker, "decode_task", buggy)

        @app.task
        def double(x: int) -> int:
            self.runs.append(x)
            return 2 * x

    async def letters(self) -> tuple[str, list[ops.Letter]]:
        await self.app.start()
        lost = await self.app.add_task("double", 21)
        assert (await self.app.wait(lost.uuid, timeout=10)).status == "error"
        letters: list[ops.Letter] = []
        while not letters:
            letters = await ops.dead_letters(self.app)
            await asyncio.sleep(0.02)
        self.broken = False
        return lost.uuid, letters


def replayed_as(results: list[ops.Replayed]) -> set[str]:
    """The tasks the replays name: the one each submitted, or the one each found replayed already."""
    prefix = "it was replayed already, as task "
    return {r.uuid or (r.refused or "").removeprefix(prefix) for r in results}


async def test_two_replays_of_one_dead_letter_at_once_run_its_task_once(
    make_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The dashboard's Replay button clicked twice: the second replay waits for the first one.
    app = make_app(broker_url=f"faulty+memory://{unique('log')}")
    dead = DeadTask(app, monkeypatch)
    lost, letters = await dead.letters()
    app.broker.faults.delay("send", 0.2, topic=app.topics.tasks, times=2)  # type: ignore[attr-defined]
    first, second = await asyncio.gather(ops.replay(app, letters), ops.replay(app, letters))
    [new] = [r.uuid for r in first + second if r.uuid is not None]
    assert [r.refused for r in first + second if r.uuid is None] == [f"it was replayed already, as task {new}"]
    assert (await app.wait(lost, timeout=10)).uuid == new
    await asyncio.sleep(0.3)
    assert dead.runs == [21]


async def test_replays_of_one_dead_letter_from_two_processes_at_once_submit_one_task(
    make_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two operators: no lock is shared, but both replays give the task the letter's uuid.
    log, name = unique("log"), unique()
    app = make_app(name=name, broker_url=f"faulty+memory://{log}")
    dead = DeadTask(app, monkeypatch)
    lost, letters = await dead.letters()
    operators = [make_app(name=name, broker_url=f"faulty+memory://{log}") for _ in range(2)]
    for operator in operators:
        await operator._connect()
        operator.broker.faults.delay("send", 0.2, topic=operator.topics.tasks)  # type: ignore[attr-defined]
    first, second = await asyncio.gather(*(ops.replay(operator, letters) for operator in operators))
    [new] = replayed_as(first + second)
    assert new == ops.replay_uuid(app.topics.dlq, letters[0])
    final = await operators[0].wait(lost, timeout=10)  # its view holds the pointer it wrote
    assert (final.uuid, final.status, final.returning) == (new, "success", 42)
    await asyncio.sleep(0.3)
    assert dead.runs == [21]


async def test_a_replay_cut_short_before_the_dead_task_points_at_its_replay_is_finished_by_the_next_one(
    make_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    log, name = unique("log"), unique()
    app = make_app(name=name, broker_url=f"faulty+memory://{log}")
    dead = DeadTask(app, monkeypatch)
    lost, letters = await dead.letters()
    operator = make_app(name=name, broker_url=f"faulty+memory://{log}")
    await operator._connect()
    # The replay's second status write (the dead task's `retry`, after the new task's `new`) is refused.
    refused = ConnectorError("refused", retriable=False)
    operator.broker.faults.fail("send", nth=2, topic=operator.topics.status, error=refused)  # type: ignore[attr-defined]
    with pytest.raises(ConnectorError, match="refused"):
        await ops.replay(operator, letters)
    [again] = await ops.replay(operator, letters)
    new = ops.replay_uuid(app.topics.dlq, letters[0])
    assert again.uuid is None and again.refused == f"it was replayed already, as task {new}"
    final = await operator.wait(lost, timeout=10)  # its view holds the pointer it wrote
    assert (final.uuid, final.status) == (new, "success")
    await asyncio.sleep(0.3)
    assert dead.runs == [21]


async def test_a_second_replay_of_a_letter_whose_dead_task_has_expired_makes_no_second_task(
    make_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app()
    dead = DeadTask(app, monkeypatch)
    lost, letters = await dead.letters()
    await app.core.store.tombstone(lost)  # past status_ttl: no status points at a replay
    [first] = await ops.replay(app, letters)
    assert first.uuid is not None and (await app.wait(first.uuid, timeout=10)).status == "success"
    [second] = await ops.replay(app, letters)
    assert second.uuid is None and second.refused == f"it was replayed already, as task {first.uuid}"
    await asyncio.sleep(0.3)
    assert dead.runs == [21]


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
