"""What an operator asks of a running group, read from Kafka: the workers and their
partitions, lag, tasks by status, the dead-letter topic (and replaying it), status changes
as they happen. The CLI (``inspect``, ``tasks``, ``dlq``, ``tail``) prints these.

Everything here is read from the broker (the group's coordinator, the status topic, the
dead-letter topic) by a client of its own: it never asks a worker anything, so it works
with any number of workers and never slows one down.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuid_mod
import weakref
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from qtasks.config import share_group_of
from qtasks.connectors.base import GroupMember, TopicPartition
from qtasks.exc import BrokerUnavailableError, RecordError
from qtasks.records import DeadLetter, Task, decode_status, decode_task

if TYPE_CHECKING:
    from qtasks.app import QueueTasks
    from qtasks.core import Core

__all__ = [
    "GroupReport",
    "Letter",
    "PartitionLag",
    "WorkerReport",
    "dead_letters",
    "inspect_group",
    "list_tasks",
    "replay",
    "replay_uuid",
    "status_changes",
]

_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)


@dataclass
class PartitionLag:
    """One partition of the tasks topic: its end, the group's committed offset, the difference, its owner."""

    partition: int
    end: int
    committed: int | None
    lag: int
    worker: str | None


@dataclass
class WorkerReport:
    """A worker of the group (its client id is its worker id), its partitions and the tasks it runs."""

    worker: str
    host: str
    partitions: list[int]
    running: list[Task] = field(default_factory=list)


@dataclass
class GroupReport:
    group: str
    state: str
    workers: list[WorkerReport]
    partitions: list[PartitionLag]

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    def to_dict(self) -> dict[str, object]:
        """Plain data for ``--json``."""
        return {
            "group": self.group,
            "state": self.state,
            "lag": self.lag,
            "workers": [
                {
                    "worker": w.worker,
                    "host": w.host,
                    "partitions": w.partitions,
                    "running": [msgspec.to_builtins(t) for t in w.running],
                }
                for w in self.workers
            ],
            "partitions": [p.__dict__ for p in self.partitions],
        }


async def end_offsets(app: QueueTasks, topic: str) -> dict[TopicPartition, int]:
    """The end of each partition of ``topic`` (read_committed when the app runs exactly-once).

    Asked through the app's results reader: its consumer lives as long as the app.
    """
    partitions = await app.core.broker.partitions_for(topic, refresh=True)
    return await app._results_reader.end_offsets([TopicPartition(topic, p) for p in range(partitions)])


async def inspect_group(app: QueueTasks) -> GroupReport:
    """The workers' group: members, their partitions, the tasks each runs, lag per tasks partition."""
    await app._connect()
    core = app.core
    if app.config.processing_mode == "share":
        # The workers share the tasks partitions: the committed offsets are the share
        # group's start offsets, and the lag is the broker's count of records not done.
        group_id = share_group_of(app.group_id)
        info = await core.broker.describe_share_group(group_id, core.topics.tasks)
    else:
        group_id = app.group_id
        info = await core.broker.describe_group(group_id)
    ends = await end_offsets(app, core.topics.tasks)
    await core.store.catch_up_all()
    running: dict[str, list[Task]] = {}
    for task in _tasks(app, status="process"):
        running.setdefault(task.worker or "", []).append(task)
    owners: dict[TopicPartition, list[str]] = {}
    workers = []
    for member in sorted(info.members, key=lambda m: m.client_id):
        tasks_partitions = [tp.partition for tp in member.partitions if tp.topic == core.topics.tasks]
        for tp in member.partitions:
            owners.setdefault(tp, []).append(member.client_id)
        workers.append(_worker(member, tasks_partitions, running.get(member.client_id, [])))
    partitions = []
    for tp, end in sorted(ends.items()):
        committed = info.committed.get(tp)
        lag = info.lag.get(tp, max(end - (committed or 0), 0))
        owner = ",".join(owners[tp]) if tp in owners else None
        partitions.append(PartitionLag(tp.partition, end, committed, lag, owner))
    return GroupReport(group_id, info.state, workers, partitions)


def _worker(member: GroupMember, partitions: list[int], running: list[Task]) -> WorkerReport:
    return WorkerReport(member.client_id, member.host, sorted(partitions), sorted(running, key=lambda t: t.updated_at))


def _tasks(app: QueueTasks, status: str | None = None, name: str | None = None) -> Iterable[Task]:
    """Tasks of the view, newest change first (decoded only when their head matches)."""
    view = app.core.view
    for head in sorted(view.heads(), key=lambda h: h.updated_at, reverse=True):
        if status is not None and head.status != status:
            continue
        task = view.get(head.uuid)
        if task is not None and (name is None or task.task_name == name):
            yield task


async def list_tasks(
    app: QueueTasks, *, status: str | None = None, name: str | None = None, limit: int = 50
) -> list[Task]:
    """Tasks from the status table, newest change first: all unfinished ones, and the finished
    ones this process keeps (the latest ``status_cache_size``)."""
    await app._connect()
    await app.core.store.catch_up_all()
    out: list[Task] = []
    for task in _tasks(app, status, name):
        if len(out) >= limit:
            break
        out.append(task)
    return out


# -- the dead-letter topic -------------------------------------------------------------


@dataclass
class Letter:
    """A dead letter and where it sits in the dead-letter topic (``offset`` is its number)."""

    partition: int
    offset: int
    letter: DeadLetter

    @property
    def cut(self) -> bool:
        """Its value was cut to fit the dead-letter topic: it cannot be replayed."""
        return self.letter.cut

    def to_dict(self, *, value: bool = False) -> dict[str, object]:
        d = self.letter
        out: dict[str, object] = {
            "number": self.offset,
            "at": d.at,
            "reason": d.reason,
            "topic": d.topic,
            "partition": d.partition,
            "offset": d.offset,
            "key": None if d.key is None else d.key.decode("utf-8", "replace"),
            "size": len(d.value or b""),
            "cut": d.cut,
        }
        if value:
            out["value"] = None if d.value is None else d.value.decode("utf-8", "replace")
        return out


#: Seconds ``dead_letters`` may take to read the topic to its end.
READ_TIMEOUT = 60.0


async def dead_letters(app: QueueTasks, timeout: float = READ_TIMEOUT) -> list[Letter]:
    """Every dead letter the topic holds now, oldest first (:class:`BrokerUnavailableError`
    if the topic cannot be read to its end within ``timeout`` seconds)."""
    await app._connect()
    letters: list[Letter] = []
    try:
        async with asyncio.timeout(timeout):
            await _read_letters(app, letters)
    except TimeoutError:
        raise BrokerUnavailableError(
            f"could not read the dead-letter topic {app.topics.dlq} to its end within {timeout:g} s"
        ) from None
    return sorted(letters, key=lambda letter: (letter.letter.at, letter.offset))


async def _read_letters(app: QueueTasks, letters: list[Letter]) -> None:
    core = app.core
    topic = core.topics.dlq
    ends = await end_offsets(app, topic)
    consumer = core.broker.consumer(None, client_id=f"{app.name}-ops")
    await consumer.start()
    try:
        wanted = {tp: end for tp, end in ends.items() if end > 0}
        consumer.assign(list(wanted))
        await consumer.seek_to_beginning(list(wanted))
        left = dict(wanted)
        while left:
            for record in await consumer.getmany(1.0):
                if record.tp not in wanted or record.offset >= wanted[record.tp] or record.value is None:
                    continue
                try:
                    letter = _dead_letter_decoder.decode(record.value)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue  # not a letter this version of qtasks wrote
                letters.append(Letter(record.partition, record.offset, letter))
            for tp in list(left):
                if await consumer.position(tp) >= left[tp]:
                    del left[tp]
    finally:
        await asyncio.shield(consumer.stop())


@dataclass
class Replayed:
    letter: Letter
    #: The new task's uuid when the letter was a task record (the dead one's status now points at it).
    uuid: str | None = None
    #: Why it was not replayed (None: it was).
    refused: str | None = None


#: The uuids of replayed letters are named in this namespace (uuid5), from the letter itself.
#: Fixed for good: another would let a letter replayed by an older version be replayed again.
REPLAY_NAMESPACE = uuid_mod.UUID("5b0f3c1e-7a4d-5c39-9d0e-2f6a8b1c4d7e")

#: One replay at a time per app: a second one waits, then finds the first one's task.
_replaying: weakref.WeakKeyDictionary[Core, asyncio.Lock] = weakref.WeakKeyDictionary()


def replay_uuid(dlq: str, letter: Letter) -> str:
    """The uuid a letter's task gets when replayed: the same for every replay of that letter,
    from any process, so replays at once submit one task (a uuid runs once)."""
    dead = letter.letter
    name = f"{dlq}:{letter.partition}:{letter.offset}:{dead.topic}:{dead.partition}:{dead.offset}:{dead.at!r}"
    return str(uuid_mod.uuid5(REPLAY_NAMESPACE, name))


async def replay(app: QueueTasks, letters: Iterable[Letter]) -> list[Replayed]:
    """Put dead letters back on their topic, once they can be used (they decode now).

    A task record goes back as a new task (a new uuid: the dead one has ended as ``error``;
    the record's name, arguments, priority and retries), and the dead task's status becomes
    ``retry`` pointing at it, so ``app.wait`` and ``app.stream`` of the old uuid follow the
    replay, and a second replay of the same letter is refused. The new uuid comes from the
    letter (:func:`replay_uuid`): replays at once, even from two processes, submit one task,
    which runs once. A letter that still does not decode here, or whose value was cut, is
    refused with the reason (it would only come back).
    """
    await app._connect()
    core = app.core
    lock = _replaying.setdefault(core, asyncio.Lock())
    out: list[Replayed] = []
    for letter in letters:
        async with lock:
            out.append(await _replay_one(core, letter))
    return out


async def _replay_one(core: Core, letter: Letter) -> Replayed:
    dead = letter.letter
    if dead.cut:
        return Replayed(letter, refused="its value was cut to fit the dead-letter topic")
    if dead.topic != core.topics.tasks:
        return Replayed(letter, refused=f"it came from {dead.topic}, not this app's tasks topic")
    try:
        record = decode_task(dead.value, core.record_limit(core.topics.tasks))
    except RecordError as exc:
        return Replayed(letter, refused=f"it still does not decode: {exc}")
    old = await core.store.lookup(record.uuid)
    if old is not None and old.retry_child_uuid is not None:
        return Replayed(letter, refused=f"it was replayed already, as task {old.retry_child_uuid}")
    if old is not None and old.status != "error":
        return Replayed(letter, refused=f"its task {record.uuid} is {old.status}, not dead")
    uuid = replay_uuid(core.topics.dlq, letter)
    replayed = await core.store.lookup(uuid) is not None  # by another process, or cut short before the pointer
    if not replayed:
        await core.submit(
            record.task_name,
            record.args,
            record.kwargs,
            priority=record.priority,
            retry=record.retry,
            retry_parent_uuid=record.uuid,
            retry_count=record.retry_count,
            key=record.key,  # its ordering key goes with it (a delay does not: it runs now)
            uuid=uuid,
        )
    if old is not None:
        # Written once the new task is stored: a replay cut short here is found by its
        # task's uuid, and the next replay of the letter writes this.
        await core.store.write(
            msgspec.structs.replace(old, status="retry", retry_child_uuid=uuid, updated_at=time.time()),
            durable=True,
        )
    if replayed:
        return Replayed(letter, refused=f"it was replayed already, as task {uuid}")
    return Replayed(letter, uuid=uuid)


# -- status changes ------------------------------------------------------------------------


async def status_changes(
    app: QueueTasks, *, poll: float = 0.5, ready: asyncio.Event | None = None
) -> AsyncIterator[Task]:
    """Every status written from now on, as it is written (a tombstone, an expired task, is skipped).

    ``ready`` is set once "now" is fixed (the partitions' ends are known): whatever is
    written after that comes.
    """
    await app._connect()
    core = app.core
    topic = core.topics.status
    partitions = await core.broker.partitions_for(topic, refresh=True)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer = core.broker.consumer(None, client_id=f"{app.name}-tail")
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_end(tps)
        for tp in tps:
            await consumer.position(tp)  # the end is looked up now, not at the first fetch
        if ready is not None:
            ready.set()
        limit = core.config.max_record_bytes
        while True:
            for record in await consumer.getmany(poll):
                if record.value is None:
                    continue
                try:
                    yield decode_status(record.value, limit)
                except RecordError:
                    continue
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
