"""What only a real broker shows: topic policies, the status table, stream positioning, expiry."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from qtasks.asyncio import QueueTasks
from qtasks.exc import TopicConfigError
from tests.helpers import unique


async def test_a_status_topic_that_is_not_compacted_is_a_clear_error(make_app: Any, kafka_bootstrap: str) -> None:
    name = unique()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{name}.status", 1, 1, topic_configs={"cleanup.policy": "delete"})])
    finally:
        await admin.close()
    app = make_app(name)
    with pytest.raises(TopicConfigError, match="must be compacted"):
        await app.start()


async def test_a_new_process_reads_finished_tasks_from_the_status_topic(make_app: Any) -> None:
    app = make_app()

    @app.task
    async def gen(n: int):
        for i in range(n):
            yield i

    await app.start()
    done = await app.add_task("gen", 3, timeout=20)
    assert done is not None and done.status == "success"
    fresh = make_app(app.name)
    seen = await fresh.get(done.uuid)
    assert seen is not None and (seen.status, seen.returning, seen.attempt) == ("success", [0, 1, 2], 1)
    assert [v async for v in fresh.stream(done.uuid)] == [0, 1, 2]


async def test_stream_starts_near_the_task_not_at_the_start_of_the_partition(make_app: Any) -> None:
    app = make_app(results_partitions=1)

    @app.task
    async def gen(n: int):
        for i in range(n):
            yield i

    await app.start()
    first = await app.add_task("gen", 500, timeout=30)
    assert first is not None and first.status == "success"
    await asyncio.sleep(0.05)
    second = await app.add_task("gen", 2)
    seeks: list[int] = []
    make_consumer = app.broker.consumer

    def spying_consumer(*args: Any, **kwargs: Any) -> Any:
        consumer = make_consumer(*args, **kwargs)
        seek = consumer.seek

        async def spy(tp: Any, offset: int) -> None:
            seeks.append(offset)
            await seek(tp, offset)

        consumer.seek = spy
        return consumer

    app.broker.consumer = spying_consumer  # type: ignore[method-assign]
    app.config.stream_clock_skew = 0.0
    assert [v async for v in app.stream(second.uuid)] == [0, 1]
    assert seeks and seeks[0] >= 500, seeks


async def test_finished_tasks_expire_after_the_ttl(make_app: Any) -> None:
    app = make_app(status_ttl=1.0)

    @app.task
    async def quick() -> int:
        return 1

    await app.start()
    done = await app.add_task("quick", timeout=20)
    assert done is not None and done.status == "success"
    deadline = time.monotonic() + 15
    while await app.get(done.uuid) is not None:
        assert time.monotonic() < deadline, "the finished task never expired"
        await asyncio.sleep(0.2)
    fresh: QueueTasks = make_app(app.name)
    assert await fresh.get(done.uuid) is None
