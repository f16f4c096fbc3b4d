"""Shared test helpers."""

from __future__ import annotations

import uuid

#: Settings that make tests quick without changing behaviour.
FAST = {
    "lease_interval": 0.5,
    "lease_timeout": 3.0,
    "retry_backoff_base": 0.01,
    "retry_backoff_max": 0.05,
    "commit_interval": 0.05,
    "stop_timeout": 5.0,
    "tasks_partitions": 3,
    "results_partitions": 3,
    "status_partitions": 3,
}


def unique(prefix: str = "t") -> str:
    """A fresh app name, so every test has its own topics."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"
