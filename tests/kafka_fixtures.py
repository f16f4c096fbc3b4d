"""A real Apache Kafka broker for the integration and fault suites.

Started once per test session on a free port (``deploy/local``: jars from Maven
Central, KRaft, one node), unless ``QTASKS_TEST_KAFKA=host:port`` names a running one.
The 3-node cluster of the cluster fault tests is started the same way, on first use.
A broker that cannot start fails the session; it is never skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_BROKER_PY = Path(__file__).resolve().parents[1] / "deploy" / "local" / "broker.py"


def _local_kafka_class() -> type:
    spec = importlib.util.spec_from_file_location("qtasks_local_broker", _BROKER_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.LocalKafka  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    named = os.environ.get("QTASKS_TEST_KAFKA")
    if named:
        yield named
        return
    broker = _local_kafka_class()()
    broker.start(timeout=240)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def broker_url(kafka_bootstrap: str) -> str:
    return f"kafka://{kafka_bootstrap}"


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[Any]:
    """A 3-node cluster (each node a broker and a KRaft voter), started on first use.

    Tests take nodes away and bring them back through it (``kill_node``, ``stop_node``,
    ``freeze_node``, ``start``).
    """
    cluster = _local_kafka_class()(brokers=3)
    cluster.start(timeout=240)
    try:
        yield cluster
    finally:
        for node in range(1, cluster.brokers + 1):
            cluster.thaw_node(node)
        cluster.stop()
