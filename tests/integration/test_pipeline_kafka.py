"""Chained streams on a real Apache Kafka broker."""

from tests.pipeline_suite import *  # noqa: F403
