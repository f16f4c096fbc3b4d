"""Share groups on the memory log: what a Kafka share group does (KIP-932), in-process.

A share group hands each record of its topics to one member at a time, under a lock:

- A record handed out is *acquired* by that member until ``lock`` seconds pass, it is
  acknowledged, or the member leaves. ACCEPT and REJECT end it; RELEASE, an expired lock
  and a member that leaves make it *available* again, for any member, its delivery count
  one more when it is handed out next.
- A record handed out ``delivery_limit`` times and not accepted or rejected is archived
  when its last lock ends: it is never handed out again (Kafka's
  ``share.delivery.count.limit``).
- The group starts at each partition's first offset (``share.auto.offset.reset=earliest``)
  or at its end when it first reads it (``latest``, Kafka's default).
- Acknowledging a record the member does not hold is refused, as Kafka refuses it
  (INVALID_RECORD_STATE): its lock ran out and it may be with another member.

Every member shares every partition: there is no assignment to wait for, which Kafka's
coordinator hands out a heartbeat or more after a member joins. The state is not
journaled, so a ``file://`` log's share groups start again after a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from qtasks.connectors.base import (
    ACCEPT,
    REJECT,
    RELEASE,
    RENEW,
    GroupInfo,
    GroupMember,
    Record,
    ShareRecord,
    TopicPartition,
)
from qtasks.connectors.memory_log import MemoryLog
from qtasks.exc import ConnectorError

#: Kafka's defaults for a share group's settings.
DEFAULT_LOCK = 30.0
DEFAULT_DELIVERY_LIMIT = 5


@dataclass(slots=True)
class _InFlight:
    """An offset handed out and not finished: held by ``member`` until ``until``, or available (no member)."""

    count: int
    member: str | None = None
    until: float = 0.0


@dataclass(slots=True)
class _Partition:
    #: Offsets below this were all handed out at least once (or skipped before the start).
    next: int
    inflight: dict[int, _InFlight] = field(default_factory=dict)


@dataclass(slots=True)
class _Group:
    lock: float = DEFAULT_LOCK
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    earliest: bool = False
    partitions: dict[TopicPartition, _Partition] = field(default_factory=dict)
    #: The members in the group now: member id -> (client id, topics).
    members: dict[str, tuple[str, list[str]]] = field(default_factory=dict)


class ShareGroups:
    """The share groups of one memory log (state only: what members do goes through :class:`MemoryShareConsumer`)."""

    def __init__(self, log: MemoryLog, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._groups: dict[str, _Group] = {}
        self.clock = clock

    def configure(self, group_id: str, settings: dict[str, str]) -> None:
        """Set a group's ``share.*`` settings, as IncrementalAlterConfigs does on Kafka."""
        with self._log.lock:
            group = self._groups.setdefault(group_id, _Group())
            for name, value in settings.items():
                if name == "share.record.lock.duration.ms":
                    group.lock = int(value) / 1000
                elif name == "share.delivery.count.limit":
                    group.delivery_limit = int(value)
                elif name in ("share.session.timeout.ms", "share.heartbeat.interval.ms"):
                    int(value)  # in one process no member dies unseen: nothing to time
                elif name == "share.auto.offset.reset":
                    if value not in ("earliest", "latest"):
                        raise ConnectorError(f"share.auto.offset.reset must be earliest or latest, not {value!r}")
                    group.earliest = value == "earliest"
                else:
                    raise ConnectorError(f"unknown share group setting {name!r}")

    def lock_of(self, group_id: str) -> float:
        with self._log.lock:
            return self._groups.setdefault(group_id, _Group()).lock

    def _partition(self, group: _Group, tp: TopicPartition) -> _Partition:
        part = group.partitions.get(tp)
        if part is None:
            start = self._log.first_offset(tp) if group.earliest else self._log.end_offset(tp)
            part = group.partitions[tp] = _Partition(start)
        return part

    def _expire(self, group: _Group, part: _Partition, now: float) -> None:
        for offset, held in list(part.inflight.items()):
            if held.member is not None and held.until <= now:
                self._free(group, part, offset, held)

    @staticmethod
    def _free(group: _Group, part: _Partition, offset: int, held: _InFlight) -> None:
        """A lock ended without an acknowledgement: available again, or archived at the delivery limit."""
        if held.count >= group.delivery_limit:
            del part.inflight[offset]
        else:
            held.member = None

    def acquire(self, group_id: str, member: str, topics: list[str], max_records: int) -> list[ShareRecord]:
        """Hand ``member`` up to ``max_records`` records: released ones first, then new ones."""
        now = self.clock()
        out: list[ShareRecord] = []
        with self._log.lock:
            group = self._groups.setdefault(group_id, _Group())
            tps = [TopicPartition(t, p) for t in topics for p in range(self._log.partitions_for(t))]
            for tp in tps:
                part = self._partition(group, tp)
                self._expire(group, part, now)
                for offset in sorted(o for o, held in part.inflight.items() if held.member is None):
                    if len(out) >= max_records:
                        return out
                    records = self._log.fetch(tp, offset, 1)
                    if not records or records[0].offset != offset:  # gone (compaction, retention)
                        del part.inflight[offset]
                        continue
                    held = part.inflight[offset]
                    held.count += 1
                    held.member, held.until = member, now + group.lock
                    out.append(_record(records[0], held.count))
                if len(out) >= max_records:
                    return out
                for record in self._log.fetch(tp, max(part.next, self._log.first_offset(tp)), max_records - len(out)):
                    part.next = record.offset + 1
                    part.inflight[record.offset] = _InFlight(1, member, now + group.lock)
                    out.append(_record(record, 1))
        return out

    def acknowledge(self, group_id: str, member: str, acks: dict[TopicPartition, dict[int, int]]) -> list[str]:
        """Apply ``member``'s acknowledgements; return why those refused were refused."""
        now = self.clock()
        refused: list[str] = []
        with self._log.lock:
            group = self._groups.setdefault(group_id, _Group())
            for tp, kinds in acks.items():
                part = self._partition(group, tp)
                self._expire(group, part, now)
                # All or nothing per partition, as Kafka applies them: one refused offset
                # refuses every acknowledgement of its partition in the request.
                wrong = []
                for offset, kind in kinds.items():
                    held = part.inflight.get(offset)
                    if held is None or held.member != member:
                        wrong.append(f"{tp.topic}[{tp.partition}]@{offset} is not held by this member")
                    elif kind not in (ACCEPT, REJECT, RELEASE, RENEW):
                        wrong.append(f"{tp.topic}[{tp.partition}]@{offset}: unknown acknowledgement {kind}")
                if wrong:
                    refused.extend(wrong)
                    continue
                for offset, kind in kinds.items():
                    held = part.inflight[offset]
                    if kind in (ACCEPT, REJECT):
                        del part.inflight[offset]
                    elif kind == RELEASE:
                        self._free(group, part, offset, held)
                    else:
                        held.until = now + group.lock
        return refused

    def join(self, group_id: str, member: str, client_id: str, topics: list[str]) -> None:
        """A member joined: :meth:`describe` lists it until it leaves."""
        with self._log.lock:
            self._groups.setdefault(group_id, _Group()).members[member] = (client_id, list(topics))

    def describe(self, group_id: str, topic: str) -> GroupInfo:
        """The group's members (each shares every partition here), and on each partition of
        ``topic`` it has read: the start offset (below it every record is done) and the lag
        (records from there on not acknowledged or rejected yet)."""
        with self._log.lock:
            group = self._groups.get(group_id)
            if group is None:
                return GroupInfo(group_id, "Dead", ())
            members = tuple(
                GroupMember(
                    member,
                    client_id,
                    "memory",
                    tuple(TopicPartition(t, p) for t in sorted(topics) for p in range(self._log.partitions_for(t))),
                )
                for member, (client_id, topics) in sorted(group.members.items())
            )
            starts: dict[TopicPartition, int] = {}
            lag: dict[TopicPartition, int] = {}
            for tp, part in group.partitions.items():
                if tp.topic != topic:
                    continue
                starts[tp] = min([part.next, *part.inflight])
                lag[tp] = len(part.inflight) + max(0, self._log.end_offset(tp) - part.next)
            return GroupInfo(group_id, "Stable" if members else "Empty", members, starts, lag)

    def leave(self, group_id: str, member: str) -> None:
        """A member left (or its connection dropped): everything it holds is available again at once."""
        with self._log.lock:
            group = self._groups.get(group_id)
            if group is None:
                return
            group.members.pop(member, None)
            for part in group.partitions.values():
                for offset, held in list(part.inflight.items()):
                    if held.member == member:
                        self._free(group, part, offset, held)

    def next_expiry(self, group_id: str) -> float | None:
        """When the next lock of the group runs out (the clock's time), if any is held."""
        with self._log.lock:
            group = self._groups.get(group_id)
            if group is None:
                return None
            ends = [h.until for p in group.partitions.values() for h in p.inflight.values() if h.member is not None]
            return min(ends) if ends else None


def _record(r: Record, count: int) -> ShareRecord:
    return ShareRecord(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp, tuple(r.headers), count)


_SHARE_GROUPS: weakref.WeakKeyDictionary[MemoryLog, ShareGroups] = weakref.WeakKeyDictionary()


def share_groups(log: MemoryLog) -> ShareGroups:
    """The share groups of ``log`` (made on first use)."""
    groups = _SHARE_GROUPS.get(log)
    if groups is None:
        groups = _SHARE_GROUPS[log] = ShareGroups(log)
    return groups


_members = itertools.count(1)


class MemoryShareConsumer:
    """A member of a share group on the memory log, with the Kafka share consumer's methods."""

    def __init__(self, log: MemoryLog, *, group_id: str, topics: list[str], client_id: str | None = None) -> None:
        self._log = log
        self._groups = share_groups(log)
        self.group_id = group_id
        self.topics = list(topics)
        self.member_id = f"memory-share-{next(_members)}"
        self.client_id = client_id or self.member_id
        self._acks: dict[TopicPartition, dict[int, int]] = {}
        self._held: dict[TopicPartition, set[int]] = {}
        self._started = False
        self._stopping = False
        self.lock_ms: int | None = None

    async def start(self, timeout: float = 30.0) -> None:
        self._groups.join(self.group_id, self.member_id, self.client_id, self.topics)
        self._started = True

    async def wait_assigned(self, timeout: float) -> bool:
        """Every member shares every partition here: at once."""
        return self._started

    def assignment(self) -> set[tuple[str, int]]:
        return {(t, p) for t in self.topics for p in range(self._log.partitions_for(t))}

    async def getmany(self, timeout: float, max_records: int) -> list[ShareRecord]:
        """Records handed to this member (at most ``max_records``), waiting up to ``timeout`` for some."""
        if self._stopping:
            raise ConnectorError(f"share group {self.group_id}: this member is stopped")
        await self.flush_acks()
        deadline = time.monotonic() + timeout
        while True:
            records = self._groups.acquire(self.group_id, self.member_id, self.topics, max_records)
            self.lock_ms = int(self._groups.lock_of(self.group_id) * 1000)
            if records:
                for r in records:
                    self._held.setdefault(TopicPartition(r.topic, r.partition), set()).add(r.offset)
                return records
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            expiry = self._groups.next_expiry(self.group_id)
            if expiry is not None:
                left = min(left, max(0.0, expiry - self._groups.clock()) + 0.001)
            tps = [TopicPartition(t, p) for t, p in self.assignment()]
            positions = {tp: self._log.end_offset(tp) for tp in tps}
            fut = self._log.watch(tps, positions)
            if fut is None:
                continue
            try:
                await asyncio.wait_for(asyncio.shield(fut), left)
            except TimeoutError:
                pass
            finally:
                self._log.unwatch(tps, fut)

    def acknowledge(self, record: ShareRecord, kind: int = ACCEPT) -> None:
        tp = TopicPartition(record.topic, record.partition)
        held = self._held.get(tp)
        if held is None or record.offset not in held:
            return  # not held here (lost, or acknowledged already): it would take its partition's others down
        held.discard(record.offset)
        self._acks.setdefault(tp, {})[record.offset] = kind

    async def flush_acks(self, *, closing: bool = False) -> None:
        acks, self._acks = self._acks, {}
        if acks:
            self._groups.acknowledge(self.group_id, self.member_id, acks)

    async def renew(self, records: list[ShareRecord]) -> list[ShareRecord]:
        """Extend the locks of ``records``; return those this member no longer holds (forgotten here).

        One request per partition, as Kafka's consumer sends them; a partition refused as a
        whole (all or nothing) is renewed again record by record.
        """
        lost: list[ShareRecord] = []
        by_tp: dict[TopicPartition, list[ShareRecord]] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            if record.offset in self._held.get(tp, ()):
                by_tp.setdefault(tp, []).append(record)
            else:
                lost.append(record)
        for tp, of_tp in by_tp.items():
            if not self._groups.acknowledge(self.group_id, self.member_id, {tp: {r.offset: RENEW for r in of_tp}}):
                continue
            for record in of_tp:
                if len(of_tp) == 1 or self._groups.acknowledge(
                    self.group_id, self.member_id, {tp: {record.offset: RENEW}}
                ):
                    lost.append(record)
        for record in lost:
            self._held.get(TopicPartition(record.topic, record.partition), set()).discard(record.offset)
        return lost

    async def stop(self) -> None:
        """Release what is held and not acknowledged, and leave the group."""
        if self._stopping:
            return
        self._stopping = True
        for tp, offsets in self._held.items():
            for offset in offsets:
                self._acks.setdefault(tp, {})[offset] = RELEASE
        self._held.clear()
        await self.flush_acks(closing=True)
        self._groups.leave(self.group_id, self.member_id)
