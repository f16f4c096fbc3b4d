"""The worker: one poll loop over the tasks topic, as a member of the consumer group.

It only sequences I/O; the decisions live elsewhere (``offsets``, ``retry``, ``status``)
and the running of a task in ``executor``. For each record it:

1. decodes it (a bad record goes to the dead-letter topic with the reason);
2. skips it if the status view says the task already finished (a redelivery) or was
   cancelled while queued, and waits if another live worker holds its lease (a rebalance
   moved the partition while the task runs there);
3. writes status ``process`` (attempt n, its lease), runs the task, streaming each value
   to the results topic, then an end marker;
4. writes the terminal status (or ``retry`` and the child task) and only then marks the
   offset done; the committer commits the lowest unfinished offset of each partition.

Backpressure: when ``concurrency`` tasks run, the worker pauses its partitions but keeps
polling, so the group never sees it as dead (``max.poll.interval.ms``), however long a
task runs. A running task renews its lease every ``lease_interval``; a worker that dies
stops renewing, and the next owner of the partition takes the task over (``attempt`` + 1).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import socket
import time
import uuid as uuid_mod
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgspec

from qtasks.connectors.base import Record, TopicPartition
from qtasks.exc import CommitFailedError, RecordError, TaskNotFoundError
from qtasks.executor import Outcome, TaskExecutor
from qtasks.offsets import PartitionOffsets
from qtasks.partitioner import partition_for
from qtasks.records import (
    ControlRecord,
    DeadLetter,
    ResultRecord,
    Status,
    StatusHead,
    Task,
    TaskRecord,
    decode_control,
    decode_task,
    encode,
)
from qtasks.retry import backoff, should_retry

if TYPE_CHECKING:
    from qtasks.app import QueueTasks

log = logging.getLogger("qtasks.worker")


class _ResultSink:
    """Writes a task's handled values as result records and keeps a bounded ``returning``."""

    __slots__ = (
        "_attempt",
        "_bytes",
        "_key",
        "_max_bytes",
        "_max_items",
        "_partition",
        "_send",
        "_topic",
        "_uuid",
        "items",
        "seq",
    )

    def __init__(self, app: QueueTasks, uuid: str, attempt: int, partition: int) -> None:
        self._send = app.broker.producer.send
        self._topic = app.topics.results
        self._uuid = uuid
        self._key = uuid.encode()
        self._partition = partition
        self._attempt = attempt
        self.seq = 0
        self.items: list[Any] | None = []
        self._bytes = 0
        self._max_items = app.config.returning_max_items
        self._max_bytes = app.config.returning_max_bytes

    async def emit(self, value: Any) -> None:
        """One result record for one handled value."""
        try:
            raw = encode(ResultRecord(uuid=self._uuid, seq=self.seq, attempt=self._attempt, value=value))
        except (TypeError, msgspec.EncodeError) as exc:
            raise TypeError(
                f"the task yielded a value of type {type(value).__name__} that cannot be encoded as JSON: {exc}"
            ) from None
        self.seq += 1
        items = self.items
        if items is not None:
            self._bytes += len(raw)
            if len(items) >= self._max_items or self._bytes > self._max_bytes:
                self.items = None
            else:
                items.append(value)
        await self._send(self._topic, raw, key=self._key, partition=self._partition)

    async def end(self, status: str) -> None:
        """Write the end marker of this attempt and wait until it is stored.

        All of a task's results go to one partition, in order, from an idempotent
        producer: once the marker is acknowledged, every value before it is too.
        """
        raw = encode(ResultRecord(uuid=self._uuid, seq=self.seq, attempt=self._attempt, end=True, status=status))
        delivery = await self._send(self._topic, raw, key=self._key, partition=self._partition)
        if delivery is not None:
            await delivery


class Worker:
    """Runs the app's tasks as a member of the workers' consumer group."""

    def __init__(self, app: QueueTasks, concurrency: int | None = None) -> None:
        self.app = app
        self.concurrency = concurrency or app.config.concurrency
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid_mod.uuid4().hex[:6]}"
        self._consumer: Any = None
        self._control: Any = None
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._owned: set[TopicPartition] = set()
        self._paused = False
        self._in_flight = 0
        #: Records fetched ahead of free slots, so a finishing task is replaced without a
        #: fetch round trip: (priority, arrival, record decoded, record, its partition's offsets).
        self.prefetch = app.config.prefetch if app.config.prefetch >= 0 else self.concurrency
        self._backlog: list[tuple[int, int, TaskRecord | RecordError, Record, PartitionOffsets]] = []
        self._sequence = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self._running: dict[str, TaskExecutor] = {}
        self._active: dict[str, asyncio.Task[Any]] = {}
        self._cancelled: OrderedDict[str, str] = OrderedDict()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self._started = False
        self._room = asyncio.Event()
        self._pool = ThreadPoolExecutor(app.config.thread_pool_size, thread_name_prefix="qtasks-task")
        self.tasks_done = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Join the group and start the loops (poll, control, commit, lease, expiry)."""
        app = self.app
        await app._connect()
        connector = app.broker
        self._consumer = connector.consumer(app.group_id, client_id=self.id)
        self._consumer.subscribe([app.topics.tasks], self)
        await self._consumer.start()
        self._control = connector.consumer(None, client_id=f"{self.id}-control")
        await self._control.start()
        control_tps = [TopicPartition(app.topics.control, p) for p in range(app.config.control_partitions)]
        self._control.assign(control_tps)
        await self._control.seek_to_end(control_tps)
        self._started = True
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._poll_loop(), name="qtasks-poll"),
            loop.create_task(self._control_loop(), name="qtasks-control"),
            loop.create_task(self._commit_loop(), name="qtasks-commit"),
            loop.create_task(self._lease_loop(), name="qtasks-lease"),
        ]
        if app.config.status_ttl > 0:
            self._loops.append(loop.create_task(self._expire_loop(), name="qtasks-expire"))
        log.info("worker %s running tasks %s (concurrency %d)", self.id, app.registry.names(), self.concurrency)
        await app.events.fire("worker_running", app=app, worker=self)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop taking tasks, let running ones finish within ``timeout``, cancel the rest, commit, leave."""
        if not self._started:
            return
        app = self.app
        await app.events.fire("worker_stopping", app=app, worker=self)
        self._stopping = True
        timeout = app.config.stop_timeout if timeout is None else timeout
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=timeout)
            if pending:
                log.warning("stop: %d task(s) still running after %.1f s; handing them back", len(pending), timeout)
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        try:
            await self._commit()
        except Exception:
            log.exception("final commit failed; the uncommitted records will be delivered again")
        await self._consumer.stop()
        await self._control.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._started = False

    # -- rebalance listener ----------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit what is done before the partitions go (eager rebalance)."""
        try:
            await self._commit()
        except Exception as exc:
            log.warning("commit before rebalance failed: %s", exc)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Track the new partitions; running tasks of lost ones go on, their offsets are the new owner's."""
        self._owned = set(assigned)
        # After a rebalance every assigned partition is read again from its committed
        # offset: waiting records come again, and running ones too (they are then
        # joined to the run in progress). So bookkeeping starts afresh; running tasks
        # finish into the trackers they started with, which no longer count.
        self._backlog = []
        self._offsets = {tp: PartitionOffsets() for tp in assigned}
        if self._paused:
            self._consumer.pause(assigned)
        log.info("worker %s assigned %s", self.id, sorted(p.partition for p in assigned))

    # -- loops -----------------------------------------------------------------------

    @property
    def _capacity(self) -> int:
        """Records the worker may still take: running plus waiting stay within concurrency + prefetch."""
        return self.concurrency + self.prefetch - self._in_flight - len(self._backlog)

    async def _poll_loop(self) -> None:
        consumer = self._consumer
        while not self._stopping:
            try:
                records = await consumer.getmany(timeout=0.5, max_records=max(self._capacity, 1))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("poll failed; retrying in 1 s")
                await asyncio.sleep(1)
                continue
            if not records or self._stopping:
                continue
            for record in records:
                self._take(record)
            self._fill()
            if self._capacity <= 0 and not self._paused:
                # Full: stop fetching, but keep polling so the group knows this worker lives.
                self._paused = True
                consumer.pause(self._owned)

    def _take(self, record: Record) -> None:
        """Hold a fetched record in the backlog (its offset counts as unfinished from now on)."""
        offsets = self._offsets.setdefault(record.tp, PartitionOffsets())
        offsets.start(record.offset)
        rec: TaskRecord | RecordError
        try:
            rec = decode_task(record.value, self.app.config.max_record_bytes)
            priority = rec.priority
        except RecordError as exc:
            rec, priority = exc, -(2**31)  # bad records go first: they only need a dead letter
        self._sequence += 1
        heapq.heappush(self._backlog, (priority, self._sequence, rec, record, offsets))

    def _fill(self) -> None:
        """Start backlog records, lowest priority number first, while there is room."""
        backlog = self._backlog
        while backlog and self._in_flight < self.concurrency and not self._stopping:
            _, _, rec, record, offsets = heapq.heappop(backlog)
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._handle(rec, record, offsets))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, rec: TaskRecord | RecordError, record: Record, offsets: PartitionOffsets) -> None:
        handed_back = False
        try:
            if isinstance(rec, RecordError):
                await self._dead_letter(record, str(rec))
            else:
                await self._run_record(rec)
        except asyncio.CancelledError:
            handed_back = True
            raise
        except Exception:
            # Its terminal status may not be written: the offset stays uncommitted (so
            # the partition's commits wait here) and the task runs again after a
            # rebalance or restart. The worker goes on with other records.
            handed_back = True
            log.exception(
                "could not finish %s@%d; it stays uncommitted and will be delivered again", record.tp, record.offset
            )
        finally:
            if not handed_back:
                offsets.finish(record.offset)
            self._in_flight -= 1
            if not self._stopping:
                self._fill()
                if self._paused and self._capacity > 0:
                    self._paused = False
                    self._consumer.resume(self._owned)

    async def _control_loop(self) -> None:
        limit = self.app.config.max_record_bytes
        while True:
            try:
                records = await self._control.getmany(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control poll failed; retrying in 1 s")
                await asyncio.sleep(1)
                continue
            for record in records:
                try:
                    command = decode_control(record.value, limit)
                except RecordError as exc:
                    log.warning("ignored a control record at %s@%d: %s", record.tp, record.offset, exc)
                    continue
                self._on_control(command)

    def _on_control(self, command: ControlRecord) -> None:
        if command.kind != "cancel":
            return
        executor = self._running.get(command.uuid)
        if executor is not None:
            executor.cancel(command.reason or f"{executor.spec.name}.cancel")
            return
        self._cancelled[command.uuid] = command.reason
        while len(self._cancelled) > 10_000:
            self._cancelled.popitem(last=False)

    async def _commit_loop(self) -> None:
        interval = self.app.config.commit_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self._commit()
            except CommitFailedError as exc:
                log.info("%s", exc)
            except Exception:
                log.exception("commit failed; will try again")

    async def _commit(self) -> None:
        offsets = {}
        for tp, tracker in self._offsets.items():
            if tp in self._owned:
                target = tracker.committable()
                if target is not None:
                    offsets[tp] = target
        if not offsets:
            return
        # Everything a finished task wrote must be durable before its offset is committed.
        await self.app.broker.producer.flush()
        await self._consumer.commit(offsets)
        for tp, offset in offsets.items():
            if (kept := self._offsets.get(tp)) is not None:
                kept.committed(offset)

    async def _lease_loop(self) -> None:
        config = self.app.config
        while True:
            await asyncio.sleep(config.lease_interval)
            for uuid, executor in list(self._running.items()):
                current = self.app.view.get(uuid)
                if current is None or current.is_finished or current.worker != self.id:
                    continue
                current.lease_until = time.time() + config.lease_timeout
                current.yield_count = executor.yield_count
                current.updated_at = time.time()
                try:
                    await self.app._write_status(current)
                except Exception:
                    log.exception("lease renewal of %s failed", uuid)

    async def _expire_loop(self) -> None:
        ttl = self.app.config.status_ttl
        while True:
            await asyncio.sleep(min(ttl / 4, 60.0))
            for uuid in list(self.app.view.expired(time.time() - ttl)):
                try:
                    await self.app._write_tombstone(uuid)
                except Exception:
                    log.exception("expiring %s failed", uuid)

    # -- one task --------------------------------------------------------------------

    async def _run_record(self, rec: TaskRecord) -> None:
        uuid = rec.uuid
        existing = self._active.get(uuid)
        if existing is not None:
            # Delivered again while it is handled here (a rebalance gave the partition back).
            await asyncio.shield(existing)
            return
        me = asyncio.current_task()
        assert me is not None
        self._active[uuid] = me
        try:
            await self._admit(rec)
        finally:
            self._active.pop(uuid, None)

    async def _admit(self, rec: TaskRecord) -> None:
        """Decide whether the record runs here, and run it."""
        app = self.app
        uuid = rec.uuid
        current = app.view.head(uuid)
        if current is not None and current.is_finished:
            return
        ttl = app.config.status_ttl
        if current is None and ttl > 0 and rec.created_at < time.time() - ttl:
            # Every submitted task has a status, and only finished ones expire: this one
            # ran long ago and is delivered again (its partition's commit lagged).
            log.warning("skipped %s (%s): older than status_ttl and its status has expired", uuid, rec.task_name)
            return
        if current is not None and current.status == "process" and current.worker not in (None, self.id):
            current = await self._wait_for_lease(uuid)
            if current is not None and current.is_finished:
                return
        if uuid in self._cancelled:
            reason = self._cancelled.pop(uuid) or f"{rec.task_name}.cancel"
            await self._finish(rec, current, "cancel", cancel_reason=reason)
            return
        attempt = (current.attempt if current is not None else 0) + 1
        spec = app.registry.get(rec.task_name)
        if spec is None:
            known = ", ".join(app.registry.names()) or "none"
            exc = TaskNotFoundError(f"unknown task {rec.task_name!r}: this worker knows {known}")
            await self._finish(rec, current, "error", traceback=f"{type(exc).__name__}: {exc}", attempt=attempt)
            await app.events.fire("task_error", app=app, task=app.view.get(uuid), exc=exc)
            return
        await self._execute(rec, spec, current, attempt)

    async def _wait_for_lease(self, uuid: str) -> StatusHead | None:
        """Wait until the task another worker runs ends, or its lease runs out (that worker died)."""
        view = self.app.view
        while True:
            current = view.head(uuid)
            if current is None or current.is_finished or current.status != "process":
                return current
            left = current.lease_until - time.time()
            if left <= 0 or current.worker == self.id:
                log.info("taking over %s from %s (lease expired)", uuid, current.worker)
                return current
            lease = current.lease_until

            def changed(t: StatusHead | None, lease: float = lease) -> bool:
                return t is None or t.is_finished or t.lease_until != lease

            try:
                await view.wait_for(uuid, changed, left)
            except TimeoutError:
                pass

    async def _execute(self, rec: TaskRecord, spec: Any, current: StatusHead | None, attempt: int) -> None:
        app = self.app
        uuid = rec.uuid
        config = app.config
        partition = partition_for(uuid, app.results_partitions)
        task = self._base(rec, current)
        task.status = "process"
        task.attempt = attempt
        task.worker = self.id
        task.lease_until = time.time() + config.lease_timeout
        task.results_partition = partition
        # Every result of this run lands after this offset: a reader starts here.
        task.results_offset = app.broker.producer.known_end(app.topics.results, partition)
        task.updated_at = time.time()
        await app._write_status(task)
        await self._trigger("worker_execute_before", task=task)
        await app.events.fire("task_running", app=app, task=task, worker=self)
        sink = _ResultSink(app, uuid, attempt, partition)
        executor_cls = spec.executor or TaskExecutor
        executor: TaskExecutor = executor_cls(
            spec,
            uuid=uuid,
            args=rec.args,
            kwargs=rec.kwargs,
            sink=sink,
            app=app.user_app,
            plugins=app.plugins,
            thread_pool=self._pool,
            broker=app.broker,
        )
        # Registered until the terminal status is written: the lease is renewed (also
        # through a retry's backoff) and a cancel request reaches it.
        self._running[uuid] = executor
        try:
            if uuid in self._cancelled:
                executor.cancel(self._cancelled.pop(uuid) or f"{spec.name}.cancel")
            outcome = await executor.execute()
            await self._conclude(rec, spec, task, sink, outcome)
        except BaseException:
            # The worker is stopping past its deadline, or the status could not be
            # written: hand the task back. Its lease ends now, so the partition's next
            # owner runs it again at once (at least once).
            await self._release(uuid)
            raise
        finally:
            self._running.pop(uuid, None)
        self.tasks_done += 1

    async def _trigger(self, name: str, **kwargs: Any) -> None:
        """Fire a worker trigger; a failing plugin is logged and never leaves a task unfinished."""
        if len(self.app.plugins):
            try:
                await self.app.plugins.trigger(name, worker=self, **kwargs)
            except Exception:
                log.exception("plugin trigger %s failed", name)

    def _checked(self, spec: Any, outcome: Outcome) -> Outcome:
        """A result that cannot be stored (not JSON, or too large for a status record) is an error."""
        if outcome.status != "success" or spec.is_generator:
            return outcome
        try:
            size = len(encode(outcome.returning))
        except (TypeError, msgspec.EncodeError) as exc:
            problem = f"the result of task {spec.name!r} cannot be encoded as JSON: {exc}"
        else:
            limit = self.app.config.returning_max_bytes
            if size <= limit:
                return outcome
            problem = f"the result of task {spec.name!r} is {size} bytes encoded, over returning_max_bytes={limit}"
        error = TypeError(problem)
        return Outcome("error", exc=error, traceback=f"TypeError: {problem}", yield_count=outcome.yield_count)

    async def _conclude(self, rec: TaskRecord, spec: Any, task: Task, sink: _ResultSink, outcome: Outcome) -> None:
        app = self.app
        outcome = self._checked(spec, outcome)
        retries_left = rec.retry if rec.retry is not None else (spec.retry or 0)
        retrying = (
            outcome.status == "error"
            and outcome.exc is not None
            and should_retry(outcome.exc, retries_left, spec.retry_on_exc)
        )
        final_status: Status = "retry" if retrying else outcome.status
        if spec.is_generator:
            returning: Any = sink.items if sink.items is not None else sink.seq
            truncated = sink.items is None
        else:
            returning, truncated = outcome.returning, False
        if outcome.status != "success":
            returning = returning if spec.is_generator else None
        if sink.seq or spec.is_generator:
            # Results are durable before the status says the task ended, so a reader who
            # sees the terminal status can read every value.
            await sink.end(final_status)
        task.yield_count = sink.seq
        task.returning = returning
        task.returning_truncated = truncated
        task.traceback = outcome.traceback
        task.cancel_reason = outcome.cancel_reason
        task.lease_until = 0.0
        if retrying:
            delay = backoff(rec.retry_count, app.config.retry_backoff_base, app.config.retry_backoff_max)
            await asyncio.sleep(0 if self._stopping else delay)
            child = await app._submit(
                rec.task_name,
                rec.args,
                rec.kwargs,
                priority=rec.priority,
                retry=retries_left - 1,
                retry_parent_uuid=rec.uuid,
                retry_count=rec.retry_count + 1,
            )
            task.retry_child_uuid = child.uuid
            task.retry = retries_left
        task.status = final_status
        task.updated_at = time.time()
        await app._write_status(task)
        await self._trigger("worker_execute_after", task=task)
        event = {"success": "task_success", "error": "task_error", "cancel": "task_cancel"}.get(final_status)
        if event:
            await app.events.fire(event, app=app, task=task, exc=outcome.exc, worker=self)
        await app.events.fire("task_stopping", app=app, task=task, worker=self)

    def _base(self, rec: TaskRecord, current: StatusHead | None) -> Task:
        now = time.time()
        return Task(
            uuid=rec.uuid,
            task_name=rec.task_name,
            status="new",
            priority=rec.priority,
            args=rec.args,
            kwargs=rec.kwargs,
            created_at=rec.created_at,
            updated_at=now,
            retry=rec.retry,
            retry_parent_uuid=rec.retry_parent_uuid,
            retry_count=rec.retry_count,
            attempt=current.attempt if current is not None else 0,
        )

    async def _finish(
        self,
        rec: TaskRecord,
        current: StatusHead | None,
        status: str,
        *,
        traceback: str | None = None,
        cancel_reason: str | None = None,
        attempt: int | None = None,
    ) -> None:
        task = self._base(rec, current)
        task.status = status  # type: ignore[assignment]
        task.traceback = traceback
        task.cancel_reason = cancel_reason
        if attempt is not None:
            task.attempt = attempt
        task.worker = self.id
        await self.app._write_status(task)
        if status == "cancel":
            await self.app.events.fire("task_cancel", app=self.app, task=task, worker=self)

    async def _release(self, uuid: str) -> None:
        """Give up a task this worker will not finish: the lease ends now so another worker takes it at once."""
        current = self.app.view.get(uuid)
        if current is None or current.is_finished:
            return
        current.lease_until = 0.0
        current.updated_at = time.time()
        try:
            await self.app._write_status(current)
            await self.app.broker.producer.flush()
        except Exception:
            log.exception("could not release %s", uuid)

    async def _dead_letter(self, record: Record, reason: str) -> None:
        app = self.app
        limit = app.config.max_record_bytes
        value = record.value
        if value is not None and len(value) > limit // 2:
            reason = f"{reason} (value cut to its first {limit // 2} bytes here)"
            value = value[: limit // 2]
        letter = DeadLetter(
            reason=reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=value,
            at=time.time(),
        )
        key = record.key or f"{record.topic}:{record.partition}:{record.offset}".encode()
        await app.broker.producer.send(app.topics.dlq, encode(letter), key=key, partition=0)
        log.warning("record %s@%d sent to the dead-letter topic: %s", record.tp, record.offset, reason)
        uuid, task_name = self._identify(record.value, limit)
        current = app.view.head(uuid) if uuid is not None else None
        if uuid is not None and (current is None or not current.is_finished):
            now = time.time()
            task = Task(
                uuid=uuid,
                task_name=task_name,
                status="error",
                created_at=now,
                updated_at=now,
                traceback=f"RecordError: {reason}",
                worker=self.id,
            )
            await app._write_status(task)

    @staticmethod
    def _identify(value: bytes | None, limit: int) -> tuple[str | None, str]:
        """uuid and name of a record that is JSON but not a valid task, so its status can say why."""
        if value is None or len(value) > limit:
            return None, ""
        try:
            data = msgspec.json.decode(value)
        except msgspec.DecodeError:
            return None, ""
        if not isinstance(data, dict):
            return None, ""
        uuid, name = data.get("uuid"), data.get("task_name")
        return (uuid if isinstance(uuid, str) and uuid else None), (name if isinstance(name, str) else "")
