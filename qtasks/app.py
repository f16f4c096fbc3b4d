"""The app: task registry, components and client, on one connector.

This is the asyncio app (``qtasks.asyncio.QueueTasks``): client methods are
coroutines. ``qtasks.QueueTasks`` is a thin blocking facade over it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec

from qtasks import _state
from qtasks.config import QueueConfig
from qtasks.connectors import Connector, TopicPartition, TopicSpec, from_url
from qtasks.exc import ConfigError
from qtasks.partitioner import partition_for
from qtasks.plugins import Events, PluginManager
from qtasks.records import ControlRecord, Task, TaskRecord, encode
from qtasks.registry import Registry, TaskSpec
from qtasks.status import StatusView
from qtasks.stream import ResultsReader, stream_results
from qtasks.worker import Worker

log = logging.getLogger("qtasks.app")


class Topics:
    """The names of an app's topics: ``<name>.tasks``, ``.results``, ``.status``, ``.control``, ``.dlq``."""

    def __init__(self, name: str) -> None:
        self.tasks = f"{name}.tasks"
        self.results = f"{name}.results"
        self.status = f"{name}.status"
        self.control = f"{name}.control"
        self.dlq = f"{name}.dlq"


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
        if not name or any(c in name for c in "/\\ :"):
            raise ConfigError(f"app name must be non-empty without '/', '\\\\', ':' or spaces, got {name!r}")
        self.name = name
        self.broker_url = broker_url or os.environ.get("QTASKS_BROKER_URL") or "memory://"
        self.config = config if config is not None else QueueConfig.from_env(**settings)
        logging.getLogger("qtasks").setLevel(self.config.log_level)
        self.topics = Topics(name)
        self.registry = Registry()
        self.plugins = PluginManager()
        self.events = Events()
        self.broker: Connector = from_url(self.broker_url, self.config)
        self.worker: Worker | None = None
        self.view = StatusView(self.config.max_record_bytes)
        self.results_partitions = self.config.results_partitions
        self.tasks_partitions = self.config.tasks_partitions
        self.status_partitions = self.config.status_partitions
        self._facade: Any = None
        self._connected = False
        self._connect_lock: asyncio.Lock | None = None
        self._tailer: asyncio.Task[None] | None = None
        self._reader: ResultsReader | None = None
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
            spec = TaskSpec(
                name=name or fn.__name__,
                func=fn,
                priority=priority or 0,
                echo=echo,
                max_time=max_time,
                retry=retry,
                retry_on_exc=retry_on_exc,
                decode=decode,
                tags=list(tags or []),
                description=description,
                generate_handler=generate_handler,
                executor=executor,
                middlewares_before=list(middlewares_before or []),
                middlewares_after=list(middlewares_after or []),
                extra=extra,
                app=self.user_app,
            )
            self.registry.add(spec)
            return spec

        if func is not None:
            return register(func)
        return register

    def use_broker(self, broker_url: str) -> None:
        """Switch to another broker URL (before the app connects)."""
        if self._connected:
            raise RuntimeError("use_broker must be called before the app connects")
        self.broker_url = broker_url
        self.broker = from_url(broker_url, self.config)

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

    # -- connection and the status view ----------------------------------------------

    async def _connect(self) -> None:
        if self._connected:
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._connected:
                return
            await self.broker.start()
            try:
                await self._prepare()
            except BaseException:
                await self.broker.stop()
                raise
            self._connected = True

    async def _prepare(self) -> None:
        """Create the topics, then read the status topic into the view."""
        config = self.config
        await self.broker.ensure_topics(
            [
                TopicSpec(self.topics.tasks, config.tasks_partitions, replication_factor=config.replication_factor),
                TopicSpec(self.topics.results, config.results_partitions, replication_factor=config.replication_factor),
                TopicSpec(
                    self.topics.status,
                    config.status_partitions,
                    compacted=True,
                    replication_factor=config.replication_factor,
                ),
                TopicSpec(self.topics.control, config.control_partitions, replication_factor=config.replication_factor),
                TopicSpec(self.topics.dlq, 1, replication_factor=config.replication_factor),
            ]
        )
        # Topics that already existed keep their partition counts; use what is there.
        self.tasks_partitions = await self.broker.partitions_for(self.topics.tasks)
        self.results_partitions = await self.broker.partitions_for(self.topics.results)
        self.status_partitions = await self.broker.partitions_for(self.topics.status)
        consumer = self.broker.consumer(None, client_id=f"{self.name}-status")
        await consumer.start()
        tps = [TopicPartition(self.topics.status, p) for p in range(self.status_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(tps)
        ends = await consumer.end_offsets(tps)
        self._tailer = asyncio.get_running_loop().create_task(self._tail_status(consumer, ends))
        await self.view.caught_up.wait()

    async def _tail_status(self, consumer: Any, ends: dict[TopicPartition, int]) -> None:
        view = self.view
        pending = {tp for tp, end in ends.items() if end > 0}
        positions: dict[TopicPartition, int] = {}
        if not pending:
            view.caught_up.set()
        try:
            while True:
                try:
                    records = await consumer.getmany(timeout=0.2 if pending else 1.0)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("status tail failed; retrying in 1 s")
                    await asyncio.sleep(1)
                    continue
                for record in records:
                    positions[record.tp] = record.offset + 1
                    try:
                        view.apply_raw(record.key, record.value)
                    except Exception as exc:
                        log.warning("ignored a status record at %s@%d: %s", record.tp, record.offset, exc)
                if pending:
                    # Caught up when the consumer's position (which moves past offsets that
                    # compaction removed) reaches the end seen at start.
                    pending = {tp for tp in pending if positions.get(tp, -1) < ends[tp]}
                    if pending and not records:
                        pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
                    if not pending:
                        view.caught_up.set()
        finally:
            await consumer.stop()

    async def _write_status(self, task: Task) -> None:
        task.rev = self.view.rev(task.uuid) + 1
        raw = encode(task)
        if len(raw) > self.config.max_record_bytes:
            raw = self._slim(task)
        await self.broker.producer.send(
            self.topics.status, raw, key=task.uuid.encode(), partition=partition_for(task.uuid, self.status_partitions)
        )
        # Read-your-writes: this process sees the new status at once, once it is on its way.
        self.view.apply(task, raw)

    def _slim(self, task: Task) -> bytes:
        """Fit a status record under max_record_bytes: the arguments stay in the task record only."""
        task.args, task.kwargs = [], {}
        raw = encode(task)
        if len(raw) > self.config.max_record_bytes:
            if task.status == "success":
                task.status = "error"
                task.traceback = "ValueError: the task's status record is too large to store; return less"
            task.returning = None
            if task.traceback and len(task.traceback) > 8000:
                task.traceback = task.traceback[-8000:]
            raw = encode(task)
        return raw

    async def _write_tombstone(self, uuid: str) -> None:
        self.view.apply_raw(uuid.encode(), None)
        await self.broker.producer.send(
            self.topics.status, None, key=uuid.encode(), partition=partition_for(uuid, self.status_partitions)
        )

    # -- client ----------------------------------------------------------------------

    async def _submit(
        self,
        task_name: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        priority: int | None = None,
        retry: int | None = None,
        retry_parent_uuid: str | None = None,
        retry_count: int = 0,
    ) -> Task:
        await self._connect()
        spec = self.registry.get(task_name)
        if priority is None:
            priority = spec.priority if spec is not None else 0
        uuid = str(uuid_mod.uuid4())
        now = time.time()
        record = TaskRecord(
            uuid=uuid,
            task_name=task_name,
            args=list(args),
            kwargs=dict(kwargs),
            priority=priority,
            created_at=now,
            retry=retry,
            retry_parent_uuid=retry_parent_uuid,
            retry_count=retry_count,
        )
        try:
            raw = encode(record)
        except (TypeError, msgspec.EncodeError) as exc:
            raise TypeError(f"arguments of task {task_name!r} must be JSON-encodable: {exc}") from None
        if len(raw) > self.config.max_record_bytes:
            raise ValueError(
                f"task {task_name!r} is {len(raw)} bytes encoded, over max_record_bytes={self.config.max_record_bytes}"
            )
        task = Task(
            uuid=uuid,
            task_name=task_name,
            status="new",
            priority=priority,
            args=record.args,
            kwargs=record.kwargs,
            created_at=now,
            updated_at=now,
            retry=retry,
            retry_parent_uuid=retry_parent_uuid,
            retry_count=retry_count,
        )
        await self._write_status(task)
        sent = await self.broker.producer.send(
            self.topics.tasks, raw, key=uuid.encode(), partition=partition_for(uuid, self.tasks_partitions)
        )
        if sent is not None:
            await sent
        return task

    async def add_task(
        self, task_name: str, *args: Any, priority: int | None = None, timeout: float | None = None, **kwargs: Any
    ) -> Task | None:
        """Submit a task; with ``timeout``, wait for it to end and return the finished Task (None if time runs out).

        A task that is retried ends as ``retry`` and hands over to a new task
        (``retry_child_uuid``); the wait follows that chain to its last task.
        """
        task = await self._submit(task_name, args, kwargs, priority=priority)
        if timeout is None:
            return task
        try:
            return await self.wait(task.uuid, timeout)
        except TimeoutError:
            return None

    async def wait(self, uuid: str, timeout: float | None = None) -> Task:
        """Wait until a task (following its retry chain) ends; raise TimeoutError when time runs out."""
        await self._connect()
        async with asyncio.timeout(timeout):
            while True:
                task = await self.view.wait_for(uuid, lambda t: t is not None and t.is_finished, None)
                assert task is not None
                if task.status == "retry" and task.retry_child_uuid:
                    uuid = task.retry_child_uuid
                    continue
                return task

    async def get(self, uuid: str | uuid_mod.UUID) -> Task | None:
        """The task's latest status, or None if no such task is known."""
        await self._connect()
        return self.view.get(str(uuid))

    def stream(self, uuid: str | uuid_mod.UUID, *, timeout: float | None = None) -> AsyncIterator[Any]:
        """The task's handled values in order, live; ends when the task ends (follows retries)."""
        return stream_results(self, str(uuid), timeout=timeout)

    async def cancel(self, uuid: str | uuid_mod.UUID, reason: str = "") -> bool:
        """Cancel a queued or running task; False when it is unknown or already finished."""
        await self._connect()
        uuid = str(uuid)
        task = self.view.get(uuid)
        if task is None or task.is_finished:
            return False
        reason = reason or f"{task.task_name}.cancel"
        command = ControlRecord(kind="cancel", uuid=uuid, reason=reason, at=time.time())
        partition = partition_for(uuid, self.config.control_partitions)
        await self.broker.producer.send(self.topics.control, encode(command), key=uuid.encode(), partition=partition)
        if task.status == "new":
            # Queued: mark it now, the worker that takes it will skip it.
            task.status = "cancel"
            task.cancel_reason = reason
            task.updated_at = time.time()
            await self._write_status(task)
        await self.broker.producer.flush()
        return True

    # -- worker ----------------------------------------------------------------------

    async def start(self, concurrency: int | None = None) -> Worker:
        """Start a worker in this program (returns once it has joined the group)."""
        if self.worker is not None and self.worker._started:
            return self.worker
        await self.events.fire("starting", app=self)
        await self.plugins.start()
        self.worker = Worker(self, concurrency)
        await self.worker.start()
        return self.worker

    async def stop(self, timeout: float | None = None) -> None:
        """Stop the worker (running tasks get ``timeout``, default ``stop_timeout``) and disconnect."""
        await self.events.fire("stopping", app=self)
        if self.worker is not None:
            await self.worker.stop(timeout)
        await self.plugins.stop()
        await self.close()

    def _results_reader(self) -> ResultsReader:
        if self._reader is None:
            self._reader = ResultsReader(self)
        return self._reader

    async def close(self) -> None:
        """Disconnect the client side (the status view, the results reader and the connector)."""
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None
        if self._tailer is not None:
            self._tailer.cancel()
            await asyncio.gather(self._tailer, return_exceptions=True)
            self._tailer = None
        if self._connected:
            await self.broker.stop()
        self._connected = False
        self.view = StatusView(self.config.max_record_bytes)

    async def serve(self, concurrency: int | None = None) -> None:
        """Run a worker until SIGINT or SIGTERM, then stop gracefully."""
        await self.start(concurrency)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            await stop.wait()
        finally:
            await self.stop()

    def run_forever(self, concurrency: int | None = None) -> None:
        """Run a worker in the foreground until interrupted (for the CLI and ``python app.py``)."""
        asyncio.run(self.serve(concurrency))
