"""The engine's behaviour, end to end through the asyncio app.

One suite for every connector: ``tests/unit`` runs it on ``memory://``, and
``tests/integration`` on a real Apache Kafka broker (the ``broker_url`` fixture).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

import msgspec
import pytest

import qtasks
from qtasks import StreamItem, _state
from qtasks.asyncio import QueueTasks
from qtasks.connectors import TopicPartition
from qtasks.context import AsyncContext, SyncContext
from qtasks.exc import TaskCancelError, TaskFailedError, TaskNotFoundError
from qtasks.logs import Logger
from qtasks.partitioner import partition_for
from qtasks.records import decode_status, encode


async def until_running(app: QueueTasks, uuid: str) -> None:
    """Wait until the task's status is ``process``."""
    await app.view.wait_for(uuid, lambda head: head is not None and head.status == "process", 20)


# -- the main path ------------------------------------------------------------------


async def test_generator_values_stream_in_order_and_returning_lists_them(app: QueueTasks) -> None:
    @app.task(generate_handler=lambda v: v * 10)
    async def count(n: int):
        for i in range(n):
            yield i

    await app.start()
    task = await app.add_task("count", 5)
    assert task is not None and task.status == "new"
    values = [v async for v in app.stream(task.uuid)]
    assert values == [0, 10, 20, 30, 40]
    done = await app.get(task.uuid)
    assert done is not None
    assert done.status == "success"
    assert done.returning == [0, 10, 20, 30, 40]
    assert done.yield_count == 5
    assert done.attempt == 1


async def test_each_value_reaches_the_stream_while_the_task_still_runs(app: QueueTasks) -> None:
    gate = asyncio.Event()

    @app.task
    async def gated():
        yield "first"
        await gate.wait()
        yield "second"

    await app.start()
    task = await app.add_task("gated")
    stream = app.stream(task.uuid)
    first = await asyncio.wait_for(stream.__anext__(), 10)
    assert first == "first"
    current = await app.get(task.uuid)
    assert current is not None and current.status == "process"
    gate.set()
    assert [v async for v in stream] == ["second"]


async def test_add_task_with_timeout_returns_the_finished_task(app: QueueTasks) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    await app.start()
    done = await app.add_task("add", 2, b=3, timeout=10)
    assert done is not None
    assert (done.status, done.returning, done.args, done.kwargs) == ("success", 5, [2], {"b": 3})


async def test_add_task_timeout_that_runs_out_returns_none(app: QueueTasks) -> None:
    @app.task
    async def slow() -> None:
        await asyncio.sleep(60)

    await app.start()
    # The timeout covers the submission too (BrokerUnavailableError if even that does not fit):
    # 3 s is room for two durable writes on a loaded machine, and far from the task's end.
    started = time.monotonic()
    assert await app.add_task("slow", timeout=3.0) is None
    assert 3.0 <= time.monotonic() - started < 10.0


async def test_get_of_an_unknown_uuid_is_none(app: QueueTasks) -> None:
    await app.start()
    assert await app.get("00000000-0000-0000-0000-000000000000") is None


async def test_sync_function_and_sync_generator_run_in_threads(app: QueueTasks) -> None:
    threads: list[str] = []

    @app.task
    def blocking(x: int) -> int:
        threads.append(threading.current_thread().name)
        time.sleep(0.05)
        return x * 2

    @app.task(generate_handler=str)
    def lines(n: int):
        threads.append(threading.current_thread().name)
        yield from range(n)

    await app.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    running = asyncio.create_task(ticker())
    done = await app.add_task("blocking", 21, timeout=10)
    running.cancel()
    assert done is not None and done.returning == 42
    assert ticks >= 3, "the event loop was blocked while the sync task ran"
    gen = await app.add_task("lines", 3)
    assert [v async for v in app.stream(gen.uuid)] == ["0", "1", "2"]
    assert all(name.startswith("qtasks-task") for name in threads)


async def test_async_generate_handler_is_awaited(app: QueueTasks) -> None:
    async def handler(v: int) -> dict[str, int]:
        await asyncio.sleep(0)
        return {"v": v}

    @app.task(generate_handler=handler)
    def gen():
        yield 1
        yield 2

    await app.start()
    task = await app.add_task("gen")
    assert [v async for v in app.stream(task.uuid)] == [{"v": 1}, {"v": 2}]


async def test_values_yielded_before_an_error_stay_readable(app: QueueTasks) -> None:
    @app.task
    async def breaks():
        yield 1
        yield 2
        raise ValueError("boom")

    await app.start()
    task = await app.add_task("breaks")
    assert [v async for v in app.stream(task.uuid)] == [1, 2]
    done = await app.wait(task.uuid, 10)
    assert done.status == "error"
    assert done.returning == [1, 2]
    assert done.traceback is not None and "ValueError: boom" in done.traceback


async def test_returning_keeps_the_count_past_the_bound(make_app: Any) -> None:
    app = make_app(returning_max_items=3)

    @app.task
    async def many():
        for i in range(10):
            yield i

    await app.start()
    task = await app.add_task("many")
    assert [v async for v in app.stream(task.uuid)] == list(range(10))
    done = await app.wait(task.uuid, 10)
    assert (done.returning, done.returning_truncated, done.yield_count) == (10, True, 10)


# -- bad input ----------------------------------------------------------------------


async def test_unknown_task_ends_as_error_and_the_worker_keeps_serving(app: QueueTasks) -> None:
    @app.task
    async def ok() -> str:
        return "ok"

    await app.start()
    bad = await app.add_task("no_such_task", timeout=10)
    assert bad is not None and bad.status == "error"
    assert "unknown task 'no_such_task'" in (bad.traceback or "")
    assert "ok" in (bad.traceback or "")
    good = await app.add_task("ok", timeout=10)
    assert good is not None and good.returning == "ok"


async def test_wrong_arguments_end_as_error_with_a_readable_message(app: QueueTasks) -> None:
    @app.task
    async def needs(a: int) -> int:
        return a

    await app.start()
    done = await app.add_task("needs", 1, 2, 3, timeout=10)
    assert done is not None and done.status == "error"
    assert "wrong arguments for task 'needs'" in (done.traceback or "")
    assert (await app.add_task("needs", 7, timeout=10)).returning == 7  # type: ignore[union-attr]


async def test_unencodable_yield_is_an_error_not_a_crash(app: QueueTasks) -> None:
    @app.task
    async def odd():
        yield 1
        yield object()

    await app.start()
    task = await app.add_task("odd")
    assert [v async for v in app.stream(task.uuid)] == [1]
    done = await app.wait(task.uuid, 10)
    assert done.status == "error" and "cannot be encoded as JSON" in (done.traceback or "")


async def test_unencodable_arguments_are_refused_at_submit(app: QueueTasks) -> None:
    @app.task
    async def noop(x: Any) -> None:
        return None

    with pytest.raises(TypeError, match="task arguments must be"):
        await app.add_task("noop", object())


# -- cancellation -------------------------------------------------------------------


async def test_ctx_cancel_ends_as_cancel_with_reason_and_is_not_retried(app: QueueTasks) -> None:
    @app.task(echo=True, retry=3)
    async def stopper(self):
        yield 1
        self.ctx.cancel("too far")
        yield 2

    await app.start()
    task = await app.add_task("stopper")
    assert [v async for v in app.stream(task.uuid)] == [1]
    done = await app.wait(task.uuid, 10)
    assert (done.status, done.cancel_reason, done.retry_child_uuid) == ("cancel", "too far", None)


async def test_ctx_cancel_default_reason_names_the_task(app: QueueTasks) -> None:
    @app.task(echo=True)
    def quitter(self) -> None:
        self.ctx.cancel()

    await app.start()
    done = await app.add_task("quitter", timeout=10)
    assert done is not None and (done.status, done.cancel_reason) == ("cancel", "quitter.cancel")


@pytest.mark.parametrize("kind", ["async_gen", "sync_gen", "async_sleep", "sync_sleep"])
async def test_app_cancel_stops_a_running_task(app: QueueTasks, kind: str) -> None:
    started = threading.Event()

    @app.task(echo=True, name="async_gen")
    async def a_gen(self):
        i = 0
        while True:
            started.set()
            yield i
            i += 1
            await asyncio.sleep(0.01)

    @app.task(echo=True, name="sync_gen")
    def s_gen(self):
        i = 0
        while True:
            started.set()
            yield i
            i += 1
            time.sleep(0.01)

    @app.task(echo=True, name="async_sleep")
    async def a_sleep(self):
        started.set()
        await self.ctx.sleep(30)

    @app.task(echo=True, name="sync_sleep")
    def s_sleep(self):
        started.set()
        self.ctx.sleep(30)

    await app.start()
    task = await app.add_task(kind)
    await until_running(app, task.uuid)
    assert await asyncio.to_thread(started.wait, 10)
    assert await app.cancel(task.uuid, "user said stop") is True
    done = await app.wait(task.uuid, 10)
    assert (done.status, done.cancel_reason) == ("cancel", "user said stop")
    assert await app.cancel(task.uuid) is False


async def test_app_cancel_of_a_queued_task_means_it_never_runs(make_app: Any) -> None:
    app = make_app(concurrency=1)
    ran: list[int] = []
    gate = asyncio.Event()

    @app.task
    async def hold() -> None:
        await gate.wait()

    @app.task
    async def mark(i: int) -> None:
        ran.append(i)

    await app.start()
    await app.add_task("hold")
    queued = await app.add_task("mark", 1)
    assert await app.cancel(queued.uuid, "not needed") is True
    gate.set()
    done = await app.wait(queued.uuid, 10)
    assert (done.status, done.cancel_reason) == ("cancel", "not needed")
    after = await app.add_task("mark", 2, timeout=10)
    assert after is not None and after.status == "success"
    assert ran == [2]


# -- retry and time limits ----------------------------------------------------------


class Flaky(Exception):
    pass


class VeryFlaky(Flaky):
    pass


async def test_retry_builds_a_chain_and_retries_subclasses(app: QueueTasks) -> None:
    calls: list[int] = []

    @app.task(retry=3, retry_on_exc=[Flaky])
    async def sometimes() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise VeryFlaky(f"call {len(calls)}")
        return "finally"

    await app.start()
    first = await app.add_task("sometimes")
    final = await app.wait(first.uuid, 20)
    assert final.status == "success" and final.returning == "finally"
    assert len(calls) == 3
    parent = await app.get(first.uuid)
    assert parent is not None and parent.status == "retry"
    assert parent.retry_child_uuid is not None
    child = await app.get(parent.retry_child_uuid)
    assert child is not None and child.retry_parent_uuid == first.uuid
    assert final.retry_parent_uuid == child.uuid


async def test_exceptions_outside_retry_on_exc_are_not_retried(app: QueueTasks) -> None:
    @app.task(retry=3, retry_on_exc=[Flaky])
    async def wrong() -> None:
        raise KeyError("nope")

    await app.start()
    done = await app.add_task("wrong", timeout=10)
    assert done is not None and done.status == "error" and done.retry_child_uuid is None


async def test_stream_of_a_retried_generator_goes_on_with_the_retry_unspliced(app: QueueTasks) -> None:
    """A retry is a new task: its values follow the failed run's whole, never mixed into them."""
    attempts: list[int] = []

    @app.task(retry=2)
    async def redo():
        attempts.append(1)
        for i in range(5):
            yield i
            if i == 2 and len(attempts) == 1:
                raise RuntimeError("first run fails")

    await app.start()
    task = await app.add_task("redo")
    assert [v async for v in app.stream(task.uuid, timeout=30)] == [0, 1, 2, 0, 1, 2, 3, 4]
    final = await app.wait(task.uuid, 10)
    assert final.status == "success" and len(attempts) == 2


async def test_a_task_handle_gives_the_result_the_stream_the_status_and_cancel(app: QueueTasks) -> None:
    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def gen(n: int):
        for i in range(n):
            yield i

    @app.task
    async def forever():
        while True:
            await asyncio.sleep(0.01)
            yield None

    await app.start()
    handle = await app.add_task("add", 2, 3)
    # The submitted task's fields, as QTasks' add_task returns them.
    assert (handle.status, handle.task_name, handle.args) == ("new", "add", [2, 3])
    assert handle.task.uuid == handle.uuid
    assert await handle.result(timeout=10) == 5
    latest = await handle.get()
    assert latest is not None and latest.status == "success"

    streaming = await app.add_task("gen", 3)
    assert [v async for v in streaming.stream(timeout=10)] == [0, 1, 2]
    assert await streaming.result(timeout=10) == [0, 1, 2]

    running = await app.add_task("forever")
    await app.view.wait_for(running.uuid, lambda h: h is not None and h.status == "process", 10)
    assert await running.cancel("enough")
    with pytest.raises(TaskCancelError, match="enough"):
        await running.result(timeout=10)
    assert (await running.wait(10)).status == "cancel"
    with pytest.raises(TimeoutError):
        await (await app.add_task("forever")).result(timeout=0.2)


async def test_a_failed_task_s_result_raises_the_remote_error_after_its_retries(app: QueueTasks) -> None:
    runs: list[int] = []

    @app.task(retry=1)
    async def broken(x: int) -> int:
        runs.append(x)
        raise ValueError(f"bad value {x}")

    await app.start()
    handle = await app.add_task("broken", 7)
    with pytest.raises(TaskFailedError) as info:
        await handle.result(timeout=20)
    error = info.value
    assert runs == [7, 7]  # the first run and its retry
    assert (error.remote_type, error.remote_message) == ("ValueError", "bad value 7")
    assert "raise ValueError" in error.remote_traceback
    assert error.task.uuid != handle.uuid and error.task.retry_parent_uuid == handle.uuid  # the retry's
    assert "failed: ValueError: bad value 7" in str(error) and "Remote traceback" in str(error)


async def test_stream_with_meta_gives_seq_attempt_and_marks_the_retry(app: QueueTasks) -> None:
    attempts: list[int] = []

    @app.task(retry=2)
    async def redo():
        attempts.append(1)
        for i in range(5):
            yield i * 10
            if i == 2 and len(attempts) == 1:
                raise RuntimeError("first run fails")

    await app.start()
    task = await app.add_task("redo")
    items = [item async for item in app.stream(task.uuid, timeout=30, meta=True)]
    final = await app.wait(task.uuid, 10)
    child = final.uuid
    assert child != task.uuid
    assert items == [
        StreamItem(uuid=task.uuid, seq=0, attempt=1, value=0),
        StreamItem(uuid=task.uuid, seq=1, attempt=1, value=10),
        StreamItem(uuid=task.uuid, seq=2, attempt=1, value=20),
        StreamItem(uuid=task.uuid, seq=3, attempt=1, retried_as=child),
        *(StreamItem(uuid=child, seq=i, attempt=1, value=i * 10) for i in range(5)),
    ]
    # Resuming after the last item seen: from the retry's own uuid and seq.
    assert [v async for v in app.stream(child, timeout=30, from_seq=3)] == [30, 40]
    # From the first task: its values from seq 2, then the whole retry.
    assert [v async for v in app.stream(task.uuid, timeout=30, from_seq=2)] == [20, 0, 10, 20, 30, 40]


async def test_a_stream_resumes_live_from_a_seq(app: QueueTasks) -> None:
    gate = asyncio.Event()

    @app.task
    async def ticks(n: int):
        for i in range(n):
            if i == 3:
                await gate.wait()
            yield i

    await app.start()
    task = await app.add_task("ticks", 6)
    seen = []
    async for item in app.stream(task.uuid, timeout=30, meta=True):
        seen.append(item.seq)
        if item.seq == 2:
            break  # the browser went away after seq 2 (its Last-Event-ID)
    gate.set()
    assert seen == [0, 1, 2]
    assert [v async for v in app.stream(task.uuid, timeout=30, from_seq=3)] == [3, 4, 5]
    # Past the end: nothing, and the stream still ends with the task.
    assert [v async for v in app.stream(task.uuid, timeout=30, from_seq=6)] == []
    with pytest.raises(ValueError, match="from_seq must be an int of 0 or more"):
        app.stream(task.uuid, from_seq=-1)


@pytest.mark.parametrize("kind", ["async", "async_gen", "sync", "sync_gen"])
async def test_max_time_is_enforced_for_every_kind(app: QueueTasks, kind: str) -> None:
    @app.task(name="async", max_time=0.3)
    async def a() -> None:
        await asyncio.sleep(10)

    @app.task(name="async_gen", max_time=0.3)
    async def ag():
        while True:
            yield 1
            await asyncio.sleep(0.05)

    @app.task(name="sync", max_time=0.3)
    def s() -> None:
        time.sleep(1)

    @app.task(name="sync_gen", max_time=0.3)
    def sg():
        while True:
            yield 1
            time.sleep(0.05)

    await app.start()
    started = time.monotonic()
    done = await app.add_task(kind, timeout=10)
    assert done is not None and done.status == "error"
    assert "max_time" in (done.traceback or "")
    assert time.monotonic() - started < 5


# -- the context --------------------------------------------------------------------


async def test_async_context_api(app: QueueTasks) -> None:
    seen: dict[str, Any] = {}

    @app.task(echo=True, name="ctx_async", generate_handler=str)
    async def probe(task_object):
        ctx = task_object.ctx
        seen["type"] = type(ctx)
        seen["names"] = (ctx.task_name, ctx.task_uuid, ctx.generate_handler)
        seen["logger"] = (ctx.get_logger(), ctx.get_logger("custom"))
        seen["config"] = ctx.get_config()
        first = await ctx.get_metadata()
        seen["meta"] = first
        seen["cached"] = await ctx.get_metadata() is first
        seen["fresh"] = await ctx.get_metadata(cache=False) is not first
        seen["task"] = await ctx.get_task(ctx.task_uuid)
        seen["components"] = {n: ctx.get_component(n) for n in ("broker", "worker", "config", "plugins", "nope")}
        await ctx.sleep(0.01)
        yield 1

    await app.start()
    task = await app.add_task("ctx_async")
    done = await app.wait(task.uuid, 10)
    assert done.status == "success", done.traceback
    assert seen["type"] is AsyncContext
    assert seen["names"] == ("ctx_async", task.uuid, str)
    default, custom = seen["logger"]
    assert isinstance(default, Logger) and default.name == "ctx_async" and custom.name == "custom"
    assert seen["config"] is app.config
    assert seen["meta"].status == "process" and seen["meta"].uuid == task.uuid
    assert seen["cached"] and seen["fresh"]
    assert seen["task"].uuid == task.uuid
    assert seen["components"] == {
        "broker": app.broker,
        "worker": app.worker,
        "config": app.config,
        "plugins": app.plugins,
        "nope": None,
    }


async def test_sync_context_api(app: QueueTasks) -> None:
    seen: dict[str, Any] = {}

    @app.task(echo=True)
    def ctx_sync(self, x: int):
        seen["type"] = type(self.ctx)
        seen["meta"] = self.ctx.get_metadata()
        seen["task"] = self.ctx.get_task(self.ctx.task_uuid)
        started = time.monotonic()
        self.ctx.sleep(0.05)
        seen["slept"] = time.monotonic() - started
        seen["logger"] = self.ctx.get_logger().name
        yield from range(x)

    await app.start()
    task = await app.add_task("ctx_sync", 2)
    assert [v async for v in app.stream(task.uuid)] == [0, 1]
    assert seen["type"] is SyncContext
    assert seen["meta"].status == "process"
    assert seen["task"].uuid == task.uuid
    assert seen["slept"] >= 0.05
    assert seen["logger"] == "ctx_sync"


async def test_get_metadata_with_cache_calls_app_get_once(app: QueueTasks) -> None:
    calls: list[str] = []
    original = app.get

    async def counting_get(uuid: Any) -> Any:
        calls.append(str(uuid))
        return await original(uuid)

    app.get = counting_get  # type: ignore[method-assign]

    @app.task(echo=True)
    async def meta(self) -> None:
        await self.ctx.get_metadata()
        await self.ctx.get_metadata()
        await self.ctx.get_metadata(cache=False)

    await app.start()
    task = await app.add_task("meta")
    done = await app.wait(task.uuid, 10)
    assert done.status == "success", done.traceback
    assert calls.count(task.uuid) == 2


async def test_context_outside_a_worker_uses_the_last_app(app: QueueTasks) -> None:
    ctx = AsyncContext(task_name=None)
    assert _state.app_main is app
    assert ctx.get_config() is app.config
    assert ctx.get_logger().name == "AsyncContext"
    assert SyncContext().get_logger().name == "SyncContext"
    with pytest.raises(TaskCancelError, match="x"):
        ctx.cancel("x")


# -- plugins and events -------------------------------------------------------------


async def test_plugin_error_trigger_can_turn_the_task_into_a_success(app: QueueTasks) -> None:
    class Rescue:
        def __init__(self) -> None:
            self.started = self.stopped = False
            self.kwargs: dict[str, Any] = {}

        async def start(self) -> None:
            self.started = True

        def stop(self) -> None:
            self.stopped = True

        def trigger(self, name: str, **kwargs: Any) -> dict[str, Any] | None:
            self.kwargs = kwargs
            return {"result": {"rescued": kwargs["e"].kwargs}}

    plugin = Rescue()
    app.add_plugin(plugin, trigger_names=["task_executor_run_task_trigger_error"])

    @app.task(echo=True)
    async def needs_help(self) -> None:
        self.ctx.plugin_error(code=7)

    await app.start()
    assert plugin.started
    done = await app.add_task("needs_help", timeout=10)
    assert done is not None and (done.status, done.returning) == ("success", {"rescued": {"code": 7}})
    assert plugin.kwargs["task_func"].name == "needs_help"
    await app.stop()
    assert plugin.stopped


async def test_plugin_error_without_a_plugin_is_an_error(app: QueueTasks) -> None:
    @app.task(echo=True)
    def lonely(self) -> None:
        self.ctx.plugin_error(why="nobody listens")

    await app.start()
    done = await app.add_task("lonely", timeout=10)
    assert done is not None and done.status == "error"
    assert "TaskPluginTriggerError" in (done.traceback or "")


async def test_every_event_fires(app: QueueTasks) -> None:
    fired: list[str] = []
    for name in (
        "starting",
        "stopping",
        "worker_running",
        "worker_stopping",
        "task_running",
        "task_stopping",
        "task_success",
        "task_error",
        "task_cancel",
    ):

        async def handler(name: str = name, **_: Any) -> None:
            fired.append(name)

        getattr(app.events.on, name)()(handler)

    @app.task
    async def good() -> int:
        return 1

    @app.task
    def bad() -> None:
        raise ValueError

    @app.task(echo=True)
    def gives_up(self) -> None:
        self.ctx.cancel()

    await app.start()
    for name in ("good", "bad", "gives_up"):
        await app.add_task(name, timeout=10)
    await app.stop()
    assert set(fired) == {
        "starting",
        "stopping",
        "worker_running",
        "worker_stopping",
        "task_running",
        "task_stopping",
        "task_success",
        "task_error",
        "task_cancel",
    }


# -- the worker ---------------------------------------------------------------------


async def test_concurrency_limit_holds(make_app: Any) -> None:
    app = make_app(concurrency=3)
    running = 0
    peak = 0

    @app.task
    async def busy() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    await app.start()
    tasks = [await app.add_task("busy") for _ in range(12)]
    for task in tasks:
        assert (await app.wait(task.uuid, 20)).status == "success"
    assert peak == 3


async def test_client_without_a_worker_sees_what_a_worker_app_does(make_app: Any) -> None:
    name = make_app().name
    worker_app = make_app(name)
    client_app = make_app(name)

    @worker_app.task
    async def gen(n: int):
        for i in range(n):
            yield i

    await worker_app.start()
    task = await client_app.add_task("gen", 4)
    assert [v async for v in client_app.stream(task.uuid)] == [0, 1, 2, 3]
    done = await client_app.wait(task.uuid, 10)
    assert done.status == "success" and done.returning == [0, 1, 2, 3]


async def test_graceful_stop_lets_running_tasks_finish(app: QueueTasks) -> None:
    @app.task
    async def short() -> str:
        await asyncio.sleep(0.3)
        return "done"

    await app.start()
    task = await app.add_task("short")
    await until_running(app, task.uuid)
    await app.stop(timeout=5)
    assert app.worker is not None and app.worker.tasks_done == 1


async def test_bad_records_go_to_the_dead_letter_topic_and_the_worker_goes_on(make_app: Any) -> None:
    from qtasks.connectors import TopicPartition
    from qtasks.records import decode_dead_letter

    app = make_app(max_record_bytes=10_000)

    @app.task
    async def fine() -> str:
        return "fine"

    await app.start()
    send = app.broker.producer.send
    bad = {
        b"{not json": "not valid JSON",
        b'{"uuid": "bad-types", "task_name": 5, "created_at": 0}': "wrong shape",
        b'{"uuid": "x", "task_name": "fine", "created_at": 0, "args": [' + b"1," * 6000 + b"1]}": "over the limit",
        b'{"v": 2, "uuid": "from-a-newer-qtasks", "task_name": "fine", "created_at": 0}': "written by a newer qtasks",
        b'{"uuid": "due-far-later", "task_name": "fine", "created_at": 0, "not_before": 1e15}': "year 5138",
    }
    for raw in bad:
        sent = await send(app.topics.tasks, raw, key=b"bad", partition=0)
        if sent is not None:
            await sent
    done = await app.add_task("fine", timeout=20)
    assert done is not None and done.returning == "fine"

    reader = app.broker.consumer(None)
    await reader.start()
    try:
        tp = TopicPartition(app.topics.dlq, 0)
        reader.assign([tp])
        await reader.seek_to_beginning([tp])
        letters = []
        deadline = time.monotonic() + 20
        while len(letters) < len(bad) and time.monotonic() < deadline:
            letters += [decode_dead_letter(r.value) for r in await reader.getmany(0.5)]
    finally:
        await reader.stop()
    assert sorted(letter.value for letter in letters) == sorted(raw[:5000] for raw in bad)
    for letter in letters:
        expected = next(reason for raw, reason in bad.items() if raw.startswith(letter.value or b""))
        assert expected in letter.reason
        assert letter.topic == app.topics.tasks and letter.partition == 0
    status = await app.get("bad-types")
    assert status is not None and status.status == "error" and "wrong shape" in (status.traceback or "")
    newer = await app.get("from-a-newer-qtasks")  # not run by guess: ended, saying why
    assert newer is not None and newer.status == "error" and "upgrade the workers" in (newer.traceback or "")


async def test_duplicate_task_names_are_refused(app: QueueTasks) -> None:
    @app.task(name="same")
    async def one() -> None: ...

    with pytest.raises(ValueError, match="already registered"):

        @app.task(name="same")
        async def two() -> None: ...


async def test_a_result_that_cannot_be_stored_is_an_error(make_app: Any) -> None:
    app = make_app(returning_max_bytes=1000)

    @app.task
    async def odd_result() -> object:
        return object()

    @app.task
    async def huge_result() -> str:
        return "x" * 5000

    await app.start()
    odd = await app.add_task("odd_result", timeout=10)
    assert odd is not None and odd.status == "error" and "cannot be encoded as JSON" in (odd.traceback or "")
    huge = await app.add_task("huge_result", timeout=10)
    assert huge is not None and huge.status == "error" and "over returning_max_bytes" in (huge.traceback or "")


async def test_a_failing_worker_plugin_does_not_leave_tasks_unfinished(app: QueueTasks) -> None:
    class Broken:
        def trigger(self, name: str, **kwargs: Any) -> None:
            raise RuntimeError("plugin bug")

    app.add_plugin(Broken(), trigger_names=["worker_execute_before", "worker_execute_after"])

    @app.task
    async def fine() -> int:
        return 3

    await app.start()
    done = await app.add_task("fine", timeout=10)
    assert done is not None and (done.status, done.returning) == ("success", 3)


async def test_waiting_tasks_start_in_priority_order(make_app: Any) -> None:
    app = make_app(concurrency=1, prefetch=10)
    gate = asyncio.Event()
    order: list[int] = []

    @app.task
    async def hold() -> None:
        await gate.wait()

    @app.task
    async def mark(i: int) -> None:
        order.append(i)

    await app.start()
    first = await app.add_task("hold")
    await until_running(app, first.uuid)
    queued = [await app.add_task("mark", p, priority=p) for p in (5, 1, 3)]
    worker = app.worker
    assert worker is not None
    for _ in range(200):  # until the worker has fetched all three into its backlog
        if len(worker._backlog) == 3:
            break
        await asyncio.sleep(0.05)
    assert len(worker._backlog) == 3
    gate.set()
    for task in queued:
        await app.wait(task.uuid, 10)
    assert order == [1, 3, 5]


async def test_errors_a_task_raises_itself_are_reported_as_they_are(app: QueueTasks) -> None:
    @app.task
    async def own_timeout() -> None:
        raise TimeoutError("the service did not answer")

    @app.task(max_time=30)
    async def own_cancelled() -> None:
        sub = asyncio.create_task(asyncio.sleep(10))
        sub.cancel()
        await sub

    await app.start()
    timed = await app.add_task("own_timeout", timeout=10)
    assert timed is not None and timed.status == "error"
    assert "the service did not answer" in (timed.traceback or "") and "max_time" not in (timed.traceback or "")
    cancelled = await app.add_task("own_cancelled", timeout=10)
    assert cancelled is not None and cancelled.status == "error" and "CancelledError" in (cancelled.traceback or "")
    # The worker still serves, and nothing was left uncommitted behind these tasks.
    again = await app.add_task("own_timeout", timeout=10)
    assert again is not None and again.status == "error"


async def test_a_status_too_large_for_one_record_keeps_its_arguments_out(make_app: Any) -> None:
    app = make_app()

    @app.task
    async def summarize(text: str) -> str:
        return text[:200_000]

    await app.start()
    big = "x" * 800_000
    done = await app.add_task("summarize", big, timeout=30)
    assert done is not None and done.status == "success" and len(done.returning) == 200_000
    assert done.args == []  # the arguments stay in the task record; the status had no room for them
    other = make_app(app.name)
    seen = await other.get(done.uuid)
    assert seen is not None and seen.status == "success"


async def test_a_stream_that_starts_too_late_reads_again_and_misses_nothing(app: QueueTasks) -> None:
    @app.task
    async def gen(n: int):
        for i in range(n):
            yield i

    await app.start()
    warmup = await app.add_task("gen", 30, timeout=20)
    assert warmup is not None and warmup.status == "success"
    producer = app.broker.producer
    known_end = producer.known_end
    # A worker that records a start offset past the task's first result.
    producer.known_end = lambda topic, partition: (known_end(topic, partition) or 0) + 3  # type: ignore[method-assign]
    try:
        task = await app.add_task("gen", 10)
        assert [v async for v in app.stream(task.uuid, timeout=30)] == list(range(10))
        done = await app.add_task("gen", 4, timeout=20)
        assert done is not None
        assert [v async for v in app.stream(done.uuid, timeout=30)] == [0, 1, 2, 3]
    finally:
        producer.known_end = known_end  # type: ignore[method-assign]


async def test_streaming_an_unknown_task_is_a_clear_error(app: QueueTasks) -> None:
    from qtasks.exc import TaskNotFoundError

    await app.start()
    # The error comes as soon as the lookup has read the task's status partition: the timeout
    # only bounds that read (a broker's answer, which a loaded machine took over 0.5 s to give).
    with pytest.raises(TaskNotFoundError, match="no task"):
        [v async for v in app.stream("00000000-0000-0000-0000-000000000000", timeout=30)]


# -- hardening: read-your-writes, retries without slots, limits, lifecycle ----------


async def test_another_process_sees_a_task_the_moment_it_was_submitted(make_app: Any) -> None:
    """get and cancel from a second, already connected client never answer from a stale view."""
    worker_app = make_app()

    @worker_app.task
    async def slow() -> None:
        await asyncio.sleep(30)

    submitter = make_app(worker_app.name)
    other = make_app(worker_app.name)
    await other.get("00000000-0000-0000-0000-000000000000")  # connected before the submits
    for _ in range(20):
        task = await submitter.add_task("slow")
        seen = await other.get(task.uuid)
        assert seen is not None and seen.status == "new"
        assert await other.cancel(task.uuid, "changed my mind") is True
    await worker_app.start()
    done = await worker_app.wait(task.uuid, 20)
    assert (done.status, done.cancel_reason) == ("cancel", "changed my mind")


async def test_a_retry_backoff_holds_no_slot_and_cancel_reaches_the_chain(make_app: Any) -> None:
    app = make_app(concurrency=1, retry_backoff_base=2.0, retry_backoff_max=2.0)
    runs: list[str] = []

    @app.task(retry=3)
    async def failing() -> None:
        runs.append("failing")
        raise RuntimeError("try again later")

    @app.task
    async def quick() -> str:
        return "done"

    await app.start()
    first = await app.add_task("failing")
    parent = await app.view.wait_for(first.uuid, lambda h: h is not None and h.status == "retry", 10)
    assert parent is not None and parent.retry_child_uuid is not None
    # The only slot is free during the backoff (1-2 s): a quick task runs at once.
    started = time.monotonic()
    other = await app.add_task("quick", timeout=10)
    assert other is not None and other.status == "success"
    assert time.monotonic() - started < 0.9
    # Cancelling the original task cancels the retry it handed over to.
    assert await app.cancel(first.uuid, "enough") is True
    final = await app.wait(first.uuid, 10)
    assert (final.uuid, final.status, final.cancel_reason) == (parent.retry_child_uuid, "cancel", "enough")
    await asyncio.sleep(2.5)  # past the backoff: the cancelled retry must not run
    assert runs == ["failing"]


async def test_a_value_too_large_for_a_record_ends_the_task_as_error(make_app: Any) -> None:
    app = make_app(max_record_bytes=50_000)

    @app.task
    async def big():
        yield "small"
        yield "x" * 60_000
        yield "never"

    await app.start()
    task = await app.add_task("big")
    assert [v async for v in app.stream(task.uuid, timeout=20)] == ["small"]
    done = await app.wait(task.uuid, 10)
    assert done.status == "error" and "over the results topic's limit" in (done.traceback or "")
    assert done.yield_count == 1


async def test_a_cyclic_result_ends_the_task_as_error(app: QueueTasks) -> None:
    @app.task
    async def cyclic() -> list[Any]:
        loop: list[Any] = []
        loop.append(loop)
        return loop

    await app.start()
    done = await app.add_task("cyclic", timeout=10)
    assert done is not None and done.status == "error" and "cannot be encoded" in (done.traceback or "")


async def test_a_stream_open_across_close_ends_with_a_clear_error(app: QueueTasks) -> None:
    from qtasks.exc import AppClosedError

    @app.task
    async def forever():
        yield 0
        await asyncio.sleep(60)

    await app.start()
    task = await app.add_task("forever")
    first = asyncio.Event()

    async def read() -> None:
        async for _ in app.stream(task.uuid):
            first.set()

    reader = asyncio.ensure_future(read())
    await asyncio.wait_for(first.wait(), 10)
    await app.stop(timeout=0.5)
    with pytest.raises(AppClosedError):
        await asyncio.wait_for(reader, 10)


async def test_overlapping_starts_make_one_worker(app: QueueTasks) -> None:
    first, second = await asyncio.gather(app.start(), app.start())
    assert first is second


async def test_wait_takes_a_uuid_object_and_refuses_an_unknown_one(app: QueueTasks) -> None:
    import uuid

    from qtasks.exc import TaskNotFoundError

    @app.task
    async def noop() -> int:
        return 1

    await app.start()
    task = await app.add_task("noop")
    done = await app.wait(uuid.UUID(task.uuid), 10)
    assert done.status == "success"
    started = time.monotonic()
    with pytest.raises(TaskNotFoundError):
        await app.wait(uuid.uuid4(), 30)
    assert time.monotonic() - started < 15


async def test_a_slow_stream_reader_gets_every_value_with_a_small_buffer(make_app: Any) -> None:
    app = make_app(stream_buffer=8)

    @app.task
    async def many(n: int):
        for i in range(n):
            yield i

    await app.start()
    task = await app.add_task("many", 300)
    seen = []
    async for value in app.stream(task.uuid, timeout=60):
        seen.append(value)
        if len(seen) % 50 == 0:
            await asyncio.sleep(0.05)  # a slow reader: the writer runs far ahead
    assert seen == list(range(300))


async def test_a_reader_a_little_slower_than_its_task_gets_every_value_with_a_small_buffer(make_app: Any) -> None:
    """Values keep coming while a full buffer drains: once one is dropped, the ones after it
    are dropped too until the stream reads again from the first dropped (a buffer with a
    hole in it looked like values missing from the log)."""
    app = make_app(stream_buffer=4)

    @app.task
    async def steady(n: int):
        for i in range(n):
            yield i
            await asyncio.sleep(0.002)

    await app.start()
    task = await app.add_task("steady", 150)
    seen = []
    async for value in app.stream(task.uuid, timeout=60):
        seen.append(value)
        await asyncio.sleep(0.004)  # a little slower than the task, all the way
    assert seen == list(range(150))


async def test_the_status_view_is_bounded_and_reads_dropped_tasks_back(make_app: Any) -> None:
    app = make_app(status_cache_size=5)

    @app.task
    async def noop(i: int) -> int:
        return i

    await app.start()
    done = [await app.add_task("noop", i, timeout=10) for i in range(12)]
    assert app.view.evicted >= 7 and len(app.view) <= 5 + 2
    first = await app.get(done[0].uuid)  # type: ignore[union-attr]
    assert first is not None and (first.status, first.returning) == ("success", 0)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((float("nan"),), {}, ValueError, r"args\[0\] is nan"),
        ((), {"x": [1, float("inf")]}, ValueError, r"kwargs\['x'\]\[1\] is inf"),
        (({1: "a"},), {}, TypeError, "JSON keys are str"),
        (([[]] * 0 + [None],), {}, None, ""),
    ],
)
async def test_add_task_refuses_what_the_worker_could_not_read_back(
    app: QueueTasks, args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception] | None, message: str
) -> None:
    if error is None:
        assert (await app.add_task("anything", *args, **kwargs)) is not None
        return
    with pytest.raises(error, match=message):
        await app.add_task("anything", *args, **kwargs)


async def test_add_task_refuses_cyclic_arguments_and_bad_names_or_priorities(app: QueueTasks) -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(TypeError, match="cycl"):
        await app.add_task("anything", cyclic)
    with pytest.raises(TypeError):
        await app.add_task(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await app.add_task("anything", priority="high")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await app.add_task("anything", priority=True)


async def test_stop_means_stop_for_a_sync_task_past_the_stop_timeout(app: QueueTasks) -> None:
    counter = [0]
    running = threading.Event()

    @app.task
    def spin() -> None:
        running.set()
        while True:
            counter[0] += 1

    await app.start()
    await app.add_task("spin")
    assert await asyncio.to_thread(running.wait, 10)
    started = time.monotonic()
    await app.stop(timeout=0.3)
    assert time.monotonic() - started < 8
    seen = counter[0]
    await asyncio.sleep(0.3)
    assert counter[0] == seen  # the handed-back run no longer runs here


async def test_tasks_the_view_dropped_still_expire(make_app: Any) -> None:
    app = make_app(status_cache_size=3, status_ttl=0.4)

    @app.task
    async def noop(i: int) -> int:
        return i

    await app.start()
    # At once, so all ten end well within status_ttl of each other (exactly-once, each waits for a commit).
    done = await asyncio.gather(*(app.add_task("noop", i, timeout=10) for i in range(10)))
    assert app.view.evicted >= 7
    first = done[0]
    assert first is not None
    deadline = time.monotonic() + 20
    while await app.get(first.uuid) is not None:  # dropped from the view, so only a sweep expires it
        assert time.monotonic() < deadline, "the dropped task never expired"
        await asyncio.sleep(0.2)


async def test_wait_for_a_task_the_view_dropped_reads_it_back(make_app: Any) -> None:
    app = make_app(status_cache_size=2)

    @app.task
    async def noop(i: int) -> int:
        return i

    await app.start()
    first = await app.add_task("noop", 0, timeout=10)
    for i in range(1, 6):
        await app.add_task("noop", i, timeout=10)
    assert first is not None and app.view.head(first.uuid) is None  # dropped from the view
    again = await app.wait(first.uuid, 10)
    assert (again.status, again.returning) == ("success", 0)


# -- what a run writes --------------------------------------------------------------


async def status_log(app: QueueTasks, uuid: str) -> list[str]:
    """The statuses of a finished task on the status topic, in order, as any reader finds them.

    Exactly once on Kafka, a commit returns before its markers reach the partitions: a
    read_committed reader sees the ending a moment later, so this reads until it does.
    """
    deadline = time.monotonic() + 10
    while True:
        found = await _read_statuses(app, uuid)
        if (found and found[-1] in ("success", "error", "cancel")) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def _read_statuses(app: QueueTasks, uuid: str) -> list[str]:
    core = app.core
    tp = TopicPartition(core.topics.status, partition_for(uuid, core.store.partitions))
    consumer = core.broker.consumer(None, client_id="status-scan")
    await consumer.start()
    found: list[str] = []
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            for record in await consumer.getmany(0.2):
                if record.key == uuid.encode() and record.value is not None:
                    found.append(decode_status(record.value).status)
    finally:
        await consumer.stop()
    return found


async def test_a_short_task_writes_its_ending_alone_and_a_longer_one_its_process_status(make_app: Any) -> None:
    app = make_app(process_grace=0.2)
    other = make_app(app.name)  # another process: it sees the log only

    @app.task
    async def quick() -> str:
        return "done"

    @app.task
    async def slow(gate: float) -> str:
        await asyncio.sleep(gate)
        return "slept"

    await app.start()
    short = await app.add_task("quick", timeout=10)
    assert short is not None and short.status == "success"
    # Exactly once, process goes in the transaction at once (it costs no round trip there),
    # and a commit while the task runs adds its progress (process again).
    expected = ["new", "process", "success"] if app.config.exactly_once else ["new", "success"]
    found = await status_log(app, short.uuid)
    assert list(dict.fromkeys(found)) == expected, found
    longer = await app.add_task("slow", 1.5)
    started = time.monotonic()
    assert await other.get(longer.uuid) is not None  # connected: its view follows the log
    running = await other.view.wait_for(longer.uuid, lambda h: h is not None and h.status == "process", 10)
    assert running is not None and running.worker == app.worker.id and running.lease_until > time.time()
    assert time.monotonic() - started < 1.5  # while it runs: written once it outlived process_grace
    done = await app.wait(longer.uuid, 10)
    assert done.status == "success"
    # process, then its lease renewals (process again), then the ending.
    assert list(dict.fromkeys(await status_log(app, longer.uuid))) == ["new", "process", "success"]


async def test_a_stream_in_another_process_gets_a_short_run_s_values_before_any_process_status(
    make_app: Any,
) -> None:
    app = make_app(process_grace=4.0, lease_interval=5.0, lease_timeout=30.0)
    other = make_app(app.name)
    go, gate = asyncio.Event(), asyncio.Event()

    @app.task
    async def gated():
        await go.wait()
        yield "first"
        await gate.wait()
        yield "second"

    await app.start()
    task = await app.add_task("gated")
    stream = other.stream(task.uuid, timeout=20)
    first = asyncio.ensure_future(anext(stream))
    deadline = time.monotonic() + 10
    while task.uuid.encode() not in other._results_reader._streams:  # the stream listens
        assert time.monotonic() < deadline and not first.done()
        await asyncio.sleep(0.01)
    started = time.monotonic()
    go.set()
    assert await first == "first"
    assert time.monotonic() - started < 3.0  # long before process_grace: no process status needed
    gate.set()
    assert [v async for v in stream] == ["second"]
    done = await other.wait(task.uuid, 10)
    assert done.status == "success"
    # (exactly once, process goes in the transaction at once, and each commit adds progress)
    expected = ["new", "process", "success"] if app.config.exactly_once else ["new", "success"]
    assert list(dict.fromkeys(await status_log(app, task.uuid))) == expected


async def test_a_stream_opened_after_a_short_run_s_values_reads_them_again(make_app: Any) -> None:
    app = make_app(process_grace=4.0, lease_interval=5.0, lease_timeout=30.0)
    other = make_app(app.name)
    gate = asyncio.Event()

    @app.task
    async def gated():
        for i in range(3):
            yield i
        await gate.wait()
        yield 3

    await app.start()
    task = await app.add_task("gated")
    await app.view.wait_for(task.uuid, lambda h: h is not None and h.status == "process", 10)
    stream = other.stream(task.uuid, timeout=20)
    first = asyncio.ensure_future(anext(stream))
    deadline = time.monotonic() + 10
    while task.uuid.encode() not in other._results_reader._streams:  # listening from after value 2
        assert time.monotonic() < deadline and not first.done()
        await asyncio.sleep(0.01)
    gate.set()  # value 3 shows the gap: the stream reads the partition again
    assert [await first] + [v async for v in stream] == [0, 1, 2, 3]


# -- many tasks at once -------------------------------------------------------------


async def test_add_tasks_submits_a_batch_in_order_and_checks_every_item_first(make_app: Any) -> None:
    app = make_app()
    runs: list[Any] = []

    @app.task
    async def add(a: int, b: int = 0) -> int:
        runs.append((a, b))
        return a + b

    with pytest.raises(TypeError, match="add_tasks: item 2"):
        await app.add_tasks("add", [(1,), (2,), (object(),)])
    with pytest.raises(TypeError, match="item 1 must be a tuple"):
        await app.add_tasks("add", [(1,), 5])
    handles = await app.add_tasks("add", [(i,) for i in range(50)] + [qtasks.Args(1, b=2), [3, 4]])
    assert [h.status for h in handles] == ["new"] * 52
    assert [h.args for h in handles[:3]] == [[0], [1], [2]] and handles[50].kwargs == {"b": 2}
    seen = await make_app(app.name).get(handles[-1].uuid)  # stored before add_tasks returned
    assert seen is not None and seen.status == "new"
    await app.start()
    assert [await h.result(timeout=20) for h in handles] == [*range(50), 3, 7]
    # The refused batches submitted nothing: only the 52 ran.
    assert sorted(runs) == sorted([(i, 0) for i in range(50)] + [(1, 2), (3, 4)])


async def test_map_and_starmap_submit_through_add_tasks(app: QueueTasks) -> None:
    @app.task
    async def double(x: int) -> int:
        return 2 * x

    @app.task
    async def power(x: int, y: int) -> int:
        return x**y

    await app.start()
    doubled = await double.map(range(5))
    powered = await power.starmap([(2, 3), (3, 2)])
    assert [await h.result(timeout=20) for h in doubled] == [0, 2, 4, 6, 8]
    assert [await h.result(timeout=20) for h in powered] == [8, 9]


async def test_stream_many_merges_live_streams_each_in_order(app: QueueTasks) -> None:
    gate = asyncio.Event()

    @app.task
    async def ticks(n: int, gated: bool = False):
        for i in range(n):
            if gated and i == 1:
                await gate.wait()
            yield i

    await app.start()
    handles = await app.add_tasks("ticks", [(3,), qtasks.Args(3, gated=True), (0,), (20,)])
    by_task: dict[str, list[int]] = {h.uuid: [] for h in handles}
    async for item in app.stream_many([h.uuid for h in handles], timeout=20):
        assert isinstance(item, StreamItem) and item.attempt == 1
        by_task[item.uuid].append(item.value)
        if sum(map(len, by_task.values())) == 23 + 1:
            gate.set()  # every other value arrived while the gated task waits
    assert list(by_task.values()) == [[0, 1, 2], [0, 1, 2], [], list(range(20))]


async def test_stream_many_of_an_unknown_task_raises_and_stops_the_others(app: QueueTasks) -> None:
    @app.task
    async def forever():
        while True:
            yield 1
            await asyncio.sleep(0.01)

    await app.start()
    running = await app.add_task("forever")
    with pytest.raises(TaskNotFoundError):
        async for _ in app.stream_many([running.uuid, "00000000-0000-0000-0000-000000000000"], timeout=20):
            pass
    assert await app.cancel(running.uuid) is True


async def test_a_stale_status_that_lands_after_an_ending_is_followed_by_the_ending_again(make_app: Any) -> None:
    # A ticker frozen past a rebalance can write a task's `new` again after the task ended.
    # Compaction keeps a key's last record, so a worker writes the ending once more.
    app = make_app()

    @app.task
    async def quick() -> str:
        return "done"

    await app.start()
    done = await app.add_task("quick", timeout=10)
    assert done is not None and done.status == "success"
    core = app.core
    stale = msgspec.structs.replace(done, status="new", rev=0, returning=None)
    partition = partition_for(done.uuid, core.store.partitions)
    delivery = await core.broker.producer.send(
        core.topics.status, encode(stale), key=done.uuid.encode(), partition=partition
    )
    if delivery is not None:
        await delivery

    deadline = time.monotonic() + 30
    while (found := await _read_statuses(app, done.uuid))[-1] != "success":
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.2)
    # The key's last record, the one compaction keeps, is the ending again.
    assert found[-3:] == ["success", "new", "success"], found
    assert core.store.restated == 1


async def test_a_finished_run_is_freed_at_once_not_left_to_the_garbage_collector(app: QueueTasks) -> None:
    # A reference cycle per run (the executor held the run that held it) left every task's
    # objects for the collector to find, and the collector became a large part of a
    # short-task worker's CPU. Every kind of task, its ending included, is freed by
    # reference counting alone.
    @app.task
    async def agen() -> Any:
        yield 1

    @app.task
    def sgen() -> Any:
        yield 1

    @app.task
    def plain() -> int:
        return 1

    @app.task
    async def fails() -> None:
        raise ValueError("meant to")

    @app.task
    def sync_fails() -> None:
        raise ValueError("meant to")

    @app.task
    def sgen_fails() -> Any:
        yield 1
        raise ValueError("meant to")

    @app.task(max_time=0.05)
    async def overruns() -> None:
        await asyncio.sleep(30)

    @app.task(max_time=0.05)
    def sgen_overruns() -> Any:  # abandoned in its thread
        while True:
            time.sleep(0.01)
            yield 1

    await app.start()
    kinds = {"agen": 100, "sgen": 100, "plain": 100, "fails": 100, "sync_fails": 50, "sgen_fails": 50}
    kinds |= {"overruns": 20, "sgen_overruns": 20}
    for name in kinds:  # warm up: first-use caches are not garbage
        await app.add_task(name, timeout=10)
    gc.collect()
    gc.disable()
    try:
        handles = [h for name, n in kinds.items() for h in await app.add_tasks(name, [()] * n)]
        for handle in handles:
            assert (await app.wait(handle.uuid, 30)).status in ("success", "error")
        found = gc.collect()
    finally:
        gc.enable()
    assert found < len(handles) // 10, f"{found} objects in reference cycles after {len(handles)} tasks"


async def test_a_stream_waits_for_values_behind_another_producer_s_open_transaction(app: QueueTasks) -> None:
    """Exactly-once, a reader sees nothing past a partition's oldest open transaction.

    Another producer's transaction is open on every results partition while a task runs and
    ends. Its ending is visible at once (the status topic has no open transaction), its values
    only once that transaction ends. A live stream reads them all then, instead of ending with
    the values it has (on Kafka: a transaction coordinator that fails over writes a commit's
    markers late, or a worker's transaction stays open until its timeout). At least once,
    nothing waits for the other transaction.
    """

    @app.task(echo=True)
    async def three(self: Any) -> Any:
        for i in range(3):
            yield i

    await app.start()
    core = app.core
    other = core.broker.transactional_producer(f"{core.name}-other")
    await other.start()
    try:
        for partition in range(core.results_partitions):
            await other.send(core.topics.results, b"not a result", key=b"other", partition=partition)
        task = await app.add_task("three")
        stream = asyncio.create_task(_values(app.stream(task.uuid, timeout=30)))
        assert (await app.wait(task.uuid, 30)).status == "success"
        if app.config.exactly_once:
            await asyncio.sleep(1.0)  # the stream has found the task ended with values it cannot read yet
            assert not stream.done()
            await other.commit()
        assert await asyncio.wait_for(stream, 30) == [0, 1, 2]
    finally:
        await other.stop()


async def _values(stream: Any) -> list[Any]:
    return [value async for value in stream]
