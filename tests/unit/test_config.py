"""Every setting of the wrong type or out of range is a ConfigError naming it; app names follow Kafka's rules."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from qtasks.config import MAX_APP_NAME, QueueConfig, validate_app_name
from qtasks.exc import ConfigError

INT_SETTINGS = [f.name for f in dataclasses.fields(QueueConfig) if f.type == "int"]
FLOAT_SETTINGS = [f.name for f in dataclasses.fields(QueueConfig) if f.type == "float"]
STR_SETTINGS = [f.name for f in dataclasses.fields(QueueConfig) if f.type == "str"]


def test_the_defaults_are_valid() -> None:
    QueueConfig().validate()
    assert INT_SETTINGS and FLOAT_SETTINGS and STR_SETTINGS


@pytest.mark.parametrize("name", INT_SETTINGS)
@pytest.mark.parametrize("value", ["3", 3.5, 3.0, True, None])
def test_int_settings_refuse_other_types(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must be an int, got"):
        QueueConfig(**{name: value})


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["3", True, None])
def test_float_settings_refuse_other_types(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must be a number, got"):
        QueueConfig(**{name: value})


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_float_settings_refuse_nan_and_infinity(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must be a finite number"):
        QueueConfig(**{name: value})


def test_float_settings_accept_ints() -> None:
    config = QueueConfig(status_ttl=10, lease_interval=1, lease_timeout=3)
    assert (config.status_ttl, config.lease_interval, config.lease_timeout) == (10, 1, 3)


@pytest.mark.parametrize("name", STR_SETTINGS)
@pytest.mark.parametrize("value", [1, None, b"x"])
def test_str_settings_refuse_other_types(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must be a str"):
        QueueConfig(**{name: value})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"concurrency": 0}, "concurrency must be greater than 0, got 0"),
        ({"concurrency": -4}, "concurrency must be greater than 0"),
        ({"prefetch": -2}, "prefetch must be -1 or more, got -2"),
        ({"tasks_partitions": 0}, "tasks_partitions must be greater than 0"),
        ({"results_partitions": 0}, "results_partitions must be greater than 0"),
        ({"status_partitions": 0}, "status_partitions must be greater than 0"),
        ({"control_partitions": 0}, "control_partitions must be greater than 0"),
        ({"replication_factor": 0}, "replication_factor must be greater than 0"),
        ({"min_insync_replicas": -1}, "min_insync_replicas must be 0 or more"),
        ({"min_insync_replicas": 2}, r"min_insync_replicas \(2\) cannot exceed replication_factor \(1\)"),
        ({"max_record_bytes": 0}, "max_record_bytes must be greater than 0"),
        ({"thread_pool_size": 0}, "thread_pool_size must be greater than 0"),
        ({"returning_max_items": -1}, "returning_max_items must be 0 or more"),
        ({"returning_max_bytes": -1}, "returning_max_bytes must be 0 or more"),
        ({"status_ttl": -0.5}, "status_ttl must be 0 or more"),
        ({"lease_interval": 0}, "lease_interval must be greater than 0"),
        ({"lease_timeout": -1}, "lease_timeout must be greater than 0"),
        ({"lease_timeout": 5.0, "lease_interval": 5.0}, r"lease_timeout \(5.0\) must be longer than lease_interval"),
        ({"lease_timeout": 4, "lease_interval": 5}, "lease_timeout"),
        ({"retry_backoff_base": -1}, "retry_backoff_base must be 0 or more"),
        ({"retry_backoff_max": -1}, "retry_backoff_max must be 0 or more"),
        ({"stop_timeout": -1}, "stop_timeout must be 0 or more"),
        ({"commit_interval": 0}, "commit_interval must be greater than 0"),
        ({"stream_clock_skew": -1}, "stream_clock_skew must be 0 or more"),
        ({"stream_linger": -1}, "stream_linger must be 0 or more"),
        ({"log_level": "debug"}, "log_level must be one of CRITICAL, FATAL, ERROR, WARN, WARNING, INFO, DEBUG, NOTSET"),
        ({"log_level": "LOUD"}, "log_level must be one of"),
        (
            {"kafka_security_protocol": "TLS"},
            "kafka_security_protocol must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
        ),
        ({"kafka_security_protocol": "plaintext"}, "kafka_security_protocol must be one of"),
        ({"kafka_max_poll_interval_ms": 0}, "kafka_max_poll_interval_ms must be greater than 0"),
        ({"kafka_session_timeout_ms": 0}, "kafka_session_timeout_ms must be greater than 0"),
        ({"kafka_heartbeat_interval_ms": 0}, "kafka_heartbeat_interval_ms must be greater than 0"),
        ({"kafka_request_timeout_ms": -1}, "kafka_request_timeout_ms must be greater than 0"),
        ({"kafka_linger_ms": -1}, "kafka_linger_ms must be 0 or more"),
        (
            {"kafka_heartbeat_interval_ms": 45_000, "kafka_session_timeout_ms": 45_000},
            r"kafka_heartbeat_interval_ms \(45000\) must be lower than kafka_session_timeout_ms",
        ),
    ],
)
def test_out_of_range_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QueueConfig(**settings)
    with pytest.raises(ConfigError, match=message):
        QueueConfig.from_env({}, **settings)
    config = QueueConfig()
    with pytest.raises(ConfigError, match=message):
        config.set(**settings)
    assert config == QueueConfig()  # set() changed nothing


@pytest.mark.parametrize(
    "settings",
    [
        {"concurrency": 1, "prefetch": -1},
        {"prefetch": 0},
        {"status_ttl": 0, "stop_timeout": 0, "retry_backoff_base": 0, "kafka_linger_ms": 0},
        {"log_level": "DEBUG"},
        {"log_level": "WARNING", "kafka_security_protocol": "SASL_SSL"},
        {"lease_interval": 0.5, "lease_timeout": 0.6},
        # Leases and Kafka's session timeout are independent: either may be the longer.
        {"lease_timeout": 120.0, "kafka_session_timeout_ms": 10_000},
        {"lease_timeout": 6.0, "kafka_session_timeout_ms": 300_000},
    ],
)
def test_settings_in_range_are_accepted(settings: dict[str, Any]) -> None:
    config = QueueConfig()
    config.set(**settings)
    for name, value in settings.items():
        assert getattr(config, name) == value


@pytest.mark.parametrize(
    ("settings", "insync"),
    [
        ({}, 1),
        ({"replication_factor": 2}, 1),  # 2 of 2 would stop every write while one node is away
        ({"replication_factor": 3}, 2),
        ({"replication_factor": 5}, 2),
        ({"replication_factor": 3, "min_insync_replicas": 3}, 3),
        ({"replication_factor": 5, "min_insync_replicas": 3}, 3),
    ],
)
def test_topics_need_two_copies_of_a_write_from_three_replicas_up(settings: dict[str, Any], insync: int) -> None:
    assert QueueConfig(**settings).insync_replicas == insync


def test_set_is_all_or_nothing() -> None:
    config = QueueConfig()
    with pytest.raises(ConfigError, match="prefetch"):
        config.set(concurrency=3, prefetch=-5)
    assert config.concurrency == QueueConfig().concurrency
    with pytest.raises(ConfigError, match="unknown setting"):
        config.set(concurrency=3, nope=1)
    assert config.concurrency == QueueConfig().concurrency


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QTASKS_CONCURRENCY": "many"}, "QTASKS_CONCURRENCY must be an int, got 'many'"),
        ({"QTASKS_CONCURRENCY": "3.5"}, "QTASKS_CONCURRENCY must be an int"),
        ({"QTASKS_CONCURRENCY": "-3"}, "QTASKS_CONCURRENCY: concurrency must be greater than 0"),
        ({"QTASKS_STATUS_TTL": "soon"}, "QTASKS_STATUS_TTL must be a number, got 'soon'"),
        ({"QTASKS_STATUS_TTL": "nan"}, "QTASKS_STATUS_TTL: status_ttl must be a finite number"),
        ({"QTASKS_LEASE_TIMEOUT": "inf"}, "QTASKS_LEASE_TIMEOUT: lease_timeout must be a finite number"),
        ({"QTASKS_LOG_LEVEL": "chatty"}, "QTASKS_LOG_LEVEL: log_level must be one of"),
        ({"QTASKS_KAFKA_SECURITY_PROTOCOL": "SSL3"}, "QTASKS_KAFKA_SECURITY_PROTOCOL: kafka_security_protocol"),
    ],
)
def test_env_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QueueConfig.from_env(env)


def test_env_values_are_parsed_to_the_setting_type() -> None:
    config = QueueConfig.from_env({"QTASKS_PREFETCH": "-1", "QTASKS_STATUS_TTL": "60", "QTASKS_LOG_LEVEL": "ERROR"})
    assert (config.prefetch, config.status_ttl, config.log_level) == (-1, 60.0, "ERROR")


def test_overrides_win_over_the_environment() -> None:
    assert QueueConfig.from_env({"QTASKS_CONCURRENCY": "0"}, concurrency=2).concurrency == 2


# -- app names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "orders", "a.b", "a_b", "a-b", "A1.b_c-D", "..a", "a" * MAX_APP_NAME, "a" * 241],
)
def test_app_names_kafka_accepts(name: str) -> None:
    assert validate_app_name(name) == name
    assert len(name + ".results") <= 249


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        (" ", r"may hold only ASCII letters, digits, '\.', '_' and '-'.*' '"),
        ("a#b", "may hold only ASCII letters.*'#'"),
        ("zürich", "may hold only ASCII letters.*'ü'"),
        ("a/b", "'/'"),
        ("a b", "' '"),
        ("a:b", "':'"),
        ("tab\t", "'\\\\t'"),
        (".", r"must not be '\.'"),
        ("..", r"must not be '\.\.'"),
        ("a" * 242, r"app name is 242 characters; at most 241 fit in a Kafka topic name \(249 characters"),
        ("a" * 300, "at most 241"),
        (5, "must be a str, got int"),
        (None, "must be a str, got NoneType"),
    ],
)
def test_app_names_kafka_refuses(name: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_app_name(name)


def test_the_longest_app_name_leaves_room_for_every_suffix() -> None:
    assert MAX_APP_NAME == 249 - len(".results") == 241
