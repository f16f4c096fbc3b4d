"""``qtasks.QueueTasks``: the blocking facade over the asyncio app, for sync programs.

It owns no logic: every call runs the asyncio app's coroutine on a private loop in a
background thread (the portal) and waits for it. Tasks run there too; sync tasks in
the worker's thread pool as always.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import signal
import threading
import uuid as uuid_mod
from collections.abc import Callable, Iterable, Iterator
from typing import Any, overload

from qtasks import _state
from qtasks.app import QueueTasks as AsyncQueueTasks
from qtasks.config import QueueConfig
from qtasks.handle import TaskHandle
from qtasks.portal import Portal
from qtasks.records import StreamItem, Task


class QueueTasks:
    """A qtasks app whose client methods block; for scripts, web handlers and sync code."""

    def __init__(
        self,
        name: str = "QueueTasks",
        broker_url: str | None = None,
        *,
        config: QueueConfig | None = None,
        **settings: Any,
    ) -> None:
        self._core = AsyncQueueTasks(name, broker_url, config=config, **settings)
        self._core._facade = self
        self._portal = Portal()
        self._exit_hook = False
        _state.app_main = self

    # -- components (what ctx.get_component reaches) --------------------------------

    @property
    def name(self) -> str:
        """The app's name (its topics are ``<name>.tasks``, ...)."""
        return self._core.name

    @property
    def broker_url(self) -> str:
        """The connector's URL."""
        return self._core.broker_url

    @property
    def config(self) -> QueueConfig:
        """The app's settings."""
        return self._core.config

    @property
    def broker(self) -> Any:
        """The connector in use."""
        return self._core.broker

    @property
    def worker(self) -> Any:
        """The running worker, or None."""
        return self._core.worker

    @property
    def plugins(self) -> Any:
        """The plugin manager."""
        return self._core.plugins

    @property
    def events(self) -> Any:
        """Lifecycle events: ``@app.events.on.task_success()``."""
        return self._core.events

    @property
    def registry(self) -> Any:
        """The registered tasks."""
        return self._core.registry

    # -- registration ----------------------------------------------------------------

    def task(self, func: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Register a task: ``@app.task`` or ``@app.task(name=..., ...)``."""
        return self._core.task(func, **options)

    def include_router(self, *routers: Any) -> None:
        """Register the tasks of each router (as the asyncio app)."""
        self._core.include_router(*routers)

    def add_middleware(self, middleware: Any, position: str = "before", **kwargs: Any) -> None:
        """Run ``middleware`` before (or after) every task of this app (as the asyncio app)."""
        self._core.add_middleware(middleware, position, **kwargs)

    def periodic(self, func: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Register a periodic task: ``@app.periodic(cron="*/5 * * * *")`` or ``every=30`` (as the asyncio app)."""
        return self._core.periodic(func, **options)

    def add_plugin(self, plugin: Any, trigger_names: list[str] | None = None, component: str | None = None) -> None:
        """Add a plugin for ``trigger_names`` (None: every trigger)."""
        self._core.add_plugin(plugin, trigger_names, component)

    # -- client ----------------------------------------------------------------------

    @overload
    def add_task(
        self, task_name: str, *args: Any, priority: int | None = None, timeout: None = None, **kwargs: Any
    ) -> TaskHandle: ...

    @overload
    def add_task(
        self, task_name: str, *args: Any, priority: int | None = None, timeout: float, **kwargs: Any
    ) -> Task | None: ...

    def add_task(
        self, task_name: str, *args: Any, priority: int | None = None, timeout: float | None = None, **kwargs: Any
    ) -> TaskHandle | Task | None:
        """Submit a task and return its handle (``handle.result()``, ``handle.stream()``, ...); with
        ``timeout``, wait for it and return the finished Task (None if time runs out).
        ``countdown=``/``eta=`` delay its start, ``key=`` orders it (as the asyncio app's ``add_task``)."""
        if timeout is not None:
            return self._portal.call(
                self._core.add_task(task_name, *args, priority=priority, timeout=timeout, **kwargs)
            )
        handle = self._portal.call(self._core.add_task(task_name, *args, priority=priority, **kwargs))
        return TaskHandle(self, handle.task)

    def add_tasks(
        self,
        task_name: str,
        calls: Iterable[Any],
        *,
        priority: int | None = None,
        countdown: float | None = None,
        eta: datetime.datetime | float | None = None,
        key: str | None = None,
    ) -> list[TaskHandle]:
        """Submit one task per item (a tuple of positional arguments, or ``qtasks.Args``), in batches; their handles."""
        handles = self._portal.call(
            self._core.add_tasks(task_name, calls, priority=priority, countdown=countdown, eta=eta, key=key)
        )
        return [TaskHandle(self, handle.task) for handle in handles]

    def chord(
        self,
        task_name: str,
        calls: Iterable[Any],
        callback: str,
        *args: Any,
        priority: int | None = None,
        **kwargs: Any,
    ) -> TaskHandle:
        """One task per item of ``calls``, then ``callback(results, *args, **kwargs)`` (as the asyncio app)."""
        handle = self._portal.call(self._core.chord(task_name, calls, callback, *args, priority=priority, **kwargs))
        return TaskHandle(self, handle.task)

    def stream_many(
        self, uuids: Iterable[str | uuid_mod.UUID], *, timeout: float | None = None
    ) -> Iterator[StreamItem]:
        """The values of many tasks as they come, merged (``StreamItem`` s), until every one has ended."""
        return self._portal.iterate(self._core.stream_many(uuids, timeout=timeout))

    def get(self, uuid: str | uuid_mod.UUID) -> Task | None:
        """The task's latest status, or None."""
        return self._portal.call(self._core.get(uuid))

    def wait(self, uuid: str, timeout: float | None = None) -> Task:
        """Wait until the task (following retries) ends; TimeoutError when time runs out."""
        return self._portal.call(self._core.wait(uuid, timeout))

    def stream(
        self, uuid: str | uuid_mod.UUID, *, timeout: float | None = None, from_seq: int = 0, meta: bool = False
    ) -> Iterator[Any]:
        """The task's handled values in order, live, until it ends (``from_seq`` and ``meta`` as the async app)."""
        return self._portal.iterate(self._core.stream(uuid, timeout=timeout, from_seq=from_seq, meta=meta))

    def cancel(self, uuid: str | uuid_mod.UUID, reason: str = "") -> bool:
        """Cancel a queued or running task; False when it is unknown or already finished."""
        return self._portal.call(self._core.cancel(uuid, reason))

    # -- worker ----------------------------------------------------------------------

    def start(self, concurrency: int | None = None) -> None:
        """Start a worker in the background of this program (stop it with :meth:`stop`)."""
        self._portal.call(self._core.start(concurrency))
        if not self._exit_hook:
            atexit.register(self._at_exit)
            self._exit_hook = True

    def _at_exit(self) -> None:
        """The program ends: a worker it never stopped is named once and closed, within seconds."""
        worker = self._core.worker
        if worker is None or not worker._started:
            return
        loop = self._portal.loop
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._core._close_at_loop_end(), loop).result(timeout=10)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the worker gracefully and disconnect."""
        self._portal.call(self._core.stop(timeout))

    def close(self) -> None:
        """Disconnect (a worker started here is stopped with :meth:`stop`); the app connects again when used."""
        self._portal.call(self._core.close())

    def __enter__(self) -> QueueTasks:
        """``with app:`` connects now (errors show here) and stops everything at the end."""
        self._portal.call(self._core._connect())
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_forever(self, concurrency: int | None = None) -> None:
        """Run a worker until SIGINT or SIGTERM."""
        stopped = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stopped.set())
        self.start(concurrency)
        try:
            while not stopped.wait(0.5):
                pass
        finally:
            self.stop()
