"""One run of one task: its result sink, its status writes, the executor, and its conclusion.

:class:`TaskRun` writes ``process`` (attempt n, a lease), runs the task through the
executor (every handled value goes to the :class:`ResultSink` the moment it is
yielded), then writes the attempt's end marker and the terminal status, durably, so a
finished task is on the log before its offset may be committed. A failed run that may be
retried ends as ``retry`` and hands over to a child task submitted with a
``not_before`` time: the backoff holds no concurrency slot.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from concurrent.futures import Executor
from typing import Any

import msgspec

from qtasks.core import Core
from qtasks.decisions import ENCODE_ERRORS, check_result, conclude
from qtasks.delivery import deliver
from qtasks.exc import ConnectorError, error_of
from qtasks.executor import Outcome, TaskExecutor
from qtasks.partitioner import partition_for
from qtasks.plugins import Events, PluginManager
from qtasks.records import ResultRecord, StatusHead, Task, TaskRecord, encode
from qtasks.registry import TaskSpec
from qtasks.retry import backoff

log = logging.getLogger("qtasks.worker")

_EVENTS = {"success": "task_success", "error": "task_error", "cancel": "task_cancel"}


class ResultSink:
    """Writes a task's handled values as result records and keeps a bounded ``returning``."""

    __slots__ = (
        "_attempt",
        "_bytes",
        "_key",
        "_limit",
        "_max_bytes",
        "_max_items",
        "_partition",
        "_send",
        "_topic",
        "_trouble",
        "_uuid",
        "error",
        "items",
        "seq",
    )

    def __init__(self, core: Core, uuid: str, attempt: int, partition: int) -> None:
        self._send = core.broker.producer.send
        self._topic = core.topics.results
        self._uuid = uuid
        self._key = uuid.encode()
        self._partition = partition
        self._attempt = attempt
        self._limit = core.record_limit(core.topics.results)
        self._trouble = core.trouble
        self.seq = 0
        self.items: list[Any] | None = []
        self._bytes = 0
        self._max_items = core.config.returning_max_items
        self._max_bytes = core.config.returning_max_bytes
        #: The first delivery error of a value of this attempt (the attempt then ends as error).
        self.error: BaseException | None = None

    async def emit(self, value: Any) -> None:
        """One result record for one handled value; a value that cannot be stored is an error."""
        try:
            raw = encode(ResultRecord(uuid=self._uuid, seq=self.seq, attempt=self._attempt, value=value))
        except ENCODE_ERRORS as exc:
            raise TypeError(
                f"the task yielded a value of type {type(value).__name__} that cannot be encoded as JSON: {exc}"
            ) from None
        if len(raw) > self._limit:
            raise ValueError(
                f"value {self.seq} of the task is {len(raw)} bytes encoded, over the results topic's limit "
                f"of {self._limit} bytes (max_record_bytes, or the topic's max.message.bytes): yield smaller values"
            )
        self.seq += 1
        items = self.items
        if items is not None:
            self._bytes += len(raw)
            if len(items) >= self._max_items or self._bytes > self._max_bytes:
                self.items = None
            else:
                items.append(value)
        delivery = await self._send(self._topic, raw, key=self._key, partition=self._partition)
        if delivery is not None:
            delivery.add_done_callback(self._delivered)  # type: ignore[attr-defined]

    def _delivered(self, delivery: Any) -> None:
        if delivery.cancelled():
            return
        error = delivery.exception()  # read every failure, so none is reported as never retrieved
        if error is not None and self.error is None:
            self.error = error

    async def end(self, status: str) -> None:
        """Write the end marker of this attempt and wait until it is stored.

        All of a task's results go to one partition, in order: once the marker is
        stored, every value before it was either stored or reported in ``error``.
        """
        raw = encode(ResultRecord(uuid=self._uuid, seq=self.seq, attempt=self._attempt, end=True, status=status))

        def send() -> Any:
            return self._send(self._topic, raw, key=self._key, partition=self._partition)

        await deliver(send, what=f"end of the results of {self._uuid}", trouble=self._trouble)


@dataclasses.dataclass(slots=True)
class Host:
    """What a run needs from the worker that hosts it."""

    core: Core
    worker_id: str
    plugins: PluginManager
    events: Events
    #: The app passed to events (``app=``) and the one the task's context sees.
    app: Any
    user_app: Any
    pool: Executor
    worker: Any


class TaskRun:
    """One attempt of one task on this worker."""

    def __init__(self, host: Host, rec: TaskRecord, spec: TaskSpec, head: StatusHead | None, attempt: int) -> None:
        self.host = host
        self.rec = rec
        self.spec = spec
        self.attempt = attempt
        core = host.core
        self.partition = partition_for(rec.uuid, core.results_partitions)
        self.task = base_status(rec, head, host.worker_id)
        self.sink = ResultSink(core, rec.uuid, attempt, self.partition)
        #: Set once the run writes its ending: lease renewals stop.
        self.concluding = False
        executor_cls = spec.executor or TaskExecutor
        self.executor: TaskExecutor = executor_cls(
            spec,
            uuid=rec.uuid,
            args=rec.args,
            kwargs=rec.kwargs,
            sink=self.sink,
            app=host.user_app,
            plugins=host.plugins,
            thread_pool=host.pool,
            broker=core.broker,
        )

    async def start(self) -> None:
        """Write ``process``: attempt n, this worker's lease, where the results start."""
        core = self.host.core
        now = time.time()
        self.task = msgspec.structs.replace(
            self.task,
            status="process",
            attempt=self.attempt,
            lease_until=now + core.config.lease_timeout,
            results_partition=self.partition,
            # Every result of this run lands after this offset: a reader starts here.
            results_offset=core.broker.producer.known_end(core.topics.results, self.partition),
            updated_at=now,
        )
        self.task = await core.store.write(self.task)

    async def renew(self) -> None:
        """Renew the lease, with the progress so far (``yield_count``)."""
        if self.concluding:
            return
        now = time.time()
        renewal = msgspec.structs.replace(
            self.task,
            lease_until=now + self.host.core.config.lease_timeout,
            yield_count=self.executor.yield_count,
            updated_at=now,
        )
        # A renewal still waiting for the broker when the task ends is dropped, never written after the end.
        await self.host.core.store.write(renewal, wanted=lambda: not self.concluding)

    async def run(self) -> Task:
        """Start, execute and conclude; return the terminal status as written."""
        host = self.host
        await self.start()
        await trigger(host, "worker_execute_before", task=self.task)
        await host.events.fire("task_running", app=host.app, task=self.task, worker=host.worker)
        outcome = await self.executor.execute()
        return await self.conclude(outcome)

    async def conclude(self, outcome: Outcome) -> Task:
        """Write the end marker and the terminal status (or ``retry`` and its child task)."""
        host, rec, spec, sink = self.host, self.rec, self.spec, self.sink
        core = host.core
        self.concluding = True
        outcome = check_result(spec.name, spec.is_generator, outcome, core.config.returning_max_bytes)
        retries_left = rec.retry if rec.retry is not None else (spec.retry or 0)
        done = conclude(
            outcome,
            is_generator=spec.is_generator,
            retries_left=retries_left,
            retry_on_exc=spec.retry_on_exc,
            items=sink.items,
            count=sink.seq,
        )
        if sink.seq or spec.is_generator:
            # Results are stored before the status says the task ended, so a reader who
            # sees the terminal status can read every value.
            try:
                await sink.end(done.status)
            except ConnectorError as exc:  # refused for good (retriable ones are retried)
                sink.error = sink.error or exc
        traceback = outcome.traceback
        status = done.status
        if sink.error is not None:
            status = "error"
            traceback = f"ConnectorError: a value of this task was not stored: {sink.error}"
        child_uuid = None
        if status == "retry":
            delay = 0.0 if host.worker._stopping else backoff(rec.retry_count, *_backoff(core))
            child = await core.submit(
                rec.task_name,
                rec.args,
                rec.kwargs,
                priority=rec.priority,
                retry=done.retries_left,
                retry_parent_uuid=rec.uuid,
                retry_count=rec.retry_count + 1,
                not_before=time.time() + delay,
            )
            child_uuid = child.uuid
        final = msgspec.structs.replace(
            self.task,
            status=status,
            yield_count=sink.seq,
            returning=done.returning,
            returning_truncated=done.truncated,
            traceback=traceback,
            cancel_reason=outcome.cancel_reason,
            lease_until=0.0,
            retry_child_uuid=child_uuid,
            retry=retries_left if child_uuid else self.task.retry,
            updated_at=time.time(),
        )
        self.task = await core.store.write(final, durable=True)
        if status in ("error", "retry"):
            kind, message = error_of(traceback)
            then = f"; retried as {child_uuid}" if child_uuid else ""
            log.info(
                "task %s (%s) failed: %s%s",
                self.task.uuid,
                self.task.task_name,
                f"{kind}: {message}" if message else kind,
                then,
            )
            await trigger(host, "worker_task_error", task=self.task, exc=outcome.exc)
        await trigger(host, "worker_execute_after", task=self.task)
        if event := _EVENTS.get(status):
            await host.events.fire(event, app=host.app, task=self.task, exc=outcome.exc, worker=host.worker)
        await host.events.fire("task_stopping", app=host.app, task=self.task, worker=host.worker)
        return self.task

    async def release(self) -> None:
        """Give up this run: its lease ends now, so the partition's next owner runs it at once."""
        core = self.host.core
        head = core.view.head(self.rec.uuid)
        if head is None or head.is_finished:
            return
        try:
            await core.store.write(msgspec.structs.replace(self.task, lease_until=0.0, updated_at=time.time()))
            await core.broker.producer.flush()
        except ConnectorError as exc:
            log.warning("could not release %s: %s", self.rec.uuid, exc)


def _backoff(core: Core) -> tuple[float, float]:
    return core.config.retry_backoff_base, core.config.retry_backoff_max


def base_status(rec: TaskRecord, head: StatusHead | None, worker_id: str) -> Task:
    """The status record of ``rec`` before this worker wrote anything."""
    return Task(
        uuid=rec.uuid,
        task_name=rec.task_name,
        status="new",
        priority=rec.priority,
        args=rec.args,
        kwargs=rec.kwargs,
        created_at=rec.created_at,
        updated_at=time.time(),
        retry=rec.retry,
        retry_parent_uuid=rec.retry_parent_uuid,
        retry_count=rec.retry_count,
        attempt=head.attempt if head is not None else 0,
        worker=worker_id,
    )


async def end_without_running(host: Host, rec: TaskRecord, head: StatusHead | None, status: str, **fields: Any) -> Task:
    """End a task that does not run here (cancelled while queued, unknown): its status, durably."""
    task = base_status(rec, head, host.worker_id)
    task.status = status  # type: ignore[assignment]
    for name, value in fields.items():
        setattr(task, name, value)
    written = await host.core.store.write(task, durable=True)
    if status == "cancel":
        await host.events.fire("task_cancel", app=host.app, task=written, exc=None, worker=host.worker)
    return written


async def end_unfinished(host: Host, rec: TaskRecord, exc: BaseException) -> bool:
    """Something failed outside the task (a bug, a write refused for good): end it as error; False if not even that."""
    text = "".join(traceback.format_exception(exc))[-8000:]
    try:
        await end_without_running(
            host,
            rec,
            host.core.view.head(rec.uuid),
            "error",
            traceback=f"the worker could not finish this task:\n{text}",
        )
    except ConnectorError as again:
        # Not even the error could be written: the offset stays uncommitted, so the
        # record is delivered again after a restart or rebalance (at least once).
        log.error("could not write the error status of %s: %s", rec.uuid, again)
        return False
    return True


async def trigger(host: Host, name: str, **kwargs: Any) -> None:
    """Fire a worker trigger; a failing plugin is logged and never leaves a task unfinished."""
    if len(host.plugins):
        try:
            await host.plugins.trigger(name, worker=host.worker, **kwargs)
        except Exception:
            log.exception("plugin trigger %s failed", name)
