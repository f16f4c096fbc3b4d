"""Transports behind one small protocol, picked by URL (importable as ``qtasks.connectors``).

- ``memory://`` or ``memory://name``: an in-process log with Kafka's semantics
  (partitions, offsets, consumer groups, compaction). Apps in one process that use the
  same URL share one log.
- ``file://path``: the same log kept on disk in the directory ``path``, for one process
  (``qtasks.connectors.file_log``).
- ``kafka://host:port[,host:port]``: Apache Kafka through aiokafka. Query parameters
  pass security settings (see ``docs/kafka.md``).
- ``faulty+<url>``, e.g. ``faulty+memory://name``: the connector of ``<url>`` wrapped in a
  :class:`~qtasks.connectors.faulty.FaultyConnector`, whose ``faults`` fail I/O on demand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtasks.config import redact_url
from qtasks.connectors.base import (
    Connector,
    Consumer,
    Producer,
    RebalanceListener,
    Record,
    TopicPartition,
    TopicSpec,
    TxnProducer,
)
from qtasks.exc import ConfigError

if TYPE_CHECKING:
    from qtasks.config import QueueConfig

__all__ = [
    "Connector",
    "Consumer",
    "Producer",
    "RebalanceListener",
    "Record",
    "TopicPartition",
    "TopicSpec",
    "TxnProducer",
    "from_url",
]


def from_url(url: str, config: QueueConfig, **options: Any) -> Connector:
    """Build the connector a URL names; a clear :class:`ConfigError` for any other scheme."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ConfigError(f"broker_url must look like 'memory://' or 'kafka://host:9092', got {redact_url(url)!r}")
    if scheme.startswith("faulty+"):
        from qtasks.connectors.faulty import FaultyConnector

        return FaultyConnector(from_url(url.removeprefix("faulty+"), config, **options))
    if scheme in ("memory", "file"):
        from qtasks.connectors.memory import MemoryConnector

        return MemoryConnector(url, config=config)
    if scheme == "kafka":
        from qtasks.connectors.kafka import KafkaConnector

        return KafkaConnector(url, config, **options)
    raise ConfigError(
        f"unknown broker scheme {scheme!r} in {url!r}: use memory://, file://, kafka:// or faulty+ either"
    )
