"""Kafka URL and security options (no broker needed)."""

from __future__ import annotations

import ssl

import pytest

from qtasks.config import QueueConfig
from qtasks.connectors.kafka import client_options, parse_url
from qtasks.exc import ConfigError


def test_url_lists_brokers_and_security_options() -> None:
    servers, options = parse_url(
        "kafka://a:9092,b:9093?security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-512&sasl_username=u&sasl_password=p%40ss"
    )
    assert servers == ["a:9092", "b:9093"]
    assert options == {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "u",
        "kafka_sasl_password": "p@ss",
    }


def test_sasl_ssl_options_reach_the_client() -> None:
    servers, overrides = parse_url(
        "kafka://a:9092?security_protocol=SASL_SSL&sasl_mechanism=SCRAM-SHA-256&sasl_username=u&sasl_password=p"
    )
    options = client_options(servers, QueueConfig(), overrides)
    assert options["security_protocol"] == "SASL_SSL"
    assert (options["sasl_mechanism"], options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "SCRAM-SHA-256",
        "u",
        "p",
    )
    assert isinstance(options["ssl_context"], ssl.SSLContext)


def test_config_fields_set_security_when_the_url_does_not() -> None:
    config = QueueConfig(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="svc", kafka_sasl_password="pw")
    options = client_options(["h:9092"], config, {})
    assert (options["sasl_mechanism"], options["sasl_plain_username"]) == ("PLAIN", "svc")
    assert "ssl_context" not in options


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("kafka://", "names no broker"),
        ("kafka://h:9092?sasl_user=x", "unknown kafka URL option"),
        ("kafka://h:9092?security_protocol=TLS", "security_protocol must be"),
        ("kafka://h:9092?security_protocol=SASL_PLAINTEXT&sasl_mechanism=GSSAPI", "sasl_mechanism must be"),
    ],
)
def test_bad_kafka_urls_are_clear_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        servers, overrides = parse_url(url)
        client_options(servers, QueueConfig(), overrides)
