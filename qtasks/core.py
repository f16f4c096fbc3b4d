"""The core every part of an app shares: settings, the connector, the topics, the status store, submit.

The app (client and registry), the worker and the streams all hold one :class:`Core`
and never each other: imports point one way (app -> worker -> runner -> core -> store).
The core connects once (topics created, the status topic read to its end), follows the
topics' partition counts while it runs (a topic that grows is read in full), and is the
one place a task is submitted.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuid_mod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from qtasks.config import QueueConfig
from qtasks.connectors import Connector, TopicSpec, from_url
from qtasks.delays import KEY, LEVELS, delay_headers, level_for
from qtasks.delivery import Trouble, deliver, deliver_together
from qtasks.exc import ConnectorError
from qtasks.partitioner import partition_for
from qtasks.records import ControlRecord, Task, TaskRecord, encode
from qtasks.stats import Stats
from qtasks.store import StatusStore
from qtasks.supervise import Supervisor
from qtasks.tracing import Headers, SubmitTrace, Tracer
from qtasks.validate import encode_task_record

if TYPE_CHECKING:
    from qtasks.transactions import PartitionTxn

log = logging.getLogger("qtasks.core")


class Topics:
    """The names of an app's topics: ``<name>.tasks``, ``.results``, ``.status``, ``.control``, ``.dlq``, ``.delays``, ``.schedule``."""

    def __init__(self, name: str) -> None:
        self.tasks = f"{name}.tasks"
        self.results = f"{name}.results"
        self.status = f"{name}.status"
        self.control = f"{name}.control"
        self.dlq = f"{name}.dlq"
        self.delays = f"{name}.delays"
        self.schedule = f"{name}.schedule"

    def all(self) -> list[str]:
        """Every topic name of the app."""
        return [self.tasks, self.results, self.status, self.control, self.dlq, self.delays, self.schedule]


class NewTask(NamedTuple):
    """A task ready to submit: its ``new`` status, its encoded task record, and the status record to write."""

    task: Task
    raw: bytes
    status: tuple[Task, bytes]


class Core:
    """Settings, connector, topics and status store of one app, and the one way to submit a task."""

    def __init__(self, name: str, broker_url: str, config: QueueConfig) -> None:
        self.name = name
        self.config = config
        self.topics = Topics(name)
        self.broker_url = broker_url
        self.broker: Connector = from_url(broker_url, config)
        self.tasks_partitions = config.tasks_partitions
        self.results_partitions = config.results_partitions
        self.delays_partitions = len(LEVELS)
        self.trouble = Trouble()
        #: What this app's worker and client did (the metrics endpoint shows it).
        self.stats = Stats()
        #: Told of each submission and run when traces are on (``qtasks.otel.instrument``).
        self.tracer: Tracer | None = None
        self.supervisor = Supervisor(f"{name} client")
        self.store = StatusStore(self.topics.status, config, self.supervisor, self.trouble)
        self.connected = False
        self._lock: asyncio.Lock | None = None
        self._closed: asyncio.Event | None = None

    @property
    def view(self) -> Any:
        """The status view (``core.store.view``)."""
        return self.store.view

    @property
    def closed(self) -> asyncio.Event:
        """Set when the core is closed (open streams end with an error)."""
        if self._closed is None:
            self._closed = asyncio.Event()
        return self._closed

    def use_broker(self, broker_url: str) -> None:
        """Switch to another broker URL (before connecting)."""
        if self.connected:
            raise RuntimeError("use_broker must be called before the app connects")
        self.broker_url = broker_url
        self.broker = from_url(broker_url, self.config)

    # -- connection ------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect once: start the connector, create the topics, read the status topic to its end."""
        if self.connected:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.connected:
                return
            await self.broker.start()
            try:
                await self._prepare()
            except BaseException:
                await self.supervisor.stop()
                await self.store.stop()
                await self.broker.stop()
                raise
            self.closed.clear()
            self.connected = True

    async def _prepare(self) -> None:
        config = self.config

        def spec(name: str, partitions: int, compacted: bool = False) -> TopicSpec:
            return TopicSpec(
                name,
                partitions,
                compacted=compacted,
                replication_factor=config.replication_factor,
                config={"min.insync.replicas": str(config.insync_replicas)},
            )

        await self.broker.ensure_topics(
            [
                spec(self.topics.tasks, config.tasks_partitions),
                spec(self.topics.results, config.results_partitions),
                spec(self.topics.status, config.status_partitions, compacted=True),
                spec(self.topics.control, config.control_partitions),
                spec(self.topics.dlq, 1),
                spec(self.topics.delays, len(LEVELS)),
                spec(self.topics.schedule, 1, compacted=True),
            ]
        )
        # A client writes tasks (delayed ones too), their `new` statuses and cancels, and
        # reads statuses and results.
        topics = self.topics
        await self.broker.check_access(
            {
                topics.tasks: ("write",),
                topics.delays: ("write",),
                topics.status: ("read", "write"),
                topics.control: ("write",),
                topics.results: ("read",),
            }
        )
        # Topics that already existed keep their partition counts; use what is there.
        self.tasks_partitions = await self.broker.partitions_for(self.topics.tasks)
        self.results_partitions = await self.broker.partitions_for(self.topics.results)
        self.delays_partitions = await self.broker.partitions_for(self.topics.delays)
        status_partitions = await self.broker.partitions_for(self.topics.status)
        await self.store.start(self.broker, status_partitions, self.record_limit(self.topics.status))
        self.supervisor.spawn("partitions", self._follow_partitions)

    def record_limit(self, topic: str) -> int:
        """The largest record value ``topic`` accepts: ``max_record_bytes``, or less if the broker says so."""
        return min(self.config.max_record_bytes, self.broker.record_limit(topic))

    async def _follow_partitions(self) -> None:
        """Partitions added to the topics while the app runs are used: statuses on them are read."""
        refresh = self.config.metadata_refresh_interval
        while True:
            await asyncio.sleep(refresh)
            try:
                tasks = await self._partitions(self.topics.tasks)
                results = await self._partitions(self.topics.results)
                status = await self._partitions(self.topics.status)
            except ConnectorError as exc:
                if not exc.retriable:
                    raise
                continue
            self.tasks_partitions = max(self.tasks_partitions, tasks)
            self.results_partitions = max(self.results_partitions, results)
            await self.store.follow(status)

    async def _partitions(self, topic: str) -> int:
        return await self.broker.partitions_for(topic, refresh=True)

    async def close(self) -> None:
        """Stop the background loops and disconnect (idempotent)."""
        self.closed.set()
        try:
            await self.supervisor.stop()
            await self.store.stop()
        finally:
            # Whatever the store's stop raised, the connector is stopped (its producer, its
            # connections). Also when never connected: a failed start may have left a client
            # start to stop.
            self.connected = False
            await self.broker.stop()
            self._lock = None

    # -- writing ---------------------------------------------------------------------

    def sender(
        self, topic: str, raw: bytes, key: str, partitions: int, headers: Headers | None = None
    ) -> Callable[[], Any]:
        """A call that enqueues one record to the partition of ``key`` (for :mod:`qtasks.delivery`)."""
        producer = self.broker.producer
        partition = partition_for(key, partitions)
        raw_key = key.encode()

        def send() -> Any:
            return producer.send(topic, raw, key=raw_key, partition=partition, headers=headers)

        return send

    def task_route(
        self, uuid: str, not_before: float, headers: Headers | None = None, *, key: str | None = None
    ) -> tuple[str, int, Headers | None]:
        """Where a task record goes: (topic, partition, headers).

        The tasks topic, in the partition of its ``key`` (an ordered task) or of its uuid;
        or, for a task due a second or more from now, the level of the delays topic it waits
        in (:mod:`qtasks.delays`), with its due time (and key) in the headers.
        """
        if not_before:
            now = time.time()
            level = level_for(not_before - now, self.delays_partitions)
            if level is not None:
                extra = [*(headers or ()), (KEY, key.encode())] if key is not None else headers or ()
                return self.topics.delays, level, delay_headers(not_before, now, extra)
        return self.topics.tasks, partition_for(key if key is not None else uuid, self.tasks_partitions), headers

    def _task_sender(self, new: NewTask, headers: Headers | None) -> Callable[[], Any]:
        """A call that enqueues ``new``'s task record where :meth:`task_route` says (worked out at each try)."""
        producer = self.broker.producer
        raw, uuid = new.raw, new.task.uuid
        key = uuid.encode()

        def send() -> Any:
            topic, partition, with_headers = self.task_route(uuid, new.task.not_before, headers, key=new.task.key)
            return producer.send(topic, raw, key=key, partition=partition, headers=with_headers)

        return send

    async def send(self, topic: str, raw: bytes, key: str, partitions: int, *, what: str) -> None:
        """Deliver one record to the partition of ``key`` (retried while the failure is retriable)."""
        await deliver(self.sender(topic, raw, key, partitions), what=what, trouble=self.trouble)

    async def submit(
        self,
        task_name: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        priority: int = 0,
        retry: int | None = None,
        retry_parent_uuid: str | None = None,
        retry_count: int = 0,
        not_before: float = 0.0,
        key: str | None = None,
        after: Sequence[str] = (),
        txn: PartitionTxn | None = None,
        uuid: str | None = None,
    ) -> Task:
        """Write the task's ``new`` status and its task record; return once both are stored.

        ``txn`` (exactly-once, a retry's child): both go in that transaction instead, and
        the view shows the task once it commits. ``uuid``: the task's id (a replayed dead
        letter's is derived from the letter); a new uuid4 otherwise.
        """
        await self.connect()
        new = self.new_task(
            task_name,
            args,
            kwargs,
            priority=priority,
            retry=retry,
            retry_parent_uuid=retry_parent_uuid,
            retry_count=retry_count,
            not_before=not_before,
            uuid=uuid,
            key=key,
            after=after,
        )
        if txn is not None:
            uuid, view = new.task.uuid, self.store.view
            status, raw_status = new.status
            await txn.send(
                self.store.topic,
                raw_status,
                key=uuid.encode(),
                partition=partition_for(uuid, self.store.partitions),
                on_commit=lambda: view.apply(status, raw_status),
            )
            topic, partition, headers = self.task_route(uuid, not_before, key=key)
            await txn.send(topic, new.raw, key=uuid.encode(), partition=partition, headers=headers)
            return new.task
        await self.submit_all([new])
        return new.task

    def new_task(
        self,
        task_name: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        priority: int = 0,
        retry: int | None = None,
        retry_parent_uuid: str | None = None,
        retry_count: int = 0,
        not_before: float = 0.0,
        uuid: str | None = None,
        key: str | None = None,
        after: Sequence[str] = (),
    ) -> NewTask:
        """A task to submit, encoded and checked (``ValueError``/``TypeError`` for arguments that cannot be sent).

        ``uuid``: the task's id (a periodic task's tick has its own); a new uuid4 otherwise.
        """
        uuid = uuid or str(uuid_mod.uuid4())
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
            not_before=not_before,
            key=key,
            after=list(after),
        )
        raw = encode_task_record(record, self.record_limit(self.topics.tasks))
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
            not_before=not_before,
            key=key,
            after=list(after),
        )
        return NewTask(task, raw, self.store.prepare(task))

    async def submit_all(self, tasks: Sequence[NewTask]) -> None:
        """Store each task's ``new`` status and task record, with one wait for all of them.

        Both are stored before this returns: another process that asks next finds every
        task. A task's status is sent before its record, so a worker finds it.
        """
        await self.connect()
        sends = []
        tracer, traces = self.tracer, []
        for new in tasks:
            uuid = new.task.uuid
            headers = None
            if tracer is not None:
                partition = partition_for(new.task.key or uuid, self.tasks_partitions)
                try:
                    traces.append(trace := tracer.submit(new.task.task_name, uuid, self.topics.tasks, partition))
                    headers = trace.headers
                except Exception:  # a trace never changes what happens to the task
                    log.warning("the tracer failed on the submission of %s", uuid, exc_info=True)
            sends.append((self.store.sender(uuid, new.status[1]), f"status new of {uuid}"))
            sends.append((self._task_sender(new, headers), f"task {uuid}"))
        try:
            await deliver_together(sends, trouble=self.trouble)
        except BaseException as exc:
            _end_traces(traces, exc)
            raise
        _end_traces(traces)
        view = self.store.view
        stats = self.stats
        for new in tasks:
            view.apply(*new.status)
            stats.submit(new.task.task_name)

    async def resend(self, new: NewTask) -> None:
        """Store ``new``'s task record again, not its status (a copy of a task is one task: its uuid)."""
        await deliver(self._task_sender(new, None), what=f"task {new.task.uuid}", trouble=self.trouble)

    async def send_control(self, command: ControlRecord) -> None:
        """Send a command to whichever worker runs the task (ValueError if it is over the control
        topic's record limit: workers would not read it, and the command would be lost)."""
        raw = encode(command)
        limit = self.record_limit(self.topics.control)
        if len(raw) > limit:
            raise ValueError(
                f"the {command.kind} of {command.uuid} is {len(raw)} bytes encoded, over the limit of {limit}"
                " (max_record_bytes): give a shorter reason"
            )
        await self.send(
            self.topics.control,
            raw,
            command.uuid,
            self.config.control_partitions,
            what=f"{command.kind} of {command.uuid}",
        )


def _end_traces(traces: list[SubmitTrace], error: BaseException | None = None) -> None:
    for trace in traces:
        try:
            trace.end(error)
        except Exception:  # a trace never changes what happens to the task
            log.warning("the tracer failed at the end of a submission", exc_info=True)
