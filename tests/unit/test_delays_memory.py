"""Delayed tasks on memory://."""

from tests.delays_suite import *  # noqa: F403
