"""qtasks and its peers on one real Kafka broker, the same two workloads each (a benchmark, not a test).

    .venv/bin/python bench/bench_peers.py [--bootstrap HOST:PORT] [--tasks-gen 2000] [--k 50]
        [--tasks-short 10000] [--engines raw,qtasks,faust,faststream,taskiq] [--rounds 1]
        [--concurrency 64]

Without ``--bootstrap`` it starts its own broker (deploy/local, Kafka 4.4.0, JVM defaults)
as bench/bench_kafka.py does, and stops it at the end. ``make bench-peers`` installs the
``bench`` extra of pyproject.toml (the pinned peers) into .venv first.

The workloads, run by each engine in turn (``--engines`` order, ``--rounds`` times; the
median is reported):

1. generator: ``--tasks-gen`` tasks that each produce ``--k`` values, one result record
   per value; figure: result records (values) per second.
2. short: ``--tasks-short`` tasks of one value each; figure: tasks per second.

The peers are installed in .venv itself: the ``bench`` extra resolves together with ``dev``
(pyproject.toml says why it pins kafka-python), so no second venv is needed.

Every run gets fresh topics (unique names) with the same partition count (6) for every
engine, and its tasks are written to the tasks topic as a backlog *before* its worker
starts, in the engine's own message format (qtasks' ``add_task``, Taskiq's ``kiq``,
FastStream's ``publish``; JSON records for the raw loop and Faust, which read plain
JSON). One worker (one consumer, one process) per engine then drains it.

Throughput comes from the result records themselves: the harness reads the run's whole
results topic back and takes the Kafka record timestamps (CreateTime, stamped by each
engine's producer when it sends the record) of the first and the last record:
``values / (last - first)``, or ``tasks / (last - first)``. Process start-up, imports and
the group join are outside that window for every engine alike. For qtasks the window
also holds its end-of-stream markers (a task's last record); they are not counted as
values.

The engines (each worker as its library's docs write one; bench/peers/ holds the peers'):

- raw: bench_kafka.py's hand-written aiokafka loop (``bench_raw``, ``raw_worker_batch``),
  the ceiling, in this process.
- raw-statuses: the same loop with the records qtasks handles per task on top of the
  values and nothing else of an engine (``bench_raw(statuses=True)``): a ``new`` status
  written with each task, an end marker and a terminal status written by the worker,
  every status read back and decoded by a tailer; its clock stops once the last
  terminal status is read back. Its figure is what a qtasks worker could reach at most
  with the records it handles today (not run by default).
- qtasks: bench_kafka.py's ``bench_qtasks`` (``make_app``, ``submit_all``): async
  generator tasks, ``concurrency`` as given, in this process (its sequential
  ``app.wait`` client shares the process, as in bench_kafka.py).
- faust (faust-streaming): an agent over the tasks topic sending each value to the
  results topic (bench/peers/faust_worker.py, ``faust worker`` via ``app.main()``).
- faststream (faststream[kafka]): a subscriber that publishes its results
  (bench/peers/faststream_worker.py, ``asyncio.run(app.run())``).
- taskiq (taskiq + taskiq-aio-kafka): ``taskiq worker --workers 1``
  (bench/peers/taskiq_worker.py). Taskiq has no generator tasks and no Kafka result
  backend: short results go through a minimal result backend that writes each return
  value as a record; for the generator workload the task sends its k values itself
  with the broker's producer (labelled in the table).

``--concurrency`` (default 64, bench_kafka.py's) is given to every engine that has the
knob: qtasks ``concurrency``, Faust's agent ``concurrency``, FastStream's
``max_workers``, Taskiq's ``--max-async-tasks``. The raw loop works a fetched batch at a
time. Everything else (producer acks, linger, commits) is each library's default; the
peers' README/doc examples are followed where they say how to set a thing up.

Nothing passes unchecked: each run must leave exactly the expected number of result
records (k per task; k + 1 for qtasks), exactly that many for every task id (and, for
the peers, the ids that were submitted, with seq 0..k-1 and no error), every offset of
its tasks topic committed by its group after the worker stopped, the worker must exit
cleanly, and the record timestamps must lie within the worker's lifetime. A failed run
shows as FAILED in the table and the script exits non-zero. Figures from a shared 2-core
machine only show that the script works; compare runs on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid as uuid_mod
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as KTP
from aiokafka.admin import AIOKafkaAdminClient
from bench_kafka import (
    LINGER_MS,
    PARTITIONS,
    Topics,
    bench_qtasks,
    bench_raw,
    check_all_committed,
    kafka_version,
    start_local_broker,
)

PEERS_DIR = Path(__file__).resolve().parent / "peers"
ENGINES = ("raw", "qtasks", "faust", "faststream", "taskiq")
#: Run only when asked for (``--engines``).
EXTRA_ENGINES = ("raw-statuses",)
WORKLOADS = ("generator", "short")
STOP_TIMEOUT = 60.0  # seconds a peer's worker gets to stop gracefully


@dataclass
class Workload:
    name: str  # "generator" or "short"
    tasks: int
    k: int  # values per task

    @property
    def values(self) -> int:
        return self.tasks * self.k


@dataclass
class Outcome:
    rate: float | None = None  # values/s (generator) or tasks/s (short)
    span: float = 0.0  # seconds from the first to the last result record
    error: str = ""


@dataclass
class Peer:
    """How the harness drives one peer: its worker's command line and how it loads the backlog."""

    command: Callable[[int], list[str]]  # concurrency -> argv (run in bench/peers)
    preload: Callable[[str, str, Workload], Awaitable[list[str]]]  # bootstrap, tasks topic -> task ids
    label: dict[str, str] = field(default_factory=dict)  # workload -> what was measured, if not native


# --------------------------------------------------------------------------- versions


def engine_version(engine: str) -> str:
    if engine == "raw":
        return f"aiokafka {version('aiokafka')}"
    if engine == "raw-statuses":
        return f"aiokafka {version('aiokafka')}, qtasks' records per task"
    if engine == "qtasks":
        return f"qtasks-kafka {version('qtasks-kafka')} (this tree)"
    if engine == "faust":
        return f"faust-streaming {version('faust-streaming')} (mode-streaming {version('mode-streaming')})"
    if engine == "faststream":
        return f"faststream {version('faststream')}"
    if engine == "taskiq":
        return f"taskiq {version('taskiq')} + taskiq-aio-kafka {version('taskiq-aio-kafka')}"
    raise ValueError(engine)


# --------------------------------------------------------------------------- topics and results


class RunTopics(Topics):
    """bench_kafka.py's Topics, which also deletes the topics a peer created itself."""

    async def add_by_prefix(self, prefix: str) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="bench-admin")
        await admin.start()
        try:
            names = await admin.list_topics()
        finally:
            await admin.close()
        self.created.extend(n for n in names if n.startswith(prefix) and n not in self.created)


async def read_records(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None, int]]:
    """Every record of the topic as (key, value, timestamp ms)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [KTP(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[tuple[bytes | None, bytes | None, int]] = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for batch in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                records.extend((r.key, r.value, r.timestamp) for r in batch)
        return records
    finally:
        await consumer.stop()


def measure(
    engine: str,
    workload: Workload,
    records: list[tuple[bytes | None, bytes | None, int]],
    per_task: int,
    window: tuple[float, float],
    task_ids: list[str] | None = None,
) -> Outcome:
    """Check the run's result records and compute its figure from their timestamps."""
    expected = workload.tasks * per_task
    assert len(records) == expected, f"{engine}: {len(records)} result records, expected {expected}"
    per_key = Counter(key for key, _, _ in records)
    assert len(per_key) == workload.tasks, f"{engine}: results for {len(per_key)} task ids, expected {workload.tasks}"
    wrong = {key: n for key, n in per_key.items() if n != per_task}
    assert not wrong, (
        f"{engine}: {len(wrong)} tasks without exactly {per_task} result records, e.g. {next(iter(wrong.items()))}"
    )
    if task_ids is not None:  # a peer: its records are ours to read
        assert set(per_key) == {t.encode() for t in task_ids}, f"{engine}: result keys are not the submitted task ids"
        seqs: dict[bytes | None, list[int]] = {}
        for key, value, _ in records:
            decoded = json.loads(value or b"null")
            assert isinstance(decoded, dict) and not decoded.get("is_err"), f"{engine}: a failed task: {decoded}"
            seqs.setdefault(key, []).append(decoded["seq"])
        bad = [key for key, got in seqs.items() if sorted(got) != list(range(per_task))]
        assert not bad, f"{engine}: task {bad[0]!r} has seq {sorted(seqs[bad[0]])}, expected 0..{per_task - 1}"
    first = min(ts for _, _, ts in records)
    last = max(ts for _, _, ts in records)
    started_ms, done_ms = int(window[0] * 1000), int(window[1] * 1000) + 1
    assert started_ms <= first and last <= done_ms, (
        f"{engine}: record timestamps [{first}, {last}] outside the worker's lifetime [{started_ms}, {done_ms}]"
    )
    span = max(last - first, 1) / 1000
    count = workload.values if workload.name == "generator" else workload.tasks
    return Outcome(rate=count / span, span=span)


# --------------------------------------------------------------------------- raw and qtasks (bench_kafka.py)


async def run_in_process(engine: str, bootstrap: str, topics: Topics, workload: Workload, args: Any) -> Outcome:
    """bench_kafka.py's raw loop or qtasks run, then the timestamps of its results topic."""
    before = len(topics.created)
    started = time.time()
    if engine == "raw":
        await bench_raw(bootstrap, topics, workload.tasks, workload.k, LINGER_MS)
        per_task = workload.k
    elif engine == "raw-statuses":
        await bench_raw(bootstrap, topics, workload.tasks, workload.k, LINGER_MS, statuses=True)
        per_task = workload.k + 1  # the values, then the end-of-stream marker
    else:
        await bench_qtasks(bootstrap, topics, workload.tasks, workload.k, args.concurrency, LINGER_MS)
        per_task = workload.k + 1  # the values, then the end-of-stream marker
    done = time.time()
    (results_topic,) = [t for t in topics.created[before:] if t.endswith(".results")]
    records = await read_records(bootstrap, results_topic)
    return measure(engine, workload, records, per_task, (started, done))


# --------------------------------------------------------------------------- the peers


def task_payload(task_uuid: str, k: int) -> dict[str, Any]:
    return {"uuid": task_uuid, "k": k}


async def preload_json(bootstrap: str, topic: str, workload: Workload) -> list[str]:
    """Plain JSON task records, keyed by task id (what a Faust agent with the json serializer reads)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        ids = [str(uuid_mod.uuid4()) for _ in range(workload.tasks)]
        deliveries = [
            await producer.send(topic, json.dumps(task_payload(i, workload.k)).encode(), key=i.encode()) for i in ids
        ]
        for delivery in deliveries:
            await delivery
        return ids
    finally:
        await producer.stop()


async def preload_faststream(bootstrap: str, topic: str, workload: Workload) -> list[str]:
    """The tasks as FastStream publishes them (JSON body, content-type and correlation headers)."""
    from faststream.kafka import KafkaBroker

    ids = [str(uuid_mod.uuid4()) for _ in range(workload.tasks)]
    async with KafkaBroker(bootstrap, logger=None) as broker:
        confirms = [
            await broker.publish(task_payload(i, workload.k), topic, key=i.encode(), no_confirm=True) for i in ids
        ]
        for confirm in confirms:
            await confirm
    return ids


async def preload_taskiq(bootstrap: str, topic: str, workload: Workload) -> list[str]:
    """The tasks as Taskiq kicks them (``kiq`` on a client broker; the task ids are Taskiq's)."""
    from taskiq.kicker import AsyncKicker
    from taskiq_aio_kafka import AioKafkaBroker

    broker = AioKafkaBroker(bootstrap_servers=bootstrap, kafka_topic=topic)
    await broker.startup()
    try:
        ids: list[str] = []
        for start in range(0, workload.tasks, 500):
            batch = range(start, min(start + 500, workload.tasks))
            if workload.name == "generator":
                kicks = [AsyncKicker("bench_gen", broker, {}).kiq(workload.k) for _ in batch]
            else:
                kicks = [AsyncKicker("bench_short", broker, {}).kiq() for _ in batch]
            ids.extend(t.task_id for t in await asyncio.gather(*kicks))
        return ids
    finally:
        await broker.shutdown()


PEERS: dict[str, Peer] = {
    "faust": Peer(
        command=lambda c: [sys.executable, "faust_worker.py", "worker", "--without-web", "-l", "warn"],
        preload=preload_json,
        label={"generator": "agent sends its k values"},
    ),
    "faststream": Peer(
        command=lambda c: [sys.executable, "faststream_worker.py"],
        preload=preload_faststream,
        label={"generator": "handler publishes its k values"},
    ),
    "taskiq": Peer(
        command=lambda c: [
            *(sys.executable, "-m", "taskiq", "worker", "taskiq_worker:broker"),
            *("--workers", "1", "--max-async-tasks", str(c), "--log-level", "WARNING"),
        ],
        preload=preload_taskiq,
        label={"generator": "no generator tasks: the task sends its k values itself"},
    ),
}


def keep_log(log: Path, to: Path) -> None:
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(log, to)


def log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


async def wait_for_results(
    bootstrap: str, topic: str, expected: int, worker: asyncio.subprocess.Process, log: Path, timeout: float
) -> None:
    """Poll the results topic's end offsets until the run's records are all there."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    exited = asyncio.ensure_future(worker.wait())
    try:
        tps = [KTP(topic, p) for p in range(PARTITIONS)]
        deadline = time.monotonic() + timeout
        while True:
            written = sum((await consumer.end_offsets(tps)).values())  # a fresh topic starts at 0
            if written >= expected:
                return
            if worker.returncode is not None:
                raise AssertionError(
                    f"the worker exited ({worker.returncode}) after {written} of {expected} records:\n{log_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{written} of {expected} records in {timeout:.0f} s:\n{log_tail(log)}")
            await asyncio.wait({exited}, timeout=0.25)  # wakes early if the worker dies
    finally:
        exited.cancel()
        await consumer.stop()


async def stop_worker(worker: asyncio.subprocess.Process, log: Path) -> None:
    """SIGTERM (each peer's graceful stop, which commits its offsets); a worker that hangs is killed and fails."""
    if worker.returncode is None:
        worker.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(worker.wait(), STOP_TIMEOUT)
    except TimeoutError:
        kill_worker(worker)
        raise AssertionError(
            f"the worker did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM:\n{log_tail(log)}"
        ) from None
    if worker.returncode != 0:
        raise AssertionError(f"the worker exited with {worker.returncode}:\n{log_tail(log)}")


def kill_worker(worker: asyncio.subprocess.Process) -> None:
    """SIGKILL to the worker's session: the worker and any process it started (Taskiq's worker process)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)


async def run_peer(engine: str, bootstrap: str, topics: RunTopics, workload: Workload, args: Any) -> Outcome:
    peer = PEERS[engine]
    tag = f"{engine}{uuid_mod.uuid4().hex[:8]}"
    tasks_topic, results_topic, group = f"{tag}.tasks", f"{tag}.results", f"{tag}-workers"
    await topics.create(tasks_topic, results_topic)
    task_ids = await peer.preload(bootstrap, tasks_topic, workload)
    assert len(task_ids) == workload.tasks, (len(task_ids), workload.tasks)
    with tempfile.TemporaryDirectory(prefix=f"bench-{engine}-") as scratch:
        log = Path(scratch) / "worker.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(PEERS_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "BENCH_BOOTSTRAP": bootstrap,
            "BENCH_TASKS_TOPIC": tasks_topic,
            "BENCH_RESULTS_TOPIC": results_topic,
            "BENCH_GROUP": group,
            "BENCH_WORKLOAD": workload.name,
            "BENCH_CONCURRENCY": str(args.concurrency),
            "BENCH_DATA_DIR": str(Path(scratch) / "data"),
        }
        with log.open("wb") as out:
            started = time.time()
            worker = await asyncio.create_subprocess_exec(
                *peer.command(args.concurrency),
                cwd=PEERS_DIR,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                await wait_for_results(bootstrap, results_topic, workload.values, worker, log, args.timeout)
                done = time.time()
            except BaseException:
                kill_worker(worker)
                await worker.wait()
                raise
            await stop_worker(worker, log)
        if args.worker_logs:
            keep_log(log, Path(args.worker_logs) / f"{tag}-{workload.name}.log")
    await topics.add_by_prefix(tag)  # what the peer made itself (Faust's assignor topic)
    records = await read_records(bootstrap, results_topic)
    outcome = measure(engine, workload, records, workload.k, (started, done), task_ids)
    await check_all_committed(bootstrap, tasks_topic, group)
    return outcome


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, bootstrap: str, engines: list[str]) -> dict[tuple[str, str], list[Outcome]]:
    workloads = {
        "generator": Workload("generator", args.tasks_gen, args.k),
        "short": Workload("short", args.tasks_short, 1),
    }
    outcomes: dict[tuple[str, str], list[Outcome]] = {(e, w): [] for e in engines for w in WORKLOADS}
    topics = RunTopics(bootstrap)
    try:
        w = min(args.tasks_gen, args.warmup_tasks)
        print(f"warm-up: raw loop, {w} tasks x {args.k} (makes the offsets topic, warms the broker's JIT) ...")
        await bench_raw(bootstrap, topics, w, args.k, LINGER_MS)
        await topics.delete_all()
        for r in range(args.rounds):
            for engine in engines:
                for name in WORKLOADS:
                    workload = workloads[name]
                    print(f"round {r + 1}: {engine}, {name} ({workload.tasks} tasks x {workload.k}) ...", flush=True)
                    try:
                        if engine in PEERS:
                            outcome = await run_peer(engine, bootstrap, topics, workload, args)
                        else:
                            outcome = await run_in_process(engine, bootstrap, topics, workload, args)
                    except Exception as exc:
                        traceback.print_exc()
                        outcome = Outcome(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    else:
                        unit = "results/s" if name == "generator" else "tasks/s"
                        print(f"  {outcome.rate:,.0f} {unit} ({outcome.span:.3f} s first to last result)", flush=True)
                    outcomes[engine, name].append(outcome)
                    await topics.delete_all()
    finally:
        await topics.delete_all()
    return outcomes


def median_rate(runs: list[Outcome]) -> float | None:
    if not runs or any(o.error for o in runs):
        return None
    return statistics.median(o.rate for o in runs if o.rate is not None)


def cell(engine: str, name: str, outcomes: dict[tuple[str, str], list[Outcome]]) -> str:
    runs = outcomes[engine, name]
    rate = median_rate(runs)
    if rate is None:
        return "FAILED: " + next(o.error for o in runs if o.error).replace("|", "/")
    text = f"{rate:,.0f}"
    raw = median_rate(outcomes.get(("raw", name), []))
    if raw:
        text += f" ({rate / raw:.2f}x)"
    label = PEERS[engine].label.get(name) if engine in PEERS else None
    return f"{text} [{label}]" if label else text


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--bootstrap", help="a running broker, host:port (default: start one with deploy/local)")
    parser.add_argument("--tasks-gen", type=int, default=2000, help="tasks of the generator workload (default 2000)")
    parser.add_argument("--k", type=int, default=50, help="values per generator task (default 50)")
    parser.add_argument("--tasks-short", type=int, default=10000, help="tasks of the short workload (default 10000)")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help=f"comma list, in run order (default {','.join(ENGINES)})"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of every engine, the median is reported (default 1)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="tasks in flight, for engines with the knob (default 64)"
    )
    parser.add_argument("--warmup-tasks", type=int, default=500, help="unmeasured raw-loop tasks first (default 500)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take (default 600)")
    parser.add_argument("--worker-logs", metavar="DIR", help="keep each peer worker's output in DIR")
    args = parser.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES) - set(EXTRA_ENGINES)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {','.join(ENGINES + EXTRA_ENGINES)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The first group join logs a GroupCoordinatorNotAvailableError while __consumer_offsets is made.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

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
        outcomes = asyncio.run(run(args, bootstrap, engines))
    finally:
        if broker is not None:
            broker.stop()
    source = "own broker, JVM defaults (G1, C2)" if broker is not None else f"external broker at {bootstrap}"
    print()
    admin_client = f"; kafka-python {version('kafka-python')} (taskiq-aio-kafka's admin client)"
    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), aiokafka {version('aiokafka')}, "
        f"Kafka {kafka_version()} (deploy/local/pom.xml; {source})"
        f"{admin_client if 'taskiq' in engines else ''}; {os.cpu_count()} CPUs"
    )
    print(
        f"generator: {args.tasks_gen} tasks x {args.k} values; short: {args.tasks_short} tasks x 1; "
        f"{PARTITIONS} partitions per topic; concurrency {args.concurrency}; median of {args.rounds} round(s); "
        f"{time.perf_counter() - started:.0f} s"
    )
    print()
    print("| engine | version | generator results/s (x raw) | short tasks/s (x raw) |")
    print("| --- | --- | --- | --- |")
    for engine in engines:
        print(
            f"| {engine} | {engine_version(engine)} | {cell(engine, 'generator', outcomes)} | {cell(engine, 'short', outcomes)} |"
        )
    print()
    print(
        "Figures: values (generator) or tasks (short) / (last - first result record timestamp) of the run's "
        "results topic; (Nx) is the ratio to the raw loop; [..] says how a peer produced several values per task."
    )
    if any(o.error for runs in outcomes.values() for o in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
