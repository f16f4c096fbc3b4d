"""The dead-letter topic: a record the worker cannot use goes there with the reason, and work goes on."""

from __future__ import annotations

import logging
import time

import msgspec

from qtasks.connectors.base import Record
from qtasks.core import Core
from qtasks.partitioner import partition_for
from qtasks.records import DeadLetter, Task, encode
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

    ``txn`` (exactly-once): both go in the transaction of the record's partition. ``kind``:
    the problem in a word (:class:`~qtasks.exc.RecordError`'s), counted by the metrics.
    """
    limit = core.config.max_record_bytes
    value = record.value
    cut = False
    if value is not None and len(value) > limit // 2:
        cut = True
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
    uuid, task_name = identify(record.value, limit)
    if uuid is None:
        return
    head = core.view.head(uuid)
    if head is None or not head.is_finished:
        now = time.time()
        task = Task(
            uuid=uuid,
            task_name=task_name,
            status="error",
            created_at=now,
            updated_at=now,
            traceback=f"RecordError: {reason}",
            worker=worker_id,
        )
        await core.store.write(task, durable=True, txn=txn)


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
