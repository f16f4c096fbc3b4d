"""Reading tasks' values live: ``app.stream(uuid)``.

A task's results sit in one partition of the results topic (key = uuid, same
partitioner as the writer). One :class:`ResultsReader` per app serves every open
stream: a single consumer that assigns itself the partitions streams need and hands
each record to the streams of its key, so opening a stream costs a seek, not a new
connection.

Where a stream starts: at the ``results_offset`` the worker recorded when the task
started (at or before its first result), and never before the first record as new as
the task's creation time minus ``stream_clock_skew``; never at the start of the topic.
A stream opened before the task runs waits for that ``process`` status. A stream yields
each ``seq`` once, in order: a later attempt (after a crash) or a retry task starts
again at seq 0 and its repeats are dropped. It ends at the end marker of the final
attempt, or when the status is terminal and the partition has been read to its end (a
task that never ran has no marker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from qtasks.connectors.base import Record, TopicPartition
from qtasks.exc import RecordError
from qtasks.partitioner import partition_for
from qtasks.records import ResultRecord, StatusHead, Task, decode_result

if TYPE_CHECKING:
    from qtasks.app import QueueTasks

log = logging.getLogger("qtasks.stream")


class ResultsReader:
    """One consumer of the results topic, shared by every open stream of an app."""

    def __init__(self, app: QueueTasks) -> None:
        self._app = app
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._streams: dict[bytes, list[asyncio.Queue[Record]]] = {}
        self._users: dict[TopicPartition, int] = {}
        self.positions: dict[TopicPartition, int] = {}
        self._lock = asyncio.Lock()
        self._needed = asyncio.Event()

    async def _ensure(self) -> Any:
        if self._consumer is None:
            consumer = self._app.broker.consumer(None, client_id=f"{self._app.name}-results")
            await consumer.start()
            self._consumer = consumer
            self._task = asyncio.get_running_loop().create_task(self._run(), name="qtasks-results")
        return self._consumer

    async def open(self, uuid: str, tp: TopicPartition, start_of: Any) -> asyncio.Queue[Record]:
        """Register a stream of ``uuid`` on ``tp``; ``start_of(consumer)`` says where it starts."""
        async with self._lock:
            consumer = await self._ensure()
            queue: asyncio.Queue[Record] = asyncio.Queue()
            self._streams.setdefault(uuid.encode(), []).append(queue)
            start: int = await start_of(consumer)
            if tp not in self._users:
                self._users[tp] = 0
                consumer.assign(set(self._users))
                await consumer.seek(tp, start)
                self.positions[tp] = start
            elif start < self.positions.get(tp, start):
                # Going back for this stream: the others on the partition drop what they saw.
                await consumer.seek(tp, start)
                self.positions[tp] = start
            self._users[tp] += 1
            self._needed.set()
            return queue

    async def close(self, uuid: str, tp: TopicPartition, queue: asyncio.Queue[Record]) -> None:
        """Unregister a stream; a partition no stream needs is released."""
        async with self._lock:
            key = uuid.encode()
            queues = self._streams.get(key, [])
            if queue in queues:
                queues.remove(queue)
            if not queues:
                self._streams.pop(key, None)
            self._users[tp] = self._users.get(tp, 1) - 1
            if self._users[tp] <= 0:
                del self._users[tp]
                self.positions.pop(tp, None)
                if self._consumer is not None:
                    self._consumer.assign(set(self._users))
                if not self._users:
                    self._needed.clear()

    async def end_offset(self, tp: TopicPartition) -> int:
        """The partition's end offset now."""
        consumer = await self._ensure()
        return int((await consumer.end_offsets([tp]))[tp])

    async def _run(self) -> None:
        while True:
            await self._needed.wait()
            consumer = self._consumer
            try:
                records = await consumer.getmany(timeout=0.5)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("results reader failed; retrying in 0.5 s")
                await asyncio.sleep(0.5)
                continue
            streams = self._streams
            for record in records:
                tp = record.tp
                if tp in self.positions:
                    self.positions[tp] = record.offset + 1
                queues = streams.get(record.key) if record.key is not None else None
                if queues:
                    for queue in queues:
                        queue.put_nowait(record)

    async def stop(self) -> None:
        """Stop the consumer."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()


def _started(head: StatusHead | None) -> bool:
    return head is not None and head.status != "new"


async def stream_results(app: QueueTasks, uuid: str, *, timeout: float | None = None) -> AsyncIterator[Any]:
    """Yield the handled values of ``uuid`` (and of its retries), live, until it ends."""
    await app._connect()
    reader = app._results_reader()
    deadline = None if timeout is None else time.monotonic() + timeout
    limit = app.config.max_record_bytes
    next_seq = 0

    def left() -> float | None:
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"stream of {uuid} did not end within {timeout} s")
        return remaining

    while True:
        # A task that has not run yet has no results offset: wait for its process status.
        task = await app.view.wait_for(uuid, _started, left())
        assert task is not None
        tp = TopicPartition(app.topics.results, partition_for(uuid, app.results_partitions))

        async def start_of(consumer: Any, task: Task = task, tp: TopicPartition = tp) -> int:
            # The end is read first: if no record is as new as `since` yet, every result
            # of this task comes after that end, even one written in between.
            end = int((await consumer.end_offsets([tp]))[tp])
            since = int((task.created_at - app.config.stream_clock_skew) * 1000)
            by_time = (await consumer.offsets_for_times({tp: since})).get(tp)
            lower = end if by_time is None else by_time
            return max(lower, task.results_offset or 0)

        queue = await reader.open(uuid, tp, start_of)
        ended: str | None = None
        drain_to: int | None = None
        try:
            while ended is None:
                wait = 0.1
                remaining = left()
                if remaining is not None:
                    wait = min(wait, remaining)
                try:
                    record: Record | None = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    record = None
                if record is not None:
                    try:
                        result: ResultRecord = decode_result(record.value, limit)
                    except RecordError:
                        continue
                    if result.end:
                        ended = result.status or "success"
                    elif result.seq == next_seq:
                        next_seq += 1
                        yield result.value
                    continue
                # Nothing new for a while: has the task ended without (or before) a marker?
                if drain_to is None:
                    head = app.view.head(uuid)
                    if head is not None and head.is_finished:
                        drain_to = await reader.end_offset(tp)
                if drain_to is not None and reader.positions.get(tp, 0) >= drain_to and queue.empty():
                    head = app.view.head(uuid)
                    ended = head.status if head is not None else "success"
        finally:
            await reader.close(uuid, tp, queue)
        head = app.view.head(uuid)
        if ended == "retry" or (head is not None and head.status == "retry"):
            parent = await app.view.wait_for(
                uuid,
                lambda h: h is None or (h.is_finished and (h.status != "retry" or h.retry_child_uuid is not None)),
                left(),
            )
            if parent is None or parent.retry_child_uuid is None:
                return
            uuid = parent.retry_child_uuid
            continue
        return
