"""Fault tests run on a real Apache Kafka broker and on a real 3-node cluster.

What each fault cost is printed at the end of the run by the root conftest (``tests/conftest.py``),
which also gathers it from the parallel workers.
"""

from __future__ import annotations

from tests.kafka_fixtures import broker_url, kafka_bootstrap, kafka_cluster

__all__ = ["broker_url", "kafka_bootstrap", "kafka_cluster"]
