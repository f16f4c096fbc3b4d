"""Chained streams on memory://."""

from tests.pipeline_suite import *  # noqa: F403
