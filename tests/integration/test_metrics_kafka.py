"""The metrics endpoint of a worker on a real broker: counts, and lag as the group's committed offsets give it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qtasks.asyncio import QueueTasks
from tests.helpers import unique

pytestmark = pytest.mark.kafka


async def scrape(client: httpx.AsyncClient, app: QueueTasks) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert app.metrics is not None
    response = await client.get(f"http://127.0.0.1:{app.metrics.port}/metrics")
    assert response.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


async def until(condition: Callable[[], Any], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.05)


async def test_a_worker_on_kafka_shows_its_counts_and_its_lag(broker_url: str) -> None:
    app = QueueTasks(
        name=unique("metrics"),
        broker_url=broker_url,
        concurrency=1,
        prefetch=0,
        tasks_partitions=2,
        results_partitions=2,
        commit_interval=0.05,
    )
    go_on = asyncio.Event()

    @app.task
    async def held(n: int):  # type: ignore[no-untyped-def]
        await go_on.wait()
        for i in range(n):
            yield i

    try:
        await app.start()
        server = await app.serve_metrics(port=0, host="127.0.0.1")
        server.CACHE = 0.0  # every scrape fresh
        tasks = [await app.add_task("held", 3) for _ in range(4)]
        lag = ("qtasks_consumer_lag", app.topics.tasks)
        async with httpx.AsyncClient() as client:

            def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
                return sum(v for (n, labels), v in samples.items() if n == name and ("topic", lag[1]) in labels)

            async def all_behind() -> bool:
                # One runs (taken, not committed), three wait in Kafka: the group is 4 behind.
                samples = await scrape(client, app)
                return total(samples, "qtasks_consumer_lag") == 4 and total(samples, "qtasks_offsets_uncommitted") == 1

            await until(all_behind)
            assert (await client.get(f"http://127.0.0.1:{app.metrics.port}/readyz")).status_code == 200  # type: ignore[union-attr]
            go_on.set()
            for task in tasks:
                assert (await app.wait(task.uuid, timeout=30)).status == "success"

            async def caught_up() -> bool:
                return total(await scrape(client, app), "qtasks_consumer_lag") == 0

            await until(caught_up)
            samples = await scrape(client, app)
            assert samples[("qtasks_tasks_succeeded_total", frozenset({("task", "held")}))] == 4
            assert samples[("qtasks_values_yielded_total", frozenset({("task", "held")}))] == 12
            assert samples[("qtasks_broker_reachable", frozenset())] == 1
    finally:
        await app.stop(timeout=5)
