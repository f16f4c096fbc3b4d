"""Testing an app without a broker: ``TestApp`` runs it on a fresh ``memory://`` log.

The app keeps its tasks, plugins and events; only the broker changes, for the time of
the test, to an in-process log of its own (nothing is shared with another test), with a
worker running in the test's event loop. At the end the worker stops, the app closes and
its broker URL is put back::

    import pytest
    from qtasks.testing import TestApp
    from myproject.tasks import app          # the app as the project defines it (kafka://...)

    @pytest.fixture
    async def tasks():
        async with TestApp(app) as tested:   # the same app object, on memory://
            yield tested

    async def test_report(tasks):
        handle = await tasks.add_task("report", 7)
        assert await handle.result(timeout=5) == {"rows": 7}

The blocking app works the same with ``with TestApp(app) as tested:``. ``worker=False``
gives a client only (tasks are then run by whatever worker the test starts itself). The
test's log is dropped at the end. Async tests need pytest-asyncio (``asyncio_mode = "auto"``,
or ``@pytest.mark.asyncio`` on each).
"""

from __future__ import annotations

import uuid
from typing import Any

from qtasks.app import QueueTasks as AsyncQueueTasks
from qtasks.connectors.memory import drop_log

__all__ = ["TestApp"]


class TestApp:
    """Run ``app`` on a ``memory://`` log of its own, with a worker, for one test."""

    __test__ = False  # not a test class, whatever pytest's collection rules say

    def __init__(self, app: Any, *, worker: bool = True, concurrency: int | None = None) -> None:
        self.app = app
        self.worker = worker
        self.concurrency = concurrency
        self._core: AsyncQueueTasks = getattr(app, "_core", app)
        self._url: str | None = None

    def _switch(self) -> None:
        self._url = self._core.broker_url
        self._core.use_broker(f"memory://qtasks-test-{uuid.uuid4().hex}")

    def _restore(self) -> None:
        if self._url is not None:
            drop_log(self._core.broker_url)  # the test's log goes with it (memory comes back)
            self._core.use_broker(self._url)
            self._url = None

    async def __aenter__(self) -> Any:
        if self._core is not self.app:
            raise TypeError("TestApp of a blocking qtasks.QueueTasks: use `with TestApp(app)`, not `async with`")
        await self._core.close()
        self._switch()
        try:
            if self.worker:
                await self._core.start(self.concurrency)
            else:
                await self._core._connect()
        except BaseException:
            await self._core.stop()
            self._restore()
            raise
        return self.app

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._core.stop()
        finally:
            self._restore()

    def __enter__(self) -> Any:
        if self._core is self.app:
            raise TypeError("TestApp of an asyncio app (qtasks.asyncio.QueueTasks): use `async with TestApp(app)`")
        portal = self.app._portal  # the blocking app: its calls run on its own loop
        portal.call(self._core.close())
        self._switch()
        try:
            if self.worker:
                self.app.start(self.concurrency)
        except BaseException:
            self.app.stop()
            self._restore()
            raise
        return self.app

    def __exit__(self, *exc: object) -> None:
        try:
            self.app.stop()
        finally:
            self._restore()
