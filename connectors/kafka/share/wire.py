"""The share-group requests on the wire (KIP-932), in Kafka's flexible encoding.

aiokafka 0.14 has no share-group requests, and its struct layer lacks the UUID type and
the nullable structs they use, so the few messages a share consumer needs are written
here by hand, field for field after the schemas Kafka ships in ``kafka-clients``
(``common/message/*.json``). Every message here is a flexible version: compact strings and
arrays (lengths as unsigned varints, plus one), and a tagged-field section after each
struct (written empty, skipped when read).

A request is sent on an aiokafka connection (``AIOKafkaConnection.send``), which only
asks a request for ``prepare``, ``build_request_header``, ``encode``,
``parse_response_header`` and ``RESPONSE_TYPE.decode``: :class:`WireRequest` gives those
and nothing of aiokafka's struct classes, so a version bump of aiokafka can break it
only at that seam (pinned in ``pyproject.toml`` and tested in ``tests/unit/test_share_wire.py``).
"""

from __future__ import annotations

import struct
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Generic, TypeVar

from aiokafka.errors import IncompatibleBrokerVersion

from qtasks.connectors.base import ACCEPT as ACCEPT
from qtasks.connectors.base import REJECT as REJECT
from qtasks.connectors.base import RELEASE as RELEASE
from qtasks.connectors.base import RENEW as RENEW

T = TypeVar("T")

# API keys (https://kafka.apache.org/protocol#protocol_api_keys).
METADATA = 3
INCREMENTAL_ALTER_CONFIGS = 44
SHARE_GROUP_HEARTBEAT = 76
SHARE_FETCH = 78
SHARE_ACKNOWLEDGE = 79
SHARE_GROUP_DESCRIBE = 77
DESCRIBE_SHARE_GROUP_OFFSETS = 90

#: The resource type of a group in (Incremental)AlterConfigs (KIP-848, KIP-932).
RESOURCE_GROUP = 32
#: IncrementalAlterConfigs' operation that sets a value.
OP_SET = 0

# Acknowledgement types (KIP-932): ACCEPT, RELEASE, REJECT and RENEW are the connector
# seam's (connectors/base.py); a gap is the wire's alone.
GAP = 0  # an offset with no record (compacted away, or a transaction marker)

#: ShareFetch v2's acquire mode that holds to ``MaxRecords`` (v1 may exceed it to whole batches).
ACQUIRE_RECORD_LIMIT = 1

#: The session epoch that opens a share session, and the one that closes it.
OPEN_SESSION = 0
CLOSE_SESSION = -1


class Writer:
    """Builds one message in the flexible encoding."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def int8(self, value: int) -> Writer:
        self._parts.append(struct.pack(">b", value))
        return self

    def bool(self, value: bool) -> Writer:
        return self.int8(1 if value else 0)

    def int16(self, value: int) -> Writer:
        self._parts.append(struct.pack(">h", value))
        return self

    def int32(self, value: int) -> Writer:
        self._parts.append(struct.pack(">i", value))
        return self

    def int64(self, value: int) -> Writer:
        self._parts.append(struct.pack(">q", value))
        return self

    def uvarint(self, value: int) -> Writer:
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
        self._parts.append(bytes(out))
        return self

    def string(self, value: str | None) -> Writer:
        """A compact (nullable) string."""
        if value is None:
            return self.uvarint(0)
        raw = value.encode()
        self.uvarint(len(raw) + 1)
        self._parts.append(raw)
        return self

    def blob(self, value: bytes | None) -> Writer:
        """Compact (nullable) bytes: a record set, as a broker writes it."""
        if value is None:
            return self.uvarint(0)
        self.uvarint(len(value) + 1)
        self._parts.append(value)
        return self

    def legacy_string(self, value: str | None) -> Writer:
        """An int16-length (nullable) string: the client id of a request header, even flexible."""
        if value is None:
            return self.int16(-1)
        raw = value.encode()
        self.int16(len(raw))
        self._parts.append(raw)
        return self

    def uuid(self, value: uuid_mod.UUID) -> Writer:
        self._parts.append(value.bytes)
        return self

    def array(self, items: list[T] | None, write: Callable[[Writer, T], Any]) -> Writer:
        """A compact (nullable) array, each item written by ``write``."""
        if items is None:
            return self.uvarint(0)
        self.uvarint(len(items) + 1)
        for item in items:
            write(self, item)
        return self

    def tags(self) -> Writer:
        """An empty tagged-field section (the end of every struct)."""
        return self.uvarint(0)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads one message in the flexible encoding; a short or malformed answer raises ``ValueError``."""

    def __init__(self, data: bytes | BytesIO) -> None:
        self._buf = data.read() if isinstance(data, BytesIO) else data
        self._at = 0

    def _take(self, size: int) -> bytes:
        end = self._at + size
        if size < 0 or end > len(self._buf):
            raise ValueError(f"a share-group answer ends early: {size} bytes wanted at {self._at} of {len(self._buf)}")
        chunk = self._buf[self._at : end]
        self._at = end
        return chunk

    def int8(self) -> int:
        return int(struct.unpack(">b", self._take(1))[0])

    def bool(self) -> bool:
        return self.int8() != 0

    def int16(self) -> int:
        return int(struct.unpack(">h", self._take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack(">i", self._take(4))[0])

    def int64(self) -> int:
        return int(struct.unpack(">q", self._take(8))[0])

    def uvarint(self) -> int:
        value = shift = 0
        while True:
            byte = self._take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ValueError("a share-group answer holds a varint longer than 64 bits")

    def string(self) -> str | None:
        n = self.uvarint()
        return None if n == 0 else self._take(n - 1).decode()

    def blob(self) -> bytes | None:
        n = self.uvarint()
        return None if n == 0 else self._take(n - 1)

    def uuid(self) -> uuid_mod.UUID:
        return uuid_mod.UUID(bytes=self._take(16))

    def array(self, read: Callable[[Reader], T]) -> list[T]:
        """A compact array (a null one reads as empty)."""
        n = self.uvarint()
        return [read(self) for _ in range(n - 1)] if n else []

    def tags(self) -> None:
        """Skip a tagged-field section: no field read here has a tagged part qtasks needs."""
        for _ in range(self.uvarint()):
            self.uvarint()  # the tag
            self._take(self.uvarint())

    def end(self) -> None:
        if self._at != len(self._buf):
            raise ValueError(f"a share-group answer has {len(self._buf) - self._at} bytes after its end")


@dataclass
class _Header:
    """A flexible request header (v2): its client id is an int16-length string all the same."""

    raw: bytes

    def encode(self) -> bytes:
        return self.raw


@dataclass
class _ResponseHeader:
    correlation_id: int


@dataclass
class _Decoder(Generic[T]):
    read: Callable[[Reader], T]

    def decode(self, data: BytesIO) -> T:
        reader = Reader(data)
        value = self.read(reader)
        reader.end()
        return value


class WireRequest(Generic[T]):
    """One request as ``AIOKafkaConnection.send`` takes it: its answer is ``read`` from the response body.

    ``versions`` are the versions this module can write, newest first; ``body`` writes the
    one the connection's broker takes (``prepare``), or the request is refused with
    ``IncompatibleBrokerVersion`` (a broker older than Kafka 4.1 has no share groups).
    """

    def __init__(
        self,
        api_key: int,
        versions: tuple[int, ...],
        body: Callable[[int], bytes],
        read: Callable[[Reader, int], T],
    ) -> None:
        self.API_KEY = api_key
        self.API_VERSION = versions[0]
        self._versions = versions
        self._body = body
        self._read = read
        self.RESPONSE_TYPE: _Decoder[T] = _Decoder(lambda r: read(r, self.API_VERSION))

    def prepare(self, versions: dict[int, tuple[int, int]]) -> WireRequest[T]:
        low, high = versions.get(self.API_KEY, (-1, -1))
        for version in self._versions:
            if low <= version <= high:
                self.API_VERSION = version
                return self
        raise IncompatibleBrokerVersion(
            f"the broker serves API {self.API_KEY} in versions {low}..{high}; qtasks speaks {list(self._versions)} "
            "(share groups need Kafka 4.1 or later)"
        )

    def build_request_header(self, correlation_id: int, client_id: str) -> _Header:
        w = Writer().int16(self.API_KEY).int16(self.API_VERSION).int32(correlation_id)
        return _Header(w.legacy_string(client_id).tags().getvalue())

    def encode(self) -> bytes:
        return self._body(self.API_VERSION)

    @staticmethod
    def parse_response_header(data: BytesIO) -> _ResponseHeader:
        (correlation_id,) = struct.unpack(">i", data.read(4))
        # The header's tagged fields, read straight from the stream: the body follows them.
        for _ in range(_read_uvarint(data)):
            _read_uvarint(data)
            data.read(_read_uvarint(data))
        return _ResponseHeader(correlation_id)


def _read_uvarint(data: BytesIO) -> int:
    value = shift = 0
    while True:
        raw = data.read(1)
        if not raw:
            raise ValueError("a response header ends early")
        value |= (raw[0] & 0x7F) << shift
        if not raw[0] & 0x80:
            return value
        shift += 7


# -- Metadata v12+: topic ids -------------------------------------------------------------


@dataclass
class PartitionMeta:
    index: int
    leader: int
    leader_epoch: int
    error: int


@dataclass
class TopicMeta:
    name: str | None
    topic_id: uuid_mod.UUID
    error: int
    partitions: list[PartitionMeta]


@dataclass
class Broker:
    node_id: int
    host: str
    port: int


@dataclass
class Metadata:
    brokers: dict[int, Broker]
    topics: list[TopicMeta]


def metadata(topics: list[str]) -> WireRequest[Metadata]:
    """Metadata of ``topics`` with their topic ids (v12 or v13; share requests name topics by id)."""

    def body(version: int) -> bytes:
        w = Writer()
        w.array(topics, lambda w, name: w.uuid(uuid_mod.UUID(int=0)).string(name).tags())
        return w.bool(False).bool(False).tags().getvalue()  # no auto-creation, no authorized ops

    def read(r: Reader, version: int) -> Metadata:
        r.int32()  # throttle
        brokers = r.array(_read_broker)
        r.string()  # cluster id
        r.int32()  # controller
        found = r.array(_read_topic_meta)
        if version >= 13:
            r.int16()  # a top-level error: per-topic errors tell the same for what is asked
        r.tags()
        return Metadata({b.node_id: b for b in brokers}, found)

    return WireRequest(METADATA, (13, 12), body, read)


def _read_broker(r: Reader) -> Broker:
    node, host, port = r.int32(), r.string() or "", r.int32()
    r.string()  # rack
    r.tags()
    return Broker(node, host, port)


def _read_topic_meta(r: Reader) -> TopicMeta:
    error, name, topic_id = r.int16(), r.string(), r.uuid()
    r.bool()  # internal
    partitions = r.array(_read_partition_meta)
    r.int32()  # authorized operations
    r.tags()
    return TopicMeta(name, topic_id, error, partitions)


def _read_partition_meta(r: Reader) -> PartitionMeta:
    error, index, leader, epoch = r.int16(), r.int32(), r.int32(), r.int32()
    r.array(Reader.int32)  # replicas
    r.array(Reader.int32)  # in-sync replicas
    r.array(Reader.int32)  # offline replicas
    r.tags()
    return PartitionMeta(index, leader, epoch, error)


# -- IncrementalAlterConfigs v1: a share group's settings -------------------------------


@dataclass
class ConfigAnswer:
    error: int
    message: str | None


def alter_group_configs(
    group_id: str, settings: dict[str, str], *, validate_only: bool = False
) -> WireRequest[list[ConfigAnswer]]:
    """Set a group's configs (``share.auto.offset.reset``, the lock duration, the delivery limit).

    ``validate_only``: the broker checks the request (ALTER_CONFIGS on the group first, then
    the values) and changes nothing.
    """

    def body(version: int) -> bytes:
        w = Writer()

        def config(w: Writer, item: tuple[str, str]) -> None:
            w.string(item[0]).int8(OP_SET).string(item[1]).tags()

        def resource(w: Writer, _: None) -> None:
            w.int8(RESOURCE_GROUP).string(group_id).array(sorted(settings.items()), config).tags()

        w.array([None], resource)
        return w.bool(validate_only).tags().getvalue()

    def read(r: Reader, version: int) -> list[ConfigAnswer]:
        r.int32()

        def answer(r: Reader) -> ConfigAnswer:
            error, message = r.int16(), r.string()
            r.int8()
            r.string()
            r.tags()
            return ConfigAnswer(error, message)

        answers = r.array(answer)
        r.tags()
        return answers

    return WireRequest(INCREMENTAL_ALTER_CONFIGS, (1,), body, read)


# -- ShareGroupHeartbeat v1 ---------------------------------------------------------------


@dataclass
class Heartbeat:
    error: int
    message: str | None
    member_id: str | None
    member_epoch: int
    interval_ms: int
    #: The member's partitions by topic id; None when the answer carries no new assignment.
    assignment: dict[uuid_mod.UUID, list[int]] | None


def share_group_heartbeat(
    group_id: str, member_id: str, member_epoch: int, topics: list[str] | None
) -> WireRequest[Heartbeat]:
    """Join (epoch 0), stay (the epoch the coordinator gave), or leave (epoch -1) a share group.

    ``topics`` is sent when it changed since the last heartbeat (and always with epoch 0).
    """

    def body(version: int) -> bytes:
        w = Writer().string(group_id).string(member_id).int32(member_epoch).string(None)
        return w.array(topics, Writer.string).tags().getvalue()

    def read(r: Reader, version: int) -> Heartbeat:
        r.int32()  # throttle
        error, message, member, epoch, interval = r.int16(), r.string(), r.string(), r.int32(), r.int32()
        assignment = None
        present = r.int8()  # a nullable struct: -1 null, 1 present
        if present >= 0:

            def topic(r: Reader) -> tuple[uuid_mod.UUID, list[int]]:
                topic_id, partitions = r.uuid(), r.array(Reader.int32)
                r.tags()
                return topic_id, partitions

            assignment = dict(r.array(topic))
            r.tags()
        r.tags()
        return Heartbeat(error, message, member, epoch, interval, assignment)

    return WireRequest(SHARE_GROUP_HEARTBEAT, (1,), body, read)


# -- ShareFetch and ShareAcknowledge v1/v2 -------------------------------------------------


@dataclass
class AckBatch:
    """Acknowledgements of the offsets ``first``..``last``: one type for all, or one per offset."""

    first: int
    last: int
    types: list[int]


@dataclass
class Acquired:
    """Offsets ``first``..``last`` locked for this member, delivered ``delivery_count`` times (this one too)."""

    first: int
    last: int
    delivery_count: int


@dataclass
class SharePartition:
    index: int
    error: int
    message: str | None
    ack_error: int
    ack_message: str | None
    leader_id: int
    leader_epoch: int
    records: bytes | None = None
    acquired: list[Acquired] = field(default_factory=list)


@dataclass
class ShareAnswer:
    error: int
    message: str | None
    #: ShareFetch v1+ and ShareAcknowledge v2: how long a lock lasts (None: not told).
    lock_ms: int | None
    partitions: dict[tuple[uuid_mod.UUID, int], SharePartition]
    nodes: dict[int, Broker]


#: What a ShareFetch or ShareAcknowledge carries per partition: its acknowledgements.
Acks = dict[tuple[uuid_mod.UUID, int], list[AckBatch]]


def _write_acks(w: Writer, batches: list[AckBatch]) -> None:
    w.array(batches, lambda w, b: w.int64(b.first).int64(b.last).array(b.types, Writer.int8).tags())


def _by_topic(partitions: dict[tuple[uuid_mod.UUID, int], T]) -> list[tuple[uuid_mod.UUID, list[tuple[int, T]]]]:
    topics: dict[uuid_mod.UUID, list[tuple[int, T]]] = {}
    for (topic_id, index), value in partitions.items():
        topics.setdefault(topic_id, []).append((index, value))
    return sorted(topics.items())


def share_fetch(
    group_id: str,
    member_id: str,
    session_epoch: int,
    fetch: dict[tuple[uuid_mod.UUID, int], list[AckBatch]],
    *,
    forget: list[tuple[uuid_mod.UUID, int]] | None = None,
    max_wait_ms: int,
    max_records: int,
    max_bytes: int = 0x7FFFFFFF,
) -> WireRequest[ShareAnswer]:
    """Fetch from (and acknowledge on) the partitions of ``fetch``, in the share session of this connection.

    ``max_records`` bounds the records acquired (and so locked) by this one request: a
    member asks for no more than it has room to run before the locks expire. Epoch 0
    opens the session (it cannot carry acknowledgements); later ones add partitions and
    ``forget`` drops them.
    """

    def body(version: int) -> bytes:
        w = Writer().string(group_id).string(member_id).int32(session_epoch)
        w.int32(max_wait_ms).int32(1).int32(max_bytes).int32(max_records).int32(max_records)
        if version >= 2:
            # Record-limit mode (KIP-1206): never more than ``max_records`` acquired. The default,
            # batch-optimized, hands out whole producer batches, so one member could lock
            # hundreds of records it cannot run before their locks expire. Not a renewal.
            w.int8(ACQUIRE_RECORD_LIMIT).bool(False)

        def partition(w: Writer, item: tuple[int, list[AckBatch]]) -> None:
            w.int32(item[0])
            _write_acks(w, item[1])
            w.tags()

        w.array(_by_topic(fetch), lambda w, t: w.uuid(t[0]).array(t[1], partition).tags())
        forgotten: dict[tuple[uuid_mod.UUID, int], None] = dict.fromkeys(forget or [])
        w.array(_by_topic(forgotten), lambda w, t: w.uuid(t[0]).array([i for i, _ in t[1]], Writer.int32).tags())
        return w.tags().getvalue()

    return WireRequest(SHARE_FETCH, (2, 1), body, _read_share_answer(fetching=True))


def share_acknowledge(
    group_id: str, member_id: str, session_epoch: int, acks: Acks, *, renew: bool = False
) -> WireRequest[ShareAnswer]:
    """Acknowledge without fetching (a session's epoch -1 closes it after these acknowledgements)."""

    def body(version: int) -> bytes:
        w = Writer().string(group_id).string(member_id).int32(session_epoch)
        if version >= 2:
            w.bool(renew)

        def partition(w: Writer, item: tuple[int, list[AckBatch]]) -> None:
            w.int32(item[0])
            _write_acks(w, item[1])
            w.tags()

        w.array(_by_topic(acks), lambda w, t: w.uuid(t[0]).array(t[1], partition).tags())
        return w.tags().getvalue()

    versions = (2,) if renew else (2, 1)
    return WireRequest(SHARE_ACKNOWLEDGE, versions, body, _read_share_answer(fetching=False))


def _read_share_answer(*, fetching: bool) -> Callable[[Reader, int], ShareAnswer]:
    def read(r: Reader, version: int) -> ShareAnswer:
        r.int32()  # throttle
        error, message = r.int16(), r.string()
        lock_ms = r.int32() if (fetching or version >= 2) else None
        partitions: dict[tuple[uuid_mod.UUID, int], SharePartition] = {}

        def topic(r: Reader) -> None:
            topic_id = r.uuid()

            def partition(r: Reader) -> None:
                index, p_error, p_message = r.int32(), r.int16(), r.string()
                ack_error, ack_message = (r.int16(), r.string()) if fetching else (p_error, p_message)
                leader_id, leader_epoch = r.int32(), r.int32()
                r.tags()  # CurrentLeader's
                part = SharePartition(index, p_error, p_message, ack_error, ack_message, leader_id, leader_epoch)
                if fetching:
                    part.records = r.blob()

                    def acquired(r: Reader) -> Acquired:
                        got = Acquired(r.int64(), r.int64(), r.int16())
                        r.tags()
                        return got

                    part.acquired = r.array(acquired)
                r.tags()
                partitions[(topic_id, index)] = part

            r.array(partition)
            r.tags()

        r.array(topic)

        nodes = {b.node_id: b for b in r.array(_read_broker)}
        r.tags()
        return ShareAnswer(error, message, lock_ms, partitions, nodes)

    return read


# -- FindCoordinator v4+: the group's coordinator --------------------------------------------

FIND_COORDINATOR = 10
#: FindCoordinator's key type of a group (share groups included).
KEY_GROUP = 0


@dataclass
class Coordinator:
    node_id: int
    host: str
    port: int
    error: int
    message: str | None


def find_coordinator(group_id: str) -> WireRequest[Coordinator]:
    """The broker that coordinates ``group_id`` (its heartbeats go there)."""

    def body(version: int) -> bytes:
        return Writer().int8(KEY_GROUP).array([group_id], Writer.string).tags().getvalue()

    def read(r: Reader, version: int) -> Coordinator:
        r.int32()  # throttle

        def one(r: Reader) -> Coordinator:
            r.string()  # the key asked
            node, host, port, error, message = r.int32(), r.string() or "", r.int32(), r.int16(), r.string()
            r.tags()
            return Coordinator(node, host, port, error, message)

        found = r.array(one)
        r.tags()
        if len(found) != 1:
            raise ValueError(f"FindCoordinator answered {len(found)} coordinators for one group")
        return found[0]

    return WireRequest(FIND_COORDINATOR, (6, 5, 4), body, read)


# -- ShareGroupDescribe v1 and DescribeShareGroupOffsets v0/v1 (for `qtasks inspect`) -------


@dataclass
class ShareMember:
    member_id: str
    #: The client id its heartbeat connection gave (a qtasks worker gives its worker id).
    client_id: str
    host: str
    #: Its partitions by topic name.
    assignment: dict[str, list[int]]


@dataclass
class ShareGroupDescription:
    error: int
    message: str | None
    state: str
    members: list[ShareMember]


def share_group_describe(group_id: str) -> WireRequest[ShareGroupDescription]:
    """A share group's state and members with their partitions (sent to its coordinator)."""

    def body(version: int) -> bytes:
        return Writer().array([group_id], Writer.string).bool(False).tags().getvalue()

    def read(r: Reader, version: int) -> ShareGroupDescription:
        r.int32()  # throttle

        def topic(r: Reader) -> tuple[str, list[int]]:
            r.uuid()
            name, partitions = r.string() or "", r.array(Reader.int32)
            r.tags()
            return name, partitions

        def member(r: Reader) -> ShareMember:
            member_id = r.string() or ""
            r.string()  # rack
            r.int32()  # member epoch
            client_id, host = r.string() or "", r.string() or ""
            r.array(Reader.string)  # subscribed topics
            assignment = dict(r.array(topic))
            r.tags()  # the assignment struct's
            r.tags()
            return ShareMember(member_id, client_id, host, assignment)

        def group(r: Reader) -> ShareGroupDescription:
            error, message = r.int16(), r.string()
            r.string()  # the group id
            state = r.string() or ""
            r.int32()  # group epoch
            r.int32()  # assignment epoch
            r.string()  # assignor
            members = r.array(member)
            r.int32()  # authorized operations
            r.tags()
            return ShareGroupDescription(error, message, state, members)

        groups = r.array(group)
        r.tags()
        if len(groups) != 1:
            raise ValueError(f"ShareGroupDescribe answered {len(groups)} groups for one")
        return groups[0]

    return WireRequest(SHARE_GROUP_DESCRIBE, (1,), body, read)


@dataclass
class SharePartitionOffsets:
    partition: int
    #: The share-partition start offset: every record below it is delivered and acknowledged.
    start_offset: int
    #: Records from the start offset on not acknowledged yet (-1: the broker does not say; v0).
    lag: int
    error: int


@dataclass
class ShareGroupOffsets:
    error: int
    message: str | None
    partitions: list[SharePartitionOffsets]


def describe_share_group_offsets(group_id: str, topic: str) -> WireRequest[ShareGroupOffsets]:
    """A share group's start offset (and lag, v1) on every partition of ``topic`` it has read."""

    def body(version: int) -> bytes:
        def request_group(w: Writer, _: None) -> None:
            w.string(group_id).array(None, Writer.string).tags()  # topics null: every topic it reads

        return Writer().array([None], request_group).tags().getvalue()

    def read(r: Reader, version: int) -> ShareGroupOffsets:
        r.int32()  # throttle

        def partition(r: Reader) -> SharePartitionOffsets:
            index, start = r.int32(), r.int64()
            r.int32()  # leader epoch
            lag = r.int64() if version >= 1 else -1
            error = r.int16()
            r.string()
            r.tags()
            return SharePartitionOffsets(index, start, lag, error)

        def answer_topic(r: Reader) -> tuple[str, list[SharePartitionOffsets]]:
            name = r.string() or ""
            r.uuid()
            partitions = r.array(partition)
            r.tags()
            return name, partitions

        def group(r: Reader) -> ShareGroupOffsets:
            r.string()
            topics = r.array(answer_topic)
            error, message = r.int16(), r.string()
            r.tags()
            return ShareGroupOffsets(error, message, [p for name, parts in topics if name == topic for p in parts])

        groups = r.array(group)
        r.tags()
        if len(groups) != 1:
            raise ValueError(f"DescribeShareGroupOffsets answered {len(groups)} groups for one")
        return groups[0]

    return WireRequest(DESCRIBE_SHARE_GROUP_OFFSETS, (1, 0), body, read)
