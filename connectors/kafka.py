"""Apache Kafka through aiokafka: ``kafka://host:port[,host:port][?option=value&...]``.

The only module that imports aiokafka. It is thin: the engine already speaks Kafka's
shapes (topic partitions, offsets, groups), so this maps calls one to one. What it adds
is what aiokafka leaves to its caller:

- **One error edge.** Every aiokafka call goes through :func:`kafka_errors`, which turns
  any ``KafkaError`` into a :class:`~qtasks.exc.ConnectorError` subclass (pure
  :func:`map_error`, tested as a table) with aiokafka's own ``retriable`` flag.
- **Size limits read from the cluster.** At start the connector reads the broker's
  ``message.max.bytes`` and, after ``ensure_topics``, each topic's ``max.message.bytes``.
  ``send`` checks every record against them before aiokafka sees it: an idempotent
  producer whose batch the broker refuses leaves a gap in its sequence numbers (aiokafka,
  unlike the Java client, does not renumber the batches after it), so every later batch
  to that partition fails with ``OutOfOrderSequenceNumber``. A record over the limit is a
  :class:`~qtasks.exc.RecordTooLargeError` and nothing else is touched.
- **A producer that recovers.** ``flush`` reports the delivery errors of the records sent
  since the previous flush, once each. A failure that breaks the idempotent producer's
  state (a refused batch, ``OutOfOrderSequenceNumber``, ``UnknownProducerId``, a fenced
  epoch) makes it rebuild its aiokafka producer (a new producer id, sequences from 0).
- **Bounded waits.** ``start`` (and a consumer's) gives up after ``connect_timeout``
  with :class:`~qtasks.exc.BrokerUnavailableError`; a send to a topic missing from the
  cluster's metadata gives up after ``max_block`` (Java's ``max.block.ms``), and records
  already queued for a deleted topic are failed instead of being retried for
  ``request_timeout_ms``. Every call can also be cancelled by the caller's own deadline.
- **Quiet outages.** aiokafka logs every failed reconnection at ERROR. A filter on its
  loggers (:func:`install_log_filter`) turns that into one WARNING from ``qtasks.kafka``
  when the broker becomes unreachable and one INFO when it is back; the connector's
  ``reachable`` / ``unreachable_since`` say the same for health checks.
- **No busy loop in an outage.** aiokafka retries a failed metadata update as fast as
  its callers ask for one; :func:`pace_metadata_updates` makes each client wait, doubling
  from ``retry_backoff_ms`` up to a second, after an update that reached no broker.
- **New partitions are seen.** Clients refresh metadata every ``metadata_max_age``
  seconds (Kafka's default is 5 minutes), so a group consumer is assigned partitions
  added to its topics promptly; ``partitions_for(topic, refresh=True)`` asks at once.

- The producer is idempotent with ``acks=all``; ``send`` only enqueues (batched by
  ``linger_ms``), ``flush`` waits for every record.
- Consumers read raw bytes: records are decoded by the engine, never in aiokafka's
  deserializer (an exception there surfaces from ``getmany`` and wedges the partition).
- ``enable_auto_commit`` is off: the worker commits only what is done.
- Topics are created at start; an existing topic with the wrong ``cleanup.policy`` is
  a :class:`~qtasks.exc.TopicConfigError`.

URL query options: ``security_protocol`` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL),
``sasl_mechanism`` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), ``sasl_username``,
``sasl_password``, ``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile`` (also settable as
``kafka_*`` config fields), and the connector's own timings in seconds:
``connect_timeout`` (10), ``max_block`` (10), ``metadata_max_age`` (5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTP
from aiokafka import errors as kafka_exc
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.helpers import create_ssl_context

from qtasks.config import QueueConfig
from qtasks.connectors.base import ClusterAware, Connector, RebalanceListener, Record, TopicPartition, TopicSpec
from qtasks.exc import (
    BrokerUnavailableError,
    CommitFailedError,
    ConfigError,
    ConnectorError,
    RecordTooLargeError,
    TopicConfigError,
)

log = logging.getLogger("qtasks.kafka")

_TOPIC_ALREADY_EXISTS = 36
_URL_OPTIONS = {
    "security_protocol": "kafka_security_protocol",
    "sasl_mechanism": "kafka_sasl_mechanism",
    "sasl_username": "kafka_sasl_username",
    "sasl_password": "kafka_sasl_password",
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
        raise ConfigError(f"kafka URL names no broker: {url!r} (use kafka://host:9092)")
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
        options["sasl_plain_password"] = get("kafka_sasl_password")
    if protocol.endswith("SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=get("kafka_ssl_cafile") or None,
            certfile=get("kafka_ssl_certfile") or None,
            keyfile=get("kafka_ssl_keyfile") or None,
        )
    return options


# -- record sizes (pure) -----------------------------------------------------------------

#: A v2 record batch's header: base offset, length, leader epoch, magic, crc, attributes,
#: last offset delta, two timestamps, producer id and epoch, base sequence, record count.
BATCH_HEADER = 61
#: A record's fixed part at its largest: length varint (5), attributes (1), timestamp delta
#: varint (10), offset delta varint (5). The same upper bound aiokafka's estimate uses.
RECORD_OVERHEAD = 21


def varint_size(n: int) -> int:
    """Bytes of Kafka's zig-zag varint for a length ``n`` >= 0."""
    value = n << 1
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def batch_size(key: bytes | None, value: bytes | None) -> int:
    """An upper bound of the batch one record makes (no headers, no compression).

    The broker compares the whole batch with ``max.message.bytes`` (the
    ``message.max.bytes`` of a topic), so this is what ``send`` checks.
    """
    size = BATCH_HEADER + RECORD_OVERHEAD + 1  # + the header count varint (0 headers)
    for part in (key, value):
        size += 1 if part is None else varint_size(len(part)) + len(part)
    return size


def value_limit(batch_limit: int, key_room: int = KEY_ROOM) -> int:
    """The largest value whose batch, with a key of ``key_room`` bytes, fits ``batch_limit``."""
    budget = batch_limit - BATCH_HEADER - RECORD_OVERHEAD - 1 - varint_size(key_room) - key_room
    value = max(0, budget - 5)
    while value + 1 + varint_size(value + 1) <= budget:
        value += 1
    return value if value + varint_size(value) <= budget else 0


# -- errors (pure mapping, one edge) -----------------------------------------------------

#: Broker or connection did not answer: the call may work later.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    kafka_exc.KafkaConnectionError,
    kafka_exc.NodeNotReadyError,
    kafka_exc.RequestTimedOutError,
    kafka_exc.NoBrokersAvailable,
    kafka_exc.KafkaTimeoutError,
    TimeoutError,
    OSError,
)
_TOO_LARGE: tuple[type[BaseException], ...] = (
    kafka_exc.MessageSizeTooLargeError,
    kafka_exc.RecordTooLargeError,
    kafka_exc.RecordListTooLargeError,
)
#: Failures after which an idempotent producer's state is wrong for good: a new producer
#: id is the only way out (what the Java client does with ``bumpIdempotentEpoch``).
_FATAL: tuple[type[BaseException], ...] = (
    kafka_exc.OutOfOrderSequenceNumber,
    kafka_exc.UnknownProducerId,
    kafka_exc.ProducerFenced,
    kafka_exc.InvalidProducerEpoch,
    kafka_exc.ProducerClosed,
)
_REBALANCE: tuple[type[BaseException], ...] = (
    kafka_exc.CommitFailedError,
    kafka_exc.RebalanceInProgressError,
    kafka_exc.IllegalStateError,
    kafka_exc.IllegalGenerationError,
    kafka_exc.UnknownMemberIdError,
)


def map_error(exc: BaseException, action: str, *, servers: str = "", topic: str | None = None) -> ConnectorError:
    """The qtasks error for an aiokafka error raised while doing ``action``.

    ``retriable`` is aiokafka's own flag, except where the class says more (a broker that
    did not answer may answer later; a rebalance means the records come again).
    """
    if isinstance(exc, ConnectorError):
        return exc
    where = f" ({topic})" if topic else ""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, _TOO_LARGE):
        return RecordTooLargeError(f"{action}{where}: the broker refused a record as too large: {detail}")
    if isinstance(exc, _UNAVAILABLE):
        return BrokerUnavailableError(f"{action}: Kafka at {servers or '?'} did not answer: {detail}")
    if action == "commit" and isinstance(exc, _REBALANCE):
        return CommitFailedError(f"commit refused ({detail}); the records will be delivered again")
    if isinstance(exc, kafka_exc.UnknownTopicOrPartitionError):
        name = repr(topic) if topic else "a topic"
        return ConnectorError(
            f"{action}: {name} does not exist on the cluster (deleted, or not created yet)",
            retriable=bool(exc.retriable),
        )
    return ConnectorError(f"{action}{where}: {detail}", retriable=bool(getattr(exc, "retriable", False)))


def is_fatal(exc: BaseException) -> bool:
    """Whether a failed delivery leaves the idempotent producer unusable until it is rebuilt.

    Any batch the broker refused for good (not retriable) leaves a gap in the partition's
    sequence numbers, so it counts as fatal too.
    """
    return isinstance(exc, _FATAL) or (isinstance(exc, kafka_exc.KafkaError) and not exc.retriable)


@contextlib.contextmanager
def kafka_errors(
    action: str, *, servers: str = "", topic: str | None = None, health: Health | None = None
) -> Iterator[None]:
    """Run aiokafka calls and raise what :func:`map_error` makes of their errors.

    A broker that did not answer is also reported to ``health`` (which then checks it).
    Cancellation passes through untouched.
    """
    try:
        yield
    except ConnectorError:
        raise
    except (kafka_exc.KafkaError, TimeoutError, OSError) as exc:
        error = map_error(exc, action, servers=servers, topic=topic)
        if health is not None and isinstance(error, BrokerUnavailableError):
            health.suspect()
        raise error from exc


def _tp(tp: TopicPartition) -> KafkaTP:
    return KafkaTP(tp.topic, tp.partition)


# -- reachability and quiet logs ---------------------------------------------------------


class Health:
    """Whether the brokers answer, checked by a probe (an ApiVersions round trip).

    Told by :func:`kafka_errors` and the log filter that something failed, it probes; if
    the probe fails too, the brokers are unreachable: one WARNING, then quiet probes with a
    capped backoff until one answers, then one INFO with the outage's length.
    """

    def __init__(self, servers: list[str], options: dict[str, Any], timeout: float) -> None:
        self.servers = servers
        self.where = ",".join(servers)
        self._conn_options = {k: v for k, v in options.items() if k != "bootstrap_servers"}
        self._timeout = timeout
        #: False while the brokers do not answer (for health checks).
        self.reachable = True
        #: Wall-clock time (``time.time()``) the current outage was noticed, else None.
        self.unreachable_since: float | None = None
        self._down_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start listening to the log filter's reports (the connector has started)."""
        self._loop = loop
        _WATCHED.add(self)

    async def close(self) -> None:
        """Stop probing."""
        _WATCHED.discard(self)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def suspect(self) -> None:
        """Something failed to reach the brokers: check (thread-safe, cheap when already checking)."""
        loop = self._loop
        if loop is None or loop.is_closed() or (self._task is not None and not self._task.done()):
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._watch_soon()
        else:
            loop.call_soon_threadsafe(self._watch_soon)

    def _watch_soon(self) -> None:
        if self._loop is not None and (self._task is None or self._task.done()) and self in _WATCHED:
            self._task = self._loop.create_task(self._watch(), name="qtasks-kafka-health")

    async def probe(self) -> None:
        """One ApiVersions round trip with any broker; raises if none answers in time."""
        error: BaseException | None = None
        for server in self.servers:
            host, _, port = server.rpartition(":")
            try:
                async with asyncio.timeout(self._timeout):
                    conn = await create_conn(
                        host or server,
                        int(port or 9092),
                        client_id="qtasks-probe",
                        request_timeout_ms=int(self._timeout * 1000),
                        **self._conn_options,
                    )
            except (kafka_exc.KafkaError, OSError, TimeoutError) as exc:
                error = exc
                continue
            conn.close()
            return
        raise error or BrokerUnavailableError(f"no broker in {self.where}")

    async def wait_until_reachable(self, timeout: float) -> None:
        """Probe until a broker answers; BrokerUnavailableError after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.1
        while True:
            left = deadline - loop.time()
            try:
                async with asyncio.timeout(max(left, 0.001)):
                    await self.probe()
                return
            except (kafka_exc.KafkaError, OSError, TimeoutError) as exc:
                left = deadline - loop.time()
                if left <= 0:
                    raise BrokerUnavailableError(f"cannot reach Kafka at {self.where} within {timeout:g} s") from exc
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)

    async def _watch(self) -> None:
        try:
            await self.probe()
            return  # a blip: nothing to say
        except (kafka_exc.KafkaError, OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
        self.reachable = False
        self.unreachable_since = time.time()
        self._down_at = time.monotonic()
        log.warning("Kafka at %s is unreachable (%s); retrying quietly", self.where, reason)
        delay = 0.25
        while True:
            await asyncio.sleep(delay)
            try:
                await self.probe()
                break
            except (kafka_exc.KafkaError, OSError, TimeoutError):
                delay = min(delay * 2, 2.0)
        log.info("Kafka at %s is back after %.1f s", self.where, time.monotonic() - self._down_at)
        self.reachable = True
        self.unreachable_since = None


_WATCHED: weakref.WeakSet[Health] = weakref.WeakSet()

#: aiokafka messages (their format strings) that only say a connection or a request failed.
_CONNECTION_NOISE = (
    "Unable connect to",
    "Unable to request metadata",
    "Unable to update metadata",
    "Unable to bootstrap",
    "Got error produce response",
    "Failed fetch messages from",
    "Failed fetch offsets from",
    "Error sending",
    "Marking the coordinator dead",
    "Heartbeat send request failed",
    "Heartbeat session expired",
    "Heartbeat failed",
    "Group Coordinator Request failed",
    "FindCoordinator Request failed",
    "Cannot send",
    "Could not send",
    "Coordinator",
    "OffsetCommit failed",
    "LeaveGroup request failed",
    "Unexpected exception in AIOKafkaConnection",
    "Attempt to fetch offsets for partition",
)
_CONNECTION_ERRORS = (
    kafka_exc.KafkaConnectionError,
    kafka_exc.NodeNotReadyError,
    kafka_exc.RequestTimedOutError,
    kafka_exc.NoBrokersAvailable,
    kafka_exc.CoordinatorNotAvailableError,
    kafka_exc.NotCoordinatorError,
    kafka_exc.GroupCoordinatorNotAvailableError,
    OSError,
    TimeoutError,
)


class AiokafkaLogFilter(logging.Filter):
    """Turns aiokafka's logging into what an operator needs.

    - A connection failure or retry: dropped (kept at DEBUG if aiokafka's logger shows
      DEBUG), and every started connector is asked to check its brokers, which log one
      WARNING when they stop answering and one INFO when they are back.
    - Any other ERROR: shown at WARNING, once per distinct message per ``every`` seconds.
    - Everything else: DEBUG.
    """

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self.every = every
        self._seen: dict[str, float] = {}
        #: aiokafka records turned into DEBUG so far (dropped unless aiokafka logs at DEBUG).
        self.demoted = 0
        #: aiokafka records this filter was given so far, whatever became of them.
        self.seen = 0

    @staticmethod
    def is_connection_noise(record: logging.LogRecord) -> bool:
        """Whether the record only says that a connection or a request to a broker failed."""
        message = str(record.msg)
        if message.startswith(_CONNECTION_NOISE):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        exc = record.exc_info[1] if record.exc_info else None
        return any(isinstance(a, _CONNECTION_ERRORS) for a in (*args, exc))

    def filter(self, record: logging.LogRecord) -> bool:
        self.seen += 1
        if record.levelno >= logging.WARNING and self.is_connection_noise(record):
            for health in list(_WATCHED):
                health.suspect()
            return self._demote(record)
        if record.levelno >= logging.ERROR:
            now = time.monotonic()
            key = f"{record.name}:{record.msg}"
            if now - self._seen.get(key, -self.every) < self.every:
                return self._demote(record)
            self._seen[key] = now
            if len(self._seen) > 1000:
                self._seen.clear()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        return self._demote(record)

    def _demote(self, record: logging.LogRecord) -> bool:
        self.demoted += 1
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_FILTER = AiokafkaLogFilter()


def install_log_filter() -> AiokafkaLogFilter:
    """Put :class:`AiokafkaLogFilter` on every aiokafka logger (idempotent; returns it)."""
    names = [n for n in list(logging.Logger.manager.loggerDict) if n == "aiokafka" or n.startswith("aiokafka.")]
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    return _FILTER


# -- metadata pacing --------------------------------------------------------------------

#: The longest wait between two failed metadata updates (Java's ``retry.backoff.max.ms``).
METADATA_BACKOFF_MAX = 1.0


def pace_metadata_updates(client: Any, cap: float = METADATA_BACKOFF_MAX) -> None:
    """Make an ``AIOKafkaClient`` wait after a metadata update that failed, before it reports so.

    Why: aiokafka's loops ask for metadata when a partition has no known leader and wait
    for the answer, with no backoff of their own: the producer's sender
    (``Sender._sender_routine``: a queued batch whose leader is unknown or -1) and the
    consumer's fetcher (``Fetcher._fetcher_routine``: ``invalid_metadata``). A broker that
    shuts down tells its clients that its partitions have no leader (-1) before it closes
    its port; from then on every update fails at once (connection refused) and the loop
    goes round again: tens of thousands of updates, and as many ERROR records, a second,
    one core busy for the whole outage.

    How: the update (``AIOKafkaClient._metadata_update``, run by the client's
    ``_md_synchronizer`` task) waits ``retry_backoff_ms`` after a failure, doubling up to
    ``cap`` seconds, and returns only then; every caller waiting for that update waits
    too. A successful update resets the wait. Set on the instance: aiokafka itself is
    untouched, and the first update after an outage is at most ``cap`` seconds late.
    """
    update = client._metadata_update
    first = max(float(client._retry_backoff), 0.01)
    delay = first

    async def paced(cluster_metadata: Any, topics: Any) -> bool:
        nonlocal delay
        updated = bool(await update(cluster_metadata, topics))
        if updated:
            delay = first
        else:
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)
        return updated

    client._metadata_update = paced


# -- producer ----------------------------------------------------------------------------


class KafkaProducer:
    """An idempotent ``acks=all`` producer: sizes checked before sending, errors reported once.

    ``send`` refuses a record larger than its topic takes (:class:`RecordTooLargeError`)
    before aiokafka sees it. ``flush`` raises the delivery errors of the records sent since
    the previous flush; after a failure that broke the idempotent state it rebuilds the
    aiokafka producer, so later sends work.
    """

    def __init__(self, connector: KafkaConnector) -> None:
        self._connector = connector
        self._client: AIOKafkaProducer | None = None
        self._batch_size = _BATCH_SIZE
        # The last delivery of each partition. An idempotent producer writes a partition's
        # batches in order, and a failed batch fails the ones after it (their sequence
        # numbers no longer follow), so the last delivery tells both the partition's end
        # and whether anything failed; no callback per record is needed.
        self._last: dict[tuple[str, int], asyncio.Future[Any]] = {}
        self._ends: dict[tuple[str, int], int] = {}
        #: Failed deliveries not reported by a flush yet.
        self._failed: list[tuple[tuple[str, int], BaseException]] = []
        #: When each topic with queued records was first seen missing from the metadata.
        self._missing_since: dict[str, float] = {}
        self._rebuilding: asyncio.Lock | None = None
        self.rebuilds = 0

    def _new_client(self) -> AIOKafkaProducer:
        c = self._connector
        producer = AIOKafkaProducer(
            **c.options,
            client_id=c.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=c.config.kafka_linger_ms,
            max_batch_size=self._batch_size,
            # Our own size check (``send``) is the one that counts; aiokafka's must never
            # refuse first, so its bound is the largest limit the cluster has.
            max_request_size=c.largest_limit() + 64 * 1024,
            request_timeout_ms=c.config.kafka_request_timeout_ms,
            metadata_max_age_ms=int(c.timings.metadata_max_age * 1000),
        )
        pace_metadata_updates(producer.client)
        return producer

    async def start(self) -> None:
        """Connect (the connector has checked that a broker answers)."""
        client = self._new_client()
        try:
            with kafka_errors("start the producer", servers=self._connector.where, health=self._connector.health):
                await client.start()
        except BaseException:
            await asyncio.shield(client.stop())
            raise
        self._client = client

    async def stop(self) -> None:
        """Deliver what is pending, then disconnect."""
        client, self._client = self._client, None
        if client is not None:
            await client.stop()

    @property
    def client(self) -> AIOKafkaProducer:
        if self._client is None:
            raise ConnectorError("the Kafka producer is not started")
        return self._client

    async def resize(self, batch_limit: int) -> None:
        """Keep batches within the smallest limit (a batch over it would be refused whole)."""
        size = min(_BATCH_SIZE, batch_limit)
        if size < self._batch_size:
            self._batch_size = size
            await self._rebuild(f"a topic takes batches of at most {batch_limit} bytes", logging.INFO)

    async def _rebuild(self, why: str, level: int = logging.WARNING) -> None:
        """Replace the aiokafka producer (a new producer id: sequence numbers start again)."""
        if self._rebuilding is None:
            self._rebuilding = asyncio.Lock()
        async with self._rebuilding:
            old = self._client
            if old is None:
                return
            log.log(level, "restarting the Kafka producer: %s", why)
            # Sends wait meanwhile (``_current``): the old producer finishes (or fails)
            # what it holds first, so a partition's records keep their order.
            self._client = None
            try:
                await old.stop()
            finally:
                self._settle()
            await self.start()
            self.rebuilds += 1

    async def _current(self) -> AIOKafkaProducer:
        if self._client is None and self._rebuilding is not None and self._rebuilding.locked():
            async with self._rebuilding:
                pass
        return self.client

    def _settle(self) -> None:
        """Fold finished last deliveries into the known ends and the failures to report."""
        for key, fut in list(self._last.items()):
            if fut.done():
                del self._last[key]
                self._fold(key, fut)

    def _fold(self, key: tuple[str, int], fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._failed.append((key, exc))
            return
        offset = fut.result().offset
        if offset >= self._ends.get(key, 0):
            self._ends[key] = offset + 1

    def known_end(self, topic: str, partition: int) -> int | None:
        """One past the highest offset this producer knows it wrote to the partition (None: none yet)."""
        last = self._last.get((topic, partition))
        if last is not None and last.done():
            self._settle()
        return self._ends.get((topic, partition))

    def check_size(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        """RecordTooLargeError if the record's batch is over what ``topic`` takes."""
        size = batch_size(key, value)
        limit = self._connector.batch_limit(topic)
        if size > limit:
            raise RecordTooLargeError(
                f"a record for {topic} is {len(value or b'')} bytes ({size} bytes as a batch); the topic takes "
                f"at most {limit} bytes per batch (values up to {self._connector.record_limit(topic)} bytes): "
                "it was not sent"
            )

    async def send(self, topic: str, value: bytes | None, *, key: bytes | None, partition: int) -> asyncio.Future[Any]:
        """Enqueue a record (waits only when the producer's buffer is full); return its delivery."""
        self.check_size(topic, key, value)
        c = self._connector
        with kafka_errors("send", servers=c.where, topic=topic, health=c.health):
            client = await self._current()
            await self._ensure_partition(client, topic, partition)
            try:
                fut: asyncio.Future[Any] = await client.send(topic, value, key=key, partition=partition)
            except _FATAL as exc:
                # The sender died (its error is kept by the accumulator): start again, once.
                await self._rebuild(f"it failed: {exc!r}")
                fut = await self.client.send(topic, value, key=key, partition=partition)
        key_ = (topic, partition)
        previous = self._last.get(key_)
        if previous is not None and previous.done():
            self._fold(key_, previous)
        self._last[key_] = fut
        return self._mapped(fut, topic, partition)

    def _mapped(self, fut: asyncio.Future[Any], topic: str, partition: int) -> asyncio.Future[Any]:
        """The delivery as the engine sees it: a failure is a ConnectorError, and a fatal one restarts the producer.

        Its error is marked as retrieved at once: a caller that does not await a delivery
        still learns of the failure from the next ``flush``.
        """
        mapped: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sender = self._client

        def done(raw: asyncio.Future[Any]) -> None:
            if raw.cancelled():
                mapped.cancel()
                return
            exc = raw.exception()
            if exc is None:
                mapped.set_result(raw.result())
                return
            where = f"deliver to {topic}[{partition}]"
            mapped.set_exception(map_error(exc, where, servers=self._connector.where, topic=topic))
            mapped.exception()
            if is_fatal(exc) and sender is not None and sender is self._client:
                asyncio.get_running_loop().create_task(self._rebuild_once(sender, f"a delivery failed: {exc!r}"))

        fut.add_done_callback(done)
        return mapped

    async def _rebuild_once(self, sender: AIOKafkaProducer, why: str) -> None:
        """Rebuild after a fatal delivery failure, unless another rebuild replaced ``sender`` already."""
        if self._rebuilding is not None and self._rebuilding.locked():
            async with self._rebuilding:
                pass
        if self._client is sender:
            await self._rebuild(why)

    async def _ensure_partition(self, producer: AIOKafkaProducer, topic: str, partition: int) -> None:
        """The topic's metadata, within ``max_block``; a refresh for a partition not seen yet."""
        client = producer.client
        known = client.cluster.partitions_for_topic(topic)
        if known and partition in known:
            return
        timing = self._connector.timings
        try:
            async with asyncio.timeout(timing.max_block):
                known = await client._wait_on_metadata(topic)
                if partition not in known:
                    await client.force_metadata_update()
                    known = client.cluster.partitions_for_topic(topic) or set()
        except TimeoutError:
            if not self._connector.health.reachable:
                raise BrokerUnavailableError(
                    f"send to {topic}: Kafka at {self._connector.where} is unreachable"
                ) from None
            raise ConnectorError(
                f"send: topic {topic!r} is not in the cluster's metadata after {timing.max_block:g} s "
                "(it does not exist or was deleted)",
                retriable=True,
            ) from None
        if partition not in known:
            raise ConnectorError(f"send: topic {topic!r} has no partition {partition} (it has {len(known)})")

    async def flush(self) -> None:
        """Wait until every enqueued record is written; raise the delivery errors since the last flush.

        Records queued for a topic that disappeared from the cluster are failed once it
        has been missing for ``max_block`` seconds, instead of retried for the request timeout.
        """
        client = await self._current()
        waiter = asyncio.ensure_future(client.flush())
        try:
            while not waiter.done():
                await asyncio.wait([waiter], timeout=0.25)
                if not waiter.done():
                    self._fail_orphans(client)
        finally:
            if not waiter.done():
                waiter.cancel()
        self._settle()
        failed, self._failed = self._failed, []
        if not failed:
            return
        if any(is_fatal(exc) for _, exc in failed):
            await self._rebuild_once(client, f"a delivery failed: {failed[0][1]!r}")
        (topic, partition), first = failed[0]
        error = map_error(first, f"deliver to {topic}[{partition}]", servers=self._connector.where, topic=topic)
        more = f" (and {len(failed) - 1} more partition(s))" if len(failed) > 1 else ""
        raise type(error)(f"a record was not delivered{more}: {error}", retriable=error.retriable) from first

    def _fail_orphans(self, client: AIOKafkaProducer) -> None:
        """Fail batches queued for topics missing from the metadata for ``max_block`` seconds.

        aiokafka keeps such a batch until ``request_timeout_ms`` and asks for metadata in a
        loop meanwhile; a deleted topic never comes back, so the wait only burns CPU.
        """
        cluster = client.client.cluster
        accumulator = client._message_accumulator
        now = time.monotonic()
        topics = {tp.topic for tp in accumulator._batches}
        for topic in list(self._missing_since):
            if topic not in topics or cluster.partitions_for_topic(topic) is not None:
                del self._missing_since[topic]
        for topic in topics:
            if cluster.partitions_for_topic(topic) is not None:
                continue
            since = self._missing_since.setdefault(topic, now)
            if now - since < self._connector.timings.max_block:
                continue
            error = kafka_exc.UnknownTopicOrPartitionError(f"topic {topic!r} is gone from the cluster")
            for tp in [tp for tp in accumulator._batches if tp.topic == topic]:
                for batch in accumulator._batches.pop(tp):
                    batch.failure(exception=error)
            del self._missing_since[topic]

    async def partitions_for(self, topic: str, *, refresh: bool = False) -> int:
        """Partitions of a topic, from the cluster's metadata (asked again with ``refresh``)."""
        client = self.client.client
        c = self._connector
        with kafka_errors("read the partitions", servers=c.where, topic=topic, health=c.health):
            async with asyncio.timeout(c.timings.max_block):
                if refresh:
                    client.add_topic(topic)
                    await client.force_metadata_update()
                partitions = await client._wait_on_metadata(topic)
        return len(partitions)


# -- consumer ----------------------------------------------------------------------------


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, listener: RebalanceListener) -> None:
        self._listener = listener

    async def on_partitions_revoked(self, revoked: Iterable[KafkaTP]) -> None:
        await self._listener.on_partitions_revoked({TopicPartition(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[KafkaTP]) -> None:
        await self._listener.on_partitions_assigned({TopicPartition(tp.topic, tp.partition) for tp in assigned})


class KafkaConsumer:
    """A Kafka consumer with auto-commit off, reading raw bytes; every call maps its errors."""

    def __init__(self, connector: KafkaConnector, group_id: str | None, client_id: str, max_wait_ms: int) -> None:
        config = connector.config
        extra: dict[str, Any] = {}
        if group_id:
            extra.update(
                max_poll_interval_ms=config.kafka_max_poll_interval_ms,
                session_timeout_ms=config.kafka_session_timeout_ms,
                heartbeat_interval_ms=config.kafka_heartbeat_interval_ms,
            )
        self._connector = connector
        self._consumer = AIOKafkaConsumer(
            **connector.options,
            **extra,
            group_id=group_id,
            client_id=client_id or "qtasks",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Data returns as soon as it arrives; this bounds how long a seek or a new
            # assignment waits for the fetch in flight.
            fetch_max_wait_ms=max_wait_ms,
            # The broker returns a batch larger than this anyway (KIP-74); sized so the
            # largest record the cluster takes comes back in one fetch.
            max_partition_fetch_bytes=max(1_048_576, connector.largest_limit()),
            request_timeout_ms=config.kafka_request_timeout_ms,
            # A group member sees partitions added to its topics at its next metadata
            # refresh, then the group rebalances (Kafka's default waits 5 minutes).
            metadata_max_age_ms=int(connector.timings.metadata_max_age * 1000),
        )
        pace_metadata_updates(self._consumer._client)
        self._subscription: tuple[list[str], RebalanceListener] | None = None

    @contextlib.contextmanager
    def _errors(self, action: str, topic: str | None = None) -> Iterator[None]:
        with kafka_errors(action, servers=self._connector.where, topic=topic, health=self._connector.health):
            yield

    async def start(self) -> None:
        """Connect (within ``connect_timeout``), and join the group if subscribed.

        A failed or cancelled start leaves nothing running.
        """
        try:
            await self._connector.health.wait_until_reachable(self._connector.timings.connect_timeout)
            with self._errors("start a consumer"):
                async with asyncio.timeout(self._connector.timings.connect_timeout):
                    await self._consumer.start()
            if self._subscription is not None:
                topics, listener = self._subscription
                self._consumer.subscribe(topics=topics, listener=_Listener(listener))
        except BaseException:
            await asyncio.shield(self._consumer.stop())
            raise

    async def stop(self) -> None:
        """Leave the group and disconnect."""
        await self._consumer.stop()

    def subscribe(self, topics: list[str], listener: RebalanceListener) -> None:
        """Join the consumer group for these topics (at ``start``)."""
        self._subscription = (list(topics), listener)

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read these partitions (no group)."""
        with self._errors("assign"):
            self._consumer.assign([_tp(tp) for tp in partitions])

    def assignment(self) -> set[TopicPartition]:
        """The partitions read now."""
        return {TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset``."""
        with self._errors("seek", tp.topic):
            self._consumer.seek(_tp(tp), offset)

    async def seek_to_end(self, partitions: Iterable[TopicPartition]) -> None:
        """Read only new records."""
        with self._errors("seek to the end"):
            await self._consumer.seek_to_end(*[_tp(tp) for tp in partitions])

    async def seek_to_beginning(self, partitions: Iterable[TopicPartition]) -> None:
        """Read from the oldest record kept."""
        with self._errors("seek to the beginning"):
            await self._consumer.seek_to_beginning(*[_tp(tp) for tp in partitions])

    async def getmany(self, timeout: float, max_records: int | None = None) -> list[Record]:
        """Records from the unpaused partitions, waiting up to ``timeout`` seconds."""
        with self._errors("read"):
            try:
                batches = await self._consumer.getmany(timeout_ms=max(0, int(timeout * 1000)), max_records=max_records)
            except kafka_exc.IllegalStateError:
                # No assignment yet (the group is still joining): nothing to return.
                await asyncio.sleep(min(timeout, 0.1))
                return []
        return [
            Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
            for records in batches.values()
            for r in records
        ]

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit the next offsets to read; a rebalance makes it a :class:`CommitFailedError`."""
        with self._errors("commit"):
            await self._consumer.commit({_tp(tp): offset for tp, offset in offsets.items()})

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop fetching these partitions; the group membership stays."""
        owned = self._consumer.assignment()
        self._consumer.pause(*[t for t in map(_tp, partitions) if t in owned])

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        """Fetch these partitions again."""
        owned = self._consumer.assignment()
        self._consumer.resume(*[t for t in map(_tp, partitions) if t in owned])

    async def position(self, tp: TopicPartition) -> int:
        """The next offset this consumer returns from ``tp``."""
        with self._errors("read the position", tp.topic):
            return int(await self._consumer.position(_tp(tp)))

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The next offset of each partition."""
        with self._errors("read the end offsets"):
            ends = await self._consumer.end_offsets([_tp(tp) for tp in partitions])
        return {TopicPartition(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}

    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict[TopicPartition, int | None]:
        """The first offset at or after each timestamp (ms), or None."""
        with self._errors("look up offsets by time"):
            found = await self._consumer.offsets_for_times({_tp(tp): max(0, ts) for tp, ts in timestamps.items()})
        return {
            TopicPartition(tp.topic, tp.partition): (None if hit is None else int(hit.offset))
            for tp, hit in found.items()
        }


# -- connector ---------------------------------------------------------------------------


class KafkaConnector:
    """The connector for ``kafka://`` URLs."""

    def __init__(self, url: str, config: QueueConfig, client_id: str = "qtasks") -> None:
        self.url = url
        self.config = config
        self.servers, overrides = parse_url(url)
        self.where = ",".join(self.servers)
        self.timings = timings(overrides)
        self.options = client_options(self.servers, config, overrides)
        self.client_id = client_id
        self.health = Health(self.servers, self.options, min(self.timings.connect_timeout, 5.0))
        #: The broker's ``message.max.bytes`` (Kafka's default until read at start).
        self.broker_limit = _DEFAULT_LIMIT
        #: Each qtasks topic's ``max.message.bytes``, read after ``ensure_topics``.
        self.topic_limits: dict[str, int] = {}
        self._producer: KafkaProducer | None = None
        install_log_filter()

    # -- health ----------------------------------------------------------------------

    @property
    def reachable(self) -> bool:
        """False while the brokers do not answer (one WARNING when it starts, one INFO when it ends)."""
        return self.health.reachable

    @property
    def unreachable_since(self) -> float | None:
        """When (``time.time()``) the current outage was noticed; None while reachable."""
        return self.health.unreachable_since

    # -- limits ----------------------------------------------------------------------

    def batch_limit(self, topic: str) -> int:
        """The largest batch ``topic`` takes: its ``max.message.bytes``, else the broker's."""
        return self.topic_limits.get(topic, self.broker_limit)

    def record_limit(self, topic: str) -> int:
        """The largest value ``send`` takes for ``topic``, with a key of up to ``KEY_ROOM`` bytes.

        It is the topic's limit less the batch header (61 bytes), a record's fixed part at
        its largest (21) and the key; a value at the limit is delivered, one byte more is a
        :class:`RecordTooLargeError` (with a key of ``KEY_ROOM`` bytes).
        """
        return value_limit(self.batch_limit(topic))

    def largest_limit(self) -> int:
        """The largest batch any known topic takes."""
        return max([self.broker_limit, *self.topic_limits.values()])

    # -- life ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the producer and read the broker's size limit, within ``connect_timeout``.

        BrokerUnavailableError if no broker answers in time; a caller's own deadline
        (cancellation) is honoured too. A failed or cancelled start leaves nothing running.
        """
        if self._producer is not None:
            return
        self.health.attach(asyncio.get_running_loop())
        timeout = self.timings.connect_timeout
        producer = KafkaProducer(self)
        try:
            await self.health.wait_until_reachable(timeout)
            try:
                async with asyncio.timeout(timeout):
                    self.broker_limit = await self._read_broker_limit()
                    await producer.start()
            except TimeoutError:
                raise BrokerUnavailableError(f"cannot reach Kafka at {self.where} within {timeout:g} s") from None
        except BaseException:
            await asyncio.shield(self._abandon(producer))
            raise
        self._producer = producer

    async def _abandon(self, producer: KafkaProducer) -> None:
        await producer.stop()
        await self.health.close()

    async def stop(self) -> None:
        """Deliver pending records and disconnect."""
        producer, self._producer = self._producer, None
        try:
            if producer is not None:
                await producer.stop()
        finally:
            await self.health.close()

    @property
    def producer(self) -> KafkaProducer:
        """The connector's producer (after ``start``)."""
        if self._producer is None:
            raise ConnectorError("the Kafka connector is not started")
        return self._producer

    def consumer(
        self, group_id: str | None = None, *, client_id: str = "", max_wait_ms: int | None = None
    ) -> KafkaConsumer:
        """A new consumer; with ``group_id`` it can ``subscribe`` as a group member.

        ``max_wait_ms`` is how long the broker holds an empty fetch (``fetch.max.wait.ms``);
        a seek or a new assignment takes effect only after the fetch in flight returns, so a
        reader that seeks often wants it short.
        """
        return KafkaConsumer(self, group_id, client_id, max_wait_ms or 100)

    async def partitions_for(self, topic: str, *, refresh: bool = False) -> int:
        """How many partitions a topic has; ``refresh`` asks the cluster now instead of the cached metadata."""
        return await self.producer.partitions_for(topic, refresh=refresh)

    # -- admin -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _admin(self) -> Any:
        admin = AIOKafkaAdminClient(
            **self.options,
            client_id=f"{self.client_id}-admin",
            request_timeout_ms=self.config.kafka_request_timeout_ms,
        )
        try:
            with kafka_errors("connect the admin client", servers=self.where, health=self.health):
                async with asyncio.timeout(self.timings.connect_timeout):
                    await admin.start()
            yield admin
        finally:
            await asyncio.shield(admin.close())

    async def _read_broker_limit(self) -> int:
        async with self._admin() as admin:
            with kafka_errors("describe the broker", servers=self.where, health=self.health):
                nodes = [b.nodeId for b in admin._client.cluster.brokers()]
                limits = await self._describe(admin, ConfigResourceType.BROKER, [str(n) for n in nodes[:1]])
        return min(limits.values(), default=_DEFAULT_LIMIT)

    @staticmethod
    async def _describe(admin: AIOKafkaAdminClient, kind: ConfigResourceType, names: list[str]) -> dict[str, int]:
        """``message.max.bytes`` of brokers, or ``max.message.bytes`` of topics, by name."""
        key = "message.max.bytes" if kind == ConfigResourceType.BROKER else "max.message.bytes"
        found: dict[str, int] = {}
        if not names:
            return found
        resources = [ConfigResource(kind, name, configs={key: None}) for name in names]
        for response in await admin.describe_configs(resources):
            for resource in response.to_object()["resources"]:
                for entry in resource["config_entries"]:
                    if entry["config_names"] == key and entry["config_value"]:
                        found[resource["resource_name"]] = int(entry["config_value"])
        return found

    async def ensure_topics(self, specs: list[TopicSpec]) -> None:
        """Create missing topics; check that existing ones have the cleanup policy qtasks needs; read their limits."""
        async with self._admin() as admin:
            with kafka_errors("prepare the topics", servers=self.where, health=self.health):
                await self._ensure(admin, specs)
                limits = await self._describe(admin, ConfigResourceType.TOPIC, [s.name for s in specs])
        self.topic_limits.update(limits)
        if self._producer is not None and limits:
            await self._producer.resize(min(limits.values()))

    async def _ensure(self, admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(
                        s.name,
                        s.partitions,
                        s.replication_factor,
                        topic_configs={"cleanup.policy": "compact" if s.compacted else "delete", **s.config},
                    )
                    for s in missing
                ]
            )
            for error in response.to_object()["topic_errors"]:
                code = error["error_code"]
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    message = error.get("error_message") or f"error code {code}"
                    raise ConnectorError(f"could not create topic {error['topic']!r}: {message}")
        present = [s for s in specs if s.name in existing]
        if present:
            await self._check_policies(admin, present)
        if missing:
            await self._wait_for_leaders(admin, [s.name for s in missing])

    @staticmethod
    async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], timeout: float = 30.0) -> None:
        """New topics need a leader for every partition before clients use them."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            topics = await admin.describe_topics(names)
            ready = all(
                t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
                for t in topics
            )
            if ready or asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.05)

    @staticmethod
    async def _check_policies(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> None:
        resources = [ConfigResource(ConfigResourceType.TOPIC, s.name, configs={"cleanup.policy": None}) for s in specs]
        policies: dict[str, str] = {}
        for response in await admin.describe_configs(resources):
            for resource in response.to_object()["resources"]:
                for entry in resource["config_entries"]:
                    if entry["config_names"] == "cleanup.policy":
                        policies[resource["resource_name"]] = entry["config_value"] or ""
        for spec in specs:
            policy = set(policies.get(spec.name, "delete").split(","))
            if spec.compacted and "compact" not in policy:
                raise TopicConfigError(
                    f"topic {spec.name!r} exists with cleanup.policy={','.join(sorted(policy))}; the status topic "
                    "must be compacted (cleanup.policy=compact): delete it or change its policy"
                )
            if not spec.compacted and policy == {"compact"}:
                raise TopicConfigError(
                    f"topic {spec.name!r} exists with cleanup.policy=compact; qtasks needs delete for it: "
                    "delete the topic or change its policy"
                )


def _conforms(connector: KafkaConnector) -> tuple[Connector, ClusterAware]:
    """Checked by mypy: the Kafka connector offers the whole seam."""
    return connector, connector
