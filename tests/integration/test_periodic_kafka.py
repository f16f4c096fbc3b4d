"""Periodic tasks on a real Apache Kafka broker."""

from tests.periodic_suite import *  # noqa: F403
