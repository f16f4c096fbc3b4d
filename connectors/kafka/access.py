"""What the brokers' ACLs let this client do on its topics and groups, asked once at start.

A worker that may not write its results topic would take tasks and never end them; a
client that may not write the tasks topic would fail on its first ``add_task``. Kafka
answers the question up front: a Metadata request (v8+) with
``include_topic_authorized_operations`` returns, per topic, the operations the caller's
principal is allowed. aiokafka builds Metadata up to v5 only, so v8 is spelled here.

A share group is asked otherwise (:func:`share_group_missing`): Kafka tells the operations
on a group only once the group exists.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from typing import Any

from aiokafka import errors as kafka_exc
from aiokafka.conn import AIOKafkaConnection
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Bytes, Int16, Int32, Schema, String

from qtasks.connectors.kafka.share import wire

#: Kafka's AclOperation codes (the bit each sets in an authorized-operations field).
OPERATIONS: Mapping[str, int] = {"read": 3, "write": 4, "create": 5, "describe": 8}
#: The field's value when the broker did not say (Integer.MIN_VALUE).
_NOT_PROVIDED = -(2**31)


class _MetadataResponseV8(Response):  # type: ignore[misc]  # aiokafka ships no types
    API_KEY = 3
    API_VERSION = 8
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("brokers", Array(("node_id", Int32), ("host", String("utf-8")), ("port", Int32), ("rack", String("utf-8")))),
        ("cluster_id", String("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            Array(
                ("error_code", Int16),
                ("topic", String("utf-8")),
                ("is_internal", Boolean),
                (
                    "partitions",
                    Array(
                        ("error_code", Int16),
                        ("partition", Int32),
                        ("leader", Int32),
                        ("leader_epoch", Int32),
                        ("replicas", Array(Int32)),
                        ("isr", Array(Int32)),
                        ("offline_replicas", Array(Int32)),
                    ),
                ),
                ("topic_authorized_operations", Int32),
            ),
        ),
        ("cluster_authorized_operations", Int32),
    )


class _MetadataRequestV8(RequestStruct):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 8
    RESPONSE_TYPE = _MetadataResponseV8
    SCHEMA = Schema(
        ("topics", Array(String("utf-8"))),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
    )


class AuthorizedOperations(Request[_MetadataRequestV8]):  # type: ignore[misc]
    """Metadata of ``topics`` with the operations the caller may do on each."""

    API_KEY = 3

    def __init__(self, topics: list[str]) -> None:
        self._topics = topics

    def build(self, request_struct_class: type[_MetadataRequestV8]) -> _MetadataRequestV8:
        return request_struct_class(self._topics, False, False, True)


class _DescribeGroupsResponseV3(Response):  # type: ignore[misc]
    API_KEY = 15
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "groups",
            Array(
                ("error_code", Int16),
                ("group", String("utf-8")),
                ("state", String("utf-8")),
                ("protocol_type", String("utf-8")),
                ("protocol", String("utf-8")),
                (
                    "members",
                    Array(
                        ("member_id", String("utf-8")),
                        ("client_id", String("utf-8")),
                        ("client_host", String("utf-8")),
                        ("member_metadata", Bytes),
                        ("member_assignment", Bytes),
                    ),
                ),
                ("authorized_operations", Int32),
            ),
        ),
    )


class _DescribeGroupsRequestV3(RequestStruct):  # type: ignore[misc]
    API_KEY = 15
    API_VERSION = 3
    RESPONSE_TYPE = _DescribeGroupsResponseV3
    SCHEMA = Schema(("groups", Array(String("utf-8"))), ("include_authorized_operations", Boolean))


class GroupOperations(Request[_DescribeGroupsRequestV3]):  # type: ignore[misc]
    """DescribeGroups of ``group`` with the operations the caller may do on it (aiokafka's
    v3 request reads its answer with v2's layout, which drops that field)."""

    API_KEY = 15

    def __init__(self, group: str) -> None:
        self._group = group

    def build(self, request_struct_class: type[_DescribeGroupsRequestV3]) -> _DescribeGroupsRequestV3:
        return request_struct_class([self._group], True)


def _provided(allowed: int) -> bool:
    """Whether an authorized-operations field says anything: Kafka answers a caller that may
    describe the resource, so a field without DESCRIBE comes from a broker that does not tell."""
    return allowed != _NOT_PROVIDED and bool(allowed & (1 << OPERATIONS["describe"]))


def group_missing(response: Any, group: str) -> list[str]:
    """What a DescribeGroups (v3) answer of ``group`` says the caller may not do: it joins, so it reads."""
    described = response.groups[0]
    error, allowed = described[0], described[-1]
    if error == kafka_exc.GroupAuthorizationFailedError.errno or (
        _provided(allowed) and not allowed & (1 << OPERATIONS["read"])
    ):
        return [f"read on group {group!r}"]
    return []


def missing(response: Any, needs: Mapping[str, Collection[str]]) -> list[str]:
    """What ``needs`` (topic -> operation names) the response does not grant, as phrases.

    A topic the caller may not even describe is reported with everything it needs. A broker
    that does not say (no authorizer answers every operation; an old one may leave the
    field unset) grants all.
    """
    lacking: list[str] = []
    seen = {topic: (error, ops) for error, topic, _, _, ops in response.topics}
    for topic, operations in needs.items():
        error, allowed = seen.get(topic, (0, _NOT_PROVIDED))
        if error == kafka_exc.TopicAuthorizationFailedError.errno:
            lacking.append(f"{'/'.join(sorted(operations))} on topic {topic!r} (it may not even describe it)")
            continue
        if not _provided(allowed):
            continue
        absent = sorted(op for op in operations if not allowed & (1 << OPERATIONS[op]))
        if absent:
            lacking.append(f"{'/'.join(absent)} on topic {topic!r}")
    return lacking


def on_share_group(group: str, *operations: str) -> str:
    """The phrase naming ``operations`` on share group ``group``: the check at start and a
    refusal met later (the heartbeat, the settings) name them in the same words."""
    return f"{'/'.join(operations)} on share group {group!r}"


async def share_group_missing(conn: AIOKafkaConnection, group: str) -> list[str]:
    """What the caller may not do on share group ``group`` of what a worker does: ``read`` (join
    it, fetch) and ``alter_configs`` (set its settings).

    Neither DescribeGroups (a share group is "not a classic group") nor ShareGroupDescribe
    tells the operations on a group that does not exist yet (both answer GROUP_ID_NOT_FOUND),
    so each operation is asked by a request that needs it and changes nothing: a ShareFetch
    that opens a session with no partitions (READ, checked first; the session ends with
    ``conn``, which the caller closes) and a validate-only IncrementalAlterConfigs with no
    settings (ALTER_CONFIGS). Neither creates the group.
    """
    denied = kafka_exc.GroupAuthorizationFailedError.errno
    probe = wire.share_fetch(group, str(uuid.uuid4()), wire.OPEN_SESSION, {}, max_wait_ms=0, max_records=1)
    fetched: wire.ShareAnswer = await conn.send(probe)
    altered: list[wire.ConfigAnswer] = await conn.send(wire.alter_group_configs(group, {}, validate_only=True))
    lacking = ["read"] if fetched.error == denied else []
    lacking += ["alter_configs"] if any(answer.error == denied for answer in altered) else []
    return [on_share_group(group, *lacking)] if lacking else []
