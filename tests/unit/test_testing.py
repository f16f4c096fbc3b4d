"""``qtasks.testing.TestApp``: a project's app, tested on a memory:// log of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import qtasks
from qtasks.asyncio import QueueTasks
from qtasks.testing import TestApp

# As a project defines it: a Kafka broker that is not there during the tests.
app = QueueTasks(name="project", broker_url="kafka://127.0.0.1:1")


@app.task
async def report(rows: int) -> dict[str, int]:
    return {"rows": rows}


@app.task
async def lines(n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield f"line {i}"


@pytest.fixture
async def tasks() -> AsyncIterator[QueueTasks]:
    async with TestApp(app) as tested:
        yield tested


async def test_the_app_runs_its_tasks_on_memory(tasks: QueueTasks) -> None:
    assert tasks is app and tasks.broker_url.startswith("memory://")
    handle = await tasks.add_task("report", 7)
    assert await handle.result(timeout=5) == {"rows": 7}
    stream = await tasks.add_task("lines", 2)
    assert [v async for v in stream.stream(timeout=5)] == ["line 0", "line 1"]


async def test_each_test_app_has_a_log_of_its_own() -> None:
    async with TestApp(app) as first:
        earlier = await first.add_task("report", 1)
    async with TestApp(app) as second:
        assert await second.get(earlier.uuid) is None  # what the first one submitted is not here


async def test_the_broker_url_comes_back_after_the_test() -> None:
    async with TestApp(app):
        pass
    assert app.broker_url == "kafka://127.0.0.1:1"


async def test_a_client_only_test_app_runs_nothing() -> None:
    async with TestApp(app, worker=False) as tested:
        handle = await tested.add_task("report", 1)
        assert app.worker is None or not app.worker._started
        latest = await handle.get()
        assert latest is not None and latest.status == "new"


def test_the_blocking_app_works_the_same() -> None:
    blocking = qtasks.QueueTasks(name="project_sync", broker_url="kafka://127.0.0.1:1")

    @blocking.task
    def double(x: int) -> int:
        return 2 * x

    with TestApp(blocking) as tested:
        assert tested.add_task("double", 21).result(timeout=5) == 42
    assert blocking.broker_url == "kafka://127.0.0.1:1"


async def test_the_test_s_log_is_dropped_and_the_wrong_form_is_named() -> None:
    from qtasks.connectors import memory_log

    before = set(memory_log._logs)
    async with TestApp(app):
        during = set(memory_log._logs) - before
    assert len(during) == 1 and not (set(memory_log._logs) & during)
    with pytest.raises(TypeError, match="use `async with TestApp"), TestApp(app):
        pass
    blocking = qtasks.QueueTasks(name="project_sync2", broker_url="kafka://127.0.0.1:1")
    with pytest.raises(TypeError, match="use `with TestApp"):
        async with TestApp(blocking):
            pass
