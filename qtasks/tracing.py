"""Where the engine tells a tracer what happens (``core.tracer``; None: traces are off).

The engine knows nothing of OpenTelemetry: :mod:`qtasks.otel` implements these
protocols (``qtasks.otel.instrument(app)``), and with no tracer set a task pays one
``is None`` test at submission and one at the start of its run, nothing per value.

Trace context travels in Kafka record headers (W3C ``traceparent``/``tracestate``): from
the client's task record to the worker, and from the worker's run to each of its result
records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from qtasks.connectors.base import Record
from qtasks.records import TaskRecord

__all__ = ["Headers", "RunTrace", "SubmitTrace", "Tracer"]

Headers = Sequence[tuple[str, bytes]]


class SubmitTrace(Protocol):
    """A task record being sent by a client."""

    #: The headers its record carries (the trace context of the send).
    headers: Headers

    def end(self, error: BaseException | None = None) -> None:
        """The record is stored (or ``error`` says why it was not)."""
        ...


class RunTrace(Protocol):
    """One attempt of one task on a worker."""

    #: The headers each of its result records carries.
    headers: Headers

    def value(self, seq: int) -> None:
        """The run stored value ``seq``."""
        ...

    def end(self, status: str, error: BaseException | None = None, reason: str | None = None) -> None:
        """The run ended with ``status`` (a terminal status, or ``released``: handed back unfinished).

        ``reason``: a cancel's reason, or a failure's traceback (text) when there is no ``error``.
        """
        ...


class Tracer(Protocol):
    def submit(self, task_name: str, uuid: str, topic: str, partition: int) -> SubmitTrace:
        """A client sends a task record."""
        ...

    def run(self, rec: TaskRecord, record: Record, attempt: int, worker_id: str, group_id: str) -> RunTrace:
        """A worker starts a run of the task of ``record`` (its headers hold the sender's context)."""
        ...
