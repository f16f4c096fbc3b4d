"""An in-process log with Kafka's semantics, for tests and embedded use.

Not a stub: topics have partitions and offsets, records keep their order within a
partition, consumer groups split partitions among members and rebalance when one joins
or leaves (eager protocol: revoke all, then assign), committed offsets survive a
member, and compacted topics keep the last record of each key (tombstones are dropped
after ``delete.retention.ms``), leaving gaps in the offsets as Kafka does. Apps in one
process that use the same ``memory://name`` URL share one log; it is thread-safe, so
apps on different event loops can share it too.

Transactions follow Kafka's: a transactional id has an epoch that ``init_txn`` raises,
which fences the older producer of that id and aborts its open transaction; a
transaction's records take offsets when sent, and ``txn_end`` writes a marker (one offset,
never returned) and either makes them visible to ``read_committed`` readers, with the
group offsets sent with them, or removes them. ``read_committed`` readers see a partition
up to its last stable offset (the first offset of its oldest open transaction); a
transaction open longer than its timeout is aborted and its producer fenced.

Retention keeps the log bounded, as Kafka's ``cleanup.policy=delete`` does: a topic that
is not compacted drops its oldest records once a partition holds more than
``retention.bytes``, or once they are older than ``retention.ms``. The limits come from the topic's config
(``TopicSpec.config``), else from the URL, else from the defaults::

    memory://name?retention_ms=600000&retention_bytes=1000000

=================== ============================= ===================================
URL option          topic config                  default
=================== ============================= ===================================
``retention_bytes`` ``retention.bytes``           16777216 (16 MiB) per partition
``retention_ms``    ``retention.ms``              3600000 (1 hour)
=================== ============================= ===================================

``-1`` means no limit. The first app to create a topic sets its limits (as on a broker:
a topic that exists keeps its config). A record counts its key and value bytes plus
``RECORD_OVERHEAD`` (what the log holds per record besides them), so ``retention.bytes``
bounds the memory a partition takes, however small its records. Deletion is by whole
records, oldest first, in batches (Kafka deletes whole segments): past the byte limit a
partition is cut to three quarters of it, and the time limit is checked every tenth of
``retention.ms``, so a record may outlive it by that much. The newest record is always
kept. A consumer whose position fell below the first kept offset reads on from it, as
Kafka's consumer does with ``auto.offset.reset=earliest``. As on Kafka, records nobody
has read yet are deleted too: a backlog older or larger than the limits is lost.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from qtasks.connectors.base import GroupInfo, GroupMember, Record, TopicPartition, TopicSpec
from qtasks.exc import CommitFailedError, ConfigError, ConnectorError, ProducerFencedError, TopicConfigError

#: The retention of topics that neither their config nor the URL sets.
DEFAULT_RETENTION = {"retention.bytes": str(16 * 2**20), "retention.ms": str(3_600_000)}
#: Bytes a stored record costs besides its key and value (the tuple, its ints, the bytes
#: objects' headers, two list slots: about 220 on CPython 3.11), counted by ``retention.bytes``.
RECORD_OVERHEAD = 200
#: The URL query options, and the topic config each one sets.
_URL_OPTIONS = {"retention_bytes": "retention.bytes", "retention_ms": "retention.ms"}

_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]


def _wake(waiters: list[_Waiter]) -> None:
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for loop, fut in waiters:
        if loop is running:
            if not fut.done():
                fut.set_result(None)
        elif not loop.is_closed():
            _call_soon(loop, fut)


def _call_soon(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
    try:
        loop.call_soon_threadsafe(_resolve, fut)
    except RuntimeError:
        pass  # the loop closed since is_closed(): nobody waits there any more


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# A stored record: (offset, key, value, timestamp ms), and its headers last when it has
# some. Tuples of bytes and ints are untracked by the garbage collector, so a long log
# costs no collector time; Record objects are made only for what a consumer fetches.
_Stored = tuple[Any, ...]


class _Partition:
    __slots__ = ("dirty", "next_check", "next_offset", "offsets", "open", "records", "size", "waiters")

    def __init__(self) -> None:
        #: transactional id -> first offset of its open transaction here (the last stable offset).
        self.open: dict[str, int] = {}
        self.records: list[_Stored] = []
        self.offsets: list[int] = []
        self.next_offset = 0
        self.waiters: list[_Waiter] = []
        self.dirty = 0
        self.size = 0  # bytes held, as retention.bytes counts them
        self.next_check = 0  # when (ms) to next apply retention.ms

    def stable(self) -> int:
        """The last stable offset: below it, every transaction is committed or aborted."""
        return min(self.open.values()) if self.open else self.next_offset


def _size(record: _Stored) -> int:
    return len(record[1] or b"") + len(record[2] or b"") + RECORD_OVERHEAD


#: A limit never reached: what -1 (no limit) stands for.
_NEVER = 2**62


def _limit(name: str, value: str) -> int:
    """A retention limit: a positive integer, or -1 for none (``_NEVER``)."""
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit == -1:
        return _NEVER
    if limit < 1:
        raise ConfigError(f"{name} must be a positive integer, or -1 for no limit; got {value!r}")
    return limit


class _Topic:
    def __init__(self, spec: TopicSpec, defaults: dict[str, str]) -> None:
        self.spec = spec
        self.compacted = spec.compacted
        self.partitions = [_Partition() for _ in range(spec.partitions)]
        config = {**DEFAULT_RETENTION, **defaults, **spec.config}
        self.delete_retention_ms = int(config.get("delete.retention.ms", "1000"))
        self.retention_bytes = _limit("retention.bytes", config["retention.bytes"])
        self.retention_ms = _limit("retention.ms", config["retention.ms"])
        # Kafka checks retention every log.retention.check.interval.ms; here every tenth
        # of retention.ms, so each check drops about a tenth of a full partition.
        self.check_interval = max(1, self.retention_ms // 10)


class Member(Protocol):
    """What the log needs of a group member (the memory connector's consumer)."""

    client_id: str
    topics: set[str]

    def wake(self) -> None: ...


class _Txn:
    """A transactional id: its epoch and its open transaction."""

    __slots__ = ("epoch", "offsets", "started", "timeout_ms", "written")

    def __init__(self) -> None:
        self.epoch = 0
        self.timeout_ms = 60_000
        self.started = 0  # ms; 0: no open transaction
        #: (topic, partition) -> offsets written in the open transaction.
        self.written: dict[tuple[str, int], list[int]] = {}
        #: group id -> offsets sent with the open transaction.
        self.offsets: dict[str, dict[TopicPartition, int]] = {}


#: Seconds a rebalance waits for every member to give its partitions up (Kafka's rebalance
#: timeout): a member that does not (its loop is stuck) no longer holds the others back.
REBALANCE_TIMEOUT = 10.0


class _Group:
    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.generation = 0
        self.assignment: dict[str, set[TopicPartition]] = {}
        self.committed: dict[TopicPartition, int] = {}
        #: Members that gave their partitions up for this generation; when the rebalance began
        #: (the first of several in a row), and whether every member has caught up since.
        self.synced: set[str] = set()
        self.started = 0.0
        self.settled = True


class MemoryLog:
    """The shared state behind ``memory://name``: topics and consumer groups."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.topics: dict[str, _Topic] = {}
        self.groups: dict[str, _Group] = {}
        self.txns: dict[str, _Txn] = {}
        self._open_txns = 0
        self._expiry_check = 0.0  # ms of the log's clock
        self._member_ids = itertools.count(1)
        #: Seconds since the epoch: record timestamps and retention read it (tests replace it).
        self.clock: Callable[[], float] = time.time

    # topics -----------------------------------------------------------------------

    def create_topic(self, spec: TopicSpec, defaults: dict[str, str] | None = None) -> None:
        """Create a topic; an existing one must have the same cleanup policy.

        ``defaults`` is topic config for what ``spec.config`` does not set (the URL's retention).
        """
        with self.lock:
            topic = self.topics.get(spec.name)
            if topic is None:
                self.topics[spec.name] = _Topic(spec, defaults or {})
            elif topic.spec.compacted != spec.compacted:
                policy = "compact" if topic.spec.compacted else "delete"
                raise TopicConfigError(
                    f"topic {spec.name!r} exists with cleanup.policy={policy}; "
                    f"qtasks needs {'compact' if spec.compacted else 'delete'}: "
                    "delete the topic or use another app name"
                )

    def _topic(self, name: str) -> _Topic:
        try:
            return self.topics[name]
        except KeyError:
            raise ConnectorError(f"unknown topic {name!r}: the app creates its topics at start") from None

    def partitions_for(self, name: str) -> int:
        """How many partitions a topic has."""
        return len(self._topic(name).partitions)

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> int:
        """Append one record and wake the readers of its partition; return its offset."""
        with self.lock:
            offset, waiters = self._append(topic, partition, key, value, headers)
        if waiters:
            _wake(waiters)
        return offset

    def _append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> tuple[int, list[_Waiter]]:
        """Append one record (lock held); its offset and the readers to wake."""
        t = self._topic(topic)
        try:
            p = t.partitions[partition]
        except IndexError:
            raise ConnectorError(f"topic {topic!r} has no partition {partition}") from None
        offset = p.next_offset
        p.next_offset = offset + 1
        now = int(self.clock() * 1000)
        p.records.append((offset, key, value, now, tuple(headers)) if headers else (offset, key, value, now))
        p.offsets.append(offset)
        waiters, p.waiters = p.waiters, []
        if t.compacted:
            p.dirty += 1
            if p.dirty > max(256, len(p.records) // 2):
                self._compact(t, p)
        else:
            # The hot path: one sum and two comparisons; _retain cuts in batches.
            p.size = size = p.size + len(key or b"") + len(value or b"") + RECORD_OVERHEAD
            if size > t.retention_bytes or now >= p.next_check:
                self._retain(t, p, now)
        return offset, waiters

    def compact(self, topic: str) -> None:
        """Compact every partition of a compacted topic now (Kafka's log cleaner does this in the background)."""
        with self.lock:
            t = self._topic(topic)
            for p in t.partitions:
                self._compact(t, p)

    def retain(self, topic: str) -> None:
        """Apply the retention of a non-compacted topic now (appends do it as they go)."""
        with self.lock:
            t = self._topic(topic)
            if not t.compacted:
                now = int(self.clock() * 1000)
                for p in t.partitions:
                    self._retain(t, p, now)

    @staticmethod
    def _retain(t: _Topic, p: _Partition, now: int) -> None:
        # Cut past the byte limit to 3/4 of it, so the next cut is a quarter of a
        # partition away: deleting in batches keeps an append O(1) on average.
        target = t.retention_bytes * 3 // 4 if p.size > t.retention_bytes else _NEVER
        horizon = now - t.retention_ms
        records, size, drop = p.records, p.size, 0
        keep_last = len(records) - 1
        while drop < keep_last and (size > target or records[drop][3] < horizon):
            size -= _size(records[drop])
            drop += 1
        if drop:
            del records[:drop]
            del p.offsets[:drop]
            p.size = size
        p.next_check = now + t.check_interval  # past _NEVER if there is no time limit

    def _compact(self, t: _Topic, p: _Partition) -> None:
        # As Kafka's cleaner, only below the last stable offset: a record of an open
        # transaction must not replace a committed one (the transaction may abort).
        stable = p.stable()
        last: dict[bytes | None, int] = {}
        for i, record in enumerate(p.records):
            if record[0] < stable:
                last[record[1]] = i
        horizon = self.clock() * 1000 - t.delete_retention_ms
        kept = [
            r
            for i, r in enumerate(p.records)
            if r[0] >= stable or (last[r[1]] == i and (r[2] is not None or r[3] > horizon))
        ]
        p.records = kept
        p.offsets = [r[0] for r in kept]
        p.dirty = 0

    def fetch(self, tp: TopicPartition, position: int, limit: int, committed: bool = False) -> list[Record]:
        """Records of a partition from ``position`` on, at most ``limit`` (``committed``: below the LSO only)."""
        with self.lock:
            p = self._topic(tp.topic).partitions[tp.partition]
            start = bisect.bisect_left(p.offsets, position)
            if committed and p.open:
                self._expire_txns()
                end = min(start + limit, bisect.bisect_left(p.offsets, p.stable()))
                stored = p.records[start:end]
            else:
                stored = p.records[start : start + limit]
        topic, partition = tp
        return [Record(topic, partition, *r) for r in stored]

    def watch(
        self, tps: Iterable[TopicPartition], positions: dict[TopicPartition, int], committed: bool = False
    ) -> asyncio.Future[None] | None:
        """A future resolved when any of ``tps`` gets a record past its position (None: data is there now)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self.lock:
            parts = []
            for tp in tps:
                p = self._topic(tp.topic).partitions[tp.partition]
                if (p.stable() if committed else p.next_offset) > positions[tp]:
                    return None
                parts.append(p)
            for p in parts:
                p.waiters.append((loop, fut))
        return fut

    def unwatch(self, tps: Iterable[TopicPartition], fut: asyncio.Future[None]) -> None:
        """Forget a ``watch`` future, so idle partitions do not collect the waits that timed out."""
        with self.lock:
            for tp in tps:
                p = self._topic(tp.topic).partitions[tp.partition]
                if p.waiters:
                    p.waiters = [w for w in p.waiters if w[1] is not fut]

    def end_offset(self, tp: TopicPartition, committed: bool = False) -> int:
        """The offset the next record of a partition will get (``committed``: its last stable offset)."""
        with self.lock:
            p = self._topic(tp.topic).partitions[tp.partition]
            if committed and p.open:
                self._expire_txns()
                return p.stable()
            return p.next_offset

    def first_offset(self, tp: TopicPartition) -> int:
        """The lowest offset still in a partition."""
        with self.lock:
            p = self._topic(tp.topic).partitions[tp.partition]
            return p.offsets[0] if p.offsets else p.next_offset

    def offset_for_time(self, tp: TopicPartition, timestamp_ms: int) -> int | None:
        """The first offset whose timestamp is at or after ``timestamp_ms``, or None."""
        with self.lock:
            p = self._topic(tp.topic).partitions[tp.partition]
            i = bisect.bisect_left(p.records, timestamp_ms, key=lambda r: r[3])
            return p.records[i][0] if i < len(p.records) else None

    # transactions -----------------------------------------------------------------

    def init_txn(self, transactional_id: str, timeout_ms: int) -> int:
        """Register a producer of ``transactional_id``: abort its open transaction, fence older ones; its epoch."""
        with self.lock:
            txn = self.txns.setdefault(transactional_id, _Txn())
            waiters = self._end_txn(txn, transactional_id, commit=False) if txn.started else []
            txn.epoch += 1
            txn.timeout_ms = timeout_ms
            epoch = txn.epoch
        _wake(waiters)
        return epoch

    def _txn(self, transactional_id: str, epoch: int) -> _Txn:
        """The transaction state of a producer that is still current (lock held)."""
        self._expire_txns()
        txn = self.txns.get(transactional_id)
        if txn is None or txn.epoch != epoch:
            raise ProducerFencedError(
                f"the producer of transactional id {transactional_id!r} was fenced: a newer one "
                "took over, or its transaction ran past its timeout"
            )
        return txn

    def txn_append(
        self,
        transactional_id: str,
        epoch: int,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> int:
        """Append a record in the producer's transaction (opened by its first write)."""
        with self.lock:
            txn = self._txn(transactional_id, epoch)
            self._open(txn)
            offset, waiters = self._append(topic, partition, key, value, headers)
            written = txn.written.setdefault((topic, partition), [])
            if not written:
                self.topics[topic].partitions[partition].open[transactional_id] = offset
            written.append(offset)
        if waiters:
            _wake(waiters)
        return offset

    def txn_offsets(self, transactional_id: str, epoch: int, group_id: str, offsets: dict[TopicPartition, int]) -> None:
        """Add a group's offsets to the producer's transaction: committed with it, or never."""
        with self.lock:
            txn = self._txn(transactional_id, epoch)
            self._open(txn)
            txn.offsets.setdefault(group_id, {}).update(offsets)

    def txn_end(self, transactional_id: str, epoch: int, *, commit: bool) -> None:
        """Commit or abort the producer's open transaction (nothing open: nothing to do)."""
        with self.lock:
            txn = self._txn(transactional_id, epoch)
            waiters = self._end_txn(txn, transactional_id, commit=commit) if txn.started else []
        _wake(waiters)

    def _open(self, txn: _Txn) -> None:
        if not txn.started:
            txn.started = max(1, int(self.clock() * 1000))
            self._open_txns += 1

    def _end_txn(self, txn: _Txn, transactional_id: str, *, commit: bool) -> list[_Waiter]:
        waiters: list[_Waiter] = []
        now = int(self.clock() * 1000)
        for (topic, partition), offsets in txn.written.items():
            t = self.topics[topic]
            p = t.partitions[partition]
            p.open.pop(transactional_id, None)
            if not commit:
                gone = set(offsets)
                kept = [r for r in p.records if r[0] not in gone]
                if not t.compacted:
                    p.size -= sum(_size(r) for r in p.records if r[0] in gone)
                p.records = kept
                p.offsets = [r[0] for r in kept]
            p.next_offset += 1  # the commit or abort marker takes an offset, as in Kafka
            waiters += p.waiters
            p.waiters = []
            if t.compacted and commit:
                p.dirty += len(offsets)
                if p.dirty > max(256, len(p.records) // 2):
                    self._compact(t, p)
            elif not t.compacted and now >= p.next_check:
                self._retain(t, p, now)
        if commit:
            for group_id, group_offsets in txn.offsets.items():
                self.groups.setdefault(group_id, _Group()).committed.update(group_offsets)
        txn.written = {}
        txn.offsets = {}
        txn.started = 0
        self._open_txns -= 1
        return waiters

    def _expire_txns(self) -> None:
        """Abort transactions open past their timeout and fence their producers (lock held).

        Checked at most every 50 ms of the log's clock (as the broker checks periodically),
        so the hot path of a transactional send stays one comparison.
        """
        if not self._open_txns:
            return
        now = self.clock() * 1000
        if now < self._expiry_check:
            return
        self._expiry_check = now + 50
        for transactional_id, txn in self.txns.items():
            if txn.started and now - txn.started > txn.timeout_ms:
                waiters = self._end_txn(txn, transactional_id, commit=False)
                txn.epoch += 1
                for loop, fut in waiters:  # woken later: the lock is held here
                    if not loop.is_closed():
                        _call_soon(loop, fut)

    # groups -----------------------------------------------------------------------

    def join(self, group_id: str, member: Member) -> str:
        """Add a member to a group and rebalance; return its member id."""
        with self.lock:
            member_id = f"{member.client_id or 'member'}-{next(self._member_ids)}"
            group = self.groups.setdefault(group_id, _Group())
            group.members[member_id] = member
            self._rebalance(group)
            return member_id

    def leave(self, group_id: str, member_id: str) -> None:
        """Remove a member from its group and rebalance the rest."""
        with self.lock:
            group = self.groups.get(group_id)
            if group and group.members.pop(member_id, None) is not None:
                self._rebalance(group)

    def rejoin(self, group_id: str, member_id: str) -> None:
        """A member asks for a rebalance: every member gets its partitions again (eager protocol)."""
        with self.lock:
            group = self.groups.get(group_id)
            if group and member_id in group.members:
                self._rebalance(group)

    def _rebalance(self, group: _Group) -> None:
        if group.settled:  # a rebalance on top of an unfinished one keeps its clock
            group.started = time.monotonic()
            group.settled = False
        group.generation += 1
        group.synced = set()
        members = sorted(group.members)
        group.assignment = {m: set() for m in members}
        topics = sorted({t for m in members for t in group.members[m].topics})
        tps = [TopicPartition(t, i) for t in topics if t in self.topics for i in range(len(self.topics[t].partitions))]
        for i, tp in enumerate(tps):
            candidates = [m for m in members if tp.topic in group.members[m].topics]
            group.assignment[candidates[i % len(candidates)]].add(tp)
        for m in members:
            group.members[m].wake()

    def sync(self, group_id: str, member_id: str, generation: int) -> bool:
        """A member gave its partitions up for ``generation``: whether the group may take the new assignment.

        As Kafka's eager protocol does, no member gets a partition of the new generation
        before every member revoked its old ones (the revoke callbacks ran: commits, and
        whatever a member writes before it lets go), or the rebalance timeout passed.
        """
        with self.lock:
            group = self.groups.get(group_id)
            if group is None or generation != group.generation or member_id not in group.members:
                return False
            if member_id not in group.synced:
                group.synced.add(member_id)
                if group.synced >= group.members.keys():
                    group.settled = True
                    for member in group.members.values():
                        member.wake()
            return group.synced >= group.members.keys() or time.monotonic() - group.started > REBALANCE_TIMEOUT

    def describe_group(self, group_id: str) -> GroupInfo:
        """A group as Kafka's DescribeGroups and OffsetFetch show it."""
        with self.lock:
            group = self.groups.get(group_id)
            if group is None:
                return GroupInfo(group_id, "Dead", ())
            settled = "Stable" if group.settled else "PreparingRebalance"
            state = settled if group.members else "Empty"
            members = tuple(
                GroupMember(
                    member_id, member.client_id, "in-process", tuple(sorted(group.assignment.get(member_id, ())))
                )
                for member_id, member in sorted(group.members.items())
            )
            return GroupInfo(group_id, state, members, dict(group.committed))

    def group_state(self, group_id: str) -> tuple[int, dict[str, set[TopicPartition]]]:
        """The generation and assignment of a group (for tests and tools)."""
        with self.lock:
            group = self.groups.get(group_id) or _Group()
            return group.generation, {m: set(tps) for m, tps in group.assignment.items()}

    def committed(self, group_id: str, tp: TopicPartition) -> int | None:
        """The committed offset of a group on a partition, or None."""
        with self.lock:
            group = self.groups.get(group_id)
            return group.committed.get(tp) if group else None

    def commit(
        self,
        group_id: str,
        member_id: str,
        generation: int,
        offsets: dict[TopicPartition, int],
        held: set[TopicPartition],
    ) -> None:
        """Store offsets for a group, as Kafka does.

        A member may commit the partitions of its current generation, and, while it has not
        yet joined a newer one (the revoke callback of an eager rebalance), those it held
        before. A member that left, or partitions it never held, are refused.
        """
        with self.lock:
            group = self.groups.get(group_id)
            if group is None or member_id not in group.members:
                raise CommitFailedError(
                    f"commit refused: not a member of group {group_id!r}; the records will be delivered again"
                )
            owned = group.assignment.get(member_id, set()) if generation == group.generation else held
            for tp, offset in offsets.items():
                if tp not in owned:
                    raise CommitFailedError(f"commit refused: {tp} is not assigned to this member")
                group.committed[tp] = offset


_logs: dict[str, MemoryLog] = {}
_logs_lock = threading.Lock()


def _name(url: str) -> str:
    return url.partition("://")[2].partition("?")[0].strip("/")


def url_options(url: str, skip: Sequence[str] = ()) -> dict[str, str]:
    """The topic config a ``memory://name?...`` URL sets (see the module docstring); ``skip``: other options it may have."""
    config = {}
    for key, value in urllib.parse.parse_qsl(url.partition("?")[2], keep_blank_values=True):
        if key in skip:
            continue
        if key not in _URL_OPTIONS:
            raise ConfigError(f"unknown memory:// option {key!r} in {url!r}: use {' or '.join(_URL_OPTIONS)}")
        _limit(key, value)
        config[_URL_OPTIONS[key]] = value
    return config


def get_log(url: str) -> MemoryLog:
    """The shared log behind a ``memory://`` URL (one per name, per process; the query is not part of the name)."""
    name = _name(url)
    with _logs_lock:
        log = _logs.get(name)
        if log is None:
            log = _logs[name] = MemoryLog()
        return log


def drop_log(url: str) -> None:
    """Forget the log behind a ``memory://`` URL (its records are freed once no app uses it)."""
    name = _name(url)
    with _logs_lock:
        _logs.pop(name, None)
