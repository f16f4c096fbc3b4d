"""The engine suite on a real Apache Kafka broker."""

from tests.engine_suite import *  # noqa: F403
