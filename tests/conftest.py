"""Fixtures shared by every suite: ``broker_url`` is memory:// unless a suite overrides it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from tests.helpers import FAST, unique


@pytest.fixture
def broker_url() -> str:
    return f"memory://{unique('log')}"


@pytest.fixture
def app_settings() -> dict[str, Any]:
    """Settings every app of a test module gets (a module overrides it: the exactly-once suites)."""
    return {}


@pytest.fixture
async def make_app(broker_url: str, app_settings: dict[str, Any]) -> AsyncIterator[Callable[..., QueueTasks]]:
    apps: list[QueueTasks] = []

    def make(name: str | None = None, **settings: Any) -> QueueTasks:
        app = QueueTasks(name=name or unique(), broker_url=broker_url, **{**FAST, **app_settings, **settings})
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.stop(timeout=2)


@pytest.fixture
async def app(make_app: Callable[..., QueueTasks]) -> QueueTasks:
    return make_app()
