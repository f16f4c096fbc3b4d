"""Routers, shared tasks and middlewares on memory://."""

from tests.compat_suite import *  # noqa: F403
