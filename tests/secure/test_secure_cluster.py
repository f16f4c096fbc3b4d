"""The 3-node cluster in secure mode: brokers talk SASL_SSL among themselves, clients too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from tests.helpers import FAST, unique
from tests.kafka_fixtures import _local_kafka_class


@pytest.fixture(scope="module")
def secure_cluster() -> Iterator[Any]:
    cluster = _local_kafka_class()(brokers=3, security="sasl_ssl")
    cluster.start(timeout=240)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.timeout(420)  # it waits for its secure cluster to start: three nodes, then the ACL grants
async def test_a_generator_streams_on_the_secure_cluster_with_replicated_topics(secure_cluster: Any) -> None:
    app = QueueTasks(name=unique("sec3"), broker_url=secure_cluster.url("qtasks"), replication_factor=3, **FAST)

    @app.task
    async def count(n: int) -> Any:
        for i in range(n):
            yield i

    try:
        await app.start()
        task = await app.add_task("count", 20)
        assert [v async for v in app.stream(task.uuid)] == list(range(20))
        done = await app.wait(task.uuid, 30)
        assert done.status == "success"
    finally:
        await app.stop(timeout=5)
    # every node serves the secure listener with the one CA: each is a bootstrap on its own
    for port in secure_cluster.ports:
        single = QueueTasks(
            name=app.name,
            broker_url=secure_cluster.url("qtasks").replace(secure_cluster.bootstrap, f"127.0.0.1:{port}"),
            **FAST,
        )
        try:
            assert (await single.get(task.uuid)).status == "success"
        finally:
            await single.stop(timeout=2)
