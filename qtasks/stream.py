"""Reading tasks' values live: ``app.stream(uuid)``.

A task's results sit in one partition of the results topic (key = uuid, same
partitioner as the writer). One :class:`ResultsReader` per app serves every open
stream: a single consumer that assigns itself the partitions streams need and hands
each record to the streams of its key, so opening a stream costs a seek, not a new
connection.

Where a stream starts: at the ``results_offset`` the worker recorded when the task
started (the end of that partition as its producer knew it: at or before the task's
first result). A stream opened before the task runs waits for that ``process`` status.
A task that never ran has no such offset; its stream starts at the first record as new
as the task's creation time minus ``stream_clock_skew``. Never at the start of the topic. A stream yields
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
from qtasks.exc import RecordError, TaskNotFoundError
from qtasks.partitioner import partition_for
from qtasks.records import ResultRecord, StatusHead, Task, decode_result

if TYPE_CHECKING:
    from qtasks.app import QueueTasks

log = logging.getLogger("qtasks.stream")

#: How long a stream waits for the status of a task it does not know yet.
_UNKNOWN_WAIT = 10.0


class ResultsReader:
    """One consumer of the results topic, shared by every open stream of an app.

    A partition stays assigned ``stream_linger`` seconds after its last stream closes,
    so the next stream on it starts from the live position with no lookup and no seek.
    """

    def __init__(self, app: QueueTasks) -> None:
        self._app = app
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._streams: dict[bytes, list[asyncio.Queue[Record]]] = {}
        self._users: dict[TopicPartition, int] = {}
        self._idle_since: dict[TopicPartition, float] = {}
        self._lock = asyncio.Lock()
        self._needed = asyncio.Event()

    async def _ensure(self) -> Any:
        if self._consumer is None:
            # Streams open and seek often: short broker waits make a seek take effect fast.
            consumer = self._app.broker.consumer(None, client_id=f"{self._app.name}-results", max_wait_ms=5)
            await consumer.start()
            self._consumer = consumer
            self._task = asyncio.get_running_loop().create_task(self._run(), name="qtasks-results")
        return self._consumer

    async def open(self, uuid: str, tp: TopicPartition) -> tuple[asyncio.Queue[Record], int]:
        """Register a stream of ``uuid`` on ``tp``, reading live from now; return its queue and start offset."""
        async with self._lock:
            consumer = await self._ensure()
            queue: asyncio.Queue[Record] = asyncio.Queue()
            self._streams.setdefault(uuid.encode(), []).append(queue)
            if tp not in self._users:
                end = await self.end_offset(tp)
                await self._assign(set(self._users) | {tp})
                self._users[tp] = 0
                await consumer.seek(tp, end)
            self._users[tp] += 1
            self._idle_since.pop(tp, None)
            self._needed.set()
            return queue, await self.position(tp)

    async def rewind(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` again from ``offset`` (the other streams on it drop what they already saw)."""
        async with self._lock:
            if tp in self._users and offset < await self.position(tp):
                await self._consumer.seek(tp, offset)

    async def close(self, uuid: str, tp: TopicPartition, queue: asyncio.Queue[Record]) -> None:
        """Unregister a stream; its partition is released once no stream used it for ``stream_linger``."""
        async with self._lock:
            key = uuid.encode()
            queues = self._streams.get(key, [])
            if queue in queues:
                queues.remove(queue)
            if not queues:
                self._streams.pop(key, None)
            if tp in self._users:
                self._users[tp] -= 1
                if self._users[tp] <= 0:
                    self._users[tp] = 0
                    self._idle_since[tp] = time.monotonic()

    async def _release_idle(self) -> None:
        linger = self._app.config.stream_linger
        now = time.monotonic()
        idle = [tp for tp, since in self._idle_since.items() if now - since >= linger]
        if not idle:
            return
        async with self._lock:
            keep = {tp for tp in self._users if tp not in idle or self._users[tp] > 0}
            await self._assign(keep)
            for tp in idle:
                if tp not in keep:
                    del self._users[tp], self._idle_since[tp]
            if not self._users:
                self._needed.clear()

    async def _assign(self, partitions: set[TopicPartition]) -> None:
        # A new assignment forgets the positions of the partitions it keeps (Kafka
        # resets them to the earliest offset): put them back.
        kept = {tp: await self.position(tp) for tp in self._users if tp in partitions}
        self._consumer.assign(partitions)
        for tp, position in kept.items():
            await self._consumer.seek(tp, position)

    async def position(self, tp: TopicPartition) -> int:
        """The next offset the reader returns from ``tp``: everything before it was handed out."""
        return int(await self._consumer.position(tp))

    async def end_offset(self, tp: TopicPartition) -> int:
        """The partition's end offset now."""
        consumer = await self._ensure()
        return int((await consumer.end_offsets([tp]))[tp])

    async def offset_for_time(self, tp: TopicPartition, timestamp_ms: int) -> int | None:
        """The first offset of ``tp`` whose record is as new as ``timestamp_ms``, or None."""
        consumer = await self._ensure()
        found = (await consumer.offsets_for_times({tp: timestamp_ms})).get(tp)
        return None if found is None else int(found)

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
                queues = streams.get(record.key) if record.key is not None else None
                if queues:
                    for queue in queues:
                        queue.put_nowait(record)
            if self._idle_since:
                # After dispatching: a seek made meanwhile must not be undone by this batch.
                await self._release_idle()

    async def stop(self) -> None:
        """Stop the consumer."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()


async def _read_again(
    app: QueueTasks,
    reader: ResultsReader,
    tp: TopicPartition,
    task: Task,
    queue: asyncio.Queue[Record],
    attempt: int,
    why: str,
) -> None:
    """Read the partition again from further back (by time, then from its start); repeats are dropped by seq."""
    back = await _start_by_time(app, reader, tp, task) if attempt == 1 else 0
    log.warning("stream of %s %s; reading again from offset %d", task.uuid, why, back)
    await reader.rewind(tp, back)
    while not queue.empty():  # all of it comes again from `back`
        queue.get_nowait()


def _started(head: StatusHead | None) -> bool:
    return head is not None and head.status != "new"


async def _start_by_time(app: QueueTasks, reader: ResultsReader, tp: TopicPartition, task: Task) -> int:
    """Where to read a task that never ran here (cancelled while queued, unknown) or ran on an older worker."""
    # The end is read first: if no record is as new as `since` yet, every result of this
    # task comes after that end, even one written in between.
    end = await reader.end_offset(tp)
    by_time = await reader.offset_for_time(tp, int((task.created_at - app.config.stream_clock_skew) * 1000))
    return end if by_time is None else by_time


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

    if app.view.head(uuid) is None:
        # Submitted elsewhere a moment ago, or no such task: wait a little, not forever.
        wait = _UNKNOWN_WAIT if deadline is None else min(_UNKNOWN_WAIT, left() or 0.0)
        try:
            await app.view.wait_for(uuid, lambda head: head is not None, wait)
        except TimeoutError:
            raise TaskNotFoundError(f"no task {uuid} is known (waited {wait:.0f} s for its status)") from None
    while True:
        tp = TopicPartition(app.topics.results, partition_for(uuid, app.results_partitions))
        # Listen from now on at once, while the worker takes the task ...
        queue, opened_at = await reader.open(uuid, tp)
        try:
            # ... then learn from its process status where its results start, and go back
            # if the worker was quicker than this reader.
            task = await app.view.wait_for(uuid, _started, left())
            assert task is not None
            start = task.results_offset
            if start is None:
                start = await _start_by_time(app, reader, tp, task)
            if start < opened_at:
                await reader.rewind(tp, start)
        except BaseException:
            await reader.close(uuid, tp, queue)
            raise
        ended: str | None = None
        drain_to: int | None = None
        heals = 0
        try:
            while ended is None:
                record: Record | None
                try:
                    record = queue.get_nowait()
                except asyncio.QueueEmpty:
                    wait = 0.1
                    remaining = left()
                    if remaining is not None:
                        wait = min(wait, remaining)
                    try:
                        record = await asyncio.wait_for(queue.get(), wait)
                    except TimeoutError:
                        record = None
                if record is not None:
                    try:
                        result: ResultRecord = decode_result(record.value, limit)
                    except RecordError:
                        continue
                    if result.seq > next_seq and heals < 2:
                        # Values before this one were not seen: the start was too late.
                        heals += 1
                        await _read_again(
                            app, reader, tp, task, queue, heals, f"missed seq {next_seq}..{result.seq - 1}"
                        )
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
                # Position first: past drain_to means every record before it was handed out
                # (records are dispatched as soon as they are fetched); then the queue.
                if drain_to is not None and await reader.position(tp) >= drain_to and queue.empty():
                    final = app.view.get(uuid)
                    if final is not None and final.yield_count > next_seq and heals < 2:
                        # It ended with more values than this stream saw.
                        heals += 1
                        await _read_again(
                            app, reader, tp, task, queue, heals, f"saw {next_seq} of {final.yield_count} values"
                        )
                        drain_to = None
                        continue
                    ended = final.status if final is not None else "success"
        finally:
            await reader.close(uuid, tp, queue)
        # The end marker comes just before the terminal status: wait for it, so that what
        # `app.get` says after the stream agrees with it (a dead worker cannot hold this
        # up for more than a lease).
        wait = app.config.lease_timeout
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        try:
            await app.view.wait_for(uuid, lambda h: h is None or h.is_finished, wait)
        except TimeoutError:
            pass
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
