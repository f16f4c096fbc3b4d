"""The dead-letter topic: a record the worker cannot use goes there with the reason, and work goes on."""

from __future__ import annotations

import logging
import time
import uuid as uuid_mod

import msgspec

from qtasks.connectors.base import Record
from qtasks.core import Core
from qtasks.delivery import retried
from qtasks.exc import RecordError
from qtasks.partitioner import partition_for
from qtasks.records import DeadLetter, StatusHead, Task, encode
from qtasks.transactions import PartitionTxn

log = logging.getLogger("qtasks.worker")

#: The longest key a dead letter gets (a record's key may be any size; qtasks' own are 36 bytes).
KEY_BYTES = 200


async def dead_letter(
    core: Core,
    record: Record,
    reason: str,
    worker_id: str,
    txn: PartitionTxn | None = None,
    *,
    kind: str = "undecodable",
) -> None:
    """Send ``record`` to ``<app>.dlq`` with ``reason``; a record that names a task ends that task as error.

    The task is the one the value names (JSON with a ``uuid``) or else the one the key names
    (a uuid: qtasks keys every task record so), such as a record over this worker's
    ``max_record_bytes`` that a client with a larger limit submitted. It ends only if
    :func:`ends_its_task` says so: never once finished, nor while a worker runs it.

    ``txn`` (exactly-once): both go in the transaction of the record's partition. ``kind``:
    the problem in a word (:class:`~qtasks.exc.RecordError`'s), counted by the metrics.
    """
    limit = core.config.max_record_bytes
    value = record.value
    given = reason  # the task's status says why, not how the letter was cut
    cut = False
    if value is not None and len(value) > limit // 2:
        cut = True
        reason = f"{reason} (value cut to its first {limit // 2} bytes here)"
        value = value[: limit // 2]
    # The task first: once its letter can be read, its status says why it ended.
    await _end_its_task(core, record, given, worker_id, txn)
    letter = DeadLetter(
        reason=reason,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=value,
        at=time.time(),
        cut=cut,
    )
    # The original key names the letter, cut to what any record takes (the whole key is in the letter).
    raw_key = (record.key or f"{record.topic}:{record.partition}:{record.offset}".encode())[:KEY_BYTES]
    key = raw_key.decode("utf-8", "replace")
    if txn is not None:
        await txn.send(core.topics.dlq, encode(letter), key=key.encode(), partition=partition_for(key, 1))
    else:
        await core.send(core.topics.dlq, encode(letter), key, 1, what=f"dead letter of {record.tp}@{record.offset}")
    core.stats.dead_letter(kind)
    log.warning("record %s@%d sent to the dead-letter topic: %s", record.tp, record.offset, reason)


async def _end_its_task(core: Core, record: Record, given: str, worker_id: str, txn: PartitionTxn | None) -> None:
    """End the task a dead-lettered record names as error (:func:`ends_its_task`), durably."""
    uuid, task_name = identify(record.value, core.config.max_record_bytes)
    uuid = uuid or uuid_of_key(record.key)
    if uuid is None:
        return
    head = await _head(core, uuid, txn)
    now = time.time()
    if not ends_its_task(head, now):
        log.info(
            "the dead-lettered record names task %s, which is %s: left as it is", uuid, head.status if head else None
        )
        return
    # A small status (no arguments): readable by every worker and client, whatever their limits.
    task = Task(
        uuid=uuid,
        task_name=task_name,
        status="error",
        created_at=now,
        updated_at=now,
        traceback=f"RecordError: {given}",
        attempt=head.attempt if head is not None else 0,
        worker=worker_id,
    )
    await core.store.write(task, durable=True, txn=txn)


async def _head(core: Core, uuid: str, txn: PartitionTxn | None) -> StatusHead | None:
    """The task's status as the worker decides on it (a finished one the view dropped is read back).

    A status this worker cannot read (over its ``max_record_bytes``: the ``new`` of a task
    submitted by a client with a larger limit) counts as none: the view ignores it too.
    """
    try:
        return await retried(
            lambda: core.store.head(uuid, timeout=2.0, txn=txn), what=f"the status of {uuid}", trouble=core.trouble
        )
    except RecordError:
        return None


def ends_its_task(head: StatusHead | None, now: float) -> bool:
    """Whether a dead-lettered record ends the task it names as ``error``.

    Yes if no status of it is known here (or none can be read), or it is ``new``, or its
    run's lease ran out (its worker is gone, and this record, dead-lettered, will not be
    read again). Never over an ending, nor over a run in progress (here or on another
    worker, maybe one whose ``max_record_bytes`` took the record): that run ends it.
    """
    if head is None:
        return True
    if head.is_finished:
        return False
    return head.status != "process" or head.lease_until <= now


def uuid_of_key(key: bytes | None) -> str | None:
    """The task uuid a record's key names, if it is one in its canonical form (as qtasks writes it)."""
    if key is None or len(key) != 36:
        return None
    try:
        text = key.decode("ascii")
        return text if str(uuid_mod.UUID(text)) == text else None
    except (UnicodeDecodeError, ValueError):
        return None


def identify(value: bytes | None, limit: int) -> tuple[str | None, str]:
    """uuid and name of a record that is JSON but not a valid task, so its status can say why."""
    if value is None or len(value) > limit:
        return None, ""
    try:
        data = msgspec.json.decode(value)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None, ""
    if not isinstance(data, dict):
        return None, ""
    uuid, name = data.get("uuid"), data.get("task_name")
    return (uuid if isinstance(uuid, str) and uuid else None), (name if isinstance(name, str) else "")
