"""Delayed tasks on a real Apache Kafka broker."""

from tests.delays_suite import *  # noqa: F403
