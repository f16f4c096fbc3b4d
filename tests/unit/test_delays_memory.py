"""Delayed tasks on memory://."""

import time
import uuid

from qtasks.asyncio import QueueTasks
from qtasks.delays import AT, DUE, KEY
from qtasks.records import TaskRecord, encode
from tests.delays_suite import *  # noqa: F403


async def test_a_delays_record_whose_key_header_has_no_value_is_dead_lettered_and_loses_no_task(
    app: QueueTasks,
) -> None:
    """Found by review: a `qtasks-key` header without a value (Kafka headers may have none) made
    the delays loop raise instead of dead-lettering the record, and the restarted loop never read
    the delayed task read in the same pass again: it stayed `new` for ever."""

    @app.task
    def quick(x: int) -> int:
        return x

    await app.start()
    handle = await app.add_task("quick", 1, countdown=2)  # level 0 (partition 0), held there for 1 s
    now = time.time()
    other = str(uuid.uuid4())
    value = encode(TaskRecord(uuid=other, task_name="quick", created_at=now, args=[2]))
    headers = [(DUE, repr(now).encode()), (AT, repr(now).encode()), (KEY, None)]
    await app.broker.producer.send(app.topics.delays, value, key=other.encode(), partition=0, headers=headers)  # type: ignore[arg-type]
    assert (await app.wait(handle.uuid, timeout=10)).status == "success"
    bad = await app.wait(other, timeout=10)  # the record names its task: it ends as error
    assert bad.status == "error" and "qtasks-key" in (bad.traceback or "")
