"""qtasks on a real Kafka broker against a raw aiokafka loop (a benchmark, not a test).

    .venv/bin/python bench/bench_kafka.py [--bootstrap HOST:PORT] [--tasks N] [--k K]
        [--concurrency C] [--rounds R] [--samples S] [--linger-ms MS]
        [--phases throughput,latency,eos,submit,loaded]

Without ``--bootstrap`` it starts its own broker (deploy/local, Kafka 4.4.0) with the
JVM defaults (G1 + C2, ``KAFKA_JVM_OPTS=""``), as deploy/local/README.md advises for
benchmarks, and stops it at the end. Everything runs in one process on one broker.

Throughput (``--rounds`` rounds, raw then qtasks, after an unmeasured warm-up of both):

1. raw ceiling: a hand-written aiokafka worker loop. N task records (shaped like
   qtasks' TaskRecord) are pre-loaded into an input topic; a group consumer (auto-commit
   off, raw bytes) fetches a batch, decodes each task, produces its k result records
   (``{"uuid", "seq", "value"}`` keyed by uuid, partition computed once per task) with
   the producer settings of connectors/kafka.py (acks=all, idempotent, linger_ms as QueueConfig,
   256 KiB batches), awaits the batch's deliveries, then commits its offsets.
   The same loop again with the records qtasks handles per task on top of the values
   (``bench_raw(statuses=True)``: a ``new`` status written with each task, an end marker
   and a terminal status written per task, every status read back and decoded by a
   tailer; its clock stops at the last status read back): what a qtasks worker could
   reach at most with its records as they are, with no engine.
2. qtasks: the same N tasks (``gen(k)``, an async generator yielding k ints) submitted
   with ``add_task`` before the worker starts, then ``app.start()`` and ``app.wait`` on
   each (sequentially: tasks end roughly in order, and one live waiter at a time keeps
   the client's own cost out of the worker's figure; gathering N waiters costs the
   shared process a lot of garbage-collector time). The clock stops once the worker's
   writes are delivered (``producer.flush()``).

Both drain a backlog of N tasks from topics with the same partition counts (6), and
both clocks start before the consumer joins its group; "from first task" leaves the
join out. The CPU figure is this process's CPU time per result during the window
(less sensitive to a busy machine than wall time; the broker's CPU is not in it).
qtasks writes more per task than the raw loop: k values + an end marker to the
results topic and two status records (process, success), and reads its status back.

Latency (sequential, with a worker running in this process, after a warm-up):

3. ``add_task("gen", 3)`` to the first value out of ``app.stream(uuid)``, and to the
   end of that stream; ``add_task("noop", timeout=...)`` to the terminal status (the
   worker is in this process, so the status reaches the waiter without a Kafka round
   trip); and, for scale, the same round trip through raw aiokafka (client -> tasks
   topic -> the raw worker loop -> results topic -> a reader that is already assigned
   and polling), which bounds what any design on these settings can reach.
4. Exactly-once (``eos``): the qtasks throughput round of 2., at-least-once then
   exactly-once (``processing_guarantee``), ``--rounds`` times, the median of each; then
   the latencies of 3. in both modes.
5. Submitting (``submit``): N no-op tasks with one ``add_task`` at a time (each waits for
   its two records to be stored), then N with one ``add_tasks`` call (stored in batches,
   one wait each); no worker runs.
6. (``--phases loaded``, not run by default) the first stream value right after N*k
   results went to the app's results topic: a stream starts reading its partition
   ``stream_clock_skew`` (30 s) before the task's creation, so it reads them all first.

It asserts correctness: every task ``success`` with ``yield_count == k``, the exact
record counts on the results topics (N*k raw, N*(k+1) qtasks), every offset committed,
each stream yielding [0, 1, 2]. Figures from a shared 2-core machine only show that the
script works; compare runs on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import logging
import os
import platform
import re
import statistics
import sys
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KTP
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qtasks.asyncio import QueueTasks  # noqa: E402
from qtasks.cli import tune_collector  # noqa: E402
from qtasks.config import QueueConfig  # noqa: E402

PARTITIONS = 6  # qtasks' default tasks_partitions and results_partitions; the raw topics get the same
LINGER_MS = QueueConfig().kafka_linger_ms  # the default of both sides; --linger-ms changes both
CONSUMER_SETTINGS: dict[str, Any] = dict(  # as connectors/kafka.py
    enable_auto_commit=False,
    auto_offset_reset="earliest",
    fetch_max_wait_ms=100,
    max_partition_fetch_bytes=1_000_000 + 64 * 1024,
)

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


# --------------------------------------------------------------------------- helpers


def kafka_version() -> str:
    found = re.search(r"<kafka.version>([^<]+)</kafka.version>", (ROOT / "deploy/local/pom.xml").read_text())
    return found.group(1) if found else "?"


def start_local_broker() -> Any:
    spec = importlib.util.spec_from_file_location("qtasks_local_broker", ROOT / "deploy/local/broker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    # JVM defaults (G1 + C2) instead of the quick-start flags (SerialGC, C1 only): full JIT.
    broker = module.LocalKafka(env={"KAFKA_JVM_OPTS": ""})
    broker.start(timeout=240)
    return broker


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..100."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def latency_row(values: list[float]) -> tuple[str, str]:
    ms = [v * 1000 for v in values]
    p50, p90, p99 = (percentile(ms, q) for q in (50, 90, 99))
    return f"p50 {p50:5.1f} / p90 {p90:5.1f} / p99 {p99:5.1f} ms", f"min {min(ms):.1f}, mean {statistics.fmean(ms):.1f}"


class Topics:
    """Creates topics and deletes every topic of the run at the end."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.created: list[str] = []

    async def create(self, *names: str) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="bench-admin")
        await admin.start()
        try:
            await admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names])
        finally:
            await admin.close()
        self.created.extend(names)
        # Wait for the leaders, as qtasks' ensure_topics does.
        probe = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        await probe.start()
        try:
            for name in names:
                for _ in range(100):
                    with contextlib.suppress(Exception):
                        if len(await asyncio.wait_for(probe.partitions_for(name), 10)) == PARTITIONS:
                            break
                    await asyncio.sleep(0.1)
        finally:
            await probe.stop()

    def add_app(self, app: QueueTasks) -> None:
        t = app.topics
        self.created.extend([t.tasks, t.results, t.status, t.control, t.dlq])

    async def delete_all(self) -> None:
        if not self.created:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="bench-admin")
        try:
            await admin.start()
            await admin.delete_topics(self.created)
        except Exception as exc:
            print(f"(could not delete the bench topics: {exc})", file=sys.stderr)
        finally:
            await admin.close()
        self.created = []


async def record_count(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [KTP(topic, p) for p in range(PARTITIONS)]
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        return sum(ends[tp] - begins[tp] for tp in tps)
    finally:
        await consumer.stop()


async def committed_count(bootstrap: str, topic: str) -> int:
    """Records a read_committed consumer reads from the topic (to its last stable offset)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [KTP(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        count = 0
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            batches = await consumer.getmany(timeout_ms=500)
            count += sum(len(records) for records in batches.values())
        return count
    finally:
        await consumer.stop()


async def check_all_committed(bootstrap: str, topic: str, group: str) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([KTP(topic, p) for p in range(PARTITIONS)])
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
    await admin.start()
    try:
        committed = {tp: meta.offset for tp, meta in (await admin.list_consumer_group_offsets(group)).items()}
    finally:
        await admin.close()
    behind = {tp: (committed.get(tp), end) for tp, end in ends.items() if end and committed.get(tp) != end}
    assert not behind, f"group {group}: committed offsets short of the end: {behind}"


def make_producer(bootstrap: str, linger_ms: int) -> AIOKafkaProducer:
    return AIOKafkaProducer(  # the settings of connectors/kafka.py's KafkaProducer
        bootstrap_servers=bootstrap,
        client_id="bench-raw",
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        max_request_size=1_000_000 + 64 * 1024,
    )


def task_value(task_uuid: str, k: int) -> bytes:
    """A task record shaped like qtasks' TaskRecord."""
    return _json_encode({"v": 1, "uuid": task_uuid, "task_name": "gen", "args": [k], "created_at": time.time()})


# --------------------------------------------------------------------------- 1. raw ceiling


def status_value(task_uuid: str, status: str, k: int = 0) -> bytes:
    """A status record shaped like qtasks' (``new`` as the client writes it, or a terminal one)."""
    now = time.time()
    if status == "new":
        return _json_encode(
            {"uuid": task_uuid, "task_name": "gen", "status": "new", "created_at": now, "updated_at": now}
        )
    return _json_encode(
        {
            "uuid": task_uuid,
            "task_name": "gen",
            "status": status,
            "created_at": now,
            "updated_at": now,
            "returning": list(range(k)),
            "yield_count": k,
            "attempt": 1,
            "worker": "bench-raw",
            "rev": 2,
            "lease_until": 0.0,
            "results_partition": 0,
            "results_offset": 0,
            "started_at": now,
        }
    )


async def raw_worker_batch(
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    results_topic: str,
    timeout_ms: int,
    marks: dict[str, float] | None = None,
    status_topic: str | None = None,
) -> int:
    """One round of the raw worker loop: fetch, produce k results per task, await the deliveries, commit.

    With ``status_topic``, each task also gets qtasks' records: an end marker after its
    values and a terminal status (``success``) keyed by its id.
    """
    batches = await consumer.getmany(timeout_ms=timeout_ms)
    if not batches:
        return 0
    if marks is not None and "first" not in marks:
        marks["first"] = time.perf_counter()
    deliveries = []
    offsets = {}
    done = 0
    send = producer.send
    for tp, records in batches.items():
        for record in records:
            task = _json_decode(record.value)
            task_uuid = task["uuid"]
            key = task_uuid.encode()
            # The default partitioner's choice, computed once per task rather than per record.
            partition = (murmur2(key) & 0x7FFFFFFF) % PARTITIONS
            k = task["args"][0]
            for i in range(k):
                value = _json_encode({"uuid": task_uuid, "seq": i, "value": i})
                deliveries.append(await send(results_topic, value, key=key, partition=partition))
            if status_topic is not None:
                end = _json_encode({"uuid": task_uuid, "seq": k, "end": True, "status": "success"})
                deliveries.append(await send(results_topic, end, key=key, partition=partition))
                status = status_value(task_uuid, "success", k)
                deliveries.append(await send(status_topic, status, key=key, partition=partition))
            done += 1
        offsets[tp] = records[-1].offset + 1
    for delivery in deliveries:  # raises a delivery error; cheaper than gather() over thousands
        await delivery
    await consumer.commit(offsets)
    return done


async def tail_statuses(consumer: AIOKafkaConsumer, view: dict[bytes, Any], ended: list[int]) -> None:
    """Read every status record into ``view`` (decoded), counting the terminal ones, as qtasks' tailer does."""
    while True:
        for records in (await consumer.getmany(timeout_ms=100)).values():
            for record in records:
                status = _json_decode(record.value)
                view[record.key] = status
                if status["status"] != "new":
                    ended[0] += 1


async def bench_raw(
    bootstrap: str, topics: Topics, n: int, k: int, linger_ms: int, statuses: bool = False
) -> dict[str, float]:
    """The raw loop over a backlog of ``n`` tasks of ``k`` values.

    ``statuses``: with the records qtasks handles per task on top of the values (a
    ``new`` status written with the task, an end marker and a terminal status written by
    the worker, every status read back by a tailer that decodes it), and no engine: what
    a qtasks worker could reach at most with its records as they are.
    """
    tag = uuid_mod.uuid4().hex[:8]
    tasks_topic, results_topic, group = f"raw{tag}.tasks", f"raw{tag}.results", f"raw{tag}-workers"
    status_topic = f"raw{tag}.status" if statuses else None
    await topics.create(tasks_topic, results_topic, *([status_topic] if status_topic else []))
    producer = make_producer(bootstrap, linger_ms)
    await producer.start()
    tailer: AIOKafkaConsumer | None = None
    tailing: asyncio.Task[None] | None = None
    try:
        for _ in range(n):
            task_uuid = str(uuid_mod.uuid4())
            await producer.send(tasks_topic, task_value(task_uuid, k), key=task_uuid.encode())
            if status_topic is not None:
                await producer.send(status_topic, status_value(task_uuid, "new"), key=task_uuid.encode())
        await producer.flush()
        consumer = AIOKafkaConsumer(
            tasks_topic, bootstrap_servers=bootstrap, group_id=group, client_id="bench-raw", **CONSUMER_SETTINGS
        )
        marks: dict[str, float] = {}
        done = 0
        view: dict[bytes, Any] = {}
        ended = [0]
        started, cpu = time.perf_counter(), time.process_time()
        if status_topic is not None:
            tailer = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id="bench-raw-status", **CONSUMER_SETTINGS)
            await tailer.start()
            status_tps = [KTP(status_topic, p) for p in range(PARTITIONS)]
            tailer.assign(status_tps)
            await tailer.seek_to_beginning(*status_tps)
            tailing = asyncio.ensure_future(tail_statuses(tailer, view, ended))
        await consumer.start()
        try:
            while done < n:
                done += await raw_worker_batch(consumer, producer, results_topic, 500, marks, status_topic)
                if time.perf_counter() - started > 600:
                    raise AssertionError(f"raw loop: only {done} of {n} tasks in 600 s")
            while tailing is not None and ended[0] < n:  # every terminal status read back
                await asyncio.sleep(0.001)
                if time.perf_counter() - started > 600:
                    raise AssertionError(f"raw loop: only {ended[0]} of {n} terminal statuses read back in 600 s")
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            await consumer.stop()
    finally:
        if tailing is not None:
            tailing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tailing
        if tailer is not None:
            await tailer.stop()
        await producer.stop()
    assert done == n, (done, n)
    per_task = k + 1 if statuses else k
    written = await record_count(bootstrap, results_topic)
    assert written == n * per_task, f"raw: {written} result records, expected {n * per_task}"
    if statuses:
        assert len(view) == n and ended[0] == n, (len(view), ended[0], n)
    await check_all_committed(bootstrap, tasks_topic, group)
    return {"elapsed": elapsed, "cpu": cpu, "join": marks["first"] - started}


# --------------------------------------------------------------------------- 2. qtasks


def make_app(
    bootstrap: str,
    concurrency: int,
    linger_ms: int,
    marks: dict[str, float] | None = None,
    guarantee: str = "at_least_once",
) -> QueueTasks:
    app = QueueTasks(
        name=f"bench{uuid_mod.uuid4().hex[:8]}",
        broker_url=f"kafka://{bootstrap}",
        concurrency=concurrency,
        kafka_linger_ms=linger_ms,
        log_level="WARNING",
        processing_guarantee=guarantee,
    )

    @app.task
    async def gen(k: int) -> AsyncIterator[int]:
        if marks is not None and "first" not in marks:
            marks["first"] = time.perf_counter()
        for i in range(k):
            yield i

    @app.task
    async def noop() -> None:
        return None

    return app


async def submit_all(app: QueueTasks, n: int, *args: Any) -> list[str]:
    uuids: list[str] = []
    for start in range(0, n, 500):
        batch = await asyncio.gather(*(app.add_task("gen", *args) for _ in range(min(500, n - start))))
        uuids.extend(t.uuid for t in batch if t is not None)
    assert len(uuids) == n
    return uuids


async def bench_qtasks(
    bootstrap: str, topics: Topics, n: int, k: int, concurrency: int, linger_ms: int, guarantee: str = "at_least_once"
) -> dict[str, float]:
    marks: dict[str, float] = {}
    app = make_app(bootstrap, concurrency, linger_ms, marks, guarantee)
    topics.add_app(app)
    try:
        uuids = await submit_all(app, n, k)
        await app.broker.producer.flush()
        # The worker's process as ``qtasks run`` sets it up (its garbage collector), for
        # this engine's part only: the raw loop and the peers keep Python's defaults.
        collector = gc.get_threshold()
        tune_collector(app.config)
        try:
            started, cpu = time.perf_counter(), time.process_time()
            await app.start()
            finished = [await app.wait(u, 600) for u in uuids]
            # The worker applies its status writes to its view before they are delivered; stop
            # the clock once everything it wrote is durable (the raw loop awaits its deliveries).
            await app.broker.producer.flush()
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            gc.set_threshold(*collector)
            gc.unfreeze()
        bad = [t for t in finished if t.status != "success" or t.yield_count != k]
        assert not bad, f"{len(bad)} tasks did not end as success with {k} values, e.g. {bad[0]}"
    finally:
        await app.stop()  # commits the last offsets
    if guarantee == "exactly_once":
        # Offsets count the transaction markers too: count what a read_committed reader gets.
        written = await committed_count(bootstrap, app.topics.results)
    else:
        written = await record_count(bootstrap, app.topics.results)
    assert written == n * (k + 1), f"qtasks: {written} result records, expected {n * (k + 1)} (k values + end marker)"
    await check_all_committed(bootstrap, app.topics.tasks, app.group_id)
    return {"elapsed": elapsed, "cpu": cpu, "join": marks["first"] - started}


async def bench_submit(bootstrap: str, topics: Topics, n: int, concurrency: int, linger_ms: int) -> tuple[float, float]:
    """Seconds to submit ``n`` tasks one ``add_task`` at a time, then with one ``add_tasks`` (no worker runs)."""
    app = make_app(bootstrap, concurrency, linger_ms)
    topics.add_app(app)
    try:
        await app.add_task("noop")  # connected, topics created
        started = time.perf_counter()
        for _ in range(n):
            await app.add_task("noop")
        one = time.perf_counter() - started
        started = time.perf_counter()
        handles = await app.add_tasks("noop", [()] * n)
        bulk = time.perf_counter() - started
        assert len(handles) == n and len({h.uuid for h in handles}) == n
        assert await record_count(bootstrap, app.topics.tasks) == 2 * n + 1
    finally:
        await app.stop()
    return one, bulk


# --------------------------------------------------------------------------- 3. latency


async def bench_latency(
    bootstrap: str,
    topics: Topics,
    samples: int,
    warmup: int,
    concurrency: int,
    linger_ms: int,
    guarantee: str = "at_least_once",
) -> dict[str, list[float]]:
    app = make_app(bootstrap, concurrency, linger_ms, guarantee=guarantee)
    topics.add_app(app)
    first_value: list[float] = []
    stream_end: list[float] = []
    noop: list[float] = []
    try:
        await app.start()
        for i in range(warmup + samples):
            t0 = time.perf_counter()
            task = await app.add_task("gen", 3)
            assert task is not None
            values: list[Any] = []
            first = 0.0
            async for v in app.stream(task.uuid, timeout=30):
                if not values:
                    first = time.perf_counter()
                values.append(v)
            end = time.perf_counter()
            assert values == [0, 1, 2], values
            if i >= warmup:
                first_value.append(first - t0)
                stream_end.append(end - t0)
        for i in range(warmup + samples):
            t0 = time.perf_counter()
            done = await app.add_task("noop", timeout=30)
            elapsed = time.perf_counter() - t0
            assert done is not None and done.status == "success", done
            if i >= warmup:
                noop.append(elapsed)
    finally:
        await app.stop()
    return {"first_value": first_value, "stream_end": stream_end, "noop": noop}


async def bench_stream_after_load(
    bootstrap: str, topics: Topics, n: int, k: int, samples: int, concurrency: int, linger_ms: int
) -> list[float]:
    """The stream figure right after N*k results were written (they are within stream_clock_skew)."""
    app = make_app(bootstrap, concurrency, linger_ms)
    topics.add_app(app)
    latencies: list[float] = []
    try:
        await app.start()
        for u in await submit_all(app, n, k):
            done = await app.wait(u, 600)
            assert done.status == "success" and done.yield_count == k, done
        for _ in range(samples):
            t0 = time.perf_counter()
            task = await app.add_task("gen", 3)
            assert task is not None
            values: list[Any] = []
            async for v in app.stream(task.uuid, timeout=60):
                if not values:
                    latencies.append(time.perf_counter() - t0)
                values.append(v)
            assert values == [0, 1, 2], values
    finally:
        await app.stop()
    return latencies


async def bench_raw_latency(bootstrap: str, topics: Topics, samples: int, warmup: int, linger_ms: int) -> list[float]:
    """The floor for the stream figure: the same round trip with long-lived raw clients."""
    tag = uuid_mod.uuid4().hex[:8]
    tasks_topic, results_topic, group = f"rawlat{tag}.tasks", f"rawlat{tag}.results", f"rawlat{tag}-workers"
    await topics.create(tasks_topic, results_topic)
    producer = make_producer(bootstrap, linger_ms)  # shared by client and worker, as in one qtasks process
    await producer.start()
    worker = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, client_id="bench-raw", **CONSUMER_SETTINGS)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id="bench-reader", **CONSUMER_SETTINGS)
    joined = asyncio.Event()

    class Joined(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            pass

        async def on_partitions_assigned(self, assigned: Any) -> None:
            joined.set()

    await worker.start()
    worker.subscribe([tasks_topic], listener=Joined())
    await reader.start()
    tps = [KTP(results_topic, p) for p in range(PARTITIONS)]
    reader.assign(tps)
    await reader.seek_to_end(*tps)

    async def work() -> None:
        while True:
            await raw_worker_batch(worker, producer, results_topic, 500)

    loop_task = asyncio.get_running_loop().create_task(work())
    latencies: list[float] = []
    try:
        await asyncio.wait_for(joined.wait(), 60)
        for i in range(warmup + samples):
            task_uuid = str(uuid_mod.uuid4())
            key = task_uuid.encode()
            t0 = time.perf_counter()
            await (await producer.send(tasks_topic, task_value(task_uuid, 3), key=key))  # as add_task awaits it
            seen = 0.0
            values = 0
            while values < 3:
                batches = await reader.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        if record.key == key:
                            values += 1
                            seen = seen or time.perf_counter()
                if loop_task.done():
                    loop_task.result()
                if time.perf_counter() - t0 > 30:
                    raise AssertionError(f"raw latency: {values} of 3 values in 30 s")
            if i >= warmup:
                latencies.append(seen - t0)
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        await worker.stop()
        await reader.stop()
        await producer.stop()
    return latencies


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, bootstrap: str) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []

    def row(what: str, value: str, note: str = "") -> None:
        rows.append((what, value, note))
        print(f"  {what}: {value}  {note}", flush=True)

    topics = Topics(bootstrap)
    phases = set(args.phases.split(","))
    n, k, c, linger = args.tasks, args.k, args.concurrency, args.linger_ms
    try:
        if "throughput" in phases:
            w = min(n, args.warmup_tasks)
            print(f"warm-up: {w} tasks x {k} on each side (creates the offsets topic, warms the broker's JIT) ...")
            await bench_raw(bootstrap, topics, w, k, linger)
            await bench_qtasks(bootstrap, topics, w, k, c, linger)
            await topics.delete_all()
            raw_runs, rs_runs, q_runs = [], [], []
            for r in range(args.rounds):
                raw = await bench_raw(bootstrap, topics, n, k, linger)
                rs = await bench_raw(bootstrap, topics, n, k, linger, statuses=True)
                q = await bench_qtasks(bootstrap, topics, n, k, c, linger)
                await topics.delete_all()
                raw_runs.append(raw)
                rs_runs.append(rs)
                q_runs.append(q)
                print(
                    f"round {r + 1}: raw {n * k / raw['elapsed']:,.0f} results/s ({raw['elapsed']:.2f} s), "
                    f"raw with qtasks' records {n * k / rs['elapsed']:,.0f} results/s ({rs['elapsed']:.2f} s), "
                    f"qtasks {n * k / q['elapsed']:,.0f} results/s ({q['elapsed']:.2f} s)",
                    flush=True,
                )

            def med(runs: list[dict[str, float]], key: str) -> float:
                return statistics.median(run[key] for run in runs)

            results = n * k
            raw_e, q_e = med(raw_runs, "elapsed"), med(q_runs, "elapsed")
            raw_f = statistics.median(r["elapsed"] - r["join"] for r in raw_runs)
            q_f = statistics.median(r["elapsed"] - r["join"] for r in q_runs)
            best_raw = max(results / r["elapsed"] for r in raw_runs)
            best_q = max(results / r["elapsed"] for r in q_runs)
            row(
                "raw loop: results/s",
                f"{results / raw_e:,.0f}",
                f"median of {args.rounds}, {raw_e:.2f} s; best {best_raw:,.0f}",
            )
            row(
                "raw loop: results/s from first task",
                f"{results / raw_f:,.0f}",
                f"join + first fetch {med(raw_runs, 'join'):.2f} s",
            )
            row("raw loop: CPU per result", f"{med(raw_runs, 'cpu') / results * 1e6:.1f} us", "this process only")
            rs_e = med(rs_runs, "elapsed")
            row(
                "raw loop with qtasks' records: results/s",
                f"{results / rs_e:,.0f}",
                f"median of {args.rounds}, {rs_e:.2f} s (to the last status read back); {raw_e / rs_e:.2f}x raw",
            )
            row(
                "raw loop with qtasks' records: CPU per task",
                f"{med(rs_runs, 'cpu') / n * 1e6:.1f} us",
                f"raw: {med(raw_runs, 'cpu') / n * 1e6:.1f} us",
            )
            row(
                "qtasks: results/s",
                f"{results / q_e:,.0f}",
                f"median of {args.rounds}, {q_e:.2f} s; best {best_q:,.0f}; {raw_e / q_e:.2f}x raw",
            )
            row(
                "qtasks: results/s from first task",
                f"{results / q_f:,.0f}",
                f"start + join {med(q_runs, 'join'):.2f} s; {raw_f / q_f:.2f}x raw",
            )
            row("qtasks: tasks/s", f"{n / q_e:,.0f}", "")
            row(
                "qtasks: CPU per task",
                f"{med(q_runs, 'cpu') / n * 1e6:.1f} us",
                f"{med(q_runs, 'cpu') / med(rs_runs, 'cpu'):.2f}x the raw loop with qtasks' records",
            )
            row(
                "qtasks: CPU per result",
                f"{med(q_runs, 'cpu') / results * 1e6:.1f} us",
                f"{med(q_runs, 'cpu') / med(raw_runs, 'cpu'):.2f}x raw",
            )
        if "latency" in phases:
            s = args.samples
            print(f"latency: {s} sequential samples each (after {args.warmup} warm-up) ...", flush=True)
            lat = await bench_latency(bootstrap, topics, s, args.warmup, c, linger)
            row("add_task -> first stream value (gen, k=3)", *latency_row(lat["first_value"]))
            row("add_task -> end of that stream", *latency_row(lat["stream_end"]))
            row("add_task(noop, timeout=) -> terminal status", *latency_row(lat["noop"]))
            raw_lat = await bench_raw_latency(bootstrap, topics, s, args.warmup, linger)
            row("raw: send task -> first result at a reader", *latency_row(raw_lat))
        if "eos" in phases:
            print(f"exactly-once against at-least-once: {args.rounds} rounds of {n} tasks x {k} each ...", flush=True)
            alo_runs, eos_runs = [], []
            for r in range(args.rounds):
                alo = await bench_qtasks(bootstrap, topics, n, k, c, linger)
                eos = await bench_qtasks(bootstrap, topics, n, k, c, linger, "exactly_once")
                await topics.delete_all()
                alo_runs.append(alo)
                eos_runs.append(eos)
                print(
                    f"round {r + 1}: at-least-once {n * k / alo['elapsed']:,.0f} results/s, "
                    f"exactly-once {n * k / eos['elapsed']:,.0f} results/s",
                    flush=True,
                )
            alo_e = statistics.median(x["elapsed"] for x in alo_runs)
            eos_e = statistics.median(x["elapsed"] for x in eos_runs)
            alo_cpu = statistics.median(x["cpu"] for x in alo_runs) / (n * k) * 1e6
            eos_cpu = statistics.median(x["cpu"] for x in eos_runs) / (n * k) * 1e6
            row(
                "at-least-once: results/s",
                f"{n * k / alo_e:,.0f}",
                f"median of {args.rounds}; {alo_cpu:.1f} us CPU each",
            )
            row(
                "exactly-once: results/s",
                f"{n * k / eos_e:,.0f}",
                f"median of {args.rounds}; {alo_e / eos_e:.2f}x at-least-once; {eos_cpu:.1f} us CPU each",
            )
            s = args.samples
            for guarantee in ("at_least_once", "exactly_once"):
                lat = await bench_latency(bootstrap, topics, s, args.warmup, c, linger, guarantee)
                row(f"{guarantee}: add_task -> first stream value", *latency_row(lat["first_value"]))
                row(f"{guarantee}: add_task(noop, timeout=) -> terminal status", *latency_row(lat["noop"]))
        if "submit" in phases:
            print(f"submitting {n} tasks: one add_task at a time, then one add_tasks ...", flush=True)
            one, bulk = await bench_submit(bootstrap, topics, n, c, linger)
            row("add_task, one at a time: submitted tasks/s", f"{n / one:,.0f}", f"{one:.2f} s for {n:,}")
            row("add_tasks, one call: submitted tasks/s", f"{n / bulk:,.0f}", f"{bulk:.2f} s; {one / bulk:.1f}x")
        if "loaded" in phases:
            m = min(args.samples, 50)
            print(f"stream latency right after {n} x {k} results ({m} samples) ...", flush=True)
            loaded = await bench_stream_after_load(bootstrap, topics, n, k, m, c, linger)
            value, note = latency_row(loaded)
            row(
                "add_task -> first stream value, after load",
                value,
                f"{note}; ~{n * (k + 1) // PARTITIONS:,} recent records per results partition",
            )
    finally:
        await topics.delete_all()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--bootstrap", help="a running broker, host:port (default: start one with deploy/local)")
    parser.add_argument("--tasks", type=int, default=3000, help="N tasks per throughput round (default 3000)")
    parser.add_argument("--k", type=int, default=20, help="values (result records) per task (default 20)")
    parser.add_argument("--concurrency", type=int, default=64, help="qtasks worker concurrency (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds, the median is reported (default 3)")
    parser.add_argument("--warmup-tasks", type=int, default=500, help="unmeasured tasks per side first (default 500)")
    parser.add_argument("--samples", type=int, default=200, help="sequential samples per latency figure (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="latency samples dropped first (default 10)")
    parser.add_argument(
        "--linger-ms",
        type=int,
        default=LINGER_MS,
        help=f"producer linger_ms on both sides (default {LINGER_MS}, as qtasks)",
    )
    parser.add_argument(
        "--phases",
        default="throughput,latency,eos,submit",
        help="comma list of throughput, latency, eos, submit, loaded (default: throughput,latency,eos,submit); "
        "submit: add_task one at a time against add_tasks; eos: "
        "exactly-once against at-least-once, throughput and latency; loaded: the stream latency "
        "right after N*k results were written",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The first group join logs a GroupCoordinatorNotAvailableError while __consumer_offsets is made.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    import aiokafka

    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        print("starting a Kafka broker (deploy/local, KAFKA_JVM_OPTS='') ...", flush=True)
        t = time.perf_counter()
        broker = start_local_broker()
        bootstrap = broker.bootstrap
        print(f"broker at {bootstrap} in {time.perf_counter() - t:.1f} s", flush=True)
    started = time.perf_counter()
    try:
        rows = asyncio.run(run(args, bootstrap))
    finally:
        if broker is not None:
            broker.stop()
    source = "own broker, JVM defaults (G1, C2)" if broker is not None else f"external broker at {bootstrap}"
    print()
    print(f"Kafka {kafka_version()} (deploy/local/pom.xml; {source}); aiokafka {aiokafka.__version__}")
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), {os.cpu_count()} CPUs; "
        f"N={args.tasks} k={args.k} concurrency={args.concurrency} rounds={args.rounds} "
        f"samples={args.samples} linger_ms={args.linger_ms}; {time.perf_counter() - started:.0f} s"
    )
    if rows:
        w1 = max(len(r[0]) for r in rows)
        w2 = max(len(r[1]) for r in rows)
        print(f"{'measure':<{w1}}  {'figure':>{w2}}  note")
        print("-" * (w1 + w2 + 40))
        for what, value, note in rows:
            print(f"{what:<{w1}}  {value:>{w2}}  {note}")


if __name__ == "__main__":
    main()
