"""A share-group consumer (KIP-932) on asyncio: records handed out with a lock, acknowledged one by one.

How it talks to the brokers follows from what a share group is (``docs/share-groups.md``):

- **Membership** is a ShareGroupHeartbeat loop on its own connection to the group's
  coordinator. The first heartbeat (epoch 0, the topics) joins; the coordinator answers
  with an epoch and, a heartbeat or more later, the partitions. Until it has some this
  member heartbeats every ``join_interval`` instead of the coordinator's 5 s, which it
  accepts. A member told it is unknown or fenced joins again (epoch 0, same member id).
- **Fetching** is a share session per partition leader, on a connection of its own: a
  session belongs to one TCP connection (its loss releases this member's locks at once),
  and a broker serves one request at a time per connection, so a long-poll fetch would
  hold a heartbeat back. Epoch 0 opens the session (it carries no acknowledgements); each
  later request carries the next epoch, the acknowledgements since the last one, and the
  partitions added to or dropped from the session.
- **Acknowledgements** (:data:`~wire.ACCEPT`, :data:`~wire.RELEASE`,
  :data:`~wire.REJECT`) are kept per partition (:class:`Acks`) and ride on the next
  fetch to that leader, or go at once with :meth:`ShareConsumer.flush_acks`. An offset
  acquired without a record (a compacted gap, a transaction marker) is acknowledged as a
  gap by itself. An acknowledgement the broker refuses (the lock expired, and the record
  went to another member) is logged: the record may run twice, which at least once allows.
- **Refusals**: an answer saying the ACLs do not allow this member in (no READ on the
  group or on a topic) ends it with a :class:`~qtasks.exc.BrokerRefusedError` naming the
  grant, in the words of the check at start; retrying cannot fix it.
- **Stopping** releases what this member holds and has not acknowledged, closes each
  session (epoch -1) and leaves the group (member epoch -1), so its records go to the
  other members at once rather than when their locks expire.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuid_mod
from collections.abc import Awaitable, Callable, Collection
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from aiokafka.conn import AIOKafkaConnection
from aiokafka.errors import IncompatibleBrokerVersion, KafkaError
from aiokafka.record.memory_records import MemoryRecords

from qtasks.connectors.base import ShareRecord
from qtasks.connectors.kafka.access import on_share_group
from qtasks.connectors.kafka.refusals import not_granted
from qtasks.connectors.kafka.share import wire
from qtasks.exc import BrokerRefusedError, ConnectorError

log = logging.getLogger("qtasks.kafka.share")

#: Error codes (https://kafka.apache.org/protocol#protocol_error_codes) this consumer acts on.
NONE = 0
UNKNOWN_TOPIC_OR_PARTITION = 3
NOT_LEADER_OR_FOLLOWER = 6
COORDINATOR_LOAD_IN_PROGRESS = 14
COORDINATOR_NOT_AVAILABLE = 15
NOT_COORDINATOR = 16
UNKNOWN_MEMBER_ID = 25
TOPIC_AUTHORIZATION_FAILED = 29
GROUP_AUTHORIZATION_FAILED = 30
UNKNOWN_TOPIC_ID = 100
FENCED_MEMBER_EPOCH = 110
INVALID_RECORD_STATE = 121
SHARE_SESSION_NOT_FOUND = 122
INVALID_SHARE_SESSION_EPOCH = 123

#: The coordinator moved or is not ready: find it again and retry.
_COORDINATOR_MOVED = {COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR}
#: The member must join again (epoch 0).
_REJOIN = {UNKNOWN_MEMBER_ID, FENCED_MEMBER_EPOCH}
#: The share session is gone or out of step: open a new one.
_SESSION_LOST = {SHARE_SESSION_NOT_FOUND, INVALID_SHARE_SESSION_EPOCH}
#: The partition's leader moved, or the metadata is behind: ask for it again.
_STALE_METADATA = {NOT_LEADER_OR_FOLLOWER, UNKNOWN_TOPIC_OR_PARTITION, UNKNOWN_TOPIC_ID}

#: The longest a fetch waits at the broker: well inside any connection's request timeout
#: (a fetch the client gives up on drops its session, and the locks with it).
MAX_WAIT = 5.0

#: A share session's epoch wraps from here to 1 (0 opens a session, -1 closes one).
_MAX_EPOCH = 2**31 - 1

Key = tuple[uuid_mod.UUID, int]
Connect = Callable[[str, int], Awaitable[AIOKafkaConnection]]


class Acks:
    """Acknowledgements not sent yet, per partition: pure state, no I/O."""

    def __init__(self) -> None:
        self._pending: dict[Key, dict[int, int]] = {}

    def add(self, key: Key, offset: int, kind: int) -> None:
        self._pending.setdefault(key, {})[offset] = kind

    def __len__(self) -> int:
        return sum(len(offsets) for offsets in self._pending.values())

    def keys(self) -> list[Key]:
        return list(self._pending)

    def take(self, keys: AbstractSet[Key] | None = None) -> dict[Key, list[wire.AckBatch]]:
        """Remove and return the acknowledgements of ``keys`` (all: None) as batches of consecutive offsets."""
        taken: dict[Key, list[wire.AckBatch]] = {}
        for key in [k for k in self._pending if keys is None or k in keys]:
            taken[key] = batches(self._pending.pop(key))
        return taken


def batches(acks: dict[int, int]) -> list[wire.AckBatch]:
    """Offsets and their types as batches: a run of consecutive offsets with one type is one batch."""
    out: list[wire.AckBatch] = []
    for offset in sorted(acks):
        kind = acks[offset]
        last = out[-1] if out else None
        if last is not None and last.last == offset - 1 and last.types == [kind]:
            last.last = offset
        else:
            out.append(wire.AckBatch(offset, offset, [kind]))
    return out


@dataclass
class _Session:
    """A share session with one leader: its connection, the next epoch, its partitions."""

    node_id: int
    conn: AIOKafkaConnection
    epoch: int = wire.OPEN_SESSION
    partitions: frozenset[Key] = frozenset()

    def next_epoch(self) -> int:
        """The epoch of a request about to be sent (a connection's requests are served in order).

        Taken when the request is sent, not when it is answered, so a renewal can follow a
        fetch still waiting on the same connection. After 2^31 - 1 it goes on at 1.
        """
        epoch = self.epoch
        self.epoch = 1 if epoch >= _MAX_EPOCH else epoch + 1
        return epoch


class ShareConsumer:
    """A member of share group ``group_id`` reading ``topics`` (see the module's docstring)."""

    def __init__(
        self,
        *,
        connect: Connect,
        bootstrap: list[tuple[str, int]],
        group_id: str,
        topics: list[str],
        join_interval: float = 0.5,
        user: str | None = None,
    ) -> None:
        self._connect = connect
        self._bootstrap = bootstrap
        #: Who the brokers take this member for (the SASL user), named when they refuse it.
        self._user = user
        self.group_id = group_id
        self.topics = list(topics)
        self.member_id = str(uuid_mod.uuid4())
        self._join_interval = join_interval
        self._epoch = 0
        self._assigned: frozenset[Key] = frozenset()
        self._assigned_changed = asyncio.Event()
        self._coordinator: AIOKafkaConnection | None = None
        self._meta_conn: AIOKafkaConnection | None = None
        self._leaders: dict[Key, int] = {}
        self._names: dict[uuid_mod.UUID, str] = {}
        self._brokers: dict[int, tuple[str, int]] = {}
        self._stale = True
        self._sessions: dict[int, _Session] = {}
        self._acks = Acks()
        self._held: dict[Key, set[int]] = {}
        self._heartbeats: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        #: ``stop`` began: no new fetch, and what a fetch under way brings is released.
        self._stopping = False
        self._closing = False
        self._polls = 0
        #: Whose turn it is to be fetched from first, when there is less room than leaders.
        self._turn = 0
        self._no_polls = asyncio.Event()
        self._no_polls.set()
        self._opening = asyncio.Lock()
        #: How long the broker locks a record for this group (from the last fetch).
        self.lock_ms: int | None = None

    # -- membership ----------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Join the group (its first heartbeat); heartbeats go on in the background.

        A broker that is not ready to coordinate yet (a fresh one answers FindCoordinator
        with COORDINATOR_NOT_AVAILABLE for a while) is asked again until ``timeout``.
        """
        try:
            await self._join(timeout)
            if self._stopping:
                raise ConnectorError(f"share group {self.group_id}: stopped while it joined")
        except BaseException:
            self._close_connections()
            raise
        self._heartbeats = asyncio.get_running_loop().create_task(
            self._heartbeat_loop(), name=f"share heartbeats {self.group_id}"
        )

    async def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        tries = 0
        while self._epoch <= 0:
            try:
                wait = await self._heartbeat()
            except (ConnectorError, KafkaError, OSError, ValueError) as exc:
                retriable = exc.retriable if isinstance(exc, ConnectorError) else True
                if not retriable or time.monotonic() >= deadline:
                    if isinstance(exc, ConnectorError):
                        raise
                    raise ConnectorError(f"share group {self.group_id}: could not join: {exc!r}") from exc
                self._drop_coordinator()
                tries += 1
                wait = min(1.0, 0.05 * 2**tries)
            if self._epoch <= 0:
                if time.monotonic() >= deadline:
                    raise ConnectorError(f"share group {self.group_id}: not joined after {timeout:g} s", retriable=True)
                await asyncio.sleep(wait)

    def assignment(self) -> set[tuple[str, int]]:
        """The partitions this member shares, by name (those whose topic id is not resolved yet are left out)."""
        return {(self._names[t], p) for t, p in self._assigned if t in self._names}

    async def wait_assigned(self, timeout: float) -> bool:
        """Wait until the coordinator shares a partition with this member (or ``timeout``); whether it has."""
        deadline = time.monotonic() + timeout
        while not self._assigned and self._failure is None:
            self._assigned_changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(self._assigned_changed.wait(), left)
            except TimeoutError:
                break
        if self._failure is not None:
            raise self._failure
        return bool(self._assigned)

    async def _coordinator_conn(self) -> AIOKafkaConnection:
        if self._coordinator is not None and self._coordinator.connected():
            return self._coordinator
        async with self._opening:  # one caller opens it; the others use that one
            if self._coordinator is not None and self._coordinator.connected():
                return self._coordinator
            self._drop_coordinator()
            self._coordinator = await self._open_coordinator()
            return self._coordinator

    async def _open_coordinator(self) -> AIOKafkaConnection:
        meta = await self._any_conn(locked=True)
        found: wire.Coordinator = await meta.send(wire.find_coordinator(self.group_id))
        if found.error == GROUP_AUTHORIZATION_FAILED:  # not even DESCRIBE, which READ includes
            raise self._not_granted(on_share_group(self.group_id, "read"))
        if found.error != NONE:
            raise ConnectorError(
                f"share group {self.group_id}: no coordinator yet (error {found.error}: {found.message})",
                retriable=found.error in _COORDINATOR_MOVED,
            )
        return await self._connect(found.host, found.port)

    async def _heartbeat(self) -> float:
        """One heartbeat; return the seconds until the next one."""
        leaving = self._closing
        epoch = -1 if leaving else self._epoch
        conn = await self._coordinator_conn()
        answer: wire.Heartbeat = await conn.send(
            wire.share_group_heartbeat(self.group_id, self.member_id, epoch, self.topics if epoch == 0 else None)
        )
        if answer.error in _COORDINATOR_MOVED:
            self._drop_coordinator()
            return self._join_interval
        if answer.error in _REJOIN:
            log.info("share group %s: member %s joins again (error %d)", self.group_id, self.member_id, answer.error)
            self._epoch = 0
            self._set_assignment(frozenset())
            return 0.0
        if answer.error == GROUP_AUTHORIZATION_FAILED:
            raise self._not_granted(on_share_group(self.group_id, "read"))
        if answer.error == TOPIC_AUTHORIZATION_FAILED:
            raise self._not_granted(*(f"read on topic {topic!r}" for topic in self.topics))
        if answer.error != NONE:
            raise ConnectorError(
                f"share group {self.group_id}: the heartbeat was refused (error {answer.error}: {answer.message})"
            )
        if leaving:
            return 0.0
        self._epoch = answer.member_epoch
        if answer.assignment is not None:
            self._set_assignment(frozenset((t, p) for t, parts in answer.assignment.items() for p in parts))
        interval = answer.interval_ms / 1000
        return min(interval, self._join_interval) if not self._assigned else interval

    def _not_granted(self, *lacking: str) -> BrokerRefusedError:
        where = ",".join(f"{host}:{port}" for host, port in self._bootstrap)
        return not_granted(where, self._user, lacking)

    def _drop_coordinator(self) -> None:
        if self._coordinator is not None:
            self._coordinator.close()
        self._coordinator = None

    def _close_connections(self) -> None:
        for node_id in list(self._sessions):
            self._drop_session(node_id)
        self._drop_coordinator()
        if self._meta_conn is not None:
            self._meta_conn.close()
        self._meta_conn = None

    def _set_assignment(self, assigned: frozenset[Key]) -> None:
        if assigned != self._assigned:
            log.info("share group %s: member %s shares %d partition(s)", self.group_id, self.member_id, len(assigned))
            self._assigned = assigned
            self._stale = True
            self._assigned_changed.set()

    async def _heartbeat_loop(self) -> None:
        failures = 0
        while not self._closing:
            try:
                wait = await self._heartbeat()
                failures = 0
            except ConnectorError as exc:
                if not exc.retriable:
                    self._failure = exc
                    self._assigned_changed.set()
                    log.error("%s", exc)
                    return
                failures += 1
                wait = min(5.0, 0.1 * 2**failures)
                log.warning("share group %s: heartbeat failed (%s); retrying in %.1f s", self.group_id, exc, wait)
            except (KafkaError, OSError, ValueError) as exc:
                self._drop_coordinator()
                failures += 1
                wait = min(5.0, 0.1 * 2**failures)
                log.warning("share group %s: heartbeat failed (%r); retrying in %.1f s", self.group_id, exc, wait)
            except Exception as exc:  # a bug: the member fails loudly (getmany raises it), never silently
                self._failure = exc
                self._assigned_changed.set()
                log.exception("share group %s: the heartbeat loop failed", self.group_id)
                return
            await asyncio.sleep(wait)

    # -- metadata ------------------------------------------------------------------------

    async def _any_conn(self, *, locked: bool = False) -> AIOKafkaConnection:
        if self._meta_conn is not None and self._meta_conn.connected():
            return self._meta_conn
        if not locked:
            async with self._opening:
                return await self._any_conn(locked=True)
        if self._meta_conn is not None:
            self._meta_conn.close()
            self._meta_conn = None
        errors = []
        for host, port in [*self._brokers.values(), *self._bootstrap]:
            try:
                self._meta_conn = await self._connect(host, port)
                return self._meta_conn
            except (KafkaError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc!r}")
        raise ConnectorError(f"no broker answers: {'; '.join(errors)}", retriable=True)

    async def _refresh(self) -> None:
        """Topic ids and partition leaders of this member's topics."""
        conn = await self._any_conn()
        found: wire.Metadata = await conn.send(wire.metadata(self.topics))
        self._brokers = {b.node_id: (b.host, b.port) for b in found.brokers.values()}
        for topic in found.topics:
            if topic.error != NONE or topic.name is None:
                continue
            self._names[topic.topic_id] = topic.name
            for p in topic.partitions:
                self._leaders[(topic.topic_id, p.index)] = p.leader
        self._stale = False

    # -- fetching ------------------------------------------------------------------------

    async def getmany(self, timeout: float, max_records: int) -> list[ShareRecord]:
        """Records handed to this member (at most ``max_records``, each locked), within about ``timeout`` seconds."""
        if self._failure is not None:
            raise self._failure
        if self._stopping:
            # An error, not an empty answer: a loop that polls until it gets records must end.
            raise ConnectorError(f"share group {self.group_id}: this member is stopped")
        self._polls += 1
        self._no_polls.clear()
        try:
            return await self._poll(min(timeout, MAX_WAIT), max_records)
        finally:
            self._polls -= 1
            if not self._polls:
                self._no_polls.set()

    async def _poll(self, timeout: float, max_records: int) -> list[ShareRecord]:
        if not self._assigned and not any(self._held.values()) and not len(self._acks):
            self._assigned_changed.clear()
            try:
                await asyncio.wait_for(self._assigned_changed.wait(), timeout)
            except TimeoutError:
                pass
            return []
        if self._stale:
            try:
                await self._refresh()
            except (KafkaError, OSError) as exc:  # the broker asked went away: ask another next time
                if self._meta_conn is not None:
                    self._meta_conn.close()
                self._meta_conn = None
                raise ConnectorError(f"share group {self.group_id}: no metadata: {exc!r}", retriable=True) from exc
        # A partition stays in its session while this member holds records of it or has
        # acknowledgements for it, assigned or not: they can only be acknowledged there.
        wanted = set(self._assigned) | {k for k, held in self._held.items() if held} | set(self._acks.keys())
        by_leader: dict[int, set[Key]] = {}
        for key in wanted:
            leader = self._leaders.get(key, -1)
            if leader >= 0:
                by_leader.setdefault(leader, set()).add(key)
        for node_id, session in list(self._sessions.items()):
            if node_id not in by_leader and session.partitions:
                by_leader[node_id] = set()  # forget its partitions
        if not by_leader:
            self._stale = True
            await asyncio.sleep(min(timeout, self._join_interval))
            return []
        leaders = sorted(by_leader)
        wanted_records = max(1, max_records)
        if wanted_records < len(leaders):
            # Less room than leaders: a fetch locks at least one record, so only as many
            # leaders are asked as there is room for, in turn. The others' acknowledgements
            # go without a fetch.
            first = self._turn % len(leaders)
            self._turn += 1
            asked = {leaders[(first + i) % len(leaders)] for i in range(wanted_records)}
            await self.flush_acks(nodes=set(leaders) - asked)
            by_leader = {node_id: keys for node_id, keys in by_leader.items() if node_id in asked}
        share, extra = divmod(wanted_records, len(by_leader))
        answers = await asyncio.gather(
            *(
                self._fetch(node_id, keys, timeout, share + (i < extra))
                for i, (node_id, keys) in enumerate(by_leader.items())
            ),
            return_exceptions=True,
        )
        records: list[ShareRecord] = []
        for node_id, answer in zip(by_leader, answers, strict=True):
            if isinstance(answer, BaseException):
                if isinstance(answer, asyncio.CancelledError):
                    raise answer
                if isinstance(answer, BrokerRefusedError):  # fetching again is refused again
                    self._failure = answer
                    raise answer
                log.warning("share fetch from node %d failed: %r", node_id, answer)
                self._drop_session(node_id)
                self._stale = True
                continue
            records.extend(answer)
        if self._stopping:  # handed out while stopping: given back with the close, never run
            for record in records:
                self._acks.add((record.topic_id, record.partition), record.offset, wire.RELEASE)
            return []
        return records

    async def _session(self, node_id: int) -> _Session:
        session = self._sessions.get(node_id)
        if session is not None and session.conn.connected():
            return session
        if session is not None:
            self._drop_session(node_id)
        host, port = self._brokers[node_id]
        session = self._sessions[node_id] = _Session(node_id, await self._connect(host, port))
        return session

    def _drop_session(self, node_id: int) -> None:
        """Forget a session: its connection closes, and the broker releases what it held."""
        session = self._sessions.pop(node_id, None)
        if session is None:
            return
        session.conn.close()
        # The broker released this session's locks with its connection: what was held there
        # is handed out again, and acknowledgements for it can no longer count.
        for key in session.partitions:
            self._held.pop(key, None)
        self._acks.take(set(session.partitions))

    async def _fetch(self, node_id: int, keys: set[Key], timeout: float, max_records: int) -> list[ShareRecord]:
        session = await self._session(node_id)
        opening = session.epoch == wire.OPEN_SESSION
        acks = {} if opening else self._acks.take(session.partitions & keys)
        fetch: dict[Key, list[wire.AckBatch]] = {key: [] for key in keys - session.partitions}
        fetch.update(acks)
        forget = sorted(session.partitions - keys)
        epoch = session.next_epoch()
        session.partitions = frozenset(keys)
        answer: wire.ShareAnswer = await session.conn.send(
            wire.share_fetch(
                self.group_id,
                self.member_id,
                epoch,
                fetch,
                forget=forget,
                max_wait_ms=int(timeout * 1000),
                max_records=max_records,
            )
        )
        if answer.error in _SESSION_LOST:
            log.info("share session with node %d lost (error %d): opening a new one", node_id, answer.error)
            self._drop_session(node_id)
            return []
        if answer.error == GROUP_AUTHORIZATION_FAILED:
            raise self._not_granted(on_share_group(self.group_id, "read"))
        if answer.error != NONE:
            raise ConnectorError(f"share fetch from node {node_id} refused (error {answer.error}: {answer.message})")
        if answer.lock_ms is not None:
            self.lock_ms = answer.lock_ms
        records: list[ShareRecord] = []
        for key, part in answer.partitions.items():
            if part.ack_error != NONE and key in acks:
                log.warning(
                    "share group %s: acknowledgements on %s were refused (error %d: %s); "
                    "those records may be handed out again",
                    self.group_id,
                    self._name(key),
                    part.ack_error,
                    part.ack_message,
                )
            if part.error in _STALE_METADATA:
                self._stale = True
            elif part.error == TOPIC_AUTHORIZATION_FAILED:
                raise self._not_granted(f"read on topic {self._names.get(key[0], str(key[0]))!r}")
            elif part.error != NONE:
                log.warning("share fetch on %s: error %d (%s)", self._name(key), part.error, part.message)
            records.extend(self._records(key, part))
        return records

    def _name(self, key: Key) -> str:
        return f"{self._names.get(key[0], key[0])}[{key[1]}]"

    def _records(self, key: Key, part: wire.SharePartition) -> list[ShareRecord]:
        """The acquired records of a partition; an acquired offset without a record is acknowledged as a gap."""
        if not part.acquired:
            return []
        counts: dict[int, int] = {}
        for got in part.acquired:
            for offset in range(got.first, got.last + 1):
                counts[offset] = got.delivery_count
        topic = self._names.get(key[0], "")
        out: list[ShareRecord] = []
        if part.records:
            batches_ = MemoryRecords(part.records)
            while batches_.has_next():
                batch: Any = batches_.next_batch()
                control = batch.is_control_batch
                for rec in batch:
                    count = counts.pop(rec.offset, None)
                    if count is None:
                        continue  # in the batch, but not acquired by this member
                    if control:
                        self._acks.add(key, rec.offset, wire.GAP)
                        continue
                    out.append(
                        ShareRecord(
                            topic,
                            key[1],
                            rec.offset,
                            rec.key,
                            rec.value,
                            rec.timestamp,
                            tuple(rec.headers),
                            count,
                            key[0],
                        )
                    )
        for offset in counts:  # acquired, and no record there
            self._acks.add(key, offset, wire.GAP)
        held = self._held.setdefault(key, set())
        held.update(r.offset for r in out)
        return out

    # -- acknowledging ---------------------------------------------------------------------

    def acknowledge(self, record: ShareRecord, kind: int = wire.ACCEPT) -> None:
        """Say what became of a record (sent with the next fetch, or by :meth:`flush_acks`)."""
        key = (record.topic_id, record.partition)
        held = self._held.get(key)
        if held is None or record.offset not in held:
            # Not held here (its lock ran out, its session is gone, or it was acknowledged
            # already): the broker would refuse it, and every acknowledgement of its
            # partition sent with it (all or nothing).
            log.debug(
                "share group %s: %s@%d is not held here: not acknowledged",
                self.group_id,
                self._name(key),
                record.offset,
            )
            return
        held.discard(record.offset)
        self._acks.add(key, record.offset, kind)

    async def flush_acks(self, *, closing: bool = False, nodes: Collection[int] | None = None) -> None:
        """Send the acknowledgements not sent yet, to each leader (``nodes``: to those only;
        ``closing``: and close its session)."""
        for node_id, session in list(self._sessions.items()):
            if nodes is not None and node_id not in nodes:
                continue
            acks = self._acks.take(set(session.partitions))
            if session.epoch == wire.OPEN_SESSION or (not acks and not closing):
                continue
            epoch = wire.CLOSE_SESSION if closing else session.next_epoch()
            try:
                answer: wire.ShareAnswer = await session.conn.send(
                    wire.share_acknowledge(self.group_id, self.member_id, epoch, acks)
                )
            except (KafkaError, OSError) as exc:
                log.warning("share acknowledgements to node %d not sent: %r", node_id, exc)
                self._drop_session(node_id)
                continue
            if answer.error != NONE:
                log.warning(
                    "share group %s: acknowledgements to node %d were refused (error %d: %s); "
                    "those records may be handed out again",
                    self.group_id,
                    node_id,
                    answer.error,
                    answer.message,
                )
                if answer.error in _SESSION_LOST:
                    self._drop_session(node_id)
                continue
            for key, part in answer.partitions.items():
                if part.error != NONE:
                    log.warning(
                        "share group %s: acknowledgements on %s were refused (error %d: %s)",
                        self.group_id,
                        self._name(key),
                        part.error,
                        part.message,
                    )

    async def renew(self, records: list[ShareRecord]) -> list[ShareRecord]:
        """Extend the locks of records still being worked on (RENEW, ShareAcknowledge v2, Kafka 4.2+).

        Returns the records this member no longer holds: their session is gone, or the
        broker refused them (the lock had run out already, and they may be with another
        member). Those are forgotten here: never renewed, acknowledged or released again.
        A renewal the broker fails as a whole (an error not about a lock) is tried again at
        the next one, a third of a lock later.

        The broker applies a partition's acknowledgements all or nothing: one record whose
        lock ran out fails the renewal of every record of its partition. So a partition
        refused with more than one record is renewed again record by record, and only the
        records refused alone are lost.
        """
        lost: list[ShareRecord] = []
        by_node: dict[int, list[ShareRecord]] = {}
        for record in records:
            key = (record.topic_id, record.partition)
            node = next((n for n, s in self._sessions.items() if key in s.partitions), None)
            if node is None or record.offset not in self._held.get(key, ()):
                lost.append(record)
            else:
                by_node.setdefault(node, []).append(record)
        for node_id, held in by_node.items():
            failed = await self._renew_on(node_id, held)
            if failed is None:  # the session is gone, and the broker released its locks with it
                lost.extend(held)
                continue
            for key in failed:
                of_key = [r for r in held if (r.topic_id, r.partition) == key]
                for record in of_key:
                    alone = {key} if len(of_key) == 1 else None
                    if alone is None and node_id in self._sessions:
                        alone = await self._renew_on(node_id, [record])
                    if alone is None or alone:
                        lost.append(record)
                    if alone:  # refused: forgotten now (a later fetch may hand it here again)
                        self._held.get(key, set()).discard(record.offset)
        return lost

    async def _renew_on(self, node_id: int, records: list[ShareRecord]) -> set[Key] | None:
        """One renewal on a session: the partitions the broker refused (None: the session is gone)."""
        session = self._sessions[node_id]
        offsets: dict[Key, dict[int, int]] = {}
        for record in records:
            offsets.setdefault((record.topic_id, record.partition), {})[record.offset] = wire.RENEW
        acks = {key: batches(kinds) for key, kinds in offsets.items()}
        request = wire.share_acknowledge(self.group_id, self.member_id, session.next_epoch(), acks, renew=True)
        try:
            answer: wire.ShareAnswer = await session.conn.send(request)
        except IncompatibleBrokerVersion as exc:
            raise ConnectorError(
                f"share group {self.group_id}: renewing a lock needs Kafka 4.2 or later: {exc}"
            ) from exc
        except (KafkaError, OSError) as exc:
            log.warning("share locks on node %d not renewed: %r", node_id, exc)
            self._drop_session(node_id)
            return None
        if answer.error in _SESSION_LOST:
            log.warning("share locks on node %d not renewed (error %d: %s)", node_id, answer.error, answer.message)
            self._drop_session(node_id)
            return None
        if answer.error != NONE:
            log.warning(
                "share locks on node %d not renewed this time (error %d: %s)", node_id, answer.error, answer.message
            )
            return set()
        if answer.lock_ms is not None:
            self.lock_ms = answer.lock_ms
        failed = {key for key, part in answer.partitions.items() if part.error != NONE}
        for key in failed:
            part = answer.partitions[key]
            log.info(
                "share group %s: locks on %s not renewed (error %d: %s)",
                self.group_id,
                self._name(key),
                part.error,
                part.message,
            )
        return failed

    # -- stopping --------------------------------------------------------------------------

    async def stop(self) -> None:
        """Release what is held and not acknowledged, close the sessions, leave the group."""
        if self._stopping:
            return
        self._stopping = True
        try:
            # A fetch under way ends within MAX_WAIT; what it brings is released below.
            await asyncio.wait_for(self._no_polls.wait(), MAX_WAIT + 5)
        except TimeoutError:
            log.warning("share group %s: a fetch was still under way at stop", self.group_id)
        for key, offsets in self._held.items():
            for offset in offsets:
                self._acks.add(key, offset, wire.RELEASE)
        self._held.clear()
        started = time.monotonic()
        try:
            await self.flush_acks(closing=True)
        finally:
            self._closing = True
            if self._heartbeats is not None:
                self._heartbeats.cancel()
                await asyncio.gather(self._heartbeats, return_exceptions=True)
            try:
                if self._epoch > 0:
                    await self._heartbeat()  # epoch -1: leave now, not after the session timeout
            except (ConnectorError, KafkaError, OSError, ValueError) as exc:
                log.info(
                    "share group %s: leaving failed (%r); the coordinator drops the member later", self.group_id, exc
                )
            self._close_connections()
            log.debug("share consumer of %s stopped in %.2f s", self.group_id, time.monotonic() - started)
