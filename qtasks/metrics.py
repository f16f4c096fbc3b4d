"""What a worker and a client did, counted, and the HTTP endpoint that shows it to Prometheus.

The engine counts into :class:`Stats`: plain dicts and ints, a few updates per task, no
lock and no library on the hot path (everything runs on the app's event loop). A scrape
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
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qtasks.connectors.base import TopicPartition

if TYPE_CHECKING:
    from qtasks.app import QueueTasks

__all__ = ["BUCKETS", "Histogram", "MetricsServer", "Stats"]

log = logging.getLogger("qtasks.metrics")

#: Upper bounds (seconds) of the histograms' buckets: from a millisecond (a short task
#: on a local broker) to an hour (a long generator job).
BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)

#: The label of a task name no registered task has (names come from records: any text).
UNKNOWN_TASK = "<unknown>"

#: Terminal statuses -> the counter each one adds to.
_ENDED = {"success": "succeeded", "error": "failed", "cancel": "cancelled", "retry": "retried"}


class Histogram:
    """Counts per bucket of :data:`BUCKETS` (the last one: above them all) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus' buckets: ``(le, observations at or below it)``, ending with ``+Inf``."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*(repr(b) for b in BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class Stats:
    """The counts of one app (its worker and its client), kept on its event loop."""

    def __init__(self) -> None:
        #: (what, task name) -> count; what: received, started, succeeded, failed, cancelled, retried.
        self.tasks: dict[tuple[str, str], int] = {}
        #: Values yielded by runs that are over here (running ones are added at a scrape).
        self.values: dict[str, int] = {}
        #: Records sent to the dead-letter topic, by the kind of their problem.
        self.dead_letters: dict[str, int] = {}
        self.durations: dict[str, Histogram] = {}
        self.queue_waits: dict[str, Histogram] = {}
        self.first_values: dict[str, Histogram] = {}
        self.lease_renewals = 0
        #: The client: tasks submitted by name, and how old a value's record is when a stream hands it over.
        self.submitted: dict[str, int] = {}
        self.stream_latency = Histogram()

    # Called per task: each inlines its few dictionary updates (no helper calls).

    def count(self, what: str, name: str) -> None:
        tasks, key = self.tasks, (what, name)
        tasks[key] = tasks.get(key, 0) + 1

    def started(self, name: str, queue_wait: float) -> None:
        tasks, key = self.tasks, ("started", name)
        tasks[key] = tasks.get(key, 0) + 1
        histogram = self.queue_waits.get(name) or _new(self.queue_waits, name)
        # From the record's own times (any producer's): kept within a day so that no value
        # makes the sum infinite for good.
        queue_wait = min(queue_wait, 86_400.0) if queue_wait > 0.0 else 0.0
        histogram.counts[bisect_left(BUCKETS, queue_wait)] += 1
        histogram.sum += queue_wait

    def ended(self, name: str, status: str, duration: float | None = None) -> None:
        """A terminal status was written (``duration``: for a run, from its start)."""
        what = _ENDED.get(status)
        if what is not None:
            tasks, key = self.tasks, (what, name)
            tasks[key] = tasks.get(key, 0) + 1
        if duration is not None:
            histogram = self.durations.get(name) or _new(self.durations, name)
            duration = duration if duration > 0.0 else 0.0
            histogram.counts[bisect_left(BUCKETS, duration)] += 1
            histogram.sum += duration

    def run_over(self, name: str, values: int, first_value: float | None) -> None:
        """A run is over here: its values, and how long its first one took (None: it yielded none)."""
        if values:
            self.values[name] = self.values.get(name, 0) + values
        if first_value is not None:
            histogram = self.first_values.get(name) or _new(self.first_values, name)
            first_value = first_value if first_value > 0.0 else 0.0
            histogram.counts[bisect_left(BUCKETS, first_value)] += 1
            histogram.sum += first_value

    def dead_letter(self, kind: str) -> None:
        self.dead_letters[kind] = self.dead_letters.get(kind, 0) + 1

    def submit(self, name: str) -> None:
        self.submitted[name] = self.submitted.get(name, 0) + 1


def _new(histograms: dict[str, Histogram], name: str) -> Histogram:
    histogram = histograms[name] = Histogram()
    return histogram


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
            "qtasks_broker_reachable", "1 while the brokers answer, 0 during an outage.", value=_reachable(app)
        )
    )
    if worker is None:
        return families
    info = GaugeMetricFamily(
        "qtasks_worker_info", "The worker of this process (always 1).", labels=["worker", "group", "guarantee"]
    )
    info.add_metric([worker.id, worker.group_id, app.config.processing_guarantee], 1)
    families.append(info)
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
    )
    for name, text, value in gauges:
        families.append(GaugeMetricFamily(name, text, value=value))
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
    broker = app.core.broker
    return int(broker.reachable and not app.core.trouble)


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
