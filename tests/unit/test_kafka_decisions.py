"""The Kafka connector's pure decisions: record sizes, error mapping, log triage (no broker)."""

from __future__ import annotations

import logging
import ssl

import pytest
from aiokafka import errors as kafka_exc

from qtasks.connectors.kafka import (
    KEY_ROOM,
    AiokafkaLogFilter,
    batch_size,
    is_fatal,
    map_error,
    parse_url,
    timings,
    value_limit,
    varint_size,
)
from qtasks.connectors.kafka.sizes import BATCH_SLACK
from qtasks.exc import (
    BrokerRefusedError,
    BrokerUnavailableError,
    CommitFailedError,
    ConfigError,
    ConnectorError,
    RecordTooLargeError,
)


@pytest.mark.parametrize(("n", "size"), [(0, 1), (63, 1), (64, 2), (8191, 2), (8192, 3), (1_048_576, 4)])
def test_varint_size_is_kafkas_zigzag_varint(n: int, size: int) -> None:
    assert varint_size(n) == size


@pytest.mark.parametrize("limit", [1_000, 20_000, 1_048_588, 8_388_608])
def test_value_limit_is_the_largest_value_that_fits(limit: int) -> None:
    key = b"k" * KEY_ROOM
    fits = value_limit(limit)
    assert batch_size(key, b"v" * fits) <= limit < batch_size(key, b"v" * (fits + 1))


@pytest.mark.parametrize("size", [0, 1, 63, 64, 127, 128, 8191, 8192, 1_048_575, 1_048_576, 20_000_000])
def test_batch_slack_bounds_the_exact_size(size: int) -> None:
    # send() skips the exact size of a record this far under the limit: it must never be more.
    for key in (None, b"", b"k" * 36, b"k" * size):
        value = b"v" * size
        assert batch_size(key, value) <= len(key or b"") + len(value) + BATCH_SLACK


def test_batch_size_matches_aiokafkas_upper_bound() -> None:
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy as Builder

    for key, value in [(None, b""), (b"u" * 36, b"v" * 1000), (b"k" * 300, b"v" * 70_000)]:
        assert batch_size(key, value) == Builder.estimate_size_in_bytes(key, value, [])


@pytest.mark.parametrize(
    ("error", "action", "kind", "retriable"),
    [
        (kafka_exc.KafkaConnectionError("refused"), "send", BrokerUnavailableError, True),
        (kafka_exc.NodeNotReadyError("x"), "read", BrokerUnavailableError, True),
        (kafka_exc.RequestTimedOutError(), "send", BrokerUnavailableError, True),
        (kafka_exc.KafkaTimeoutError(), "send", BrokerUnavailableError, True),
        (TimeoutError(), "start", BrokerUnavailableError, True),
        (kafka_exc.MessageSizeTooLargeError(), "deliver", RecordTooLargeError, False),
        (kafka_exc.RecordTooLargeError(), "read", RecordTooLargeError, False),
        (kafka_exc.RecordListTooLargeError(), "deliver", RecordTooLargeError, False),
        (kafka_exc.UnknownTopicOrPartitionError(), "send", ConnectorError, True),
        (kafka_exc.CommitFailedError("rebalanced"), "commit", CommitFailedError, True),
        (kafka_exc.RebalanceInProgressError(), "commit", CommitFailedError, True),
        (kafka_exc.IllegalStateError(), "commit", CommitFailedError, True),
        (kafka_exc.OutOfOrderSequenceNumber(), "deliver", ConnectorError, False),
        (kafka_exc.TopicAuthorizationFailedError(), "send", BrokerRefusedError, False),
        (kafka_exc.GroupAuthorizationFailedError(), "join", BrokerRefusedError, False),
        (kafka_exc.SaslAuthenticationFailed("bad"), "start", BrokerRefusedError, False),
        (ssl.SSLCertVerificationError(1, "verify failed"), "start", BrokerRefusedError, False),
        (kafka_exc.NotLeaderForPartitionError(), "send", ConnectorError, True),
    ],
)
def test_map_error(error: BaseException, action: str, kind: type[ConnectorError], retriable: bool) -> None:
    mapped = map_error(error, action, servers="b:9092", topic="t.tasks")
    assert type(mapped) is kind
    assert mapped.retriable is retriable
    assert action in str(mapped)


def test_an_unknown_topic_is_named() -> None:
    assert "'t.results' does not exist" in str(
        map_error(kafka_exc.UnknownTopicOrPartitionError(), "send", topic="t.results")
    )


@pytest.mark.parametrize(
    ("error", "fatal"),
    [
        (kafka_exc.OutOfOrderSequenceNumber(), True),
        (kafka_exc.UnknownProducerId(), True),
        (kafka_exc.ProducerFenced(), True),
        (kafka_exc.MessageSizeTooLargeError(), True),  # refused batch: a sequence gap follows
        (kafka_exc.NotLeaderForPartitionError(), False),
        (kafka_exc.UnknownTopicOrPartitionError(), False),
        (kafka_exc.KafkaConnectionError(), False),
    ],
)
def test_which_delivery_failures_need_a_new_producer(error: BaseException, fatal: bool) -> None:
    assert is_fatal(error) is fatal


def test_timing_options_come_from_the_url() -> None:
    _, options = parse_url("kafka://h:9092?connect_timeout=2.5&max_block=1&metadata_max_age=3")
    assert timings(options) == timings({"connect_timeout": "2.5", "max_block": "1", "metadata_max_age": "3"})
    assert timings(options).connect_timeout == 2.5
    assert timings({}).connect_timeout == 10.0
    with pytest.raises(ConfigError, match="connect_timeout"):
        timings({"connect_timeout": "0"})


def record(msg: str, level: int = logging.ERROR, args: tuple[object, ...] = ()) -> logging.LogRecord:
    return logging.LogRecord("aiokafka.client", level, __file__, 1, msg, args, None)


@pytest.mark.parametrize(
    ("message", "args", "noise"),
    [
        ('Unable connect to "%s:%s": %s', ("h", 1, OSError("refused")), True),
        ("Unable to update metadata from %s", ([1],), True),
        ("Failed fetch messages from %s: %s", (1, kafka_exc.NodeNotReadyError()), True),
        ("Heartbeat session expired - marking coordinator dead", (), True),
        ("anything at all: %r", (kafka_exc.KafkaConnectionError(),), True),
        ("Topic %s is not authorized for this client", ("t",), False),
        ("Unexpected error in sender routine", (), False),
    ],
)
def test_connection_noise_is_told_apart(message: str, args: tuple[object, ...], noise: bool) -> None:
    assert AiokafkaLogFilter.is_connection_noise(record(message, args=args)) is noise


def test_other_errors_show_once_a_minute_at_warning() -> None:
    triage = AiokafkaLogFilter(every=60)
    first = record("Topic %s is not authorized for this client", args=("t",))
    assert triage.filter(first) and first.levelno == logging.WARNING
    again = record("Topic %s is not authorized for this client", args=("u",))
    assert not triage.filter(again) and again.levelno == logging.DEBUG
    noise = record('Unable connect to "%s:%s": %s', args=("h", 1, OSError()))
    assert not triage.filter(noise)
    info = record("Joined group %s", logging.INFO, ("g",))
    assert not triage.filter(info)
