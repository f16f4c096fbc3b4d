"""The share-group wire format and acknowledgement batching, without a broker."""

from __future__ import annotations

import struct
import uuid
from io import BytesIO
from typing import Any

import pytest
from aiokafka.errors import IncompatibleBrokerVersion

from qtasks.connectors.kafka.share import wire
from qtasks.connectors.kafka.share.consumer import Acks, ShareConsumer, _Session, batches
from qtasks.exc import BrokerRefusedError

TOPIC = uuid.UUID("d7165ecd-fdcf-450a-bd00-31a3e8fe9e93")


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 2**31 - 1, 2**63 - 1])
def test_an_unsigned_varint_reads_back_as_written(value: int) -> None:
    raw = wire.Writer().uvarint(value).getvalue()
    assert wire.Reader(raw).uvarint() == value
    assert len(raw) == max(1, (value.bit_length() + 6) // 7)


def test_compact_strings_and_arrays_carry_their_length_plus_one_and_null_as_zero() -> None:
    raw = wire.Writer().string("ab").string(None).array([1, 2], wire.Writer.int32).array(None, wire.Writer.int32)
    assert raw.getvalue() == b"\x03ab" + b"\x00" + b"\x03" + struct.pack(">ii", 1, 2) + b"\x00"
    r = wire.Reader(raw.getvalue())
    assert (r.string(), r.string(), r.array(wire.Reader.int32), r.array(wire.Reader.int32)) == ("ab", None, [1, 2], [])
    r.end()


def test_a_short_or_overlong_answer_is_an_error_not_a_wrong_value() -> None:
    with pytest.raises(ValueError, match="ends early"):
        wire.Reader(b"\x05ab").string()
    r = wire.Reader(b"\x00\x00\x00\x01\xff")
    r.int32()
    with pytest.raises(ValueError, match="1 bytes after its end"):
        r.end()


def test_tagged_fields_are_skipped_whatever_they_hold() -> None:
    raw = wire.Writer().uvarint(2).uvarint(0).uvarint(3).getvalue() + b"xyz" + b"\x05\x01Q" + b"\x2a"
    r = wire.Reader(raw)
    r.tags()
    assert r.int8() == 42


def test_the_request_header_is_v2_with_an_int16_length_client_id() -> None:
    request = wire.share_group_heartbeat("g", "m", 0, ["t"])
    header = request.prepare({76: (1, 1)}).build_request_header(correlation_id=7, client_id="me").encode()
    assert header == struct.pack(">hhih", 76, 1, 7, 2) + b"me" + b"\x00"


def test_a_request_picks_the_newest_version_the_broker_takes_or_says_what_is_missing() -> None:
    fetch = wire.share_fetch("g", "m", 0, {(TOPIC, 0): []}, max_wait_ms=100, max_records=5)
    assert fetch.prepare({78: (1, 2)}).API_VERSION == 2
    assert fetch.prepare({78: (1, 1)}).API_VERSION == 1
    with pytest.raises(IncompatibleBrokerVersion, match=r"Kafka 4\.1 or later"):
        fetch.prepare({})


def test_share_fetch_v2_asks_for_a_record_limit_and_v1_has_no_such_field() -> None:
    fetch = wire.share_fetch("g", "m", 3, {(TOPIC, 0): []}, max_wait_ms=100, max_records=5)
    fetch.prepare({78: (1, 2)})
    v2 = fetch.encode()
    fetch.prepare({78: (1, 1)})
    v1 = fetch.encode()
    assert len(v2) == len(v1) + 2
    head = b"\x02g\x02m" + struct.pack(">iiiiii", 3, 100, 1, 0x7FFFFFFF, 5, 5)
    assert v2.startswith(head + bytes([wire.ACQUIRE_RECORD_LIMIT, 0]))
    assert v1.startswith(head) and v1[len(head) :] == v2[len(head) + 2 :]


def _answer(acquired: list[tuple[int, int, int]], records: bytes | None) -> bytes:
    """A ShareFetch v2 answer with one partition, written the way a broker would."""
    w = wire.Writer().int32(0).int16(0).string(None).int32(30_000)

    def partition(w: wire.Writer, _: None) -> None:
        w.int32(0).int16(0).string(None).int16(0).string(None).int32(1).int32(5).tags()
        w.blob(records).array(acquired, lambda w, a: w.int64(a[0]).int64(a[1]).int16(a[2]).tags()).tags()

    w.array([None], lambda w, _: w.uuid(TOPIC).array([None], partition).tags())
    w.array([None], lambda w, _: w.int32(1).string("h").int32(9092).string(None).tags())
    return w.tags().getvalue()


def test_a_share_fetch_answer_reads_its_locks_records_and_leaders() -> None:
    request = wire.share_fetch("g", "m", 1, {(TOPIC, 0): []}, max_wait_ms=100, max_records=5)
    request.prepare({78: (1, 2)})
    answer = request.RESPONSE_TYPE.decode(BytesIO(_answer([(4, 6, 2)], b"RECORDS")))
    part = answer.partitions[(TOPIC, 0)]
    assert (answer.lock_ms, part.leader_id, part.leader_epoch, part.records) == (30_000, 1, 5, b"RECORDS")
    assert part.acquired == [wire.Acquired(4, 6, 2)]
    assert answer.nodes[1] == wire.Broker(1, "h", 9092)


def test_acknowledgements_go_as_runs_of_consecutive_offsets_of_one_type() -> None:
    acks = {5: wire.ACCEPT, 3: wire.ACCEPT, 4: wire.ACCEPT, 6: wire.RELEASE, 9: wire.ACCEPT, 10: wire.GAP}
    assert batches(acks) == [
        wire.AckBatch(3, 5, [wire.ACCEPT]),
        wire.AckBatch(6, 6, [wire.RELEASE]),
        wire.AckBatch(9, 9, [wire.ACCEPT]),
        wire.AckBatch(10, 10, [wire.GAP]),
    ]


def test_acks_are_taken_once_per_partition_and_the_last_word_on_an_offset_counts() -> None:
    acks = Acks()
    acks.add((TOPIC, 0), 1, wire.ACCEPT)
    acks.add((TOPIC, 0), 1, wire.RELEASE)
    acks.add((TOPIC, 1), 2, wire.ACCEPT)
    assert len(acks) == 2
    assert acks.take({(TOPIC, 0)}) == {(TOPIC, 0): [wire.AckBatch(1, 1, [wire.RELEASE])]}
    assert acks.take({(TOPIC, 0)}) == {}
    assert acks.take() == {(TOPIC, 1): [wire.AckBatch(2, 2, [wire.ACCEPT])]}
    assert len(acks) == 0


class _FakeConn:
    """A connection whose broker answers from a script: a list of answers per API key."""

    def __init__(self, script: dict[int, list[object]], opened: list[_FakeConn]) -> None:
        self._script = script
        self.closed = False
        self.sent: list[int] = []
        opened.append(self)

    def connected(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True

    async def send(self, request: wire.WireRequest[object]) -> object:
        self.sent.append(request.API_KEY)
        answers = self._script[request.API_KEY]
        return answers.pop(0) if len(answers) > 1 else answers[0]


def _consumer(script: dict[int, list[object]], opened: list[_FakeConn]) -> ShareConsumer:
    async def connect(host: str, port: int) -> Any:
        return _FakeConn(script, opened)

    return ShareConsumer(
        connect=connect, bootstrap=[("h", 1)], group_id="g", topics=["t"], join_interval=0.01, user="app"
    )


async def test_a_member_waits_for_a_coordinator_that_is_not_ready_yet_then_joins() -> None:
    opened: list[_FakeConn] = []
    not_yet = wire.Coordinator(-1, "", -1, 15, None)  # COORDINATOR_NOT_AVAILABLE, as a fresh broker says
    script: dict[int, list[object]] = {
        wire.FIND_COORDINATOR: [not_yet, not_yet, wire.Coordinator(1, "h", 1, 0, None)],
        wire.SHARE_GROUP_HEARTBEAT: [wire.Heartbeat(0, None, "m", 2, 5000, {})],
    }
    consumer = _consumer(script, opened)
    await consumer.start(timeout=5)
    assert consumer.assignment() == set()
    await consumer.stop()
    assert opened and all(conn.closed for conn in opened)


#: What the member's refusals say: the words of the ACL check at start.
NOT_ALLOWED = "Kafka at h:1 does not let user 'app' do what this app needs: "


@pytest.mark.parametrize(
    ("script", "lacking"),
    [
        ({wire.FIND_COORDINATOR: [wire.Coordinator(-1, "", -1, 30, None)]}, "read on share group 'g'"),
        (
            {
                wire.FIND_COORDINATOR: [wire.Coordinator(1, "h", 1, 0, None)],
                wire.SHARE_GROUP_HEARTBEAT: [wire.Heartbeat(30, None, None, 0, 0, None)],
            },
            "read on share group 'g'",
        ),
        (
            {
                wire.FIND_COORDINATOR: [wire.Coordinator(1, "h", 1, 0, None)],
                wire.SHARE_GROUP_HEARTBEAT: [wire.Heartbeat(29, None, None, 0, 0, None)],
            },
            "read on topic 't'",
        ),
    ],
    ids=["coordinator", "join", "join-topic"],
)
async def test_a_member_the_acls_keep_out_fails_at_start_naming_the_grant_and_leaves_no_connection_open(
    script: dict[int, list[object]], lacking: str
) -> None:
    opened: list[_FakeConn] = []
    consumer = _consumer(script, opened)
    with pytest.raises(BrokerRefusedError) as refused:
        await consumer.start(timeout=5)
    assert str(refused.value).startswith(NOT_ALLOWED + lacking + ". Grant it in the ACLs")
    assert opened and all(conn.closed for conn in opened)


def _joined(heartbeats: list[object], fetches: list[object]) -> dict[int, list[object]]:
    """A broker where the member joins and is given partition 0 of topic ``t``."""
    return {
        wire.FIND_COORDINATOR: [wire.Coordinator(1, "h", 1, 0, None)],
        wire.SHARE_GROUP_HEARTBEAT: heartbeats,
        wire.METADATA: [
            wire.Metadata(
                {1: wire.Broker(1, "h", 1)}, [wire.TopicMeta("t", TOPIC, 0, [wire.PartitionMeta(0, 1, 0, 0)])]
            )
        ],
        wire.SHARE_FETCH: fetches,
        wire.SHARE_ACKNOWLEDGE: [wire.ShareAnswer(30, None, None, {}, {})],
    }


async def test_a_member_whose_fetch_is_refused_stops_fetching_and_names_the_grant() -> None:
    opened: list[_FakeConn] = []
    refused = wire.ShareAnswer(30, None, None, {}, {})  # READ on the group revoked
    consumer = _consumer(_joined([wire.Heartbeat(0, None, "m", 2, 60_000, {TOPIC: [0]})], [refused]), opened)
    await consumer.start(timeout=5)
    for _ in range(2):  # not a retry loop: the second call fails without asking again
        with pytest.raises(BrokerRefusedError, match=NOT_ALLOWED + "read on share group 'g'"):
            await consumer.getmany(0.1, 5)
    assert sum(conn.sent.count(wire.SHARE_FETCH) for conn in opened) == 1
    await consumer.stop()
    assert all(conn.closed for conn in opened)


async def test_a_member_whose_heartbeat_is_refused_later_fails_naming_the_grant() -> None:
    opened: list[_FakeConn] = []
    heartbeats: list[object] = [wire.Heartbeat(0, None, "m", 2, 10, None), wire.Heartbeat(30, None, None, 0, 0, None)]
    consumer = _consumer(_joined(heartbeats, []), opened)
    await consumer.start(timeout=5)
    with pytest.raises(BrokerRefusedError, match=NOT_ALLOWED + "read on share group 'g'"):
        await consumer.wait_assigned(5)
    with pytest.raises(BrokerRefusedError, match=NOT_ALLOWED + "read on share group 'g'"):
        await consumer.getmany(0.1, 5)
    await consumer.stop()
    assert all(conn.closed for conn in opened)


def test_a_sessions_epoch_is_taken_as_a_request_is_sent_and_wraps_to_one() -> None:
    session = _Session(1, conn=None)  # type: ignore[arg-type]
    assert [session.next_epoch() for _ in range(3)] == [wire.OPEN_SESSION, 1, 2]
    session.epoch = 2**31 - 1
    assert [session.next_epoch(), session.next_epoch()] == [2**31 - 1, 1]
