"""OpenTelemetry traces: ``qtasks.otel.instrument(app)`` (the ``otel`` extra).

Each submission is a ``send <tasks topic>`` span (kind PRODUCER) whose W3C trace context
goes in the task record's headers; each run on a worker is a ``process <tasks topic>``
span (kind CONSUMER) whose parent is that send span. The run's span is the current span
while the task's code runs (so spans the task opens nest under it, in a sync task's
thread too), each stored value is an event ``value`` with its ``qtasks.value.seq``, and
every result record carries the run's context in its headers. An error is recorded on the
span (status ERROR, the exception as an event); a cancel is an event with its reason.

Attributes follow OpenTelemetry's messaging conventions: ``messaging.system``,
``messaging.operation.type``, ``messaging.destination.name``,
``messaging.destination.partition.id``, ``messaging.consumer.group.name``,
``messaging.kafka.offset``, ``messaging.message.id`` (the task's uuid), and
``qtasks.task.name``, ``qtasks.task.attempt``, ``qtasks.task.status``, ``qtasks.worker.id``.

Nothing in qtasks imports this module: an app that is not instrumented never loads
OpenTelemetry.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from qtasks.connectors.base import Record
from qtasks.exc import error_of
from qtasks.records import TaskRecord
from qtasks.tracing import Headers

if TYPE_CHECKING:
    from qtasks.app import QueueTasks

__all__ = ["instrument", "uninstrument"]

log = logging.getLogger("qtasks.otel")

_FAILED = frozenset({"error", "retry"})


def instrument(app: Any, tracer_provider: trace.TracerProvider | None = None) -> None:
    """Trace ``app``'s submissions and runs (``tracer_provider``: the global one by default)."""
    core = _core(app).core
    core.tracer = OtelTracer(core.broker.url, tracer_provider)


def uninstrument(app: Any) -> None:
    """Stop tracing ``app``."""
    _core(app).core.tracer = None


def _core(app: Any) -> QueueTasks:
    from qtasks.app import QueueTasks

    inner = getattr(app, "_core", app)  # the blocking app wraps the asyncio one
    if not isinstance(inner, QueueTasks):
        raise TypeError(f"instrument() takes a qtasks app, got {type(app).__name__}")
    return inner


def _described(error: BaseException) -> str:
    """``Type: message``, also for an exception whose ``str`` fails."""
    try:
        return f"{type(error).__name__}: {error}"
    except Exception:
        return type(error).__name__


def _headers(context: otel_context.Context) -> list[tuple[str, bytes]]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return [(name, value.encode()) for name, value in carrier.items()]


class OtelTracer:
    """:class:`qtasks.tracing.Tracer` on OpenTelemetry."""

    def __init__(self, url: str, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("qtasks", tracer_provider=tracer_provider)
        self._system = "kafka" if url.startswith("kafka") else url.partition("://")[0] or "memory"
        self._fields = {name.lower() for name in propagate.get_global_textmap().fields}

    def submit(self, task_name: str, uuid: str, topic: str, partition: int) -> _Submit:
        span = self._tracer.start_span(
            f"send {topic}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": self._system,
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": topic,
                "messaging.destination.partition.id": str(partition),
                "messaging.message.id": uuid,
                "qtasks.task.name": task_name,
            },
        )
        return _Submit(span, _headers(trace.set_span_in_context(span)))

    def run(self, rec: TaskRecord, record: Record, attempt: int, worker_id: str, group_id: str) -> _Run:
        carrier = {
            name.lower(): value.decode("latin-1")
            for name, value in record.headers
            if name.lower() in self._fields and isinstance(value, bytes)
        }
        parent = propagate.extract(carrier)
        span = self._tracer.start_span(
            f"process {record.topic}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": self._system,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": record.topic,
                "messaging.destination.partition.id": str(record.partition),
                "messaging.consumer.group.name": group_id,
                "messaging.kafka.offset": record.offset,
                "messaging.message.id": rec.uuid,
                "qtasks.task.name": rec.task_name,
                "qtasks.task.attempt": attempt,
                "qtasks.worker.id": worker_id,
            },
        )
        context = trace.set_span_in_context(span, parent)
        # The run's span is current for the task's code (its handler's asyncio task, and the
        # thread of a sync task, which gets a copy of this context).
        token = otel_context.attach(context)
        return _Run(span, token, _headers(context))


class _Submit:
    __slots__ = ("headers", "span")

    def __init__(self, span: trace.Span, headers: Headers) -> None:
        self.span = span
        self.headers = headers

    def end(self, error: BaseException | None = None) -> None:
        try:
            if error is not None:
                self.span.set_status(Status(StatusCode.ERROR, _described(error)))
                self.span.record_exception(error)
        except Exception:  # a trace never changes what happens to the task
            log.warning("could not record a submission's error on its span", exc_info=True)
        finally:
            self.span.end()


class _Run:
    __slots__ = ("headers", "span", "token")

    def __init__(self, span: trace.Span, token: object, headers: Headers) -> None:
        self.span = span
        self.token = token
        self.headers = headers

    def value(self, seq: int) -> None:
        self.span.add_event("value", {"qtasks.value.seq": seq})

    def end(self, status: str, error: BaseException | None = None, reason: str | None = None) -> None:
        try:
            self._record(status, error, reason)
        except Exception:  # a trace never changes what happens to the task
            log.warning("could not record how a run ended on its span", exc_info=True)
        finally:
            self.span.end()
            try:
                otel_context.detach(self.token)  # type: ignore[arg-type]
            except Exception:  # ended in another context than it began: nothing to restore there
                log.debug("the run's trace context was not detached here", exc_info=True)

    def _record(self, status: str, error: BaseException | None, reason: str | None) -> None:
        span = self.span
        span.set_attribute("qtasks.task.status", status)
        if status in _FAILED:
            if error is not None:
                description = _described(error)
                span.set_status(Status(StatusCode.ERROR, description))
                span.record_exception(error)
                return
            # The error is only text (a value that was not stored, a worker's failure).
            kind, message = error_of(reason)
            span.set_status(Status(StatusCode.ERROR, f"{kind}: {message}" if kind and message else kind or message))
        elif status == "cancel":
            span.add_event("cancel", {"qtasks.cancel_reason": reason or ""})
        elif status == "released":
            span.add_event("released", {"qtasks.reason": "the worker handed the task back unfinished"})
