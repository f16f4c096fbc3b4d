"""Apache Kafka through aiokafka: ``kafka://host:port[,host:port][?option=value&...]``.

The only module that imports aiokafka. It is thin: the engine already speaks Kafka's
shapes (topic partitions, offsets, groups), so this maps calls one to one and turns
aiokafka's errors into qtasks' (with ``retriable``).

- The producer is idempotent with ``acks=all``; ``send`` only enqueues (batched by
  ``linger_ms``), ``flush`` waits for every record and raises the first delivery error.
- Consumers read raw bytes: records are decoded by the engine, never in aiokafka's
  deserializer (an exception there surfaces from ``getmany`` and wedges the partition).
- ``enable_auto_commit`` is off: the worker commits only what is done.
- Topics are created at start; an existing topic with the wrong ``cleanup.policy`` is
  a :class:`~qtasks.exc.TopicConfigError`.

URL query options (also settable as ``kafka_*`` config fields): ``security_protocol``
(PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL), ``sasl_mechanism`` (PLAIN, SCRAM-SHA-256,
SCRAM-SHA-512), ``sasl_username``, ``sasl_password``, ``ssl_cafile``, ``ssl_certfile``,
``ssl_keyfile``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, unquote

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTP
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import CommitFailedError as KafkaCommitFailed
from aiokafka.errors import IllegalStateError, KafkaError, RebalanceInProgressError
from aiokafka.helpers import create_ssl_context

from qtasks.config import QueueConfig
from qtasks.connectors.base import RebalanceListener, Record, TopicPartition, TopicSpec
from qtasks.exc import CommitFailedError, ConfigError, ConnectorError, TopicConfigError

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


def parse_url(url: str) -> tuple[list[str], dict[str, str]]:
    """``kafka://h1:9092,h2:9092?security_protocol=SSL`` -> (["h1:9092", "h2:9092"], {"kafka_security_protocol": "SSL"})."""
    rest = url.partition("://")[2]
    hosts, _, query = rest.partition("?")
    servers = [h.strip() for h in hosts.strip("/").split(",") if h.strip()]
    if not servers:
        raise ConfigError(f"kafka URL names no broker: {url!r} (use kafka://host:9092)")
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _URL_OPTIONS:
            raise ConfigError(f"unknown kafka URL option {name!r}; known: {', '.join(sorted(_URL_OPTIONS))}")
        options[_URL_OPTIONS[name]] = unquote(value)
    return servers, options


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


def _tp(tp: TopicPartition) -> KafkaTP:
    return KafkaTP(tp.topic, tp.partition)


class KafkaProducer:
    """An idempotent ``acks=all`` producer; delivery errors are raised by ``flush``."""

    def __init__(self, options: dict[str, Any], config: QueueConfig, client_id: str) -> None:
        self._producer = AIOKafkaProducer(
            **options,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=config.kafka_linger_ms,
            max_batch_size=256 * 1024,
            # A record up to max_record_bytes plus its envelope must fit in one request.
            max_request_size=max(1_048_576, config.max_record_bytes + 64 * 1024),
            request_timeout_ms=config.kafka_request_timeout_ms,
        )
        # The last delivery of each partition. An idempotent producer writes a partition's
        # batches in order, and a failed batch fails the ones after it, so the last
        # delivery tells both the partition's end and whether anything failed; no
        # callback per record is needed.
        self._last: dict[tuple[str, int], asyncio.Future[Any]] = {}
        self._ends: dict[tuple[str, int], int] = {}
        #: A failed delivery stays reported: every later flush raises it, so no offset is
        #: committed past a record that was lost (the worker must be restarted).
        self._error: BaseException | None = None

    async def start(self) -> None:
        """Connect."""
        await self._producer.start()

    async def stop(self) -> None:
        """Deliver what is pending, then disconnect."""
        await self._producer.stop()

    def _settle(self) -> BaseException | None:
        """Fold finished last deliveries into the known ends; return the first error among them."""
        error: BaseException | None = None
        for key, fut in list(self._last.items()):
            if not fut.done():
                continue
            del self._last[key]
            if fut.cancelled():
                continue
            exc = fut.exception()
            if exc is not None:
                error = error or exc
                if self._error is None:
                    self._error = exc
                    log.error("a record to %s[%d] was not delivered: %s", key[0], key[1], exc)
                continue
            offset = fut.result().offset
            if offset >= self._ends.get(key, 0):
                self._ends[key] = offset + 1
        return error

    def known_end(self, topic: str, partition: int) -> int | None:
        """One past the highest offset this producer knows it wrote to the partition (None: none yet)."""
        last = self._last.get((topic, partition))
        if last is not None and last.done():
            self._settle()
        return self._ends.get((topic, partition))

    async def send(self, topic: str, value: bytes | None, *, key: bytes | None, partition: int) -> asyncio.Future[Any]:
        """Enqueue a record (waits only when the producer's buffer is full); return its delivery."""
        try:
            fut: asyncio.Future[Any] = await self._producer.send(topic, value, key=key, partition=partition)
        except KafkaError as exc:
            raise ConnectorError(f"could not send to {topic}: {exc}", retriable=exc.retriable) from exc
        self._last[(topic, partition)] = fut
        return fut

    async def flush(self) -> None:
        """Wait until every enqueued record is written; raise the first delivery error since the last flush."""
        await self._producer.flush()
        self._settle()
        error = self._error
        if error is not None:
            raise ConnectorError(f"a record was not delivered: {error}", retriable=getattr(error, "retriable", False))

    async def partitions_for(self, topic: str) -> int:
        """Partitions of a topic, from the cluster's metadata."""
        return len(await self._producer.partitions_for(topic))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, listener: RebalanceListener) -> None:
        self._listener = listener

    async def on_partitions_revoked(self, revoked: Iterable[KafkaTP]) -> None:
        await self._listener.on_partitions_revoked({TopicPartition(tp.topic, tp.partition) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[KafkaTP]) -> None:
        await self._listener.on_partitions_assigned({TopicPartition(tp.topic, tp.partition) for tp in assigned})


class KafkaConsumer:
    """A Kafka consumer with auto-commit off, reading raw bytes."""

    def __init__(
        self, options: dict[str, Any], config: QueueConfig, group_id: str | None, client_id: str, max_wait_ms: int
    ) -> None:
        extra: dict[str, Any] = {}
        if group_id:
            extra.update(
                max_poll_interval_ms=config.kafka_max_poll_interval_ms,
                session_timeout_ms=config.kafka_session_timeout_ms,
                heartbeat_interval_ms=config.kafka_heartbeat_interval_ms,
            )
        self._consumer = AIOKafkaConsumer(
            **options,
            **extra,
            group_id=group_id,
            client_id=client_id or "qtasks",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # Data returns as soon as it arrives; this bounds how long a seek or a new
            # assignment waits for the fetch in flight.
            fetch_max_wait_ms=max_wait_ms,
            max_partition_fetch_bytes=max(1_048_576, config.max_record_bytes + 64 * 1024),
            request_timeout_ms=config.kafka_request_timeout_ms,
        )
        self._subscription: tuple[list[str], RebalanceListener] | None = None

    async def start(self) -> None:
        """Connect, and join the group if subscribed."""
        await self._consumer.start()
        if self._subscription is not None:
            topics, listener = self._subscription
            self._consumer.subscribe(topics=topics, listener=_Listener(listener))

    async def stop(self) -> None:
        """Leave the group and disconnect."""
        await self._consumer.stop()

    def subscribe(self, topics: list[str], listener: RebalanceListener) -> None:
        """Join the consumer group for these topics (at ``start``)."""
        self._subscription = (list(topics), listener)

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read these partitions (no group)."""
        self._consumer.assign([_tp(tp) for tp in partitions])

    def assignment(self) -> set[TopicPartition]:
        """The partitions read now."""
        return {TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset``."""
        self._consumer.seek(_tp(tp), offset)

    async def seek_to_end(self, partitions: Iterable[TopicPartition]) -> None:
        """Read only new records."""
        await self._consumer.seek_to_end(*[_tp(tp) for tp in partitions])

    async def seek_to_beginning(self, partitions: Iterable[TopicPartition]) -> None:
        """Read from the oldest record kept."""
        await self._consumer.seek_to_beginning(*[_tp(tp) for tp in partitions])

    async def getmany(self, timeout: float, max_records: int | None = None) -> list[Record]:
        """Records from the unpaused partitions, waiting up to ``timeout`` seconds."""
        try:
            batches = await self._consumer.getmany(timeout_ms=max(0, int(timeout * 1000)), max_records=max_records)
        except IllegalStateError:
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
        try:
            await self._consumer.commit({_tp(tp): offset for tp, offset in offsets.items()})
        except (KafkaCommitFailed, RebalanceInProgressError, IllegalStateError) as exc:
            raise CommitFailedError(f"commit refused ({exc}); the records will be delivered again") from exc

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
        return int(await self._consumer.position(_tp(tp)))

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The next offset of each partition."""
        ends = await self._consumer.end_offsets([_tp(tp) for tp in partitions])
        return {TopicPartition(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}

    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict[TopicPartition, int | None]:
        """The first offset at or after each timestamp (ms), or None."""
        found = await self._consumer.offsets_for_times({_tp(tp): max(0, ts) for tp, ts in timestamps.items()})
        return {
            TopicPartition(tp.topic, tp.partition): (None if hit is None else int(hit.offset))
            for tp, hit in found.items()
        }


class KafkaConnector:
    """The connector for ``kafka://`` URLs."""

    def __init__(self, url: str, config: QueueConfig, client_id: str = "qtasks") -> None:
        self.url = url
        self.config = config
        self.servers, overrides = parse_url(url)
        self.options = client_options(self.servers, config, overrides)
        self.client_id = client_id
        self._producer: KafkaProducer | None = None

    async def start(self) -> None:
        """Connect the producer."""
        if self._producer is None:
            producer = KafkaProducer(self.options, self.config, self.client_id)
            try:
                await producer.start()
            except KafkaError as exc:
                raise ConnectorError(f"cannot reach Kafka at {','.join(self.servers)}: {exc}", retriable=True) from exc
            self._producer = producer

    async def stop(self) -> None:
        """Deliver pending records and disconnect."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()

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
        return KafkaConsumer(self.options, self.config, group_id, client_id, max_wait_ms or 100)

    async def partitions_for(self, topic: str) -> int:
        """How many partitions a topic has."""
        return await self.producer.partitions_for(topic)

    async def ensure_topics(self, specs: list[TopicSpec]) -> None:
        """Create missing topics; check that existing ones have the cleanup policy qtasks needs."""
        admin = AIOKafkaAdminClient(**self.options, client_id=f"{self.client_id}-admin")
        await admin.start()
        try:
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
        finally:
            await admin.close()

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
