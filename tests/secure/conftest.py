"""The secure-broker suite: a real Kafka broker with a SASL_SSL listener (SCRAM-SHA-512, TLS
with a CA made at its start) and an authorizer, as ``deploy/local`` starts it with
``KAFKA_SECURITY=sasl_ssl``. The engine's tests here reach it as the ``qtasks`` user.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.kafka_fixtures import _local_kafka_class, kafka_bootstrap

__all__ = ["kafka_bootstrap"]

#: Users made at format time next to admin and qtasks: one with no ACLs, three given some.
USERS = ("nobody", "limited", "groupless", "shareless")


@pytest.fixture(scope="session")
def secure_kafka() -> Iterator[Any]:
    broker = _local_kafka_class()(security="sasl_ssl", users=USERS)
    broker.start(timeout=240)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def broker_url(secure_kafka: Any) -> str:
    url: str = secure_kafka.url("qtasks")
    return url
