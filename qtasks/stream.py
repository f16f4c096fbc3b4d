"""Reading tasks' values live: ``app.stream(uuid)``.

A task's results sit in one partition of the results topic: the ``results_partition``
its ``process`` status records (computed from the uuid with the same partitioner, and
trusted over the reader's own count when the topic grew). One :class:`ResultsReader` per
app serves every open stream: a single consumer that assigns itself the partitions
streams need and hands each record to the streams of its key, so opening a stream costs
a seek, not a new connection.

Where a stream starts: at the ``results_offset`` the worker recorded when the task
started (the end of that partition as its producer knew it: at or before the task's
first result). A stream opened before the task runs waits for that ``process`` status.
A task that never ran has no such offset; its stream starts at the first record as new
as the task's creation time minus ``stream_clock_skew``. A stream yields each ``seq`` of
a task once, in order (a later attempt after a crash starts again at seq 0 and its
repeats are dropped). A retry is a new task: the stream goes on with its values from
seq 0, so the failed run's values are never spliced into the retry's. It ends at the
end marker of the final attempt, or when the status is terminal and the partition has
been read to its end (a task that never ran has no marker).

Memory is bounded: a stream buffers at most ``stream_buffer`` records; a reader that
falls further behind is left behind and reads the rest again from the log when it
catches up (no value is lost, the other streams are never held up).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from qtasks.connectors.base import TopicPartition
from qtasks.core import Core
from qtasks.delivery import retry_delay
from qtasks.exc import ConnectorError, RecordError, StreamIncompleteError, TaskNotFoundError
from qtasks.partitioner import partition_for
from qtasks.reader import ResultsReader, StreamQueue
from qtasks.records import ResultRecord, StatusHead, StreamItem, Task, decode_result
from qtasks.supervise import raise_if_cancelled

__all__ = ["ResultsReader", "stream_results"]

log = logging.getLogger("qtasks.stream")

#: A stream with nothing new checks its task's state this often (seconds); a change of the
#: task's status wakes it at once, so this only bounds what nothing else announces.
_POLL = 0.1


def _started(head: StatusHead | None) -> bool:
    return head is None or head.status != "new"


def _finished(head: StatusHead | None) -> bool:
    return head is None or head.is_finished


async def _start_by_time(core: Core, reader: ResultsReader, tp: TopicPartition, task: Task, deadline: _Deadline) -> int:
    """Where to read a task that never ran here (cancelled while queued, unknown) or ran on an older worker."""
    # The end is read first: if no record is as new as `since` yet, every result of this
    # task comes after that end, even one written in between.
    end = await _patiently(functools.partial(reader.end_offset, tp), deadline)
    since = int((task.created_at - core.config.stream_clock_skew) * 1000)
    by_time = await _patiently(functools.partial(reader.offset_for_time, tp, since), deadline)
    return end if by_time is None else by_time


_T = TypeVar("_T")


async def _patiently(read: Callable[[], Awaitable[_T]], deadline: _Deadline) -> _T:
    """A stream's read of its results partition, tried again while it fails for a while
    (a node down or frozen, a leader moving), each try and the whole bounded by the
    stream's deadline: a stream outlives an outage as the worker does. A failure that is
    not retriable is raised; one that lasts is logged once (after 30 s) and, at the
    deadline, chained to the stream's ``TimeoutError``."""
    tries = 0
    first = time.monotonic()
    noticed = False
    while True:
        try:
            async with asyncio.timeout(deadline.left()):
                return await read()
        except TimeoutError:
            deadline.left()  # past the deadline: the stream's own TimeoutError
            raise
        except ConnectorError as exc:
            raise_if_cancelled()
            if not exc.retriable:
                raise
            tries += 1
            waited = time.monotonic() - first
            if tries == 1:
                log.debug("a stream's read waits for the broker: %s (retrying)", exc)
            elif waited >= _PATIENCE_NOTICE and not noticed:
                noticed = True
                log.warning(
                    "stream of %s has waited %.0f s for the broker: %s (still retrying)", deadline.uuid, waited, exc
                )
            try:
                await asyncio.sleep(deadline.cap(retry_delay(tries)))
                deadline.left()
            except TimeoutError as timeout:
                raise timeout from exc


#: A stream's read that keeps failing this long (seconds) is logged as a warning, once.
_PATIENCE_NOTICE = 30.0


class _Deadline:
    def __init__(self, uuid: str, timeout: float | None) -> None:
        self.uuid = uuid
        self.timeout = timeout
        self.at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        if self.at is None:
            return None
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"stream of {self.uuid} did not end within {self.timeout} s")
        return remaining

    def cap(self, seconds: float) -> float:
        left = self.left()
        return seconds if left is None else min(seconds, left)


async def stream_results(
    core: Core, reader: ResultsReader, uuid: str, *, timeout: float | None = None, from_seq: int = 0, meta: bool = False
) -> AsyncIterator[Any]:
    """Yield the handled values of ``uuid`` (and of its retries), live, until it ends.

    ``from_seq``: the first value of ``uuid`` to yield (its earlier values are passed over;
    the retries that follow it start at their beginning). ``meta``: yield
    :class:`~qtasks.records.StreamItem` s (seq, attempt, value, and a closing item for a
    task that failed and was retried) instead of bare values.
    """
    deadline = _Deadline(uuid, timeout)
    async with asyncio.timeout(deadline.left()):
        await core.connect()
        known = await core.store.lookup(uuid)
    if known is None:
        raise TaskNotFoundError(f"no task {uuid} is known")
    while True:
        if core.view.head(uuid) is None:
            await core.store.lookup(uuid)  # a finished task the view dropped is read back into it
        next_seq = from_seq
        ended_as = None
        async for result in _stream_one(core, reader, uuid, deadline, from_seq):
            if result.end:
                ended_as = result.status
                continue
            next_seq = result.seq + 1
            yield (
                StreamItem(uuid=uuid, seq=result.seq, attempt=result.attempt, value=result.value)
                if meta
                else result.value
            )
        # The end marker comes just before the terminal status: wait for it, so that what
        # `app.get` says after the stream agrees with it (a dead worker cannot hold this
        # up for more than a lease). A marker that says ``retry`` is followed by the retry:
        # its status is waited for as long as the stream may last (a slow broker must not
        # end the stream before the retry's values, as if the task had ended).
        if ended_as == "retry":
            try:
                await core.view.wait_for(uuid, _finished, deadline.left())
            except TimeoutError:
                deadline.left()  # the stream's own TimeoutError, which says whose
                raise
        else:
            with contextlib.suppress(TimeoutError):
                await core.view.wait_for(uuid, _finished, deadline.cap(core.config.lease_timeout))
        head = core.view.head(uuid)
        if head is None or head.status != "retry":
            return
        parent = await core.view.wait_for(uuid, lambda h: h is None or h.retry_child_uuid is not None, deadline.left())
        if parent is None or parent.retry_child_uuid is None:
            return
        if meta:
            failed = core.view.get(uuid)  # its whole status: how many values it yielded
            values = failed.yield_count if failed is not None else next_seq
            yield StreamItem(uuid=uuid, seq=values, attempt=parent.attempt, retried_as=parent.retry_child_uuid)
        uuid, from_seq = parent.retry_child_uuid, 0


async def _open_at_start(
    core: Core, reader: ResultsReader, uuid: str, deadline: _Deadline
) -> tuple[TopicPartition, StreamQueue, Task]:
    """Listen on the task's results partition and go back to where its results start."""
    tp = TopicPartition(core.topics.results, partition_for(uuid, core.results_partitions))
    while True:
        # Listen from now on at once, while the worker takes the task ...
        end = None if reader.listening(tp) else await _patiently(functools.partial(reader.end_offset, tp), deadline)
        opened = await _patiently(functools.partial(reader.open, uuid, tp, end), deadline)
        if opened is None:
            continue
        queue, opened_at = opened
        try:
            # ... then learn from its process status where its results start, unless a value
            # comes first (a run writes process only once it outlives process_grace): read
            # live from before the run began, the first value seen is seq 0, and a later
            # one shows the gap (`_stream_one` reads again).
            if not _started(core.view.head(uuid)):
                forget = core.view.when(uuid, _started, queue.wake)
                try:
                    while not queue.records and not _started(core.view.head(uuid)):
                        await queue.wait(deadline.left())
                        deadline.left()  # raises once the stream's time is up
                finally:
                    forget()
                if not _started(core.view.head(uuid)):
                    task = core.view.get(uuid)
                    if task is None:
                        raise TaskNotFoundError(f"task {uuid} expired")
                    return tp, queue, task
            task = await core.view.wait_for(uuid, _started, deadline.left())
            if task is None:
                raise TaskNotFoundError(f"task {uuid} expired")
            if task.results_partition is not None and task.results_partition != tp.partition:
                # The topic grew since this process counted its partitions: trust the worker.
                await reader.close(uuid, tp, queue)
                tp = TopicPartition(tp.topic, task.results_partition)
                continue
            start = task.results_offset
            if start is None:
                start = await _start_by_time(core, reader, tp, task, deadline)
            if start < opened_at:
                # Values that came live meanwhile come again, after the ones before them.
                await _patiently(functools.partial(reader.rewind, tp, start), deadline)
                queue.clear()
            return tp, queue, task
        except BaseException:
            await reader.close(uuid, tp, queue)
            raise


async def _stream_one(
    core: Core, reader: ResultsReader, uuid: str, deadline: _Deadline, from_seq: int
) -> AsyncIterator[ResultRecord]:
    """The value records of one task of a chain, each seq once from ``from_seq``, then its end
    marker if it wrote one (its status: ``retry`` is followed by a retry)."""
    tp, queue, task = await _open_at_start(core, reader, uuid, deadline)
    limit = core.config.max_record_bytes
    stats = core.stats
    next_seq = from_seq
    drain_to: int | None = None
    heals = 0  # reads again since the last value: two that find nothing new mean it is gone
    undecodable: str | None = None  # why a record of this task could not be decoded here
    beyond: int | None = None  # the lowest seq seen past a gap since the last read again
    # A task that yields nothing writes no end marker: its terminal status ends the stream at once.
    forget = core.view.when(uuid, _finished, queue.wake)

    async def read_again(why: str) -> None:
        nonlocal heals, beyond
        heals += 1
        back = await _start_by_time(core, reader, tp, task, deadline) if heals == 1 else 0
        log.warning("stream of %s %s; reading again from offset %d", uuid, why, back)
        await _patiently(functools.partial(reader.rewind, tp, back), deadline)
        queue.clear()  # all of it comes again from `back`
        beyond = None

    try:
        while True:
            if queue.missed_from is not None and not queue.records:
                # This stream fell behind its buffer: read the rest again from the log. Its
                # buffer takes nothing until the reader is there (a rewind may wait for the
                # reader), so nothing newer comes before what it missed.
                await _patiently(functools.partial(reader.rewind, tp, queue.missed_from), deadline)
                queue.clear()
            record = await queue.get(deadline.cap(_POLL))
            if record is not None:
                try:
                    result: ResultRecord = decode_result(record.value, limit)
                except RecordError as exc:
                    if undecodable is None:
                        log.warning("stream of %s: a record at offset %d cannot be read: %s", uuid, record.offset, exc)
                    undecodable = str(exc)
                    continue
                if result.seq > next_seq:
                    # Values before this one were not seen: the start was too late. Once read
                    # from the partition's start, the records past the gap are passed over and
                    # the task's ending decides (below) whether values are missing.
                    beyond = result.seq if beyond is None else min(beyond, result.seq)
                    if heals < 2:
                        await read_again(f"missed seq {next_seq}..{result.seq - 1}")
                    continue
                if result.end:
                    yield result
                    return
                if result.seq == next_seq:
                    next_seq += 1
                    heals, beyond = 0, None
                    stats.stream_latency.observe(max(time.time() - record.timestamp / 1000, 0.0))
                    yield result
                continue
            # Nothing new for a while: has the task ended without (or before) a marker? Its
            # records were all written before its ending was, so they are below the partition's
            # end now, decided or not. Exactly-once, read until every transaction open now is
            # decided: its commit may be visible in the status topic and not yet here (Kafka
            # writes a commit's markers partition by partition; another producer's open
            # transaction holds back everything after its start).
            if drain_to is None:
                head = core.view.head(uuid)
                if head is not None and head.is_finished:
                    drain_to = await _patiently(functools.partial(reader.end_with_undecided, tp), deadline)
            # Position first: past drain_to means every record before it was handed out
            # (records are dispatched as soon as they are fetched); then the queue.
            if (
                drain_to is not None
                and await _patiently(functools.partial(reader.position, tp), deadline) >= drain_to
                and not queue.records
            ):
                if queue.missed_from is not None:
                    continue
                final = core.view.get(uuid)
                if final is not None and final.yield_count > next_seq:
                    if heals < 2:
                        await read_again(f"saw {next_seq} of {final.yield_count} values")
                        drain_to = None
                        continue
                    # Read from the partition's start, and still missing. A value the broker
                    # refused ended the task as error: from it on, values may be missing, and
                    # the ending says so (``lost_from``). Otherwise they were stored and are gone.
                    if final.lost_from is None or next_seq < final.lost_from:
                        missing = range(next_seq, min(final.yield_count, beyond or final.yield_count))
                        raise StreamIncompleteError(uuid, missing, undecodable)
                return
    finally:
        forget()
        await reader.close(uuid, tp, queue)
