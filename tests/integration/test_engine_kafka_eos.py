"""The engine suite on a real Apache Kafka broker, exactly-once: transactions, read_committed readers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from tests.engine_suite import *  # noqa: F403
from tests.helpers import FAST, unique


@pytest.fixture
async def make_app(broker_url: str) -> AsyncIterator[Callable[..., QueueTasks]]:
    apps: list[QueueTasks] = []

    def make(name: str | None = None, **settings: Any) -> QueueTasks:
        app = QueueTasks(
            name=name or unique(),
            broker_url=broker_url,
            **{**FAST, "processing_guarantee": "exactly_once", **settings},
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.stop(timeout=2)
