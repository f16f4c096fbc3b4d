"""Fault tests run on a real Apache Kafka broker."""

from tests.kafka_fixtures import broker_url, kafka_bootstrap

__all__ = ["broker_url", "kafka_bootstrap"]
