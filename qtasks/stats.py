"""What a worker and a client did, counted: :class:`Stats`, kept on the app's event loop.

Plain dicts and ints, a few updates per task, no lock and no library: the engine (core,
worker, runner, streams, dead letters) counts here, and :mod:`qtasks.metrics` shows the
counts to Prometheus.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["BUCKETS", "UNKNOWN_TASK", "Histogram", "Stats"]

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
