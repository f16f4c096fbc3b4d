"""Traces (qtasks.otel) in the SDK's in-memory exporter: the client's send span is the parent
of the worker's process span, values are events, the context rides on every record."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from qtasks.asyncio import QueueTasks
from qtasks.connectors.base import TopicPartition
from qtasks.otel import instrument
from tests.helpers import FAST, unique


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
async def make_app(provider: TracerProvider) -> AsyncIterator[Callable[..., QueueTasks]]:
    apps: list[QueueTasks] = []

    def make(**settings: Any) -> QueueTasks:
        app = QueueTasks(name=unique(), broker_url=f"memory://{unique('log')}", **{**FAST, **settings})
        instrument(app, tracer_provider=provider)
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.stop(timeout=2)


def spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_the_send_span_is_the_parent_of_the_process_span_and_values_are_events(
    make_app: Callable[..., QueueTasks], exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    app = make_app()
    tracer = provider.get_tracer("the-task")

    @app.task
    async def numbers(n: int):  # type: ignore[no-untyped-def]
        with tracer.start_as_current_span("inside the task"):
            for i in range(n):
                yield i

    await app.start()
    with provider.get_tracer("the-client").start_as_current_span("the client's request") as request:
        task = await app.add_task("numbers", 3)
    assert [v async for v in app.stream(task.uuid)] == [0, 1, 2]
    await app.wait(task.uuid, timeout=10)

    [send] = spans(exporter, f"send {app.topics.tasks}")
    [process] = spans(exporter, f"process {app.topics.tasks}")
    [inside] = spans(exporter, "inside the task")
    assert send.kind is SpanKind.PRODUCER and process.kind is SpanKind.CONSUMER
    assert send.parent is not None and send.parent.span_id == request.get_span_context().span_id
    assert process.parent is not None and process.parent.span_id == send.context.span_id  # across the log
    assert process.context.trace_id == send.context.trace_id == request.get_span_context().trace_id
    assert inside.parent is not None and inside.parent.span_id == process.context.span_id
    assert [e.attributes["qtasks.value.seq"] for e in process.events if e.name == "value"] == [0, 1, 2]  # type: ignore[index]
    attributes = dict(process.attributes or {})
    partition = int(attributes["messaging.destination.partition.id"])  # type: ignore[arg-type]
    assert attributes["messaging.system"] == "memory"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == app.topics.tasks
    assert attributes["messaging.consumer.group.name"] == app.group_id
    assert attributes["messaging.message.id"] == task.uuid
    assert isinstance(attributes["messaging.kafka.offset"], int)
    assert (attributes["qtasks.task.name"], attributes["qtasks.task.attempt"]) == ("numbers", 1)
    assert attributes["qtasks.task.status"] == "success"
    assert process.status.status_code is StatusCode.UNSET
    assert dict(send.attributes or {})["messaging.message.id"] == task.uuid

    # The records carry the context: the task record the send's, every result record the run's.
    log = app.broker.log  # type: ignore[attr-defined]
    [task_record] = [
        r for r in log.fetch(TopicPartition(app.topics.tasks, partition), 0, 100) if r.key == task.uuid.encode()
    ]
    assert dict(task_record.headers)["traceparent"].decode().split("-")[2] == f"{send.context.span_id:016x}"
    results = [
        r
        for p in range(app.core.results_partitions)
        for r in log.fetch(TopicPartition(app.topics.results, p), 0, 100)
        if r.key == task.uuid.encode()
    ]
    assert len(results) == 4  # three values and the end marker
    for record in results:
        assert dict(record.headers)["traceparent"].decode().split("-")[2] == f"{process.context.span_id:016x}"


async def test_a_failure_and_a_cancel_are_recorded_on_the_run_s_span(
    make_app: Callable[..., QueueTasks], exporter: InMemorySpanExporter
) -> None:
    app = make_app()

    @app.task
    def breaks() -> None:
        raise ValueError("it broke")

    @app.task(echo=True)
    async def stops(self):  # type: ignore[no-untyped-def]
        yield 1
        self.ctx.cancel("enough")

    await app.start()
    assert (await app.add_task("breaks", timeout=10)).status == "error"
    assert (await app.add_task("stops", timeout=10)).status == "cancel"
    by_task = {dict(s.attributes or {})["qtasks.task.name"]: s for s in spans(exporter, f"process {app.topics.tasks}")}
    failed = by_task["breaks"]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError: it broke"
    [exception] = [e for e in failed.events if e.name == "exception"]
    assert dict(exception.attributes or {})["exception.type"] == "ValueError"
    cancelled = by_task["stops"]
    assert cancelled.status.status_code is StatusCode.UNSET
    assert [dict(e.attributes or {}) for e in cancelled.events if e.name == "cancel"] == [
        {"qtasks.cancel_reason": "enough"}
    ]
    assert dict(cancelled.attributes or {})["qtasks.task.status"] == "cancel"


async def test_a_sync_task_s_spans_nest_under_its_run_in_its_thread(
    make_app: Callable[..., QueueTasks], exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    app = make_app()
    tracer = provider.get_tracer("the-task")

    @app.task
    def blocking() -> int:
        with tracer.start_as_current_span("in a thread"):
            return 7

    await app.start()
    assert (await app.add_task("blocking", timeout=10)).returning == 7
    [process] = spans(exporter, f"process {app.topics.tasks}")
    [inside] = spans(exporter, "in a thread")
    assert inside.parent is not None and inside.parent.span_id == process.context.span_id


async def test_the_worker_s_own_context_is_left_as_it_was(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()

    @app.task
    def nothing() -> None:
        return None

    await app.start()
    for _ in range(3):
        await app.add_task("nothing", timeout=10)
    assert not trace.get_current_span().get_span_context().is_valid  # nothing leaked into the caller


def test_an_app_that_is_not_instrumented_never_imports_opentelemetry() -> None:
    code = textwrap.dedent(
        """
        import asyncio, sys
        from qtasks.asyncio import QueueTasks
        app = QueueTasks(name="plain", broker_url="memory://plain")

        @app.task
        async def gen():
            yield 1

        async def main():
            await app.start()
            task = await app.add_task("gen")
            assert [v async for v in app.stream(task.uuid)] == [1]
            await app.stop()

        asyncio.run(main())
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


async def test_a_retry_is_sent_from_inside_the_failed_run_s_span(
    make_app: Callable[..., QueueTasks], exporter: InMemorySpanExporter
) -> None:
    app = make_app()

    @app.task(retry=1)
    def fails() -> None:
        raise RuntimeError("again")

    await app.start()
    final = await app.add_task("fails", timeout=10)
    assert final.retry_count == 1
    first, second = sorted(spans(exporter, f"process {app.topics.tasks}"), key=lambda s: s.start_time or 0)
    sends = {s.context.span_id: s for s in spans(exporter, f"send {app.topics.tasks}")}
    assert second.parent is not None
    retry_send = sends[second.parent.span_id]
    assert retry_send.parent is not None and retry_send.parent.span_id == first.context.span_id
    assert dict(first.attributes or {})["qtasks.task.status"] == "retry"
    assert first.status.status_code is StatusCode.ERROR


async def test_a_failing_tracer_or_an_exception_that_cannot_be_shown_changes_nothing_for_the_task(
    make_app: Callable[..., QueueTasks], exporter: InMemorySpanExporter
) -> None:
    app = make_app()

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text for this one")

    @app.task(retry=1)
    def odd() -> None:
        raise Unprintable()

    @app.task
    async def fine():  # type: ignore[no-untyped-def]
        yield 1

    await app.start()
    final = await app.add_task("odd", timeout=10)
    assert (final.status, final.retry_count) == ("error", 1)  # retried once, as without traces
    first = await app.get(final.retry_parent_uuid)  # type: ignore[arg-type]
    assert first is not None and (first.status, first.retry_child_uuid) == ("retry", final.uuid)
    assert {s.status.description for s in spans(exporter, f"process {app.topics.tasks}")} == {"Unprintable"}

    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError(f"the tracer broke at {name}")

        def submit(self, *args: Any) -> Any:
            raise RuntimeError("the tracer broke at submit")

        def run(self, *args: Any) -> Any:
            raise RuntimeError("the tracer broke at run")

    app.core.tracer = Broken()  # type: ignore[assignment]
    task = await app.add_task("fine")
    assert [v async for v in app.stream(task.uuid)] == [1]
    assert (await app.wait(task.uuid, timeout=10)).status == "success"


def test_instrument_and_the_counts_last_when_the_app_moves_to_a_new_event_loop(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    import asyncio

    app = QueueTasks(name=unique(), broker_url=f"memory://{unique('log')}", **FAST)
    instrument(app, tracer_provider=provider)

    @app.task
    def one() -> int:
        return 1

    async def once() -> None:
        await app.start()
        assert (await app.add_task("one", timeout=10)).status == "success"
        await app.stop()

    asyncio.run(once())
    asyncio.run(once())  # a new loop: the app starts afresh, and keeps its tracer and its counts
    assert len(spans(exporter, f"process {app.topics.tasks}")) == 2
    assert app.core.stats.tasks[("succeeded", "one")] == 2
