"""Routers, shared tasks and middlewares on a real Apache Kafka broker."""

from tests.compat_suite import *  # noqa: F403
