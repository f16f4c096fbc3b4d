"""Security settings without a broker: passwords from files, secrets kept out of text, refusals named."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiokafka import errors as kafka_exc

from qtasks.config import QueueConfig, redact_url
from qtasks.connectors import from_url
from qtasks.connectors.kafka import install_log_filter
from qtasks.connectors.kafka.access import group_missing, missing, share_group_missing
from qtasks.connectors.kafka.options import client_options, parse_url
from qtasks.connectors.kafka.refusals import refusal
from qtasks.connectors.kafka.share import wire
from qtasks.exc import BrokerRefusedError, ConfigError
from qtasks.supervise import LoopFailedError, Supervisor

SASL = "kafka://b:9093?security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-512&sasl_username=app"


def options(url: str, **settings: str) -> dict[str, object]:
    servers, overrides = parse_url(url)
    return client_options(servers, QueueConfig(**settings), overrides)


def test_the_password_comes_from_a_file_without_its_newline(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    assert options(f"{SASL}&sasl_password_file={secret}")["sasl_plain_password"] == "s3cret"
    assert options(SASL, kafka_sasl_password_file=str(secret))["sasl_plain_password"] == "s3cret"


def test_a_password_given_outright_wins_over_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-file")
    got = options(f"{SASL}&sasl_password=given&sasl_password_file={secret}")
    assert got["sasl_plain_password"] == "given"


def test_the_password_file_from_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("env-secret")
    config = QueueConfig.from_env({"QTASKS_KAFKA_SASL_PASSWORD_FILE": str(secret)})
    assert config.kafka_sasl_password_file == str(secret)


@pytest.mark.parametrize(("content", "reason"), [(None, "cannot be read"), ("", "is empty"), ("\n", "is empty")])
def test_a_missing_or_empty_password_file_is_a_config_error(tmp_path: Path, content: str | None, reason: str) -> None:
    secret = tmp_path / "password"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(ConfigError, match=reason):
        options(f"{SASL}&sasl_password_file={secret}")


def test_secrets_stay_out_of_urls_and_the_config_s_repr() -> None:
    assert redact_url(f"{SASL}&sasl_password=hunter2&ssl_cafile=/ca") == f"{SASL}&sasl_password=***&ssl_cafile=/ca"
    assert redact_url("kafka://user:hunter2@b:9092") == "kafka://***@b:9092"
    assert redact_url(f"{SASL}&sasl_password=hun#ter2") == f"{SASL}&sasl_password=***"
    assert "hunter2" not in repr(QueueConfig(kafka_sasl_password="hunter2"))
    with pytest.raises(ConfigError) as caught:
        from_url("kafka:/b:9092?sasl_password=hunter2", QueueConfig())
    assert "hunter2" not in str(caught.value)


def test_refusals_name_what_to_fix() -> None:
    sasl = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "app"}
    said = refusal(kafka_exc.SaslAuthenticationFailed("invalid"), "b:9093", sasl)
    assert said is not None and "refused the credentials of user 'app' (SCRAM-SHA-512)" in said
    said = refusal(ssl.SSLCertVerificationError(1, "x"), "b:9093", sasl)
    assert said is not None and "kafka_ssl_cafile" in said
    # a broker that did not answer is no refusal: it may answer later
    assert refusal(kafka_exc.KafkaConnectionError("refused"), "b:9093", sasl) is None
    assert refusal(ConnectionResetError(), "b:9093", sasl) is None
    assert refusal(ssl.SSLEOFError(), "b:9093", sasl) is None
    # a handshake that met plain Kafka is named; a TLS failure of another kind may pass
    not_tls = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    not_tls.reason = "WRONG_VERSION_NUMBER"
    said = refusal(not_tls, "b:9093", sasl, handshake=True)
    assert said is not None and "is its listener TLS?" in said
    assert refusal(not_tls, "b:9093", sasl) is None  # on a connection in use: a stream cut short
    bad_mac = ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC]")
    bad_mac.reason = "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"
    assert refusal(bad_mac, "b:9093", sasl, handshake=True) is None


def test_a_tls_record_read_as_a_kafka_size_means_the_listener_is_tls() -> None:
    """A plain-text client reads the broker's TLS alert (0x15 0x03 ...) as a response size."""
    closed = kafka_exc.KafkaConnectionError("Connection at b:9093 closed")
    closed.__cause__ = asyncio.IncompleteReadError(b"\x00\x00\x00", int.from_bytes(b"\x15\x03\x03\x00", "big"))
    said = refusal(closed, "b:9093", {"security_protocol": "PLAINTEXT"}, handshake=True)
    assert said is not None and "answers in TLS, but kafka_security_protocol is PLAINTEXT" in said
    # a short read of an ordinary size is a broker that went away
    closed.__cause__ = asyncio.IncompleteReadError(b"", 120)
    assert refusal(closed, "b:9093", {"security_protocol": "PLAINTEXT"}, handshake=True) is None


def test_missing_operations_are_named_per_topic() -> None:
    read, write, describe = 1 << 3, 1 << 4, 1 << 8
    response = SimpleNamespace(
        topics=[
            (0, "a.tasks", False, [], read | write | describe),
            (0, "a.results", False, [], read | describe),
            (29, "a.status", False, [], -(2**31)),
            (0, "a.dlq", False, [], -(2**31)),  # the broker did not say: not checked
            (0, "a.control", False, [], 0),  # a field without DESCRIBE says nothing either
        ]
    )
    needs = {
        "a.tasks": ("read", "write"),
        "a.results": ("write",),
        "a.status": ("read", "write"),
        "a.dlq": ("write",),
        "a.control": ("write",),
    }
    assert missing(response, needs) == [
        "write on topic 'a.results'",
        "read/write on topic 'a.status' (it may not even describe it)",
    ]


async def test_a_loop_the_broker_refuses_stops_at_once_instead_of_restarting() -> None:
    runs = 0

    async def refused() -> None:
        nonlocal runs
        runs += 1
        raise BrokerRefusedError("Kafka at b:9093 denies this client access to the consumer group")

    supervisor = Supervisor("test")
    supervisor.spawn("poll", refused)
    with pytest.raises(LoopFailedError, match="denies this client access"):
        await supervisor.wait(asyncio.Event().wait(), timeout=10)
    assert runs == 1
    await supervisor.stop()


def test_a_group_the_caller_may_not_read_is_named() -> None:
    read, describe = 1 << 3, 1 << 8

    def answer(error: int, operations: int) -> SimpleNamespace:
        return SimpleNamespace(groups=[(error, "a-workers", "Dead", "", "", [], operations)])

    assert group_missing(answer(0, read | describe), "a-workers") == []
    assert group_missing(answer(0, describe), "a-workers") == ["read on group 'a-workers'"]
    assert group_missing(answer(30, -(2**31)), "a-workers") == ["read on group 'a-workers'"]
    assert group_missing(answer(0, -(2**31)), "a-workers") == []


class _Answers:
    """A connection whose broker answers a ShareFetch and an IncrementalAlterConfigs with these errors."""

    def __init__(self, fetch_error: int, alter_error: int) -> None:
        self.answers = {
            wire.SHARE_FETCH: wire.ShareAnswer(fetch_error, None, None, {}, {}),
            wire.INCREMENTAL_ALTER_CONFIGS: [wire.ConfigAnswer(alter_error, None)],
        }
        self.sent: list[wire.WireRequest[object]] = []

    async def send(self, request: wire.WireRequest[object]) -> object:
        self.sent.append(request)
        return self.answers[request.API_KEY]


@pytest.mark.parametrize(
    ("fetch_error", "alter_error", "lacking"),
    [
        (0, 0, []),
        (30, 0, ["read on share group 'a-workers.share'"]),
        (0, 30, ["alter_configs on share group 'a-workers.share'"]),
        (30, 30, ["read/alter_configs on share group 'a-workers.share'"]),
        (35, 42, []),  # not an authorization error: the join and the settings tell what it is
    ],
)
async def test_what_a_worker_may_not_do_on_its_share_group_is_named(
    fetch_error: int, alter_error: int, lacking: list[str]
) -> None:
    conn = _Answers(fetch_error, alter_error)
    assert await share_group_missing(conn, "a-workers.share") == lacking
    fetch, alter = conn.sent
    # READ asked by opening a session with no partitions; ALTER_CONFIGS by a validate-only change of nothing
    fetch.prepare({wire.SHARE_FETCH: (1, 2)})
    assert fetch.encode().endswith(b"\x01\x01\x00")  # no partitions, none forgotten, no tags
    alter.prepare({wire.INCREMENTAL_ALTER_CONFIGS: (0, 1)})
    assert alter.encode() == b"\x02\x20\x10a-workers.share\x01\x00" + b"\x01\x00"  # validate only


def test_aiokafkas_debug_lines_never_show_a_sasl_exchange() -> None:
    """aiokafka logs each request at DEBUG; SASL PLAIN's request holds the password."""
    from aiokafka.protocol.admin import SaslAuthenticateRequest_v1

    logger = logging.getLogger("aiokafka.conn")
    record = logger.makeRecord(
        "aiokafka.conn",
        logging.DEBUG,
        __file__,
        1,
        "Request to %s:%d %d: %s",
        ("b", 9093, 7, SaslAuthenticateRequest_v1(b"\x00app\x00hunter2")),
        None,
    )
    assert "hunter2" in record.getMessage()  # what aiokafka would write
    install_log_filter().filter(record)
    assert "hunter2" not in record.getMessage() and "<SASL exchange hidden>" in record.getMessage()
