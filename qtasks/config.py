"""Configuration: one dataclass with documented defaults and ``QTASKS_*`` overrides.

``QueueConfig.from_env(**overrides)`` builds it: defaults, then the environment
(``QTASKS_CONCURRENCY=32``), then keyword arguments given in code, and validates the
result. ``app.config`` is the live object; change it before ``app.start()``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from qtasks.exc import ConfigError


@dataclasses.dataclass
class QueueConfig:
    """Settings of one app. Every field can be set with ``QTASKS_<FIELD>`` in the environment."""

    #: Tasks one worker runs at once; past it the worker pauses its partitions (backpressure).
    concurrency: int = 16
    #: Records fetched ahead of free slots (-1: as many as ``concurrency``); they start in
    #: priority order (lower number first) as slots free up.
    prefetch: int = -1
    #: Partitions of the tasks, results and status topics created at start.
    tasks_partitions: int = 6
    results_partitions: int = 6
    status_partitions: int = 6
    control_partitions: int = 1
    #: Replication factor of the topics created at start (Kafka only).
    replication_factor: int = 1
    #: Consumer group of the workers; empty means ``<name>-workers``.
    group_id: str = ""
    #: A record larger than this is not decoded: it goes to the dead-letter topic.
    max_record_bytes: int = 1_000_000
    #: A generator's ``returning`` keeps the handled values up to this many; past it, the count.
    returning_max_items: int = 1000
    #: ... and up to this many encoded bytes (a status record must stay far below 1 MiB).
    returning_max_bytes: int = 256_000
    #: Seconds after which finished tasks are dropped from the status topic (0 keeps them).
    status_ttl: float = 86_400.0
    #: A running task refreshes its lease this often (seconds) ...
    lease_interval: float = 5.0
    #: ... and another worker takes it over when the lease is this old (a crashed worker).
    lease_timeout: float = 30.0
    #: Retry backoff: ``base * 2**n`` seconds, at most ``max``, with full jitter.
    retry_backoff_base: float = 0.5
    retry_backoff_max: float = 60.0
    #: Seconds ``app.stop()`` waits for running tasks before it cancels them.
    stop_timeout: float = 30.0
    #: How often the worker commits finished offsets (seconds).
    commit_interval: float = 0.2
    #: Threads for sync tasks (sync functions and sync generators).
    thread_pool_size: int = 32
    #: A stream starts reading results this many seconds before the task's creation
    #: time, to allow for clock skew between machines.
    stream_clock_skew: float = 30.0
    #: A client keeps reading a results partition this many seconds after its last
    #: stream on it ends, so the next stream there starts at once (no lookup, no seek).
    stream_linger: float = 10.0
    #: How often (seconds) an app checks whether its topics gained partitions.
    metadata_refresh_interval: float = 30.0
    #: Finished tasks whose whole status a process keeps in memory; older ones keep only
    #: their head and are read back from the status topic when asked for.
    status_cache_size: int = 100_000
    #: Values a slow stream may have waiting before the reader leaves it behind (it then
    #: reads them again from the log when it catches up): the memory bound of one stream.
    stream_buffer: int = 10_000
    #: Log level of qtasks' loggers.
    log_level: str = "INFO"
    # Kafka client settings (see docs/kafka.md).
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    kafka_max_poll_interval_ms: int = 300_000
    kafka_session_timeout_ms: int = 45_000
    kafka_heartbeat_interval_ms: int = 3_000
    #: 0: send at once; aiokafka still batches what piles up while a request is in flight.
    kafka_linger_ms: int = 0
    kafka_request_timeout_ms: int = 40_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> QueueConfig:
        """Defaults, then ``QTASKS_*`` variables from ``env`` (``os.environ``), then ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(f"QTASKS_{field.name.upper()}")
            if raw is not None:
                values[field.name] = _parse(field.name, field.type, raw)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values.update(overrides)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first setting that is out of range."""
        positive = [
            "concurrency",
            "tasks_partitions",
            "results_partitions",
            "status_partitions",
            "control_partitions",
            "replication_factor",
            "max_record_bytes",
            "thread_pool_size",
            "lease_interval",
            "lease_timeout",
            "commit_interval",
            "metadata_refresh_interval",
            "stream_buffer",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be greater than 0, got {getattr(self, name)!r}")
        for name in ("returning_max_items", "returning_max_bytes", "status_ttl", "stop_timeout", "stream_linger"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)!r}")
        if self.lease_timeout <= self.lease_interval:
            raise ConfigError(
                f"lease_timeout ({self.lease_timeout}) must be longer than lease_interval ({self.lease_interval})"
            )

    def set(self, **values: Any) -> None:
        """Change settings in place and validate them."""
        for name, value in values.items():
            if not hasattr(self, name):
                raise ConfigError(f"unknown setting: {name}")
            setattr(self, name, value)
        self.validate()


def _parse(name: str, type_name: Any, raw: str) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "str")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return raw.strip().lower() in ("1", "true", "yes", "on")
    except ValueError:
        raise ConfigError(f"QTASKS_{name.upper()} must be a {kind}, got {raw!r}") from None
    return raw


def validate_app_name(name: str) -> str:
    """An app name usable in Kafka topic names; ConfigError otherwise."""
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ :"):
        raise ConfigError(f"app name must be non-empty without '/', '\\\\', ':' or spaces, got {name!r}")
    return name
