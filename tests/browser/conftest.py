"""The dashboard in a real browser (Debian's headless Chromium), over a real Kafka broker."""

from tests.kafka_fixtures import broker_url, kafka_bootstrap

__all__ = ["broker_url", "kafka_bootstrap"]
