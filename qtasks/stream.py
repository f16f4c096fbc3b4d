"""Reading a task's values live: ``app.stream(uuid)``.

A task's results sit in one partition of the results topic (key = uuid, same
partitioner as the writer). The reader assigns itself that partition and starts near
the task's creation time (``offsets_for_times``, minus ``stream_clock_skew``), never at
the start of the topic. It yields each ``seq`` once, in order: a later attempt (after a
crash) or a retry task starts again at seq 0 and its repeats are dropped. It ends at
the end marker of the final attempt, or when the status is terminal and the partition
has been read to its end (a task that never ran has no marker).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from qtasks.connectors.base import TopicPartition
from qtasks.exc import RecordError
from qtasks.partitioner import partition_for
from qtasks.records import Task, decode_result

if TYPE_CHECKING:
    from qtasks.app import QueueTasks


async def stream_results(app: QueueTasks, uuid: str, *, timeout: float | None = None) -> AsyncIterator[Any]:
    """Yield the handled values of ``uuid`` (and of its retries), live, until it ends."""
    await app._connect()
    deadline = None if timeout is None else time.monotonic() + timeout
    task = await app.view.wait_for(uuid, lambda t: t is not None, timeout)
    assert task is not None
    next_seq = 0
    limit = app.config.max_record_bytes
    while True:
        consumer = app.broker.consumer(None, client_id=f"{app.name}-stream")
        await consumer.start()
        try:
            tp = TopicPartition(app.topics.results, partition_for(uuid, app.results_partitions))
            consumer.assign([tp])
            since = int((task.created_at - app.config.stream_clock_skew) * 1000)
            # The end is read first: if no record is as new as `since` yet, every record
            # of this task comes after that end, even one written in between.
            end = (await consumer.end_offsets([tp]))[tp]
            start = (await consumer.offsets_for_times({tp: since})).get(tp)
            if start is None:
                start = end
            await consumer.seek(tp, start)
            key = uuid.encode()
            ended: str | None = None
            drain_to: int | None = None
            position = start
            while ended is None:
                wait = 0.1
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise TimeoutError(f"stream of {uuid} did not end within {timeout} s")
                records = await consumer.getmany(timeout=wait)
                for record in records:
                    position = record.offset + 1
                    if record.key != key:
                        continue
                    try:
                        result = decode_result(record.value, limit)
                    except RecordError:
                        continue
                    if result.end:
                        ended = result.status or "success"
                        break
                    if result.seq == next_seq:
                        next_seq += 1
                        yield result.value
                if ended is not None:
                    break
                if drain_to is not None:
                    if position >= drain_to:
                        ended = "done"
                    continue
                if not records:
                    current = app.view.get(uuid)
                    if current is not None and current.is_finished:
                        drain_to = (await consumer.end_offsets([tp]))[tp]
                        if position >= drain_to:
                            ended = current.status
        finally:
            await consumer.stop()
        current = app.view.get(uuid)
        if ended == "retry" or (current is not None and current.status == "retry"):
            child = await _retry_child(app, uuid, deadline)
            if child is None:
                return
            uuid, task = child.uuid, child
            continue
        return


async def _retry_child(app: QueueTasks, uuid: str, deadline: float | None) -> Task | None:
    """The task that retries ``uuid``, once its status names it."""
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    parent = await app.view.wait_for(
        uuid, lambda t: t is None or (t.is_finished and (t.status != "retry" or t.retry_child_uuid is not None)), left
    )
    if parent is None or parent.retry_child_uuid is None:
        return None
    child_uuid = parent.retry_child_uuid
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    return await app.view.wait_for(child_uuid, lambda t: t is not None, left)
