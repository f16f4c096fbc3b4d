"""Ordering keys on memory://."""

from tests.ordering_suite import *  # noqa: F403
