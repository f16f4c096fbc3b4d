"""Chaining streams (``qtasks.Stream`` parameters), end to end, for every connector.

``tests/unit`` runs it on ``memory://`` and ``tests/integration`` on a real Kafka broker.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuid_mod
from typing import Any

from qtasks import Stream
from qtasks.asyncio import QueueTasks


def stages(app: QueueTasks, seen: dict[str, list[tuple[float, Any]]]) -> None:
    @app.task
    async def numbers(n: int, pause: float = 0.05, fail_at: int = -1):
        for i in range(n):
            if i == fail_at:
                raise RuntimeError(f"numbers broke at {i}")
            await asyncio.sleep(pause)
            seen.setdefault("numbers", []).append((time.time(), i))
            yield i

    @app.task
    async def squares(values: Stream[int]):
        async for n in values:
            seen.setdefault("squares", []).append((time.time(), n * n))
            yield n * n

    @app.task
    async def total(values: Stream[int]) -> int:
        return sum([v async for v in values])

    @app.task
    def sync_total(values: Stream[int]) -> int:  # a sync task reads it with a plain for
        return sum(v for v in values)


async def test_three_stages_stream_through_each_other_live(app: QueueTasks) -> None:
    seen: dict[str, list[tuple[float, Any]]] = {}
    stages(app, seen)
    await app.start()
    first = await app.add_task("numbers", 8)
    second = await app.add_task("squares", first.uuid)
    third = await app.add_task("total", second.uuid)
    also = await app.add_task("sync_total", second.uuid)  # a stream can have several readers
    done = await app.wait(third.uuid, timeout=60)
    assert done.status == "success" and done.returning == sum(i * i for i in range(8))
    assert (await app.wait(also.uuid, timeout=60)).returning == done.returning
    assert [v async for v in second.stream(timeout=20)] == [i * i for i in range(8)]
    # live: the second stage had its first value before the first stage yielded its last
    assert seen["squares"][0][0] < seen["numbers"][-1][0]


async def test_an_upstream_error_reaches_the_stages_after_it(app: QueueTasks) -> None:
    seen: dict[str, list[tuple[float, Any]]] = {}
    stages(app, seen)
    await app.start()
    first = await app.add_task("numbers", 8, 0.01, 3)
    second = await app.add_task("squares", first.uuid)
    third = await app.add_task("total", second.uuid)
    failed = await app.wait(second.uuid, timeout=60)
    assert failed.status == "error" and failed.yield_count == 3  # the values before the error went through
    assert f"UpstreamFailedError: upstream task {first.uuid} ended as error" in (failed.traceback or "")
    assert "numbers broke at 3" in (failed.traceback or "")
    last = await app.wait(third.uuid, timeout=60)
    assert last.status == "error" and f"upstream task {second.uuid} ended as error" in (last.traceback or "")


async def test_an_upstream_cancel_cancels_the_stage_after_it_but_not_the_other_way(app: QueueTasks) -> None:
    seen: dict[str, list[tuple[float, Any]]] = {}
    stages(app, seen)
    await app.start()
    first = await app.add_task("numbers", 200, 0.05)
    second = await app.add_task("squares", first.uuid)
    reader = await app.add_task("total", first.uuid)
    await app.view.wait_for(second.uuid, lambda h: h is not None and h.status == "process", 20)
    assert await app.cancel(reader.uuid, "reader gone")  # a downstream cancel leaves the upstream running
    assert (await app.wait(reader.uuid, timeout=20)).status == "cancel"
    upstream = await app.get(first.uuid)
    assert upstream is not None and upstream.status in ("new", "process")
    assert await app.cancel(first.uuid, "stop the pipeline")
    cancelled = await app.wait(second.uuid, timeout=30)
    assert cancelled.status == "cancel"
    assert cancelled.cancel_reason == f"upstream task {first.uuid} was cancelled: stop the pipeline"


async def test_a_stream_parameter_takes_a_known_task_uuid(app: QueueTasks) -> None:
    seen: dict[str, list[tuple[float, Any]]] = {}
    stages(app, seen)
    await app.start()
    wrong = await app.add_task("total", 5, timeout=20)
    assert wrong is not None and wrong.status == "error"
    assert "parameter 'values' is a qtasks.Stream and takes an upstream task's uuid" in (wrong.traceback or "")
    for missing in (str(uuid_mod.uuid4()), "not a task"):
        unknown = await app.add_task("total", missing, timeout=20)
        assert unknown is not None and unknown.status == "error"
        assert f"TaskNotFoundError: no task {missing} is known" in (unknown.traceback or "")
