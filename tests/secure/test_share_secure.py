"""Share mode (``processing_mode="share"``) on the secure broker: the ACLs of the share group.

A worker in share mode reads its tasks as a member of the share group ``<name>-workers.share``
(READ on the group) and sets that group's settings at start (ALTER_CONFIGS on it). Without
them it is refused at start with one error naming both, or, when the check at start could
not tell, by the broker's first refusal, in the same words.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.config import QueueConfig
from qtasks.connectors import from_url
from qtasks.exc import BrokerRefusedError
from tests.helpers import FAST, unique
from tests.secure.test_secure_errors import refused, until_granted

# the first of these may wait for the session's secure broker to start (certificates, ACL grants)
pytestmark = pytest.mark.timeout(300)

SHARE = {**FAST, "processing_mode": "share", "tasks_partitions": 1}
USER = "shareless"
#: The app names of this module start so: the user may use their topics (a prefixed ACL).
PREFIX = "shr"


@pytest.fixture(scope="module")
def topics_granted(secure_kafka: Any) -> str:
    """The URL of a user that may use the cluster and every topic of this module's apps, and no group."""
    allow = ("--add", "--allow-principal", f"User:{USER}")
    cluster = ("--operation", "Describe", "--operation", "DescribeConfigs", "--operation", "IdempotentWrite")
    secure_kafka.acl(*allow, *cluster, "--cluster")
    secure_kafka.acl(*allow, "--operation", "All", "--resource-pattern-type", "prefixed", "--topic", PREFIX)
    url: str = secure_kafka.url(USER)
    return url


async def grant(secure_kafka: Any, *acl: str) -> None:
    """Allow the user ``acl`` (Kafka's AclCommand arguments after the principal)."""
    await asyncio.to_thread(secure_kafka.acl, "--add", "--allow-principal", f"User:{USER}", *acl)


async def with_delays_group(secure_kafka: Any, url: str, name: str) -> None:
    """Let the user read the app's delays group (a consumer group in share mode too), then wait
    for the topic grants: the broker applies ACLs in the order they were made."""
    await grant(secure_kafka, "--operation", "Read", "--group", f"{name}-workers.delays")
    await until_granted(url, {f"{name}.results": ("read", "write")})


async def runs_a_task(url: str, name: str) -> None:
    """A share-mode app (worker and client) on ``url`` runs a task to its end."""
    app = QueueTasks(name=name, broker_url=url, **SHARE)

    @app.task
    async def double(n: int) -> int:
        return 2 * n

    try:
        await app.start()
        done = await app.add_task("double", 21, timeout=30)
        assert done is not None and done.status == "success" and done.returning == 42
    finally:
        await app.stop(timeout=5)


def not_allowed(lacking: str) -> str:
    return f"does not let user '{USER}' do what this app needs: {lacking}. Grant it in the ACLs"


async def test_a_share_mode_worker_without_its_share_group_grants_is_refused_at_start_naming_both(
    secure_kafka: Any, topics_granted: str
) -> None:
    name = unique(PREFIX)
    await with_delays_group(secure_kafka, topics_granted, name)
    error, took = await refused(topics_granted, name, **SHARE)
    assert took < 10
    # both grants in one error, and nothing about the consumer group share mode does not join
    assert not_allowed(f"read/alter_configs on share group '{name}-workers.share'") in str(error)


async def test_a_share_group_refusal_met_after_the_check_says_the_same_words(
    secure_kafka: Any, topics_granted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check at start skipped (as when the brokers cannot answer it): the settings, then the
    join, are refused with the words of the check, at once, not retried."""

    async def not_checked(conn: Any, group: str) -> list[str]:
        return []

    monkeypatch.setattr("qtasks.connectors.kafka.connector.share_group_missing", not_checked)
    name = unique(PREFIX)
    group = f"{name}-workers.share"
    await with_delays_group(secure_kafka, topics_granted, name)
    error, took = await refused(topics_granted, name, **SHARE)
    assert took < 10
    assert not_allowed(f"alter_configs on share group '{group}'") in str(error)

    await grant(secure_kafka, "--operation", "AlterConfigs", "--group", group)
    connector = from_url(topics_granted, QueueConfig())
    async with asyncio.timeout(30):  # until the broker applied the new ACL
        while True:
            try:
                await connector.configure_share_group(group, {"share.auto.offset.reset": "earliest"})
                break
            except BrokerRefusedError:
                await asyncio.sleep(0.05)
    error, took = await refused(topics_granted, name, **SHARE)
    assert took < 10
    assert not_allowed(f"read on share group '{group}'") in str(error)


async def test_a_share_mode_worker_granted_what_the_docs_list_runs_tasks(
    secure_kafka: Any, topics_granted: str
) -> None:
    """READ and ALTER_CONFIGS on the share group and READ on the delays group: no ACL on the
    consumer group ``<name>-workers``, which share mode does not join."""
    name = unique(PREFIX)
    await grant(secure_kafka, "--operation", "Read", "--operation", "AlterConfigs", "--group", f"{name}-workers.share")
    await with_delays_group(secure_kafka, topics_granted, name)
    await runs_a_task(topics_granted, name)


async def test_the_local_deploy_s_app_user_runs_share_mode(secure_kafka: Any) -> None:
    """``make run`` in secure mode connects as ``qtasks``: its grants cover share mode too."""
    await runs_a_task(secure_kafka.url("qtasks"), unique(PREFIX))
