"""Chaining streams (``qtasks.Stream`` parameters), end to end, for every connector.

``tests/unit`` runs it on ``memory://`` and ``tests/integration`` on a real Kafka broker.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuid_mod
from collections.abc import Callable
from typing import Any

import pytest

from qtasks import Stream
from qtasks.asyncio import QueueTasks


def stages(app: QueueTasks, seen: dict[str, list[tuple[float, Any]]]) -> None:
    got_one = asyncio.Event()  # set by the second stage's first value

    @app.task
    async def numbers(n: int, pause: float = 0.05, fail_at: int = -1, hold: bool = False):
        for i in range(n):
            if i == fail_at:
                raise RuntimeError(f"numbers broke at {i}")
            if hold and i == n - 1:
                await got_one.wait()  # the last value only once the next stage has had one: live
            await asyncio.sleep(pause)
            seen.setdefault("numbers", []).append((time.time(), i))
            yield i

    @app.task
    async def squares(values: Stream[int]):
        async for n in values:
            seen.setdefault("squares", []).append((time.time(), n * n))
            got_one.set()
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
    first = await app.add_task("numbers", 8, hold=True)
    second = await app.add_task("squares", first.uuid)
    third = await app.add_task("total", second.uuid)
    also = await app.add_task("sync_total", second.uuid)  # a stream can have several readers
    done = await app.wait(third.uuid, timeout=60)
    assert done.status == "success" and done.returning == sum(i * i for i in range(8))
    assert (await app.wait(also.uuid, timeout=60)).returning == done.returning
    assert [v async for v in second.stream(timeout=20)] == [i * i for i in range(8)]
    # live: the first stage yields its last value only after the second stage had its first
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


# -- fan-out and fan-in: chords -----------------------------------------------------------------


def chord_tasks(app: QueueTasks, gate: asyncio.Event | None = None) -> None:
    @app.task(retry=1)
    async def square(x: int, fail: str = "") -> int:
        if gate is not None and x == 0:
            await gate.wait()
        if fail == "always" or (fail == "once" and not getattr(square, "failed", False)):
            square.failed = True  # type: ignore[attr-defined]
            raise ValueError(f"square of {x} failed")
        return x * x

    @app.task
    async def total(results: list[int], offset: int = 0) -> int:
        return sum(results) + offset


async def test_a_chords_callback_gets_every_result_in_order_once_the_last_ends(app: QueueTasks) -> None:
    gate = asyncio.Event()
    chord_tasks(app, gate)
    await app.start()
    callback = await app.chord("square", [(x,) for x in range(5)], "total", offset=100)
    assert len(callback.task.after) == 5 and callback.task.status == "new"
    other = await app.add_task("square", 7, timeout=20)  # the waiting callback holds no slot
    assert other is not None and other.returning == 49
    await asyncio.sleep(0.3)
    waiting = await app.get(callback.uuid)
    assert waiting is not None and waiting.status == "new"  # square(0) is held at the gate
    gate.set()
    done = await app.wait(callback.uuid, timeout=30)
    assert done.status == "success" and done.returning == 100 + sum(x * x for x in range(5))
    headers = [await app.get(uuid) for uuid in callback.task.after]
    assert all(h is not None and h.status == "success" and h.updated_at <= done.started_at for h in headers)


async def test_a_chords_callback_follows_retries_and_does_not_run_after_a_failure(app: QueueTasks) -> None:
    chord_tasks(app)
    await app.start()
    retried = await app.chord("square", [(2,), (3, "once")], "total")
    done = await app.wait(retried.uuid, timeout=30)
    assert done.status == "success" and done.returning == 4 + 9
    failed = await app.chord("square", [(2,), (3, "always")], "total")
    ended = await app.wait(failed.uuid, timeout=30)
    assert ended.status == "error" and ended.started_at == 0.0  # it never ran
    assert "ChordError: task" in (ended.traceback or "") and "ended as error: square of 3 failed" in (
        ended.traceback or ""
    )
    with pytest.raises(ValueError, match="at least one task"):
        await app.chord("square", [], "total")


async def test_a_chord_outlives_the_worker_that_held_its_callback(make_app: Callable[..., QueueTasks]) -> None:
    name = f"chord{time.time_ns()}"
    first = make_app(name)
    gate = asyncio.Event()
    chord_tasks(first, gate)
    await first.start()
    callback = await first.chord("square", [(0,), (1,)], "total")
    await asyncio.sleep(0.5)
    await first.stop(timeout=0.5)  # square(0) is handed back at the gate; the callback waits
    second = make_app(name)
    chord_tasks(second)
    await second.start()
    done = await second.wait(callback.uuid, timeout=60)
    assert done.status == "success" and done.returning == 1


async def test_a_stream_does_not_splice_a_retried_upstream_onto_its_failed_run(app: QueueTasks) -> None:
    """Found by review: the values of a failed run and of its retry came one after the other,
    so a stage that adds them up counted some twice."""
    from qtasks import UpstreamRetriedError

    runs: list[int] = []

    @app.task(retry=1)
    async def flaky_numbers():
        runs.append(1)
        yield 0
        yield 1
        if len(runs) == 1:
            raise RuntimeError("first run fails")
        yield 2

    @app.task
    async def careful(values: Stream[int]) -> dict[str, Any]:
        seen = []
        try:
            async for value in values:
                seen.append(value)
        except UpstreamRetriedError as exc:  # start again on the retry
            seen = [v async for v in Stream(exc.retried_as, app)]
        return {"sum": sum(seen), "values": seen}

    await app.start()
    first = await app.add_task("flaky_numbers")
    done = await app.add_task("careful", first.uuid, timeout=30)
    assert done is not None and done.status == "success" and done.returning == {"sum": 3, "values": [0, 1, 2]}


async def test_a_chords_callback_that_is_retried_gets_the_results_again(app: QueueTasks) -> None:
    """Found by review: the retry of a chord's callback lost the results (they were not in its record)."""
    calls: list[tuple[Any, ...]] = []

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task(retry=1)
    async def merge(results: list[int], tag: str) -> str:
        calls.append((results, tag))
        if len(calls) == 1:
            raise RuntimeError("fails once")
        return f"{tag}:{sum(results)}"

    await app.start()
    callback = await app.chord("add", [(1, 2), (5, 5)], "merge", "t")
    done = await app.wait(callback.uuid, timeout=30)
    assert done.status == "success" and done.returning == "t:13"
    assert calls == [([3, 10], "t"), ([3, 10], "t")]
