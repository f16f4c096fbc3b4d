"""The engine suite on memory://."""

from tests.engine_suite import *  # noqa: F403
