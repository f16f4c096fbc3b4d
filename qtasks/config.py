"""Configuration: one dataclass with documented defaults and ``QTASKS_*`` overrides.

``QueueConfig.from_env(**overrides)`` builds it: defaults, then the environment
(``QTASKS_CONCURRENCY=32``), then keyword arguments given in code, and validates the
result. ``app.config`` is the live object; change it with ``config.set(...)`` before
``app.start()``.

Every setting is checked for its type and range (:meth:`QueueConfig.validate`); a
wrong one is a :class:`~qtasks.exc.ConfigError` naming the setting (and the
``QTASKS_*`` variable when it came from the environment).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Final

from qtasks.exc import ConfigError

#: The suffixes an app name gets as topic names.
TOPIC_SUFFIXES: Final = (".tasks", ".results", ".status", ".control", ".dlq")
#: Kafka's longest topic name (``Topic.MAX_NAME_LENGTH``).
MAX_TOPIC_NAME: Final = 249
#: The longest app name: its longest topic name must still fit.
MAX_APP_NAME: Final = MAX_TOPIC_NAME - max(map(len, TOPIC_SUFFIXES))
_TOPIC_CHARS = re.compile(r"[A-Za-z0-9._-]+")
#: ``security.protocol`` values Kafka clients accept.
SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


_SECRET_IN_URL = re.compile(r"(?i)(sasl_password=)[^&]*|(//)[^/@?#]*:[^/@?#]*(@)")


def redact_url(url: str) -> str:
    """``url`` fit to show: a ``sasl_password`` option's value and a ``user:password@`` part masked."""
    return _SECRET_IN_URL.sub(lambda m: f"{m[1]}***" if m[1] else f"{m[2]}***{m[3]}", url)


def validate_app_name(name: str) -> str:
    """Return ``name`` if it makes valid Kafka topic names, else raise :class:`ConfigError` naming the rule.

    An app's topics are ``<name>.tasks``, ``.results``, ``.status``, ``.control`` and
    ``.dlq``, its consumer group ``<name>-workers``. Kafka's topic rules (``Topic.validate``)
    apply: only ASCII letters, digits, ``.``, ``_`` and ``-``; at most 249 characters,
    so at most 241 for the name (249 - len(".results")); not ``.`` or ``..``. Kafka
    warns that ``.`` and ``_`` collide in metric names (``a.b`` and ``a_b``): both are
    accepted here, but do not run two such apps on one cluster.
    """
    if not isinstance(name, str):
        raise ConfigError(f"app name must be a str, got {type(name).__name__}")
    if not name:
        raise ConfigError("app name must not be empty")
    if not _TOPIC_CHARS.fullmatch(name) or not name.isascii():
        bad = sorted({c for c in name if not (c.isascii() and _TOPIC_CHARS.fullmatch(c))})
        raise ConfigError(
            f"app name {name!r} may hold only ASCII letters, digits, '.', '_' and '-' (Kafka topic names); "
            f"it has {', '.join(map(repr, bad))}"
        )
    if name in (".", ".."):
        raise ConfigError(f"app name must not be {name!r} (Kafka refuses '.' and '..' as topic names)")
    if len(name) > MAX_APP_NAME:
        raise ConfigError(
            f"app name is {len(name)} characters; at most {MAX_APP_NAME} fit in a Kafka topic name "
            f"({MAX_TOPIC_NAME} characters, with the longest suffix '.results')"
        )
    return name


@dataclasses.dataclass
class QueueConfig:
    """Settings of one app. Every field can be set with ``QTASKS_<FIELD>`` in the environment."""

    #: Tasks one worker runs at once; past it the worker pauses its partitions (backpressure).
    concurrency: int = 16
    #: Records fetched ahead of free slots (-1: as many as ``concurrency``); they start in
    #: priority order (lower number first) as slots free up.
    prefetch: int = -1
    #: Partitions of the tasks topic created at start (at most this many workers share the work).
    tasks_partitions: int = 6
    #: Partitions of the results topic created at start.
    results_partitions: int = 6
    #: Partitions of the (compacted) status topic created at start.
    status_partitions: int = 6
    #: Partitions of the control topic (cancel commands) created at start.
    control_partitions: int = 1
    #: Replication factor of the topics created at start (Kafka only).
    replication_factor: int = 1
    #: ``min.insync.replicas`` of those topics: the copies a write needs (the producer uses
    #: ``acks=all``). 0: 2 from three replicas up (one node may fail), else 1.
    min_insync_replicas: int = 0
    #: Consumer group of the workers; empty means ``<name>-workers``.
    group_id: str = ""
    #: A record larger than this is not decoded: it goes to the dead-letter topic (a task record's task ends as error).
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
    #: A run writes its ``process`` status (with its lease) once it has run this long
    #: (seconds), or when its partition is revoked: a task that ends sooner writes only
    #: its values and its ending. 0 writes it at once. At least once only (exactly once
    #: writes it at once, in the transaction).
    process_grace: float = 0.05
    #: Retry backoff: ``base * 2**n`` seconds before retry ``n`` (full jitter) ...
    retry_backoff_base: float = 0.5
    #: ... and at most this many seconds.
    retry_backoff_max: float = 60.0
    #: Periodic tasks: when a worker takes the ticking over, the ticks missed within this
    #: many seconds of the last sign of the worker that ticked before are all submitted (a
    #: crash and its rebalance take that long); later ones, missed while no worker ran,
    #: follow the task's ``catch_up``. 0: twice ``kafka_session_timeout_ms``, at least 60 s.
    periodic_grace: float = 0.0
    #: Seconds ``app.stop()`` waits for running tasks before it cancels them.
    stop_timeout: float = 30.0
    #: How often the worker commits finished offsets (seconds).
    commit_interval: float = 0.2
    #: Threads for sync tasks (sync functions and sync generators).
    thread_pool_size: int = 32
    #: ``qtasks run`` sets the garbage collector's first threshold to this (Python's
    #: default is 700): a worker makes many short-lived objects per task, and collecting
    #: every 700 of them took 15% of its CPU. 0 leaves the collector alone. A program
    #: that runs its own worker (``app.start``) keeps its own setting.
    worker_gc_threshold: int = 10_000
    #: A stream starts reading results this many seconds before the task's creation
    #: time, to allow for clock skew between machines.
    stream_clock_skew: float = 30.0
    #: A client keeps reading a results partition this many seconds after its last
    #: stream on it ends, so the next stream there starts at once (no lookup, no seek).
    stream_linger: float = 10.0
    #: How often (seconds) an app checks whether its topics gained partitions.
    metadata_refresh_interval: float = 5.0
    #: Finished tasks whose whole status a process keeps in memory; older ones keep only
    #: their head and are read back from the status topic when asked for.
    status_cache_size: int = 100_000
    #: Values a slow stream may have waiting before the reader leaves it behind (it then
    #: reads them again from the log when it catches up): the memory bound of one stream.
    stream_buffer: int = 10_000
    #: Log level of qtasks' loggers.
    log_level: str = "INFO"
    #: ``text`` or ``json`` (one JSON object a line, with the task's uuid, name and attempt).
    log_format: str = "text"
    #: A worker serves ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz`` on this port
    #: (``qtasks run --metrics-port``; docs/operations.md). 0: no such server.
    metrics_port: int = 0
    #: The address the metrics server listens on (0.0.0.0: every interface, as probes need).
    metrics_host: str = "0.0.0.0"
    #: ``at_least_once`` (a task whose worker dies runs again and its stream may repeat
    #: values, which ``app.stream`` drops) or ``exactly_once`` (results, statuses and offsets
    #: commit in transactions per tasks partition; readers read committed records only; see
    #: docs/guarantees.md).
    processing_guarantee: str = "at_least_once"
    #: ``group``: workers read the tasks topic as a consumer group (at most one worker per
    #: partition). ``share``: as a share group (KIP-932, Kafka 4.2+; docs/share-groups.md):
    #: any number of workers, records locked for ``lease_timeout`` and acknowledged one by
    #: one; at least once only, no ordering keys.
    processing_mode: str = "group"
    #: Share mode: how many times the share group hands a task record out (Kafka's
    #: ``share.delivery.count.limit``, 2 to 10), and the poison limit: a task whose started
    #: runs reach ``share_delivery_limit - 1`` without an ending (their workers died or lost
    #: their locks) ends as ``error`` (``DeliveryLimitError``) and its record is
    #: dead-lettered. A record's last delivery is never run: it is sent afresh, so
    #: hand-backs (graceful stops) never end a task.
    share_delivery_limit: int = 5
    #: Exactly-once: a worker commits each partition's transaction this often (seconds);
    #: values become visible to readers at each commit.
    eos_commit_interval: float = 0.1
    #: Exactly-once: ... or as soon as a transaction holds this many records.
    eos_commit_records: int = 1000
    #: Exactly-once: the broker aborts a transaction left open this long (Kafka's
    #: ``transaction.timeout.ms``; at most the broker's ``transaction.max.timeout.ms``).
    eos_transaction_timeout: float = 60.0
    #: A resumed generator that yields values other than the ones its earlier attempt
    #: committed (it is not deterministic): ``warn`` logs it, ``error`` ends the task as error.
    resume_mismatch: str = "warn"
    #: The largest ``ctx.checkpoint(state)``, as encoded JSON bytes.
    checkpoint_max_bytes: int = 64_000
    # Kafka client settings (see docs/kafka.md).
    #: Kafka's ``security.protocol`` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL).
    kafka_security_protocol: str = "PLAINTEXT"
    #: SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) when the protocol uses SASL.
    kafka_sasl_mechanism: str = ""
    #: SASL user name.
    kafka_sasl_username: str = ""
    #: SASL password (never logged). Prefer ``kafka_sasl_password_file``.
    kafka_sasl_password: str = dataclasses.field(default="", repr=False)
    #: A file holding the SASL password (a mounted Kubernetes Secret, say), read when the
    #: app connects; a trailing newline is dropped. Used when ``kafka_sasl_password`` is empty.
    kafka_sasl_password_file: str = ""
    #: CA certificate file (PEM) that signed the brokers' certificates.
    kafka_ssl_cafile: str = ""
    #: Client certificate file (PEM), for brokers that ask for one.
    kafka_ssl_certfile: str = ""
    #: The client certificate's key file (PEM).
    kafka_ssl_keyfile: str = ""
    #: Kafka's ``max.poll.interval.ms``; the worker keeps polling while it runs long tasks,
    #: so this bounds nothing about a task's duration.
    kafka_max_poll_interval_ms: int = 300_000
    #: The group session: a worker that stops heartbeating (killed) loses its partitions
    #: after this long, and its tasks are taken over.
    kafka_session_timeout_ms: int = 45_000
    #: How often a worker heartbeats to its group (below the session timeout).
    kafka_heartbeat_interval_ms: int = 3_000
    #: 0: send at once; aiokafka still batches what piles up while a request is in flight.
    kafka_linger_ms: int = 0
    #: How long a request to a broker may go unanswered before it is retried elsewhere
    #: (a frozen node stalls what it leads up to this long).
    kafka_request_timeout_ms: int = 40_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> QueueConfig:
        """Defaults, then ``QTASKS_*`` variables from ``env`` (``os.environ``), then ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            variable = f"QTASKS_{field.name.upper()}"
            raw = env.get(variable)
            if raw is not None and field.name not in overrides:
                values[field.name] = _parse(field.name, str(field.type), raw)
                try:
                    check_setting(field.name, values[field.name])
                except ConfigError as exc:
                    raise ConfigError(f"{variable}: {exc}") from None
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values.update(overrides)
        return cls(**values)  # validates (__post_init__)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first setting of the wrong type or out of range."""
        for field in dataclasses.fields(self):
            check_setting(field.name, getattr(self, field.name))
        if self.lease_timeout <= self.lease_interval:
            raise ConfigError(
                f"lease_timeout ({self.lease_timeout}) must be longer than lease_interval ({self.lease_interval})"
            )
        if self.process_grace >= self.lease_interval:
            raise ConfigError(
                f"process_grace ({self.process_grace}) must be shorter than lease_interval ({self.lease_interval})"
            )
        if self.periodic_grace < 0:
            raise ConfigError(f"periodic_grace must be 0 or more seconds, got {self.periodic_grace}")
        if self.min_insync_replicas > self.replication_factor:
            raise ConfigError(
                f"min_insync_replicas ({self.min_insync_replicas}) cannot exceed replication_factor "
                f"({self.replication_factor}): no write could succeed"
            )
        if self.eos_transaction_timeout < 10 * self.eos_commit_interval:
            raise ConfigError(
                f"eos_transaction_timeout ({self.eos_transaction_timeout}) must be at least ten times "
                f"eos_commit_interval ({self.eos_commit_interval}): a transaction commits well inside its timeout"
            )
        if self.processing_mode == "share" and self.exactly_once:
            raise ConfigError(
                "processing_mode='share' is at least once only: a share group's acknowledgement "
                "cannot join a transaction (use processing_mode='group' for exactly_once)"
            )
        # Kafka: a member must heartbeat several times within its session timeout.
        if self.kafka_heartbeat_interval_ms >= self.kafka_session_timeout_ms:
            raise ConfigError(
                f"kafka_heartbeat_interval_ms ({self.kafka_heartbeat_interval_ms}) must be lower than "
                f"kafka_session_timeout_ms ({self.kafka_session_timeout_ms})"
            )

    @property
    def exactly_once(self) -> bool:
        """True when ``processing_guarantee`` is ``exactly_once``."""
        return self.processing_guarantee == "exactly_once"

    @property
    def insync_replicas(self) -> int:
        """The ``min.insync.replicas`` the app's topics are created with."""
        if self.min_insync_replicas:
            return self.min_insync_replicas
        return 2 if self.replication_factor >= 3 else 1

    def set(self, **values: Any) -> None:
        """Change settings in place and validate them; if they are invalid, nothing changes."""
        unknown = sorted(set(values) - _FIELDS.keys())
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        dataclasses.replace(self, **values)  # validates the result (__post_init__)
        for name, value in values.items():
            setattr(self, name, value)


_FIELDS: dict[str, str] = {f.name: str(f.type) for f in dataclasses.fields(QueueConfig)}

# Ranges: (lowest, whether the lowest itself is allowed). Every float must also be finite.
_AT_LEAST: dict[str, float] = {
    "prefetch": -1,
    "returning_max_items": 0,
    "returning_max_bytes": 0,
    "status_ttl": 0,
    "retry_backoff_base": 0,
    "retry_backoff_max": 0,
    "stop_timeout": 0,
    "process_grace": 0,
    "worker_gc_threshold": 0,
    "stream_clock_skew": 0,
    "stream_linger": 0,
    "kafka_linger_ms": 0,
    "min_insync_replicas": 0,
    "metrics_port": 0,
}
_ABOVE_ZERO: frozenset[str] = frozenset(
    {
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
        "status_cache_size",
        "stream_buffer",
        "kafka_max_poll_interval_ms",
        "kafka_session_timeout_ms",
        "kafka_heartbeat_interval_ms",
        "kafka_request_timeout_ms",
        "eos_commit_interval",
        "eos_commit_records",
        "eos_transaction_timeout",
        "checkpoint_max_bytes",
    }
)
_CHOICES: dict[str, tuple[str, ...]] = {
    "log_level": tuple(logging.getLevelNamesMapping()),
    "log_format": ("text", "json"),
    "kafka_security_protocol": SECURITY_PROTOCOLS,
    "processing_guarantee": ("at_least_once", "exactly_once"),
    "processing_mode": ("group", "share"),
    "resume_mismatch": ("warn", "error"),
}


def share_group_of(group_id: str) -> str:
    """The share group of the workers of ``group_id`` (processing_mode="share"): a group type
    of its own, so a name of its own."""
    return f"{group_id}.share"


def check_setting(name: str, value: Any) -> None:
    """Raise :class:`ConfigError` if ``value`` is of the wrong type or out of range for setting ``name``."""
    kind = _FIELDS.get(name)
    if kind is None:
        raise ConfigError(f"unknown setting: {name}")
    if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if kind == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if kind == "str" and not isinstance(value, str):
        raise ConfigError(f"{name} must be a str, got {value!r} ({type(value).__name__})")
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    if name in _ABOVE_ZERO and value <= 0:
        raise ConfigError(f"{name} must be greater than 0, got {value!r}")
    if name == "share_delivery_limit" and not 2 <= value <= 10:
        raise ConfigError(f"share_delivery_limit must be 2 to 10 (Kafka's range), got {value!r}")
    if name == "metrics_port" and value > 65535:
        raise ConfigError(f"metrics_port must be a TCP port (0 to 65535), got {value!r}")
    if name in _AT_LEAST and value < _AT_LEAST[name]:
        raise ConfigError(f"{name} must be {_AT_LEAST[name]:g} or more, got {value!r}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"{name} must be one of {', '.join(_CHOICES[name])}, got {value!r}")


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _parse(name: str, kind: str, raw: str) -> Any:
    """The value of ``QTASKS_<NAME>`` as the setting's type; :class:`ConfigError` naming the variable."""
    variable = f"QTASKS_{name.upper()}"
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{variable} must be {'an int' if kind == 'int' else 'a number'}, got {raw!r}") from None
    if kind == "bool":
        word = raw.strip().lower()
        if word not in _TRUE | _FALSE:
            raise ConfigError(f"{variable} must be one of 1, true, yes, on, 0, false, no, off; got {raw!r}")
        return word in _TRUE
    return raw
