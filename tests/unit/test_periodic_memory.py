"""Periodic tasks on memory://."""

from tests.periodic_suite import *  # noqa: F403
