"""Share mode against group mode on one real Kafka broker (a benchmark, not a test).

    .venv/bin/python bench/bench_share.py [--bootstrap HOST:PORT] [--rounds 3]
        [--short 10000] [--gen-tasks 1000] [--k 50] [--concurrency 64]
        [--sleep-tasks 1200] [--sleep 0.05] [--sleep-concurrency 8] [--workers 1,2,4]
        [--workloads short,generator,scaling] [--keep-logs DIR]

Without ``--bootstrap`` it starts its own broker (deploy/local, JVM defaults) as
bench/bench_kafka.py does, and stops it at the end.

Every worker is a process of its own, as in production: ``python -m qtasks -A
share_app:app --broker kafka://... run --concurrency C`` (bench/share_app.py), its
settings in ``QTASKS_*`` variables (``QTASKS_PROCESSING_MODE=group`` or ``share``), its log
in a file. Each run has an app of its own (a fresh name: fresh topics, a fresh consumer
or share group), and deletes its topics at the end. This process is only the client: it
submits the tasks with ``add_tasks`` and reads the results topic.

The workloads, each in group mode then in share mode, ``--rounds`` times (the modes
alternate, so that the noise of a shared machine falls on both):

1. short: ``--short`` one-value generator tasks, one worker process (``--concurrency``),
   6 tasks partitions; figure: tasks/s.
2. generator: ``--gen-tasks`` tasks of ``--k`` values each, one worker process, 6 tasks
   partitions; figure: values/s.
3. scaling: ``--sleep-tasks`` tasks that each ``await asyncio.sleep(--sleep)`` and yield
   one value, on a tasks topic of ONE partition, with ``--workers`` worker processes (1, 2
   and 4; ``--sleep-concurrency`` each); figure: tasks/s. In group mode one worker holds the
   partition and the others idle; in share mode every worker shares it.

In 1. and 2. the backlog is written before the worker starts; in 3. the workers start
first and the tasks are submitted once every worker is in its group (its log says it was
assigned the partition, or that its share group shares it) and the delays topic's group
has settled, so that all of them take part from the first task. Throughput comes from the result records themselves: the Kafka record
timestamps (CreateTime, stamped by the worker's producer) of the first and the last record
of the run's results topic, so process start-up and the group join are outside the window,
in both modes alike. The CPU per task is the worker processes' CPU time (``/proc``) from
their first task to the end of the run, over the tasks.

Every run is checked: each task has an end marker on the results topic, its last one
``success``, and its values are there. Tasks run more than once (share mode hands a record out again when
its lock is lost or released) are counted, not failed, and every worker log line at
WARNING or above is collected; the end of the output lists both, with excerpts. Figures
from a shared 2-core machine are noisy: the tables show the range of each cell over the
rounds, and that of share / group within a round (the two ran one right after the other).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid as uuid_mod
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as KTP
from aiokafka.admin import AIOKafkaAdminClient
from bench_kafka import kafka_version, start_local_broker

from qtasks.asyncio import QueueTasks
from qtasks.config import QueueConfig
from qtasks.delays import LEVELS
from qtasks.records import ResultRecord, decode_result

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
APP = "share_app:app"
MODES = ("group", "share")
RESULTS_PARTITIONS = QueueConfig().results_partitions
STOP_TIMEOUT = 60.0  # seconds a worker gets to stop after SIGTERM
_ASSIGNED = re.compile(r"worker \S+ assigned \[([\d, ]*)\]")
_SHARES = re.compile(r"share group \S+: member \S+ shares (\d+) partition")
_LEVELS = re.compile(r"worker \S+ moves on the delayed tasks of levels \[([\d, ]*)\]")
_FIRST_TASK_CPU = re.compile(r"BENCH first task, cpu ([\d.]+)")
_RAN = re.compile(r"BENCH ran (\d+) tasks")
_NOTABLE = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


@dataclass(frozen=True)
class Job:
    """One cell of the table: what its runs submit and how many workers run it."""

    workload: str  # short, generator or scaling
    tasks: int
    k: int  # values per task
    delay: float  # seconds each task sleeps first
    concurrency: int  # per worker process
    partitions: int  # of the tasks topic
    workers: int
    preload: bool  # the backlog is written before the workers start

    @property
    def label(self) -> str:
        if self.workload == "short":
            return f"short, {self.tasks:,} tasks x 1 value, 1 worker"
        if self.workload == "generator":
            return f"generator, {self.tasks:,} tasks x {self.k} values, 1 worker"
        workers = "1 worker" if self.workers == 1 else f"{self.workers} workers"
        return f"{self.tasks:,} tasks x sleep {self.delay:g} s, 1 partition, {workers}"

    @property
    def unit(self) -> str:
        return "values/s" if self.workload == "generator" else "tasks/s"

    @property
    def counted(self) -> int:
        """What the figure counts: values for generators, tasks otherwise."""
        return self.tasks * self.k if self.workload == "generator" else self.tasks


@dataclass
class Outcome:
    rate: float | None = None
    span: float = 0.0  # seconds from the first to the last result record
    cpu_per_task: float | None = None  # seconds, every worker process together
    reruns: int = 0  # runs beyond the first, over all tasks
    split: list[int] = field(default_factory=list)  # runs per worker process
    notable: list[str] = field(default_factory=list)  # worker log lines at WARNING or above
    error: str = ""


# --------------------------------------------------------------------------- worker processes


class WorkerProcess:
    """One ``qtasks run`` process of the benchmark's app, with its log file."""

    def __init__(self, label: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.label = label
        self.popen = popen
        self.log_path = log_path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        """User + system CPU seconds so far (every thread)."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cpu_before_first_task(self) -> float | None:
        found = _FIRST_TASK_CPU.search(self.log())
        return float(found.group(1)) if found else None

    def ready(self, mode: str) -> bool:
        """In its group: started, and (group) assigned a partition list, or (share) sharing a partition."""
        text = self.log()
        if "running tasks" not in text:
            return False
        if mode == "share":
            shares = _SHARES.findall(text)
            return bool(shares) and int(shares[-1]) > 0
        return bool(_ASSIGNED.search(text))

    def latest(self, pattern: re.Pattern[str]) -> list[int]:
        """The partitions of the latest assignment the pattern finds in the log (tasks or delays)."""
        found = pattern.findall(self.log())
        return [int(p) for p in found[-1].split(",") if p.strip()] if found else []

    def runs(self) -> int:
        """The tasks it ran, which it logs as it exits."""
        found = _RAN.search(self.log())
        return int(found.group(1)) if found else 0

    def notable(self) -> list[str]:
        return [f"{self.label}: {line}" for line in self.log().splitlines() if _NOTABLE.search(line)]

    def tail(self, lines: int = 30) -> str:
        return f"----- {self.label} (pid {self.popen.pid}) -----\n" + "\n".join(self.log().splitlines()[-lines:])

    async def stop(self) -> None:
        """SIGTERM (a graceful stop); a worker that hangs past STOP_TIMEOUT is killed and fails the run."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.popen.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.label} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM\n{self.tail()}"
            ) from None
        if self.popen.returncode != 0:
            raise AssertionError(f"{self.label} exited with {self.popen.returncode}\n{self.tail()}")

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


def start_workers(job: Job, mode: str, name: str, url: str, log_dir: Path) -> list[WorkerProcess]:
    env = {
        **os.environ,
        **{f"QTASKS_{key.upper()}": str(value) for key, value in app_settings(job, mode).items()},
        "BENCH_SHARE_APP": name,
        "BENCH_PARENT_PID": str(os.getpid()),
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "qtasks", "-A", APP, "--broker", url, "run", "--concurrency", str(job.concurrency)]
    workers = []
    for i in range(job.workers):
        log_path = log_dir / f"{name}-worker{i + 1}.log"
        with log_path.open("wb") as log_file:  # the child keeps its own descriptor
            popen = subprocess.Popen(
                argv, cwd=BENCH_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
            )
        workers.append(WorkerProcess(f"{mode} worker {i + 1}", popen, log_path))
    return workers


async def wait_ready(workers: list[WorkerProcess], mode: str, partitions: int, timeout: float = 120) -> None:
    """Until every worker is in its group, (group mode) the partitions are all assigned, and the
    delays topic's group (a consumer group in both modes) has settled too, so no rebalance is left."""
    deadline = time.monotonic() + timeout
    while True:
        for w in workers:
            assert w.alive(), f"{w.label} exited before it was ready\n{w.tail()}"
        if all(w.ready(mode) for w in workers):
            assigned = sorted(p for w in workers for p in w.latest(_ASSIGNED))
            levels = sorted(p for w in workers for p in w.latest(_LEVELS))
            if (mode == "share" or assigned == list(range(partitions))) and levels == list(range(len(LEVELS))):
                return
        assert time.monotonic() < deadline, f"workers not in their group within {timeout:.0f} s\n" + "\n".join(
            w.tail() for w in workers
        )
        await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- one run


def app_settings(job: Job, mode: str) -> dict[str, Any]:
    return {"processing_mode": mode, "tasks_partitions": job.partitions}


async def read_results(bootstrap: str, topic: str) -> list[tuple[ResultRecord, int]]:
    """Every record of the results topic, decoded, with its timestamp (ms)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [KTP(topic, p) for p in range(RESULTS_PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[tuple[ResultRecord, int]] = []
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            for batch in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                out.extend((decode_result(r.value), r.timestamp) for r in batch)
        return out
    finally:
        await consumer.stop()


async def wait_results(
    bootstrap: str, topic: str, uuids: list[str], k: int, workers: list[WorkerProcess], timeout: float
) -> list[tuple[ResultRecord, int]]:
    """Until every task has its end marker; polls end offsets (cheap), reads the topic once they suffice."""
    expected = len(uuids) * (k + 1)
    wanted = set(uuids)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [KTP(topic, p) for p in range(RESULTS_PARTITIONS)]
        deadline = time.monotonic() + timeout
        ended = 0
        while True:
            written = sum((await consumer.end_offsets(tps)).values())  # a fresh topic starts at 0
            if written >= expected:
                records = await read_results(bootstrap, topic)
                ended = len(wanted & {r.uuid for r, _ in records if r.end})
                if ended == len(wanted):
                    return records
            for w in workers:
                assert w.alive(), f"{w.label} exited with {written} of {expected} result records\n{w.tail()}"
            assert time.monotonic() < deadline, (
                f"{written} of {expected} result records ({ended} of {len(wanted)} tasks ended) in {timeout:.0f} s\n"
                + "\n".join(w.tail() for w in workers)
            )
            await asyncio.sleep(0.25 if written < expected else 1.0)
    finally:
        await consumer.stop()


def measure(
    job: Job, uuids: list[str], records: list[tuple[ResultRecord, int]], window: tuple[float, float]
) -> Outcome:
    """Check what the run wrote and compute its figure from the records' timestamps."""
    ends: dict[str, list[str | None]] = {}
    starts: Counter[str] = Counter()  # seq-0 values: one per run of a task
    for record, _ in records:
        if record.end:
            ends.setdefault(record.uuid, []).append(record.status)
        elif record.seq == 0:
            starts[record.uuid] += 1
    missing = [u for u in uuids if u not in ends]
    assert not missing, f"{len(missing)} tasks without an end marker, e.g. {missing[0]}"
    failed = {u: s for u, s in ends.items() if s[-1] != "success"}
    assert not failed, f"{len(failed)} tasks did not end as success, e.g. {next(iter(failed.items()))}"
    values = sum(1 for r, _ in records if not r.end)
    reruns = sum(n - 1 for n in starts.values() if n > 1)
    assert values >= job.tasks * job.k, f"{values} values, expected {job.tasks * job.k}"
    stamps = [ts for _, ts in records]
    first, last = min(stamps), max(stamps)
    assert int(window[0] * 1000) <= first and last <= int(window[1] * 1000) + 1, (
        f"record timestamps [{first}, {last}] outside the run [{window[0]:.3f}, {window[1]:.3f}]"
    )
    span = max(last - first, 1) / 1000
    return Outcome(rate=job.counted / span, span=span, reruns=reruns)


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        if doomed := [n for n in names if n in existing]:
            await admin.delete_topics(doomed)
    except Exception as exc:
        print(f"(could not delete the topics {names}: {exc})", file=sys.stderr)
    finally:
        await admin.close()


async def run_once(job: Job, mode: str, bootstrap: str, log_dir: Path, timeout: float) -> Outcome:
    """One run: a fresh app, its worker processes, its tasks; the workers stopped and the topics deleted after."""
    name = f"bshare{mode[0]}{uuid_mod.uuid4().hex[:8]}"
    url = f"kafka://{bootstrap}"
    client = QueueTasks(name=name, broker_url=url, log_level="WARNING", **app_settings(job, mode))
    workers: list[WorkerProcess] = []
    calls = [(job.k, job.delay) if job.delay else (job.k,)] * job.tasks
    try:
        started = time.time()
        if job.preload:
            uuids = [h.uuid for h in await client.add_tasks("gen", calls)]
            workers = start_workers(job, mode, name, url, log_dir)
        else:
            workers = start_workers(job, mode, name, url, log_dir)
            await wait_ready(workers, mode, job.partitions)
            uuids = [h.uuid for h in await client.add_tasks("gen", calls)]
        records = await wait_results(bootstrap, client.topics.results, uuids, job.k, workers, timeout)
        done = time.time()
        used = [w.cpu() - first for w in workers if (first := w.cpu_before_first_task()) is not None]
        for w in workers:
            await w.stop()
        outcome = measure(job, uuids, records, (started, done))
        outcome.cpu_per_task = sum(used) / job.tasks
        outcome.notable = [line for w in workers for line in w.notable()]
        outcome.split = [w.runs() for w in workers]
        return outcome
    finally:
        for w in workers:
            w.kill()
        with contextlib.suppress(Exception):
            await client.close()
        await delete_topics(bootstrap, client.topics.all())


# --------------------------------------------------------------------------- the rounds


def jobs_of(args: argparse.Namespace) -> list[Job]:
    workloads = {w.strip() for w in args.workloads.split(",")}
    jobs = []
    if "short" in workloads:
        jobs.append(Job("short", args.short, 1, 0.0, args.concurrency, 6, 1, True))
    if "generator" in workloads:
        jobs.append(Job("generator", args.gen_tasks, args.k, 0.0, args.concurrency, 6, 1, True))
    if "scaling" in workloads:
        for n in (int(w) for w in args.workers.split(",")):
            jobs.append(Job("scaling", args.sleep_tasks, 1, args.sleep, args.sleep_concurrency, 1, n, False))
    return jobs


async def run(args: argparse.Namespace, bootstrap: str, log_dir: Path) -> dict[tuple[Job, str], list[Outcome]]:
    jobs = jobs_of(args)
    outcomes: dict[tuple[Job, str], list[Outcome]] = {(job, mode): [] for job in jobs for mode in MODES}
    if args.warmup:
        warmup = Job("short", args.warmup, 1, 0.0, args.concurrency, 6, 1, True)
        for mode in MODES:
            print(f"warm-up, {mode} mode: {warmup.label} ...", flush=True)
            await run_once(warmup, mode, bootstrap, log_dir, args.timeout)
    for r in range(args.rounds):
        for job in jobs:
            for mode in MODES:
                print(f"round {r + 1}, {mode} mode: {job.label} ...", flush=True)
                try:
                    outcome = await run_once(job, mode, bootstrap, log_dir, args.timeout)
                except Exception as exc:
                    print(f"  FAILED: {exc}", flush=True)
                    outcome = Outcome(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                else:
                    assert outcome.rate is not None and outcome.cpu_per_task is not None
                    notes = f"; runs per worker {outcome.split}" if job.workers > 1 else ""
                    notes += f"; {outcome.reruns} task run(s) beyond the first" if outcome.reruns else ""
                    notes += f"; {len(outcome.notable)} worker log line(s) at WARNING+" if outcome.notable else ""
                    print(
                        f"  {outcome.rate:,.0f} {job.unit} ({outcome.span:.2f} s first to last result; "
                        f"{outcome.cpu_per_task * 1e6:,.0f} us worker CPU per task{notes})",
                        flush=True,
                    )
                outcomes[job, mode].append(outcome)
    return outcomes


# --------------------------------------------------------------------------- the report


def spread(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return fmt.format(low) if len(values) == 1 else f"{fmt.format(low)}-{fmt.format(high)}"


def figures(runs: list[Outcome], figure: str) -> list[float] | str:
    """``rate`` or ``cpu`` (µs per task) of each run, or what failed."""
    failed = [o.error for o in runs if o.error]
    if failed:
        return "FAILED: " + failed[0].replace("|", "/")
    return [(o.rate or 0.0) if figure == "rate" else (o.cpu_per_task or 0.0) * 1e6 for o in runs]


def table(outcomes: dict[tuple[Job, str], list[Outcome]], figure: str) -> list[str]:
    """A row per job: the range over the runs of each mode, and of share / group within a round.

    The modes of one round ran one right after the other, so the ratio within a round is
    less exposed to what else the machine was doing than the ratio of two ranges.
    """
    lines = [
        "| workload | unit | group | share | share / group, same round |",
        "| --- | --- | --- | --- | --- |",
    ]
    for job in dict.fromkeys(job for job, _ in outcomes):
        group, share = (figures(outcomes[job, mode], figure) for mode in MODES)
        row = [job.label, job.unit if figure == "rate" else "µs CPU per task"]
        row += [cell if isinstance(cell, str) else spread(cell, "{:,.0f}") for cell in (group, share)]
        if isinstance(group, str) or isinstance(share, str) or not group:
            row.append("-")
        else:
            row.append(spread([s / g for g, s in zip(group, share, strict=True)], "{:.2f}x"))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def commit() -> str:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    return head + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def oddities(outcomes: dict[tuple[Job, str], list[Outcome]]) -> list[str]:
    """Tasks run more than once and worker log lines at WARNING or above, per mode, with excerpts."""
    lines = []
    for mode in MODES:
        runs = [(job, o) for (job, m), got in outcomes.items() if m == mode for o in got]
        reruns = sum(o.reruns for _, o in runs)
        notable = [line for _, o in runs for line in o.notable]
        failed = [f"{job.label}: {o.error}" for job, o in runs if o.error]
        lines.append(
            f"{mode} mode: {len(runs)} runs, {len(failed)} failed, {reruns} task run(s) beyond the first, "
            f"{len(notable)} worker log line(s) at WARNING or above"
        )
        lines.extend(f"  failed: {f}" for f in failed)
        # The same message from many runs once, by what it says (times, pids and ids left out).
        shapes = Counter(re.sub(r"\S*\d\S*", "#", line.split(" ", 3)[-1]) for line in notable)
        for shape, count in shapes.most_common(8):
            example = next(line for line in notable if re.sub(r"\S*\d\S*", "#", line.split(" ", 3)[-1]) == shape)
            lines.append(f"  {count} x {example[:300]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--bootstrap", help="a running broker, host:port (default: start one with deploy/local)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every cell in each mode (default 3)")
    parser.add_argument(
        "--short", type=int, default=10000, help="one-value tasks of the short workload (default 10000)"
    )
    parser.add_argument("--gen-tasks", type=int, default=1000, help="tasks of the generator workload (default 1000)")
    parser.add_argument("--k", type=int, default=50, help="values per generator task (default 50)")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="worker concurrency, short and generator (default 64)"
    )
    parser.add_argument("--sleep-tasks", type=int, default=1200, help="tasks of the scaling workload (default 1200)")
    parser.add_argument("--sleep", type=float, default=0.05, help="seconds each scaling task sleeps (default 0.05)")
    parser.add_argument(
        "--sleep-concurrency", type=int, default=8, help="worker concurrency, scaling workload (default 8)"
    )
    parser.add_argument("--workers", default="1,2,4", help="worker processes of the scaling runs (default 1,2,4)")
    parser.add_argument(
        "--workloads", default="short,generator,scaling", help="comma list (default short,generator,scaling)"
    )
    parser.add_argument("--warmup", type=int, default=500, help="short tasks per mode first, unmeasured (default 500)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a run may take (default 300)")
    parser.add_argument("--keep-logs", metavar="DIR", help="keep every worker's log in DIR")
    args = parser.parse_args()

    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        print("starting a Kafka broker (deploy/local, KAFKA_JVM_OPTS='') ...", flush=True)
        broker = start_local_broker()
        bootstrap = broker.bootstrap
    load_before = os.getloadavg()
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-share-") as scratch:
            log_dir = Path(args.keep_logs or scratch)
            log_dir.mkdir(parents=True, exist_ok=True)
            outcomes = asyncio.run(run(args, bootstrap, log_dir))
    finally:
        if broker is not None:
            broker.stop()
    elapsed = time.perf_counter() - started
    source = "own broker, JVM defaults (G1, C2)" if broker is not None else f"external broker at {bootstrap}"
    config = QueueConfig.from_env()  # what the workers read too
    prefetch = "as concurrency" if config.prefetch < 0 else config.prefetch
    print()
    print(
        f"qtasks {commit()}; Kafka {kafka_version()} (deploy/local/pom.xml; {source}); "
        f"aiokafka {version('aiokafka')}; Python {platform.python_version()}; {os.cpu_count()} CPUs; "
        f"load average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        f"{args.rounds} run(s) per cell and mode, group and share alternated, after {args.warmup} short tasks "
        f"per mode unmeasured; every worker a process of its own; concurrency {args.concurrency} (short, "
        f"generator; 6 tasks partitions), {args.sleep_concurrency} per worker (scaling; 1 tasks partition); "
        f"prefetch {prefetch}; results_partitions {RESULTS_PARTITIONS}; share mode: records locked for "
        f"lease_timeout {config.lease_timeout:g} s (renewed a third of that apart), share_delivery_limit "
        f"{config.share_delivery_limit}; {elapsed:.0f} s"
    )
    print()
    print("Throughput, from the first to the last result record's timestamp (min-max over the runs):")
    print()
    print("\n".join(table(outcomes, "rate")))
    print()
    print("CPU of the worker processes from their first task to the end of the run, per task (min-max):")
    print()
    print("\n".join(table(outcomes, "cpu")))
    print()
    print("\n".join(oddities(outcomes)))
    if any(o.error for runs in outcomes.values() for o in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
