"""Share mode's own pieces (``processing_mode="share"``, docs/share-groups.md).

A record's bookkeeping (:class:`ShareOffsets`: finishing it is an acknowledgement), and what
the worker does with a poison task (:func:`end_at_limit`) and with a record's last delivery
(:func:`send_again`). The loops that fetch and renew locks are the worker's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from qtasks.connectors.base import ACCEPT, REJECT, RELEASE, Record, ShareConsumer, ShareRecord
from qtasks.core import Core
from qtasks.deadletter import dead_letter
from qtasks.decisions import ShareDelivery
from qtasks.delays import AT, DUE, KEY, MOVED
from qtasks.delivery import deliver
from qtasks.exc import DeliveryLimitError
from qtasks.offsets import PartitionOffsets
from qtasks.records import StatusHead, TaskRecord
from qtasks.runner import Host, end_without_running

log = logging.getLogger("qtasks.worker")

#: Share mode: on a task record sent afresh at the last delivery of an earlier record of the task.
AGAIN: Final = "qtasks-again"


def as_record(item: ShareRecord) -> Record:
    """A share record as the worker handles every record."""
    return Record(item.topic, item.partition, item.offset, item.key, item.value, item.timestamp, item.headers)


class ShareOffsets(PartitionOffsets):
    """Share mode: one record's bookkeeping. Finishing it acknowledges it (ACCEPT); nothing is committed."""

    def __init__(self, share: ShareConsumer, shared: ShareRecord, live: set[ShareOffsets], wake: asyncio.Event) -> None:
        super().__init__()
        self._share = share
        self.shared = shared
        self._live = live
        #: Set once its acknowledgement is taken: a full worker's poll loop sends it at once.
        self._wake = wake
        #: Its lock ran out and the group may have handed it to another member: it is not
        #: started here, renewed or acknowledged (a run under way goes on: at least once).
        self.lost = False
        live.add(self)

    def lose(self) -> None:
        self.lost = True
        self._live.discard(self)

    def _end(self, kind: int) -> None:
        if self in self._live:
            self._live.discard(self)
            self._share.acknowledge(self.shared, kind)
            self._wake.set()

    def finish(self, offset: int) -> None:
        self._end(ACCEPT)

    def reject(self) -> None:
        self._end(REJECT)

    def give_back(self) -> None:
        self._end(RELEASE)

    def delivery(self, record: Record, limit: int) -> ShareDelivery:
        """How the group handed this record out, for :func:`~qtasks.decisions.admit`."""
        shared = self.shared
        again = any(name == AGAIN for name, _ in record.headers or ())
        return ShareDelivery(f"{shared.partition}:{shared.offset}", shared.delivery_count, limit, again)


async def end_at_limit(
    host: Host, rec: TaskRecord, head: StatusHead | None, share: ShareDelivery, attempt: int, record: Record | None
) -> None:
    """Share mode, a poison task: its started runs reached ``share_delivery_limit - 1`` and
    none ended. It ends as error, its record is dead-lettered, and it is not run again."""
    runs = head.attempt - head.released if head is not None else 0
    last = f", the last on worker {head.worker}" if head is not None and head.worker else ""
    reason = (
        f"task {rec.uuid} ({rec.task_name}) started {runs} run(s) that never ended{last}: each worker "
        f"died or lost its lock while running it, as many times as share_delivery_limit={share.limit} "
        f"allows (delivery {share.count} of its record is not run)"
    )
    log.error("%s", reason)
    exc = DeliveryLimitError(reason)
    task = await end_without_running(
        host, rec, head, "error", traceback=f"qtasks.exc.DeliveryLimitError: {reason}", attempt=attempt
    )
    if record is not None:
        await dead_letter(host.core, record, reason, host.worker_id, kind="delivery_limit")
    await host.events.fire("task_error", app=host.app, task=task, exc=exc, worker=host.worker)


async def send_again(
    core: Core, rec: TaskRecord, head: StatusHead | None, share: ShareDelivery, record: Record
) -> None:
    """Share mode, a record's last delivery, the task not poison: it is sent afresh (its
    deliveries count from 1 again) and this one is acknowledged once that is stored.

    The deliveries before were hand-backs (graceful stops, a chord callback waiting for
    its tasks) or runs that died, fewer than the limit allows: running this one could
    leave the task without an ending, as the broker would not hand it out again.
    """
    runs = head.attempt if head is not None else 0
    log.info(
        "task %s: delivery %d of %d of its record, %d run(s) started: sent afresh",
        rec.uuid,
        share.count,
        share.limit,
        runs,
    )
    headers = [(n, v) for n, v in record.headers or () if n not in (DUE, AT, KEY, MOVED, AGAIN)]
    topic, partition, out = core.task_route(rec.uuid, rec.not_before, [*headers, (AGAIN, b"1")], key=rec.key)
    key = rec.uuid.encode()
    producer = core.broker.producer
    await deliver(
        lambda: producer.send(topic, record.value, key=key, partition=partition, headers=out or None),
        what=f"task {rec.uuid} sent afresh",
        trouble=core.trouble,
    )
