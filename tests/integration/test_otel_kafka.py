"""Traces on a real broker: the trace context crosses Kafka in record headers."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KafkaTP
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from qtasks.asyncio import QueueTasks
from qtasks.otel import instrument
from tests.helpers import unique

pytestmark = pytest.mark.kafka


async def test_a_run_s_span_is_a_child_of_its_send_across_kafka(broker_url: str, kafka_bootstrap: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = QueueTasks(name=unique("otel"), broker_url=broker_url, tasks_partitions=2, results_partitions=2)
    instrument(app, tracer_provider=provider)

    @app.task
    async def three():  # type: ignore[no-untyped-def]
        for i in range(3):
            yield i

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    try:
        await app.start()
        task = await app.add_task("three")
        assert [v async for v in app.stream(task.uuid)] == [0, 1, 2]
        final = await app.wait(task.uuid, timeout=30)
        spans = {s.name.split()[0]: s for s in exporter.get_finished_spans()}
        send, process = spans["send"], spans["process"]
        assert process.parent is not None and process.parent.span_id == send.context.span_id
        assert process.context.trace_id == send.context.trace_id
        attributes = dict(process.attributes or {})
        assert attributes["messaging.system"] == "kafka"
        assert attributes["messaging.message.id"] == task.uuid
        assert [e.name for e in process.events].count("value") == 3

        # Every result record of the run carries the run's context, as Kafka stores it.
        await consumer.start()
        tp = KafkaTP(app.topics.results, final.results_partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        records = [r for r in (await consumer.getmany(tp, timeout_ms=10_000))[tp] if r.key == task.uuid.encode()]
        assert len(records) == 4  # three values and the end marker
        for record in records:
            traceparent = dict(record.headers)["traceparent"].decode()
            assert traceparent.split("-")[1:3] == [
                f"{process.context.trace_id:032x}",
                f"{process.context.span_id:016x}",
            ]
    finally:
        await consumer.stop()
        await app.stop(timeout=5)
