"""Fault tests run on a real Apache Kafka broker and on a real 3-node cluster."""

from __future__ import annotations

from typing import Any

from tests.faults.report import MEASURED, table
from tests.kafka_fixtures import broker_url, kafka_bootstrap, kafka_cluster

__all__ = ["broker_url", "kafka_bootstrap", "kafka_cluster"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What each fault cost, printed at the end of every run that had fault tests."""
    if MEASURED:
        terminalreporter.section("faults: what each cost")
        terminalreporter.write_line(table(MEASURED))
