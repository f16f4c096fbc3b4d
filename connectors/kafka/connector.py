"""The connector for ``kafka://`` URLs: clients, topics and the cluster's limits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from aiokafka import errors as kafka_exc
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import AIOKafkaConnection, create_conn
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.errors import KafkaError

from qtasks.config import QueueConfig
from qtasks.connectors.base import Connector, GroupInfo, GroupMember, TopicPartition, TopicSpec
from qtasks.connectors.kafka.access import (
    AuthorizedOperations,
    GroupOperations,
    group_missing,
    missing,
    on_share_group,
    share_group_missing,
)
from qtasks.connectors.kafka.consumer import KafkaConsumer
from qtasks.connectors.kafka.errors import kafka_errors
from qtasks.connectors.kafka.health import Health, install_log_filter
from qtasks.connectors.kafka.options import _DEFAULT_LIMIT, _TOPIC_ALREADY_EXISTS, client_options, parse_url, timings
from qtasks.connectors.kafka.producer import KafkaProducer
from qtasks.connectors.kafka.refusals import not_granted
from qtasks.connectors.kafka.share import wire
from qtasks.connectors.kafka.share.consumer import ShareConsumer
from qtasks.connectors.kafka.sizes import value_limit
from qtasks.connectors.kafka.starts import Starts
from qtasks.connectors.kafka.transactions import KafkaTxnProducer
from qtasks.exc import (
    BrokerRefusedError,
    BrokerUnavailableError,
    ConnectorError,
    TopicConfigError,
)
from qtasks.supervise import raise_if_cancelled

#: What a share consumer's own connections take of the clients' options: the security.
_CONN_OPTIONS = ("security_protocol", "ssl_context", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password")

log = logging.getLogger("qtasks.kafka")


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
        #: Every client's start; one abandoned by its caller is stopped when it ends.
        self.starts = Starts(self.timings.connect_timeout + config.eos_transaction_timeout)
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
        # A client start given up here stops its client once it ends (``stop`` waits for
        # it): waiting for it now would hold the caller's error back as long.
        await producer.stop()
        await self.health.close()

    async def stop(self) -> None:
        """Deliver pending records and disconnect (clients whose start was given up too)."""
        producer, self._producer = self._producer, None
        try:
            if producer is not None:
                await producer.stop()
            await self.starts.drain()
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

    def share_consumer(self, group_id: str, topics: list[str], client_id: str | None = None) -> ShareConsumer:
        """A member of share group ``group_id`` (docs/share-groups.md), on connections of its own
        (``client_id``: theirs, which ShareGroupDescribe shows)."""
        return ShareConsumer(
            connect=functools.partial(self._share_connect, client_id=client_id),
            bootstrap=self._addresses(),
            group_id=group_id,
            topics=topics,
            user=self.options.get("sasl_plain_username"),
        )

    async def configure_share_group(self, group_id: str, settings: dict[str, str]) -> None:
        """Set a share group's ``share.*`` settings (IncrementalAlterConfigs, resource type GROUP).

        BrokerRefusedError if the ACLs do not allow it (ALTER_CONFIGS on the group), in the
        words of the check at start.
        """
        conn = await self._share_conn()
        try:
            with kafka_errors("set the share group's settings", servers=self.where, health=self.health):
                answers = await conn.send(wire.alter_group_configs(group_id, settings))
        finally:
            conn.close()
        if any(a.error == kafka_exc.GroupAuthorizationFailedError.errno for a in answers):
            raise self._not_granted([on_share_group(group_id, "alter_configs")])
        refused = [f"error {a.error}: {a.message}" for a in answers if a.error]
        if refused:
            raise ConnectorError(f"the settings of share group {group_id} were refused: {'; '.join(refused)}")

    async def _share_conn(self) -> AIOKafkaConnection:
        """A connection of its own to the first broker that takes one."""
        errors: list[str] = []
        for host, port in self._addresses():
            try:
                return await self._share_connect(host, port)
            except (KafkaError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc!r}")
        raise BrokerUnavailableError(f"no broker at {self.where} takes a connection: {'; '.join(errors)}")

    def _addresses(self) -> list[tuple[str, int]]:
        return [(host, int(port)) for host, port in (server.rsplit(":", 1) for server in self.servers)]

    async def describe_share_group(self, group_id: str, topic: str) -> GroupInfo:
        """ShareGroupDescribe and DescribeShareGroupOffsets of ``group_id``, at its coordinator."""
        conn = await self._share_conn()
        try:
            with kafka_errors("describe the share group", servers=self.where, health=self.health):
                found: wire.Coordinator = await conn.send(wire.find_coordinator(group_id))
                if found.error:
                    raise kafka_exc.for_code(found.error)(found.message or "no coordinator")
                coordinator = await self._share_connect(found.host, found.port)
                try:
                    described: wire.ShareGroupDescription = await coordinator.send(wire.share_group_describe(group_id))
                    offsets: wire.ShareGroupOffsets = await coordinator.send(
                        wire.describe_share_group_offsets(group_id, topic)
                    )
                finally:
                    coordinator.close()
        finally:
            conn.close()
        if described.error == kafka_exc.GroupIdNotFound.errno:
            return GroupInfo(group_id, "Dead", ())
        if described.error:
            raise ConnectorError(
                f"cannot describe share group {group_id}: error {described.error}: {described.message}"
            )
        members = tuple(
            GroupMember(
                m.member_id,
                m.client_id,
                m.host,
                tuple(TopicPartition(t, p) for t, parts in sorted(m.assignment.items()) for p in sorted(parts)),
            )
            for m in described.members
        )
        found_offsets = [p for p in offsets.partitions if not p.error]
        return GroupInfo(
            group_id,
            described.state,
            members,
            {TopicPartition(topic, p.partition): p.start_offset for p in found_offsets if p.start_offset >= 0},
            {TopicPartition(topic, p.partition): p.lag for p in found_offsets if p.lag >= 0},
        )

    async def _share_connect(self, host: str, port: int, client_id: str | None = None) -> AIOKafkaConnection:
        """A connection of its own (a share session lives and dies with its connection), with the app's security."""
        security = {k: v for k, v in self.options.items() if k in _CONN_OPTIONS}
        return await create_conn(
            host,
            port,
            client_id=client_id or f"{self.client_id}-share",
            request_timeout_ms=self.config.kafka_request_timeout_ms,
            **security,
        )

    def transactional_producer(self, transactional_id: str) -> KafkaTxnProducer:
        """Exactly-once: a transactional producer for ``transactional_id`` (``start`` fences older ones)."""
        return KafkaTxnProducer(self, transactional_id)

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
        with kafka_errors("connect the admin client", servers=self.where, health=self.health):
            async with asyncio.timeout(self.timings.connect_timeout):
                await self.starts.run(admin.start, admin.close)  # not started: closed there
        try:
            yield admin
        finally:
            await asyncio.shield(admin.close())

    async def describe_group(self, group_id: str) -> GroupInfo:
        """DescribeGroups and OffsetFetch of ``group_id``, at its coordinator."""
        async with self._admin() as admin:
            with kafka_errors("describe the consumer group", servers=self.where, health=self.health):
                responses = await admin.describe_consumer_groups([group_id])
                offsets = await admin.list_consumer_group_offsets(group_id)
        described = [group for response in responses for group in response.groups]
        if not described:
            return GroupInfo(group_id, "Dead", ())
        group = described[0]
        error_code, state, members = group[0], group[2], group[5]
        if error_code:
            raise ConnectorError(f"cannot describe group {group_id}: {kafka_exc.for_code(error_code).__name__}")
        return GroupInfo(
            group_id,
            state,
            tuple(_member(member) for member in members),
            {
                TopicPartition(tp.topic, tp.partition): int(meta.offset)
                for tp, meta in offsets.items()
                if meta.offset >= 0
            },
        )

    async def check_access(
        self,
        needs: Mapping[str, Collection[str]],
        group: str | Sequence[str] | None = None,
        share_group: str | None = None,
    ) -> None:
        """Ask the brokers what this client's principal may do on each topic (Metadata v8), its
        consumer groups and its share group (``read`` and ``alter_configs``), and raise one
        BrokerRefusedError naming every grant missing.

        Bounded by ``connect_timeout``. A check the brokers cannot answer now (a node away, no
        coordinator yet) is skipped with a warning: a refusal met later stops the worker all
        the same, with the same words.
        """
        try:
            async with asyncio.timeout(self.timings.connect_timeout):
                lacking = await self._lacking(needs, group, share_group)
        except (BrokerUnavailableError, TimeoutError) as exc:
            raise_if_cancelled()
            log.warning("the ACLs were not checked (%s)", str(exc) or type(exc).__name__)
            return
        if lacking:
            raise self._not_granted(lacking)

    def _not_granted(self, lacking: list[str]) -> BrokerRefusedError:
        return not_granted(self.where, self.options.get("sasl_plain_username"), lacking)

    async def _lacking(
        self, needs: Mapping[str, Collection[str]], group: str | Sequence[str] | None, share_group: str | None
    ) -> list[str]:
        lacking: list[str] = []
        groups = [group] if isinstance(group, str) else list(group or ())
        async with self._admin() as admin:
            with kafka_errors("check the ACLs", servers=self.where, health=self.health):
                try:
                    response = await _to_any_node(admin, AuthorizedOperations(list(needs)))
                    lacking += missing(response, needs)
                    for group in groups:
                        try:
                            coordinator = await admin.find_coordinator(group)
                            described = await admin._send_request(GroupOperations(group), coordinator)
                            lacking += group_missing(described, group)
                        except kafka_exc.GroupAuthorizationFailedError:  # not even allowed to find it
                            lacking.append(f"read on group {group!r}")
                        except kafka_exc.KafkaError as exc:
                            if not exc.retriable:
                                raise
                            # No coordinator yet (a new cluster makes its offsets topic on
                            # the first lookup; a node is away): the join waits for one.
                            log.debug("the group %s was not checked: %s", group, exc)
                    if share_group is not None:
                        conn = await self._share_conn()
                        try:
                            lacking += await share_group_missing(conn, share_group)
                        finally:
                            conn.close()
                except (NotImplementedError, kafka_exc.IncompatibleBrokerVersion):
                    log.debug("the brokers cannot tell the operations a client may do; not checked")
        return lacking

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


async def _to_any_node(admin: AIOKafkaAdminClient, request: Any) -> Any:
    """Send ``request`` to the brokers in random order until one answers (a node may be away)."""
    nodes = [broker.nodeId for broker in admin._client.cluster.brokers()]
    random.shuffle(nodes)
    for node in nodes[:-1]:
        try:
            return await admin._send_request(request, node)
        except (kafka_exc.KafkaConnectionError, kafka_exc.NodeNotReadyError, kafka_exc.RequestTimedOutError):
            raise_if_cancelled()
            log.debug("node %s did not answer; asking another", node)
    return await admin._send_request(request, nodes[-1] if nodes else None)


def _member(member: Any) -> GroupMember:
    """A member of a DescribeGroups response (v4 and later add the group instance id after the member id)."""
    if len(member) >= 6:
        member_id, _instance, client_id, host, _metadata, assignment = member[:6]
    else:
        member_id, client_id, host, _metadata, assignment = member[:5]
    partitions: tuple[TopicPartition, ...] = ()
    if assignment:
        decoded = ConsumerProtocolMemberAssignment.decode(assignment)
        partitions = tuple(sorted(TopicPartition(topic, p) for topic, ps in decoded.assignment for p in ps))
    return GroupMember(member_id, client_id, host.lstrip("/"), partitions)


def _conforms(connector: KafkaConnector) -> Connector:
    """Checked by mypy: the Kafka connector offers the whole seam."""
    return connector
