"""What a worker and a client did, counted, and the HTTP endpoint that shows it to Prometheus.

The engine counts into :class:`qtasks.stats.Stats`: plain dicts and ints, a few updates
per task, no lock and no library on the hot path (everything runs on the app's event
loop). A scrape
of :class:`MetricsServer` (``GET /metrics``) turns the counts, and the worker's state at
that moment (running tasks, free slots, lag per partition), into Prometheus metrics;
``prometheus_client`` writes the text format and is imported only by the server.

The server also answers ``/healthz`` (the process and its event loop answer) and
``/readyz`` (the worker has joined its group, its loops run, the brokers answer). It
runs on the app's own loop: a loop blocked by a task's code fails the liveness probe,
which is what a liveness probe is for. docs/operations.md lists every metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from qtasks.connectors.base import TopicPartition

if TYPE_CHECKING:
    from qtasks.config import QueueConfig
    from qtasks.core import Core
    from qtasks.worker import Worker


class QueueTasks(Protocol):
    """What the metrics read of an app (the app itself, which serves them, is not imported here)."""

    core: Core
    config: QueueConfig
    worker: Worker | None


__all__ = ["MetricsServer", "readiness", "snapshot"]

log = logging.getLogger("qtasks.metrics")

# -- the scrape -------------------------------------------------------------------------

#: (name without the ``qtasks_`` prefix, help) of the task counters, by what they count.
TASK_COUNTERS: dict[str, tuple[str, str]] = {
    "received": ("tasks_received", "Task records this worker took from the tasks topic."),
    "started": ("tasks_started", "Runs started (attempts: a retried or taken-over task starts again)."),
    "succeeded": ("tasks_succeeded", "Tasks that ended as success here."),
    "failed": ("tasks_failed", "Tasks that ended as error here (no retry left)."),
    "cancelled": ("tasks_cancelled", "Tasks that ended as cancel here."),
    "retried": ("tasks_retried", "Runs that failed and were submitted again as a retry."),
}
HISTOGRAMS: dict[str, tuple[str, str]] = {
    "durations": ("task_duration_seconds", "From a run's start to its terminal status."),
    "queue_waits": ("task_queue_wait_seconds", "From a task's creation (add_task) to the start of its run."),
    "first_values": ("task_first_value_seconds", "From a run's start to its first value."),
}


async def snapshot(app: QueueTasks, lag_timeout: float = 2.0) -> list[Any]:
    """The app's metrics now, as ``prometheus_client`` metric families."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    stats = app.core.stats
    families: list[Any] = []
    worker = app.worker if app.worker is not None and app.worker._started else None
    running = list(worker._running.values()) if worker is not None else []

    for what, (name, text) in TASK_COUNTERS.items():
        family = CounterMetricFamily(f"qtasks_{name}", text, labels=["task"])
        for (kind, task), value in sorted(stats.tasks.items()):
            if kind == what:
                family.add_metric([task], value)
        families.append(family)

    values = dict(stats.values)
    for run in running:  # values of runs still going, so the counter rises while they yield
        values[run.spec.name] = values.get(run.spec.name, 0) + run.values_here
    family = CounterMetricFamily("qtasks_values_yielded", "Values yielded by tasks run here.", labels=["task"])
    for task, value in sorted(values.items()):
        family.add_metric([task], value)
    families.append(family)

    family = CounterMetricFamily(
        "qtasks_dead_letters", "Records sent to the dead-letter topic, by the kind of problem.", labels=["reason"]
    )
    for reason, value in sorted(stats.dead_letters.items()):
        family.add_metric([reason], value)
    families.append(family)

    for attribute, (name, text) in HISTOGRAMS.items():
        histogram_family = HistogramMetricFamily(f"qtasks_{name}", text, labels=["task"])
        for task, histogram in sorted(getattr(stats, attribute).items()):
            histogram_family.add_metric([task], histogram.cumulative(), histogram.sum)
        families.append(histogram_family)

    families.append(
        CounterMetricFamily(
            "qtasks_lease_renewals", "Lease renewals written for long runs (at least once).", value=stats.lease_renewals
        )
    )
    family = CounterMetricFamily(
        "qtasks_client_tasks_submitted", "Tasks this app submitted (add_task, add_tasks).", labels=["task"]
    )
    for task, value in sorted(stats.submitted.items()):
        family.add_metric([task], value)
    families.append(family)
    histogram_family = HistogramMetricFamily(
        "qtasks_client_stream_latency_seconds",
        "How old a value's result record is (its broker timestamp) when a stream hands it to the caller.",
    )
    histogram_family.add_metric([], stats.stream_latency.cumulative(), stats.stream_latency.sum)
    families.append(histogram_family)

    families.append(
        GaugeMetricFamily(
            "qtasks_broker_reachable",
            "1 once the brokers were reached and while they answer, else 0.",
            value=_reachable(app),
        )
    )
    if worker is None:
        return families
    info = GaugeMetricFamily(
        "qtasks_worker_info",
        "The worker of this process (always 1).",
        labels=["worker", "group", "guarantee", "mode"],
    )
    info.add_metric([worker.id, worker.group_id, app.config.processing_guarantee, app.config.processing_mode], 1)
    families.append(info)
    if worker._share is not None:
        families += [
            GaugeMetricFamily(
                "qtasks_share_records_held",
                "Share mode: task records locked for this worker (running, waiting for a slot, or ending).",
                value=len(worker._share_live),
            ),
            CounterMetricFamily(
                "qtasks_share_redelivered",
                "Share mode: task records that came here with a delivery count above 1 (their last "
                "holder died, lost its lock or handed them back).",
                value=worker.share_redelivered,
            ),
            CounterMetricFamily(
                "qtasks_share_locks_lost",
                "Share mode: locks of records held here that ran out before they were renewed.",
                value=worker.share_locks_lost,
            ),
        ]
    gauges = (
        ("qtasks_worker_concurrency", "Tasks the worker runs at once at most.", worker.concurrency),
        ("qtasks_tasks_running", "Runs under way on this worker.", len(running)),
        (
            "qtasks_worker_free_slots",
            "Slots free for another task now.",
            max(worker.concurrency - worker._in_flight, 0),
        ),
        (
            "qtasks_worker_prefetched",
            "Task records fetched and waiting for a slot (or for their not_before time).",
            len(worker._backlog) + len(worker._delayed),
        ),
        (
            "qtasks_worker_waiting_for_key",
            "Task records waiting behind another task of their ordering key (no slot).",
            worker._queued_by_key,
        ),
        (
            "qtasks_worker_chords_waiting",
            "Chords' callbacks waiting for their tasks to end (no slot).",
            len(worker._afters),
        ),
        ("qtasks_delays_held", "Delayed tasks held in memory, one per owned delay level at most.", worker.delays.held),
        (
            "qtasks_periodic_ticking",
            "1 while this worker ticks the periodic tasks of the group.",
            worker.ticker.leading,
        ),
    )
    for name, text, value in gauges:
        families.append(GaugeMetricFamily(name, text, value=int(value)))
    for name, text, value in (
        ("qtasks_delays_moved", "Delayed tasks moved to a shorter delay level.", worker.delays.moved),
        ("qtasks_delays_due", "Delayed tasks moved to the tasks topic as their time came.", worker.delays.due),
        (
            "qtasks_delays_dropped",
            "Delayed tasks dropped as they came due: cancelled while they waited.",
            worker.delays.dropped,
        ),
        ("qtasks_periodic_submitted", "Ticks of periodic tasks this worker submitted.", worker.ticker.submitted),
        (
            "qtasks_runs_superseded",
            "Runs stopped here because another worker took their task over (this worker was frozen "
            "or cut off past its lease).",
            worker.runs_superseded,
        ),
    ):
        families.append(CounterMetricFamily(name, text, value=value))
    lag = GaugeMetricFamily(
        "qtasks_consumer_lag",
        "Records of an owned tasks partition not yet committed by the group (log end - committed offset).",
        labels=["topic", "partition"],
    )
    uncommitted = GaugeMetricFamily(
        "qtasks_offsets_uncommitted",
        "Records of an owned tasks partition taken by this worker and not yet committed.",
        labels=["topic", "partition"],
    )
    for tp, (behind, taken) in sorted((await _lag(worker, lag_timeout)).items()):
        lag.add_metric([tp.topic, str(tp.partition)], behind)
        uncommitted.add_metric([tp.topic, str(tp.partition)], taken)
    families += [lag, uncommitted]
    return families


def _reachable(app: QueueTasks) -> int:
    """1 once the app has reached its brokers and while they answer (0 while it still waits for them)."""
    core = app.core
    return int(core.connected and core.broker.reachable and not core.trouble)


async def _lag(worker: Any, timeout: float) -> dict[TopicPartition, tuple[int, int]]:
    """Per owned partition: (log end - committed offset, taken but not committed); {} if the broker does not answer."""
    owned = sorted(worker._owned)
    if not owned:
        return {}
    consumer = worker._consumer
    try:
        async with asyncio.timeout(timeout):
            ends = await consumer.end_offsets(owned)
            out: dict[TopicPartition, tuple[int, int]] = {}
            for tp in owned:
                end = ends.get(tp)
                if end is None:
                    continue
                tracker = worker._offsets.get(tp)
                base = tracker.base if tracker is not None else None
                seen = tracker.seen if tracker is not None else None
                if base is None:
                    base = seen = await consumer.position(tp)
                assert seen is not None
                out[tp] = (max(end - base, 0), max(seen - base, 0))
            return out
    except Exception as exc:  # the scrape shows what it has; the broker's state is in qtasks_broker_reachable
        log.debug("consumer lag not known now: %s", exc)
        return {}


def readiness(app: QueueTasks) -> tuple[bool, list[str]]:
    """Whether the worker can take tasks now, and if not, why."""
    problems: list[str] = []
    worker = app.worker
    if worker is not None and worker.error is not None:
        problems.append(f"the worker failed: {worker.error}")
    elif worker is None or not worker._started:
        problems.append("no worker has started")
    elif worker._stopping:
        problems.append("the worker is stopping")
    broker = app.core.broker
    if not broker.reachable:
        since = broker.unreachable_since
        for_how_long = f" for {time.time() - since:.0f} s" if since is not None else ""
        problems.append(f"the brokers do not answer{for_how_long}")
    elif app.core.trouble:
        problems.append("writes to the broker are failing")
    return not problems, problems


# -- the server ---------------------------------------------------------------------------


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` over HTTP/1.1 on the app's event loop."""

    #: Connections served at once; more are closed at once (a flood cannot take the
    #: worker's file descriptors).
    MAX_CONNECTIONS = 32
    #: Seconds a client has to send its request.
    REQUEST_TIMEOUT = 5.0
    #: Seconds a scrape's families are reused (one end-offsets request to the brokers at
    #: most this often, however many scrapers there are).
    CACHE = 1.0

    def __init__(self, app: QueueTasks, port: int, host: str = "0.0.0.0") -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self._server: asyncio.Server | None = None
        self._registry: Any = None
        self._families: list[Any] = []
        self._connections = 0
        self._rendered: tuple[float, bytes] | None = None
        self._rendering: asyncio.Lock | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one the system picked when asked for 0)."""
        if self._server is None or not self._server.sockets:
            return self.requested_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        registry.register(self)
        self._registry = registry
        self._server = await asyncio.start_server(self._serve, self.host, self.requested_port)
        log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", self.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await server.wait_closed()

    def collect(self) -> Iterator[Any]:
        """Prometheus' collector interface: the families of the scrape under way."""
        return iter(self._families)

    async def render(self) -> bytes:
        """The text exposition of every metric now (reused for ``CACHE`` seconds)."""
        from prometheus_client import generate_latest

        if self._rendering is None:
            self._rendering = asyncio.Lock()
        async with self._rendering:
            if self._rendered is not None and time.monotonic() - self._rendered[0] < self.CACHE:
                return self._rendered[1]
            self._families = await snapshot(self.app)
            try:
                text = bytes(generate_latest(self._registry))
            finally:
                self._families = []
            self._rendered = (time.monotonic(), text)
            return text

    async def _answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"only GET\n"
        if path == "/metrics":
            return 200, TEXT_FORMAT, await self.render()
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            ready, problems = readiness(self.app)
            body = json.dumps({"ready": ready, "problems": problems}).encode() + b"\n"
            return (200 if ready else 503), "application/json", body
        return 404, "text/plain; charset=utf-8", b"not found: /metrics, /healthz, /readyz\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= self.MAX_CONNECTIONS:
            writer.close()  # too many at once: this one is turned away, the worker's descriptors are kept
            return
        self._connections += 1
        try:
            async with asyncio.timeout(self.REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                method, _, rest = head.decode("latin-1").partition(" ")
                path = rest.partition(" ")[0].partition("?")[0]
                try:
                    status, content_type, body = await self._answer(method, path)
                except Exception as exc:  # a scrape that fails says why, and the server goes on
                    log.exception("metrics request %s %s failed", method, path)
                    status, content_type, body = 500, "text/plain; charset=utf-8", f"{exc!r}\n".encode()
                reason = _REASONS.get(status, "")
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + (b"" if method == "HEAD" else body)
                )
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that went away or sent no request: nothing to answer
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


#: Prometheus' text format, which every scraper reads (the metric names are all plain ASCII).
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
