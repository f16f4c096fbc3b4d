"""Edges a demanding user meets: the stream of a task the status view dropped, checkpoints
changed after they were taken, a cancel too large to send, a body nested too deep for the
dashboard, the stream of a run resumed from an earlier one, a cancelled sync pipeline stage.

Every test runs on ``memory://`` (or ``faulty+memory://``) in a few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from qtasks import Stream
from qtasks.asyncio import QueueTasks
from qtasks.web import create_app
from tests.helpers import FAST, unique


@pytest.fixture
async def make_app() -> AsyncIterator[Any]:
    apps: list[QueueTasks] = []

    def make(name: str | None = None, log: str | None = None, **settings: Any) -> QueueTasks:
        app = QueueTasks(name=name or unique(), broker_url=f"memory://{log or unique('log')}", **{**FAST, **settings})
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.stop(timeout=2)


# -- streams -----------------------------------------------------------------------------


async def test_a_deeply_nested_json_body_is_a_400_not_a_500(make_app: Any) -> None:
    """A body nested deeper than Python can decode is a bad request (400), not a server error (500)."""
    app = make_app()

    @app.task
    async def noop() -> None: ...

    transport = httpx.ASGITransport(app=create_app(app), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
        body = b"[" * 100_000 + b"]" * 100_000
        response = await client.post("/api/tasks", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (response.status_code, response.text[:200])


# -- checkpoints -------------------------------------------------------------------------


async def test_a_checkpoint_is_the_state_as_it_was_when_checkpointed(make_app: Any) -> None:
    """What ``ctx.checkpoint(state)`` stores is the state at that call: the task may go on
    changing its own dict (a run that goes on from the checkpoint must not start ahead of its seq)."""
    app = make_app()

    @app.task(echo=True)
    async def crunch(self: Any) -> Any:
        state = {"next": 0}
        yield 0
        state["next"] = 1
        self.ctx.checkpoint(state)  # resume at seq 1 with next=1
        state["next"] = 7  # work toward value 7 that is not yielded yet
        await asyncio.sleep(2.0)  # lease renewals (every 0.5 s) store the checkpoint meanwhile
        yield 1

    await app.start()
    handle = await app.add_task("crunch")
    await asyncio.sleep(1.5)
    running = await app.get(handle.uuid)
    assert running is not None and running.status == "process" and running.checkpoint_seq == 1
    assert running.checkpoint == {"next": 1}, running.checkpoint  # stored: {"next": 7}
    await app.wait(handle.uuid, timeout=10)


async def test_a_checkpointed_state_changed_afterwards_does_not_break_the_lease_loop(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpointed dict that later holds something not JSON (the task's own business) changes
    nothing stored, and the worker's lease renewals of its runs go on."""
    app = make_app()

    @app.task(echo=True)
    async def crunch(self: Any) -> Any:
        state: dict[str, Any] = {"next": 0}
        yield 0
        state["next"] = 1
        self.ctx.checkpoint(state)
        state["cache"] = object()  # the task's own business once checkpointed
        await asyncio.sleep(2.0)

    await app.start()
    handle = await app.add_task("crunch")
    await asyncio.sleep(1.6)  # three renewals
    assert "loop lease failed" not in caplog.text
    await app.wait(handle.uuid, timeout=10)
    assert app.worker is not None and app.worker.error is None


async def test_the_stream_of_a_run_resumed_exactly_once_starts_where_its_values_start(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that goes on from an earlier attempt's values says where those start: a stream of the
    task reads them without a false alarm ("missed seq") and a second read of the partition."""
    from tests.unit.test_exactly_once import EOS, committed_at_least, crash, register_counting, until

    name = unique()
    log = unique("log")
    a, b = make_app(name, log, **EOS), make_app(name, log, **EOS)
    register_counting(a)
    register_counting(b)
    await a.start()
    task = await a.add_task("gen", 30, 0.02)
    await until(committed_at_least(a, [task.uuid], 5), 20, "5 committed values")
    await crash(a)
    await b.start()
    final = await b.wait(task.uuid, 30)
    assert (final.status, final.attempt) == ("success", 2)
    caplog.clear()
    assert [v async for v in b.stream(task.uuid, timeout=10)] == list(range(30))
    assert "reading again" not in caplog.text, caplog.text


# -- cancel ------------------------------------------------------------------------------


async def test_a_cancel_that_says_true_stops_the_task(make_app: Any) -> None:
    """A cancel whose reason makes its control record too large for the workers to read is refused
    with the sizes, never said True and lost."""
    app = make_app(max_record_bytes=4000)

    @app.task
    async def slow() -> Any:
        for i in range(30):
            await asyncio.sleep(0.1)
            yield i

    await app.start()
    handle = await app.add_task("slow")
    async for _ in handle.stream(timeout=10):
        break  # it runs
    with pytest.raises(ValueError, match="over the limit of 4000"):
        await app.cancel(handle.uuid, "x" * 5000)
    assert await app.cancel(handle.uuid, "shorter")
    final = await app.wait(handle.uuid, timeout=10)
    assert (final.status, final.cancel_reason) == ("cancel", "shorter")


async def test_a_finished_task_the_view_dropped_still_streams(make_app: Any) -> None:
    """A finished task the bounded status view dropped streams as one it holds: it is read back
    from its status partition (as ``app.get`` does), for the dashboard, a resumed stream, a pipeline."""
    app = make_app(status_cache_size=5)

    @app.task
    async def count(n: int) -> Any:
        for i in range(n):
            yield i

    @app.task
    async def noop(i: int) -> int:
        return i

    await app.start()
    handle = await app.add_task("count", 3)
    await handle.wait(timeout=10)
    for i in range(12):  # enough finished tasks to push it out of the view's cache
        await app.add_task("noop", i, timeout=10)
    assert app.view.get(handle.uuid) is None  # dropped from the view ...
    found = await app.get(handle.uuid)
    assert found is not None and found.status == "success"  # ... and read back by get
    assert [v async for v in app.stream(handle.uuid, timeout=10)] == [0, 1, 2]


async def test_a_cancelled_sync_stage_stops_without_waiting_for_its_upstream_s_next_value(make_app: Any) -> None:
    """A sync pipeline stage waiting for its upstream's next value stops at once when cancelled,
    however long the upstream is quiet (it held its slot and its thread until the next value)."""
    app = make_app()

    @app.task
    async def upstream(pause: float) -> Any:
        yield 0
        await asyncio.sleep(pause)
        yield 1

    @app.task
    def stage(values: Stream[int]) -> Any:
        yield from values

    await app.start()
    up = await app.add_task("upstream", 20.0)
    down = await app.add_task("stage", up.uuid)
    async for _ in down.stream(timeout=10):
        break  # the stage is running and waits for the upstream's next value
    started = time.monotonic()
    assert await app.cancel(down.uuid, "stop the stage")
    try:
        final = await app.wait(down.uuid, timeout=5)
        assert final.status == "cancel"
        assert time.monotonic() - started < 5
    finally:
        await app.cancel(up.uuid, "cleanup")
