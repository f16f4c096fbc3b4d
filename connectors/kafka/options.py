"""The Kafka URL, its options and the aiokafka client options they make."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from aiokafka.helpers import create_ssl_context

from qtasks.config import QueueConfig, redact_url
from qtasks.exc import (
    ConfigError,
)

log = logging.getLogger("qtasks.kafka")


_TOPIC_ALREADY_EXISTS = 36
_URL_OPTIONS = {
    "security_protocol": "kafka_security_protocol",
    "sasl_mechanism": "kafka_sasl_mechanism",
    "sasl_username": "kafka_sasl_username",
    "sasl_password": "kafka_sasl_password",
    "sasl_password_file": "kafka_sasl_password_file",
    "ssl_cafile": "kafka_ssl_cafile",
    "ssl_certfile": "kafka_ssl_certfile",
    "ssl_keyfile": "kafka_ssl_keyfile",
}
#: The connector's own URL options (seconds) and their defaults.
_TIMING_OPTIONS = {"connect_timeout": 10.0, "max_block": 10.0, "metadata_max_age": 5.0}

#: Kafka's default ``message.max.bytes``, used until the broker has told its own.
_DEFAULT_LIMIT = 1_048_588
#: The producer's batch size when every limit allows it.
_BATCH_SIZE = 256 * 1024
#: Key bytes ``record_limit`` leaves room for (qtasks keys are 36-byte uuids).
KEY_ROOM = 256


def parse_url(url: str) -> tuple[list[str], dict[str, str]]:
    """``kafka://h1:9092,h2:9092?security_protocol=SSL`` -> (["h1:9092", "h2:9092"], {"kafka_security_protocol": "SSL"}).

    Timing options keep their own names (``connect_timeout``, ``max_block``, ``metadata_max_age``).
    """
    rest = url.partition("://")[2]
    hosts, _, query = rest.partition("?")
    servers = [h.strip() for h in hosts.strip("/").split(",") if h.strip()]
    if not servers:
        raise ConfigError(f"kafka URL names no broker: {redact_url(url)!r} (use kafka://host:9092)")
    options: dict[str, str] = {}
    known = sorted([*_URL_OPTIONS, *_TIMING_OPTIONS])
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _TIMING_OPTIONS:
            options[name] = unquote(value)
        elif name in _URL_OPTIONS:
            options[_URL_OPTIONS[name]] = unquote(value)
        else:
            raise ConfigError(f"unknown kafka URL option {name!r}; known: {', '.join(known)}")
    return servers, options


@dataclass(frozen=True, slots=True)
class Timings:
    """The connector's bounds, in seconds (URL options of the same names)."""

    #: ``start`` (and a consumer's) gives up after this long: BrokerUnavailableError.
    connect_timeout: float = _TIMING_OPTIONS["connect_timeout"]
    #: ``send`` waits at most this long for a topic's metadata (Java's ``max.block.ms``).
    max_block: float = _TIMING_OPTIONS["max_block"]
    #: Clients refresh metadata this often, so partitions added to a topic are seen.
    metadata_max_age: float = _TIMING_OPTIONS["metadata_max_age"]


def timings(overrides: dict[str, str]) -> Timings:
    """The :class:`Timings` a URL's options give; a clear ConfigError for a bad value."""
    values: dict[str, float] = {}
    for name in _TIMING_OPTIONS:
        raw = overrides.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ConfigError(f"kafka URL option {name} takes a number of seconds > 0, got {raw!r}")
        values[name] = value
    return Timings(**values)


def _password_from(path: str) -> str:
    """The password a file holds (one trailing newline dropped); "" for no file."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"kafka sasl_password_file {path!r} cannot be read: {reason}") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ConfigError(f"kafka sasl_password_file {path!r} is empty")
    return password


def client_options(servers: list[str], config: QueueConfig, overrides: dict[str, str]) -> dict[str, Any]:
    """The connection and security options shared by every aiokafka client."""

    def get(name: str) -> str:
        return overrides.get(name) or str(getattr(config, name))

    protocol = get("kafka_security_protocol").upper()
    if protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise ConfigError(
            f"kafka security_protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, got {protocol!r}"
        )
    options: dict[str, Any] = {"bootstrap_servers": servers, "security_protocol": protocol}
    if protocol.startswith("SASL"):
        mechanism = get("kafka_sasl_mechanism").upper() or "PLAIN"
        if mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise ConfigError(f"kafka sasl_mechanism must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, got {mechanism!r}")
        options["sasl_mechanism"] = mechanism
        options["sasl_plain_username"] = get("kafka_sasl_username")
        options["sasl_plain_password"] = get("kafka_sasl_password") or _password_from(get("kafka_sasl_password_file"))
    if protocol.endswith("SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=get("kafka_ssl_cafile") or None,
            certfile=get("kafka_ssl_certfile") or None,
            keyfile=get("kafka_ssl_keyfile") or None,
        )
    return options
