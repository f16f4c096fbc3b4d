"""The app: task registry, plugins, events and the client, over one :class:`~qtasks.core.Core`.

This is the asyncio app (``qtasks.asyncio.QueueTasks``): client methods are
coroutines. ``qtasks.QueueTasks`` is a thin blocking facade over it. The app holds the
core, the worker and the results reader; none of them imports the app.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, overload

from qtasks import _state
from qtasks.bulk import BATCH, calls_of, merge_streams
from qtasks.config import QueueConfig, validate_app_name
from qtasks.connectors import Connector
from qtasks.core import Core, NewTask, Topics
from qtasks.exc import BrokerUnavailableError, TaskNotFoundError
from qtasks.handle import AsyncTaskHandle
from qtasks.logs import show_logs
from qtasks.middlewares import check_middleware
from qtasks.periodic import Schedule
from qtasks.plugins import Events, PluginManager
from qtasks.records import ControlRecord, StreamItem, Task
from qtasks.registry import Registry, TaskSpec, make_spec
from qtasks.router import Router
from qtasks.status import CANCEL_REV, StatusView
from qtasks.stream import ResultsReader, stream_results
from qtasks.validate import check_due, check_key, check_priority, check_task_name, check_uuid
from qtasks.worker import Worker

if TYPE_CHECKING:
    from qtasks.metrics import MetricsServer

log = logging.getLogger("qtasks.app")

#: Seconds an app may take to close when its event loop ends without it having been stopped.
_LOOP_END_GRACE = 5.0

__all__ = ["QueueTasks", "Topics"]


class QueueTasks:
    """A qtasks app whose client methods are coroutines.

    ``QueueTasks(name="orders", broker_url="kafka://localhost:9092")``; the URL defaults
    to ``QTASKS_BROKER_URL`` or ``memory://``. Settings go in ``config`` or as keyword
    arguments (``concurrency=32``), over ``QTASKS_*`` environment variables.
    """

    def __init__(
        self,
        name: str = "QueueTasks",
        broker_url: str | None = None,
        *,
        config: QueueConfig | None = None,
        **settings: Any,
    ) -> None:
        self.name = validate_app_name(name)
        self.config = config if config is not None else QueueConfig.from_env(**settings)
        show_logs(self.config.log_level, self.config.log_format)
        self.core = Core(name, broker_url or os.environ.get("QTASKS_BROKER_URL") or "memory://", self.config)
        self.registry = Registry()
        self.plugins = PluginManager()
        self.events = Events()
        self.worker: Worker | None = None
        #: The ``/metrics`` server of this app (see :meth:`serve_metrics`), once started.
        self.metrics: MetricsServer | None = None
        self._facade: Any = None
        self._reader: ResultsReader | None = None
        self._lifecycle: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_end: AsyncIterator[None] | None = None
        self._binding: object | None = None
        _state.app_main = self

    # -- registration ----------------------------------------------------------------

    def task(
        self,
        func: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        priority: int | None = None,
        echo: bool = False,
        max_time: float | None = None,
        retry: int | None = None,
        retry_on_exc: Sequence[type[BaseException]] | None = None,
        decode: Callable[[Any], Any] | None = None,
        tags: list[str] | None = None,
        description: str | None = None,
        generate_handler: Callable[[Any], Any] | None = None,
        executor: type | None = None,
        middlewares_before: list[Callable[..., Any]] | None = None,
        middlewares_after: list[Callable[..., Any]] | None = None,
        **extra: Any,
    ) -> Any:
        """Register a task: ``@app.task`` or ``@app.task(name=..., retry=3, ...)``."""

        def register(fn: Callable[..., Any]) -> TaskSpec:
            spec = make_spec(
                fn,
                name=name,
                priority=priority,
                echo=echo,
                max_time=max_time,
                retry=retry,
                retry_on_exc=retry_on_exc,
                decode=decode,
                tags=tags,
                description=description,
                generate_handler=generate_handler,
                executor=executor,
                middlewares_before=middlewares_before,
                middlewares_after=middlewares_after,
                app=self.user_app,
                **extra,
            )
            self.registry.add(spec)
            return spec

        if func is not None:
            return register(func)
        return register

    def periodic(
        self,
        func: Callable[..., Any] | None = None,
        *,
        cron: str | None = None,
        every: float | None = None,
        tz: str | datetime.tzinfo | None = None,
        catch_up: str = "latest",
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **task_options: Any,
    ) -> Any:
        """Register a periodic task: ``@app.periodic(cron="*/5 * * * *")`` or ``@app.periodic(every=30)``.

        ``cron``: five fields (minute hour day-of-month month day-of-week) or ``@hourly``,
        ``@daily``, ...; in ``tz`` (an IANA name or a tzinfo; UTC by default). ``every``: a
        tick every so many seconds (at least 1), at whole multiples since the Unix epoch.
        One run per tick across all the workers of the group, submitted with ``args`` and
        ``kwargs``. ``catch_up``: what happens to ticks missed while no worker ran:
        ``"latest"`` (one run, for the last of them), ``"all"`` (one run each, at most the
        last 1,000) or ``"skip"``. Every other keyword is ``@app.task``'s (``name``,
        ``retry``, ``max_time``, ...); the task can be submitted by hand too.
        """
        schedule = Schedule.of(cron=cron, every=every, tz=tz, catch_up=catch_up, args=args, kwargs=kwargs)

        def register(fn: Callable[..., Any]) -> TaskSpec:
            spec: TaskSpec = self.task(**task_options)(schedule.check(fn, task_options))
            spec.schedule = schedule
            return spec

        if func is not None:
            return register(func)
        return register

    def include_router(self, *routers: Router) -> None:
        """Register the tasks of each router (QTasks' ``include_router``); a name already taken is a ``ValueError``."""
        for router in routers:
            if not isinstance(router, Router):
                raise TypeError(f"include_router takes qtasks.Router objects, got {type(router).__name__}")
            for spec in router.specs:
                if spec.app is None:
                    spec.app = self.user_app
                self.registry.include(spec)

    def add_middleware(self, middleware: Any, position: str = "before", **kwargs: Any) -> None:
        """Run ``middleware`` before (``position="after"``: after) every task of this app, ahead of the task's own.

        A :class:`qtasks.middlewares.TaskMiddleware` subclass (QTasks' shape: made with the
        task's executor for each run, then called) or a function (qtasks' shape, as in
        ``middlewares_before``/``middlewares_after``). Other keywords are taken for QTasks'
        sake and not used.
        """
        del kwargs
        check_middleware(middleware, position)
        registry = self.registry
        (registry.middlewares_before if position == "before" else registry.middlewares_after).append(middleware)

    def _include_shared(self) -> None:
        for spec in _state.shared_tasks:
            if spec.name not in self.registry:
                self.registry.include(spec)

    def use_broker(self, broker_url: str) -> None:
        """Switch to another broker URL (before the app connects)."""
        self.core.use_broker(broker_url)

    def add_plugin(self, plugin: Any, trigger_names: list[str] | None = None, component: str | None = None) -> None:
        """Add a plugin for ``trigger_names`` (None: every trigger)."""
        self.plugins.add(plugin, trigger_names, component)

    @property
    def user_app(self) -> Any:
        """The app the user holds: this one, or the blocking facade around it."""
        return self._facade if self._facade is not None else self

    @property
    def group_id(self) -> str:
        """The workers' consumer group."""
        return self.config.group_id or f"{self.name}-workers"

    # -- what the parts share --------------------------------------------------------

    @property
    def broker_url(self) -> str:
        """The connector's URL."""
        return self.core.broker_url

    @property
    def broker(self) -> Connector:
        """The connector in use."""
        return self.core.broker

    @property
    def topics(self) -> Topics:
        """The app's topic names."""
        return self.core.topics

    @property
    def view(self) -> StatusView:
        """This process's status view."""
        return self.core.store.view

    @property
    def results_partitions(self) -> int:
        """Partitions of the results topic (as found at connect)."""
        return self.core.results_partitions

    async def _connect(self) -> None:
        await self._here()
        await self.core.connect()

    # -- the event loop --------------------------------------------------------------

    async def _here(self) -> None:
        """Serve the running loop. An app whose loop ended (an ``asyncio.run`` returned, a
        test's loop closed) starts afresh on the new one: a new connection, the same tasks,
        plugins and events. One app serves one loop at a time."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        old = self._loop
        if old is not None:
            # A loop that is only paused (a fixture's wider loop scope, a loop run by hand)
            # still owns what the app opened there: the app cannot leave it behind.
            busy = self.core.connected or (self.worker is not None and self.worker._started)
            if old.is_running() or (busy and not old.is_closed()):
                raise RuntimeError(
                    f"app {self.name!r} is in use by another event loop that is still open "
                    f"({'running' if old.is_running() else 'paused'}); use one app per loop, close "
                    "the app on its loop first, or (pytest) give the test the fixture's loop scope"
                )
            self._renew()
        self._loop = loop
        # asyncio.run closes every async generator before it closes its loop: this one then
        # disconnects the app while the loop still runs (no connection is left behind).
        binding = self._binding = object()
        self._loop_end = self._until_the_loop_ends(binding)
        await anext(self._loop_end)

    async def _until_the_loop_ends(self, binding: object) -> AsyncIterator[None]:
        try:
            yield
        finally:
            # Only the binding still in force: a generator of an earlier binding may be
            # closed late, after the app came back to this loop.
            if self._binding is binding and self._loop is asyncio.get_running_loop():
                await self._close_at_loop_end()

    async def _close_at_loop_end(self) -> None:
        """The loop is ending (its tasks, the connector's included, are cancelled by now):
        close what is left, within a few seconds. A worker still running is the program's
        mistake: it is said once, and its partitions are not committed (their tasks run again
        or are skipped as finished, at least once)."""
        running = self.worker is not None and self.worker._started
        if running:
            log.warning(
                "the %s ended while app %r ran a worker: stop it first (app.stop(), or async with / with "
                "app:); closing it now without a graceful stop",
                "program" if self._facade is not None else "event loop",
                self.name,
            )
        try:
            async with asyncio.timeout(_LOOP_END_GRACE):
                if running:
                    await self.stop(timeout=0)
                else:
                    await self.close()
        # The loop's end must not fail because of this app. A CancelledError is said too:
        # nothing cancels the loop's last step, so one is a close that stopped halfway (and
        # asyncio would drop it without a word).
        except (Exception, asyncio.CancelledError) as exc:
            log.warning("app %r could not be closed at the end of its event loop: %r", self.name, exc)

    def _renew(self) -> None:
        """Drop what belonged to a loop that is gone: a new core (connector, status store,
        loops), no worker, no reader, no metrics server. The registry, plugins and events stay,
        and so do the counts (they are the process's) and the tracer ``instrument`` set."""
        old = self.core
        self.core = Core(self.name, old.broker_url, self.config)
        self.core.stats = old.stats
        self.core.tracer = old.tracer
        self.metrics = None  # its server lived on the loop that is gone
        self.worker = None
        self._reader = None
        self._lifecycle = None

    # -- client ----------------------------------------------------------------------

    @overload
    async def add_task(
        self,
        task_name: str,
        *args: Any,
        priority: int | None = None,
        timeout: None = None,
        countdown: float | None = None,
        eta: datetime.datetime | float | None = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> AsyncTaskHandle: ...

    @overload
    async def add_task(
        self,
        task_name: str,
        *args: Any,
        priority: int | None = None,
        timeout: float,
        countdown: float | None = None,
        eta: datetime.datetime | float | None = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> Task | None: ...

    async def add_task(
        self,
        task_name: str,
        *args: Any,
        priority: int | None = None,
        timeout: float | None = None,
        countdown: float | None = None,
        eta: datetime.datetime | float | None = None,
        key: str | None = None,
        **kwargs: Any,
    ) -> AsyncTaskHandle | Task | None:
        """Submit a task and return its handle (the submitted Task's fields, ``await handle.result()``,
        ``handle.stream()``, ``handle.cancel()``, ``handle.get()``); with ``timeout``, wait for it
        to end and return the finished Task (None if time runs out).

        ``countdown`` (seconds) or ``eta`` (a ``datetime``, or Unix time) delays the start:
        the task never starts before that time (it waits in the delays topic, holding no
        worker's slot). ``key``: tasks of one key run one at a time, in the order they were
        submitted (docs/ordering.md). A task that is retried ends as ``retry`` and hands over to a new task
        (``retry_child_uuid``); the wait follows that chain to its last task. With
        ``timeout``, a broker that cannot take the task in that time raises
        :class:`~qtasks.exc.BrokerUnavailableError`.
        """
        task_name = check_task_name(task_name)
        if priority is not None:
            priority = check_priority(priority)
        due = check_due(countdown, eta)
        key = self._key(key)
        await self._here()
        if timeout is None:
            return AsyncTaskHandle(
                self, await self._submit(task_name, args, kwargs, priority=priority, due=due, key=key)
            )
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                task = await self._submit(task_name, args, kwargs, priority=priority, due=due, key=key)
        except TimeoutError:
            raise BrokerUnavailableError(f"task {task_name!r} could not be submitted within {timeout} s") from None
        try:
            return await self.wait(task.uuid, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return None

    async def add_tasks(
        self,
        task_name: str,
        calls: Iterable[Any],
        *,
        priority: int | None = None,
        countdown: float | None = None,
        eta: datetime.datetime | float | None = None,
        key: str | None = None,
    ) -> list[AsyncTaskHandle]:
        """Submit one task per item of ``calls`` and return their handles, in order.

        Each item is a tuple (or list) of positional arguments, or ``qtasks.Args(*args,
        **kwargs)``. Every task is checked before any is sent (a bad item raises, naming
        its index, with nothing submitted); then they are stored in batches, each with one
        wait: much faster than one ``add_task`` at a time. ``task.map(values)`` and
        ``task.starmap(tuples)`` call this. A broker error that is not retriable raises
        after the batches before it were stored (their tasks run; their handles are lost).
        ``countdown``/``eta`` delay every one of them (as :meth:`add_task`); with ``key`` they
        run one at a time, in the order given.
        """
        task_name = check_task_name(task_name)
        priority = check_priority(self._priority_of(task_name, priority))
        due = check_due(countdown, eta)
        key = self._key(key)
        await self._here()
        await self.core.connect()
        new = self._new_tasks("add_tasks", task_name, calls, priority=priority, not_before=due, key=key)
        await self._submit_batches(new)
        return [AsyncTaskHandle(self, n.task) for n in new]

    def _key(self, key: Any) -> str | None:
        """A checked ordering key; refused in share mode, which keeps no order."""
        checked = check_key(key)
        if checked is not None and self.config.processing_mode == "share":
            raise ValueError(
                "ordering keys need processing_mode='group': a share group hands tasks out in no order "
                "(processing_mode='share' is set)"
            )
        return checked

    def _priority_of(self, task_name: str, priority: int | None) -> int:
        """``priority``, or (None) the registered task's own, else 0."""
        if priority is not None:
            return priority
        spec = self.registry.get(task_name)
        return spec.priority if spec is not None else 0

    def _new_tasks(self, caller: str, task_name: str, calls: Iterable[Any], **fields: Any) -> list[NewTask]:
        """One checked task per item of ``calls``; a bad item raises naming its index (nothing is sent)."""
        new = []
        for i, (args, kwargs) in enumerate(calls_of(calls)):
            try:
                new.append(self.core.new_task(task_name, args, kwargs, **fields))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{caller}: item {i}: {exc}") from None
        return new

    async def _submit_batches(self, new: list[NewTask]) -> None:
        for start in range(0, len(new), BATCH):
            await self.core.submit_all(new[start : start + BATCH])

    async def chord(
        self,
        task_name: str,
        calls: Iterable[Any],
        callback: str,
        *args: Any,
        priority: int | None = None,
        **kwargs: Any,
    ) -> AsyncTaskHandle:
        """Fan out, then in: one ``task_name`` task per item of ``calls`` (as :meth:`add_tasks`),
        and ``callback(results, *args, **kwargs)`` once every one of them has ended, with
        their results in the order of ``calls`` (Celery's chord).

        Returns the callback's handle; ``handle.task.after`` lists the other tasks' uuids.
        If one of them ends as ``error`` or ``cancel``, the callback does not run: it ends
        as ``error`` (``ChordError``) naming that task. Nothing polls: a worker holds the
        callback's record, without a slot, until the statuses say the others have ended.
        """
        task_name, callback = check_task_name(task_name), check_task_name(callback)
        priority = check_priority(self._priority_of(task_name, priority))
        await self._here()
        await self.core.connect()
        new = self._new_tasks("chord", task_name, calls, priority=priority)
        if not new:
            raise ValueError("a chord needs at least one task before its callback")
        last = self.core.new_task(
            callback, args, kwargs, priority=self._priority_of(callback, None), after=[n.task.uuid for n in new]
        )
        await self._submit_batches(new)
        await self.core.submit_all([last])
        return AsyncTaskHandle(self, last.task)

    def stream_many(
        self, uuids: Iterable[str | uuid_mod.UUID], *, timeout: float | None = None
    ) -> AsyncIterator[StreamItem]:
        """The values of many tasks as they come, merged: ``StreamItem`` s (``uuid``, ``seq``,
        ``attempt``, ``value``), each task's in order, until every one has ended.

        Each task's stream is :meth:`stream` with ``meta=True`` (retries followed, and an
        item with ``retried_as`` where a task hands over); ``timeout`` bounds each of them.
        The first that fails (an unknown uuid, its timeout) ends them all with its error.
        """
        checked = [check_uuid(uuid) for uuid in uuids]
        return merge_streams(lambda uuid: self.stream(uuid, timeout=timeout, meta=True), checked)

    async def _submit(
        self,
        task_name: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        priority: int | None,
        due: float = 0.0,
        key: str | None = None,
    ) -> Task:
        priority = self._priority_of(task_name, priority)
        return await self.core.submit(task_name, args, kwargs, priority=priority, not_before=due, key=key)

    async def _follow(self, uuid: str) -> Task:
        """The task, or the last one of its retry chain that is known; TaskNotFoundError if none."""
        task = await self.core.store.lookup(uuid)
        if task is None:
            raise TaskNotFoundError(f"no task {uuid} is known")
        while task.status == "retry" and task.retry_child_uuid:
            child = await self.core.store.lookup(task.retry_child_uuid)
            if child is None:  # the child is written before its parent names it: it expired
                raise TaskNotFoundError(f"task {task.uuid} was retried as {task.retry_child_uuid}, which is not known")
            task = child
        return task

    async def wait(self, uuid: str | uuid_mod.UUID, timeout: float | None = None) -> Task:
        """Wait until a task (following its retry chain) ends; TimeoutError when time runs out.

        An unknown uuid is a :class:`~qtasks.exc.TaskNotFoundError` at once.
        """
        uuid = check_uuid(uuid)
        await self._here()
        async with asyncio.timeout(timeout):
            await self.core.connect()
            while True:
                # The last known task of the chain; a finished one the view dropped is read back.
                task = await self._follow(uuid)
                if task.is_finished and not (task.status == "retry" and task.retry_child_uuid):
                    return task
                uuid = task.uuid
                await self.core.store.view.wait_for(uuid, lambda t: t is None or t.is_finished, None)

    async def get(self, uuid: str | uuid_mod.UUID) -> Task | None:
        """The task's latest status, or None if no such task is known (after reading the log to its end)."""
        uuid = check_uuid(uuid)
        await self._here()
        await self.core.connect()
        return await self.core.store.lookup(uuid)

    def stream(
        self, uuid: str | uuid_mod.UUID, *, timeout: float | None = None, from_seq: int = 0, meta: bool = False
    ) -> AsyncIterator[Any]:
        """The task's handled values in order, live; ends when the task ends (follows retries).

        ``from_seq=N`` starts at the task's value N (resume after seq N - 1); ``meta=True``
        yields :class:`~qtasks.StreamItem` s with ``seq``, ``attempt`` and ``value``, and an
        item with ``retried_as`` where a failed task hands over to its retry.
        """
        if isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 0:
            raise ValueError(f"from_seq must be an int of 0 or more, got {from_seq!r}")
        return self._stream(check_uuid(uuid), timeout, from_seq, meta)

    async def _stream(self, uuid: str, timeout: float | None, from_seq: int, meta: bool) -> AsyncIterator[Any]:
        await self._here()
        async for item in stream_results(
            self.core, self._results_reader, uuid, timeout=timeout, from_seq=from_seq, meta=meta
        ):
            yield item

    async def cancel(self, uuid: str | uuid_mod.UUID, reason: str = "") -> bool:
        """Cancel a queued or running task (or the retry it handed over to).

        False when it is unknown or has ended, also when it ended just before (as its status
        partition says), unless a worker ended it as ``cancel`` on this very cancel. A queued
        task ends as ``cancel`` at once, final in every view; a running one stops at its next
        await, yield or ``ctx.sleep``, and one whose code is already done ends as it would,
        except that a failed run is not retried.
        """
        uuid = check_uuid(uuid)
        await self._here()
        await self.core.connect()
        try:
            task = await self._follow(uuid)
        except TaskNotFoundError:
            return False
        if task.is_finished:
            return False
        reason = reason or f"{task.task_name}.cancel"
        await self.core.send_control(ControlRecord(kind="cancel", uuid=task.uuid, reason=reason, at=time.time()))
        if task.status == "process" and task.lease_until > time.time():
            return True  # its worker stops it at its next await or yield, and ends it as cancel
        # Queued (or waiting out a retry's backoff), or its worker died (its lease ran out):
        # end it now. What was stored before now counts first: an ending there wins.
        await self.core.store.catch_up(task.uuid)
        now = self.core.view.get(task.uuid)
        if now is None or now.is_finished:
            # A worker that read the cancel record above may have ended it as cancel already.
            return now is not None and now.status == "cancel"
        if now.status == "process" and now.lease_until > time.time():
            return True
        # Final, in every view: a worker whose short run started meanwhile (the log still says
        # `new` while its `process` is held back) or that wakes past its lease writes its
        # ending below this rev. The run stops at the cancel sent above, or ends as it would.
        now.status = "cancel"
        now.cancel_reason = reason
        now.lease_until = 0.0
        now.updated_at = time.time()
        await self.core.store.write(now, durable=True, rev=CANCEL_REV)
        return True

    # -- worker ----------------------------------------------------------------------

    def _lock(self) -> asyncio.Lock:
        if self._lifecycle is None:
            self._lifecycle = asyncio.Lock()
        return self._lifecycle

    async def start(self, concurrency: int | None = None) -> Worker:
        """Start a worker in this program (returns once it has joined the group); a second call returns it."""
        await self._here()
        show_logs(
            self.config.log_level, self.config.log_format
        )  # the program may have configured logging since the app was made
        async with self._lock():
            if self.worker is not None and self.worker._started:
                return self.worker
            self._include_shared()  # @shared_task: every app's worker takes them (its own of a name wins)
            if self.config.metrics_port and self.metrics is None:
                await self.serve_metrics()
            await self.events.fire("starting", app=self)
            await self.plugins.start()
            worker = Worker(
                self.core,
                self.registry,
                self.plugins,
                self.events,
                app=self,
                user_app=self.user_app,
                group_id=self.group_id,
                concurrency=concurrency,
            )
            await worker.start()
            self.worker = worker
            await self.events.fire("worker_running", app=self, worker=worker)
            return worker

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the worker (running tasks get ``timeout``, default ``stop_timeout``) and disconnect."""
        await self._here()
        async with self._lock():
            await self.events.fire("stopping", app=self)
            worker = self.worker
            if worker is not None and worker._started:
                await self.events.fire("worker_stopping", app=self, worker=worker)
                await worker.stop(timeout)
            try:
                await self.plugins.stop()
                await self.close()
            finally:
                metrics, self.metrics = self.metrics, None
                if metrics is not None:
                    await metrics.stop()

    async def serve_metrics(self, port: int | None = None, host: str | None = None) -> MetricsServer:
        """Serve ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz`` on ``port`` (default ``metrics_port``; 0 picks a free one).

        :meth:`start` calls it when ``metrics_port`` is set; :meth:`stop` stops it. A second
        call returns the server already running.
        """
        from qtasks.metrics import MetricsServer  # the server and its library load only when served

        await self._here()
        if self.metrics is None:
            server = MetricsServer(
                self,
                self.config.metrics_port if port is None else port,
                self.config.metrics_host if host is None else host,
            )
            await server.start()
            self.metrics = server
        return self.metrics

    @property
    def _results_reader(self) -> ResultsReader:
        if self._reader is None:
            self._reader = ResultsReader(self.core)
        return self._reader

    async def close(self) -> None:
        """Disconnect (a worker started here should be stopped with :meth:`stop`): open streams
        end with :class:`~qtasks.exc.AppClosedError`. The app connects again when used."""
        await self._here()
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.stop()
        await self.core.close()

    async def __aenter__(self) -> QueueTasks:
        """``async with app:`` connects now (errors show here) and stops everything at the end."""
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve(self, concurrency: int | None = None) -> None:
        """Run a worker until SIGINT or SIGTERM (or until it fails for good), then stop gracefully."""
        worker = await self.start(concurrency)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            await worker.supervisor.wait(stop.wait())
        finally:
            await self.stop()

    def run_forever(self, concurrency: int | None = None) -> None:
        """Run a worker in the foreground until interrupted (for the CLI and ``python app.py``)."""
        asyncio.run(self.serve(concurrency))
