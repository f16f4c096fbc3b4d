"""The narrow seam between the engine and a transport.

A connector offers what the engine needs from a log, and nothing else: topics with
partitions, one producer that enqueues and flushes, and consumers that either join a
group (``subscribe``) or read partitions they pick (``assign``). The shapes follow
Kafka (and aiokafka) so the Kafka connector is thin; the memory connector implements
the same semantics in-process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


class TopicPartition(NamedTuple):
    """A partition of a topic."""

    topic: str
    partition: int


@dataclass(slots=True)
class Record:
    """One record read from a partition; key and value are raw bytes, decoded by the engine."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int  # milliseconds since the epoch
    #: Kafka record headers (name, value): qtasks writes ``traceparent`` when traces are on.
    headers: Sequence[tuple[str, bytes]] = ()

    @property
    def tp(self) -> TopicPartition:
        """The partition this record came from."""
        return TopicPartition(self.topic, self.partition)


#: What a share-group member says of a record it was handed (KIP-932's acknowledgement types).
ACCEPT = 1  # processed: never handed out again
RELEASE = 2  # given back: handed out again, to any member, its delivery count one more
REJECT = 3  # cannot be processed: archived, never handed out again
RENEW = 4  # still working on it (Kafka: ShareAcknowledge v2): the lock is extended


@dataclass(frozen=True, slots=True)
class ShareRecord:
    """A record handed to one member of a share group, locked for it until acknowledged or its lock runs out."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    headers: tuple[tuple[str, bytes], ...]
    #: How many times it was handed out, this time included (1 the first time).
    delivery_count: int
    #: Kafka's id of the topic (None on memory://).
    topic_id: Any = None


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic the app needs: its partitions and whether it is compacted."""

    name: str
    partitions: int
    compacted: bool = False
    replication_factor: int = 1
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GroupMember:
    """A member of a consumer group: qtasks workers use their worker id as ``client_id``."""

    member_id: str
    client_id: str
    host: str
    partitions: tuple[TopicPartition, ...]


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A consumer group as its coordinator sees it, with the offsets it has committed."""

    group_id: str
    #: Kafka's group state: ``Stable``, ``PreparingRebalance``, ``CompletingRebalance``, ``Empty`` or ``Dead``.
    state: str
    members: tuple[GroupMember, ...]
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    #: A share group: the records from its start offset on (``committed``) not acknowledged
    #: yet, per partition, as the broker counts them (absent where it does not say).
    lag: dict[TopicPartition, int] = field(default_factory=dict)


class RebalanceListener(Protocol):
    """Told by a group consumer when its partitions change (eager protocol, as aiokafka)."""

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None: ...

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None: ...


class Producer(Protocol):
    """Sends records. ``send`` only enqueues and may return a delivery to await; ``flush`` waits for all."""

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        partition: int,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any] | None: ...

    async def flush(self) -> None: ...

    def known_end(self, topic: str, partition: int) -> int | None:
        """An offset at or below the partition's end, from what this producer knows (None: nothing)."""
        ...


class TxnProducer(Protocol):
    """Exactly-once: a transactional producer, one per transactional id (one per tasks partition).

    ``start`` registers the id with the broker: an older producer of the same id is
    fenced and its open transaction aborted. The first ``send`` after ``start`` or a
    ``commit`` opens a transaction; ``send_offsets`` adds a group's offsets to it;
    ``commit`` makes its records and offsets visible at once, ``abort`` drops them. A
    fenced producer raises :class:`~qtasks.exc.ProducerFencedError` and can do nothing more.
    """

    transactional_id: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        partition: int,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any] | None: ...

    async def send_offsets(self, offsets: dict[TopicPartition, int], group_id: str) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...

    def known_end(self, topic: str, partition: int) -> int | None:
        """An offset at or below the partition's end, from what this producer knows (None: nothing)."""
        ...


class Consumer(Protocol):
    """Reads records, either as a member of a group or from partitions it assigns itself."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def subscribe(self, topics: list[str], listener: RebalanceListener) -> None: ...

    def rejoin(self) -> None:
        """Ask the group for a rebalance (a member that lost track of what it owns gets its assignment afresh)."""
        ...

    def assign(self, partitions: Iterable[TopicPartition]) -> None: ...

    def assignment(self) -> set[TopicPartition]: ...

    async def seek(self, tp: TopicPartition, offset: int) -> None: ...

    async def seek_to_end(self, partitions: Iterable[TopicPartition]) -> None: ...

    async def seek_to_beginning(self, partitions: Iterable[TopicPartition]) -> None: ...

    async def getmany(self, timeout: float, max_records: int | None = None) -> list[Record]: ...

    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...

    def pause(self, partitions: Iterable[TopicPartition]) -> None: ...

    def resume(self, partitions: Iterable[TopicPartition]) -> None: ...

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...

    def high_watermark(self, tp: TopicPartition) -> int | None:
        """The end of an assigned partition including the records of transactions not decided
        yet, as this consumer last fetched it (None: not fetched yet).

        A read_committed consumer's ``end_offsets`` stop at the partition's oldest open
        transaction, which can hold back records that are committed already: Kafka writes a
        commit's markers partition by partition, after the commit returns.
        """
        ...

    async def position(self, tp: TopicPartition) -> int: ...

    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict[TopicPartition, int | None]: ...


class ShareConsumer(Protocol):
    """A member of a share group (KIP-932): records handed out one by one under a lock, acknowledged one by one."""

    group_id: str
    member_id: str
    #: How long the broker locks a record for this group, once known.
    lock_ms: int | None

    async def start(self, timeout: float = 30.0) -> None: ...

    async def wait_assigned(self, timeout: float) -> bool: ...

    def assignment(self) -> set[tuple[str, int]]: ...

    async def getmany(self, timeout: float, max_records: int) -> list[ShareRecord]: ...

    def acknowledge(self, record: ShareRecord, kind: int = ACCEPT) -> None: ...

    async def flush_acks(self, *, closing: bool = False) -> None: ...

    async def renew(self, records: list[ShareRecord]) -> list[ShareRecord]: ...

    async def stop(self) -> None: ...


class Connector(Protocol):
    """A transport, picked by URL: ``memory://`` or ``kafka://host:port``."""

    url: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ensure_topics(self, specs: list[TopicSpec]) -> None: ...

    async def check_access(
        self,
        needs: Mapping[str, Collection[str]],
        group: str | Sequence[str] | None = None,
        share_group: str | None = None,
    ) -> None:
        """Raise :class:`~qtasks.exc.BrokerRefusedError` naming what this client may not do.

        ``needs`` maps a topic to the operations this app does on it (``read``, ``write``);
        ``group`` is a consumer group it joins (which takes ``read``), or a list of them;
        ``share_group`` a share group it joins and sets up (``read`` and ``alter_configs``).
        A connector without access control grants all.
        """
        ...

    async def partitions_for(self, topic: str, *, refresh: bool = False) -> int:
        """Partitions of ``topic``; ``refresh`` asks the cluster now instead of cached metadata."""
        ...

    @property
    def reachable(self) -> bool:
        """False while the brokers do not answer (for health checks)."""
        ...

    @property
    def unreachable_since(self) -> float | None:
        """When (``time.time()``) the current outage was noticed; None while reachable."""
        ...

    def record_limit(self, topic: str) -> int:
        """The largest value (bytes) ``send`` takes for ``topic``; larger is a RecordTooLargeError."""
        ...

    async def describe_group(self, group_id: str) -> GroupInfo:
        """The members of a consumer group, their partitions, and the group's committed offsets."""
        ...

    @property
    def producer(self) -> Producer: ...

    def consumer(self, group_id: str | None = None, *, client_id: str = "", max_wait_ms: int | None = None) -> Consumer:
        """A consumer; it reads committed records only if the app runs exactly-once."""
        ...

    def share_consumer(self, group_id: str, topics: list[str], client_id: str | None = None) -> ShareConsumer:
        """A member of share group ``group_id`` reading ``topics`` (``start`` joins); a worker's
        ``client_id`` is its worker id, as in its consumer group."""
        ...

    async def describe_share_group(self, group_id: str, topic: str) -> GroupInfo:
        """A share group's members and their partitions, and on each partition of ``topic``
        its start offset (``committed``) and lag. A group that does not exist is ``Dead``."""
        ...

    async def configure_share_group(self, group_id: str, settings: dict[str, str]) -> None:
        """Set a share group's ``share.*`` settings (Kafka: IncrementalAlterConfigs on the group)."""
        ...

    def transactional_producer(self, transactional_id: str) -> TxnProducer:
        """Exactly-once: a transactional producer for ``transactional_id`` (not started)."""
        ...
