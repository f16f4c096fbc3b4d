"""Ordering keys on a real Apache Kafka broker."""

from tests.ordering_suite import *  # noqa: F403
