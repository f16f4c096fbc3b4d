"""Fault tests: worker processes on a real Kafka broker, started, stopped and killed as a user would.

Every worker is ``python -m qtasks -A tests.faults.fault_app:app --broker URL run``, its
settings in ``QTASKS_*`` variables and its log (stderr) in a file per process, whose
tail is printed when a test fails. The test process is only a client: the same app
name and settings, no tasks registered, never a worker.

Executions are counted from the results topic itself: every run of a generator task
writes its ``seq`` 0 record (with its ``attempt``) before anything else, so the seq-0
records of a task are its executions, whatever the status topic says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.connectors.base import TopicPartition
from qtasks.records import ResultRecord, Task, decode_result
from tests.helpers import FAST, unique

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.faults.fault_app:app"
PARTITIONS = 6
BASE: dict[str, Any] = {
    **FAST,
    "tasks_partitions": PARTITIONS,
    "results_partitions": PARTITIONS,
    "status_partitions": 3,
}
_ASSIGNED = re.compile(r"worker \S+ assigned \[([\d, ]*)\]")


# -- processes ---------------------------------------------------------------------------


class Proc:
    """One subprocess with its log file."""

    def __init__(self, label: str, popen: subprocess.Popen[bytes], log_path: Path, log_file: Any) -> None:
        self.label = label
        self.popen = popen
        self.log_path = log_path
        self._log_file = log_file

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def assignments(self) -> list[list[int]]:
        """Every partition list this worker logged as assigned, oldest first."""
        return [[int(p) for p in m.group(1).split(",") if p.strip()] for m in _ASSIGNED.finditer(self.log())]

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def ran(self, task: Task) -> bool:
        """Whether this process is the worker named in the task's status."""
        return task.worker is not None and f"-{self.pid}-" in task.worker

    def tail(self, lines: int = 80) -> str:
        text = self.log().splitlines()[-lines:]
        code = self.popen.poll()
        state = "running" if code is None else f"exit code {code}"
        return f"----- {self.label} (pid {self.pid}, {state}) {self.log_path} -----\n" + "\n".join(text)

    def reap(self) -> None:
        """Stop it if it still runs (SIGTERM, then SIGKILL), wait for it, close the log."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self._log_file.close()


class Cluster:
    """Worker processes and clients of one app (fresh topics and group), on one broker."""

    def __init__(self, tmp_path: Path, broker_url: str, settings: dict[str, Any]) -> None:
        self.name = unique("fault")
        self.tmp_path = tmp_path
        self.broker_url = broker_url
        self.settings = {**BASE, **settings}
        self.procs: list[Proc] = []
        self.clients: list[QueueTasks] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({f"QTASKS_{key.upper()}": str(value) for key, value in self.settings.items()})
        env["QTASKS_FAULT_APP_NAME"] = self.name
        env["QTASKS_FAULT_PARENT_PID"] = str(os.getpid())
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def qtasks_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "qtasks", "-A", APP, "--broker", self.broker_url, *args]

    def start_worker(self, concurrency: int) -> Proc:
        label = f"worker{len(self.procs) + 1}"
        log_path = self.tmp_path / f"{label}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed by Proc.reap
        popen = subprocess.Popen(
            self.qtasks_argv("run", "--concurrency", str(concurrency)),
            cwd=ROOT,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        proc = Proc(label, popen, log_path, log_file)
        self.procs.append(proc)
        return proc

    async def wait_assigned(self, workers: Iterable[Proc], timeout: float = 60) -> None:
        """Until each worker's latest assignment is non-empty and together they cover every partition."""
        workers = list(workers)
        deadline = time.monotonic() + timeout
        while True:
            for w in workers:
                assert w.alive(), f"{w.label} exited early\n{w.tail()}"
            latest = [w.assignments()[-1:] for w in workers]
            if all(latest) and sorted(p for (parts,) in latest for p in parts) == list(range(PARTITIONS)):
                return
            assert time.monotonic() < deadline, f"workers not assigned within {timeout} s: {latest}"
            await asyncio.sleep(0.2)

    async def client(self) -> QueueTasks:
        app = QueueTasks(name=self.name, broker_url=self.broker_url, **self.settings)
        self.clients.append(app)
        await app._connect()
        return app

    def report(self) -> str:
        return "\n".join(p.tail() for p in self.procs)


@pytest.fixture
async def make_cluster(tmp_path: Path, broker_url: str) -> AsyncIterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def make(**settings: Any) -> Cluster:
        cluster = Cluster(tmp_path, broker_url, settings)
        clusters.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            for proc in cluster.procs:
                proc.reap()
            for app in cluster.clients:
                with contextlib.suppress(Exception):
                    await app.close()
            # Shown by pytest only when the test failed.
            print(f"app {cluster.name}, logs in {tmp_path}\n{cluster.report()}")


# -- reading what happened ---------------------------------------------------------------


async def wait_all(app: QueueTasks, uuids: list[str], timeout: float) -> dict[str, Task]:
    """The final status of every task; on timeout, fail with a count of where they are."""
    try:
        async with asyncio.timeout(timeout):
            finals = await asyncio.gather(*(app.wait(u) for u in uuids))
    except TimeoutError:
        where = Counter((h.status, h.attempt) if (h := app.view.head(u)) else None for u in uuids)
        pytest.fail(f"not every task finished within {timeout} s: (status, attempt) counts {dict(where)}")
    return {u: t for u, t in zip(uuids, finals, strict=True)}


def running_on(app: QueueTasks, uuids: list[str], proc: Proc) -> set[str]:
    """The tasks the client's status view shows running on that worker process."""
    mark = f"-{proc.pid}-"
    return {
        u
        for u in uuids
        if (h := app.view.head(u)) is not None and h.status == "process" and h.worker is not None and mark in h.worker
    }


def finished(app: QueueTasks, uuids: list[str]) -> int:
    return sum(1 for u in uuids if (h := app.view.head(u)) is not None and h.is_finished)


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.1)


async def read_stream(app: QueueTasks, uuid: str, timeout: float = 60) -> list[Any]:
    return [value async for value in app.stream(uuid, timeout=timeout)]


async def read_streams(app: QueueTasks, uuids: list[str], parallel: int = 12) -> dict[str, list[Any]]:
    gate = asyncio.Semaphore(parallel)

    async def one(uuid: str) -> tuple[str, list[Any]]:
        async with gate:
            return uuid, await read_stream(app, uuid)

    return dict(await asyncio.gather(*(one(u) for u in uuids)))


async def scan_results(app: QueueTasks) -> dict[str, list[ResultRecord]]:
    """Every record of the results topic, by task, in partition order."""
    consumer = app.broker.consumer(None, client_id=f"{app.name}-scan")
    await consumer.start()
    try:
        tps = [TopicPartition(app.topics.results, p) for p in range(app.results_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(tps)
        ends = await consumer.end_offsets(tps)
        out: dict[str, list[ResultRecord]] = defaultdict(list)
        deadline = time.monotonic() + 60
        while True:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                return out
            assert time.monotonic() < deadline, f"results scan stuck at {positions}, ends {ends}"
            for record in await consumer.getmany(timeout=0.5):
                assert record.key is not None
                out[record.key.decode()].append(decode_result(record.value))
    finally:
        await consumer.stop()


def executions(records: list[ResultRecord]) -> list[int]:
    """The attempts of every run of a task (one seq-0 value record per run), sorted."""
    return sorted(r.attempt for r in records if r.seq == 0 and not r.end)


def end_markers(records: list[ResultRecord]) -> list[tuple[int, str | None]]:
    return sorted((r.attempt, r.status) for r in records if r.end)


def check_values(values: list[Any], n: int) -> None:
    assert [v["i"] for v in values] == list(range(n)), values


# -- 1. three workers, many generators -----------------------------------------------------


@pytest.mark.timeout(240)
async def test_three_workers_run_every_generator_exactly_once(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    workers = [cluster.start_worker(concurrency=16) for _ in range(3)]
    await cluster.wait_assigned(workers)
    app = await cluster.client()

    n_tasks, n_values = 300, 20
    tasks = await asyncio.gather(*(app.add_task("gen", n_values, 0.002) for _ in range(n_tasks)))
    uuids = [t.uuid for t in tasks]
    live = [asyncio.create_task(read_stream(app, u, timeout=120)) for u in uuids[:10]]

    finals = await wait_all(app, uuids, timeout=120)

    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    assert Counter(t.attempt for t in finals.values()) == {1: n_tasks}
    for t in finals.values():
        assert t.yield_count == n_values, t
        check_values(t.returning, n_values)
        (runner,) = [w for w in workers if w.ran(t)]
        assert {v["pid"] for v in t.returning} == {runner.pid}, t

    by_worker = Counter(t.worker for t in finals.values())
    assert len(by_worker) >= 2, f"only one worker did work: {by_worker}"

    # Each task ran once: one seq-0 record, one end marker, nothing from a second run.
    scanned = await scan_results(app)
    assert set(scanned) == set(uuids)
    for u in uuids:
        records = scanned[u]
        assert executions(records) == [1], (u, records)
        assert end_markers(records) == [(1, "success")], (u, records)
        assert len(records) == n_values + 1, (u, records)

    streams = await read_streams(app, uuids)
    for u in uuids:
        assert streams[u] == finals[u].returning, u
    for u, reading in zip(uuids, live, strict=False):
        assert await reading == finals[u].returning, u


# -- 2. a worker joins, another leaves (SIGTERM) mid-run --------------------------------------


@pytest.mark.timeout(240)
async def test_worker_joining_and_leaving_mid_run_loses_nothing(make_cluster: Callable[..., Cluster]) -> None:
    # Quick heartbeats make a rebalance shorter than a task, so partitions move while
    # their tasks still run on the previous owner (the new owner must wait for the lease).
    cluster = make_cluster(kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=500)
    w1, w2 = cluster.start_worker(concurrency=4), cluster.start_worker(concurrency=4)
    await cluster.wait_assigned([w1, w2])
    app = await cluster.client()

    n_tasks, n_values = 150, 10
    tasks = await asyncio.gather(*(app.add_task("gen", n_values, 0.09) for _ in range(n_tasks)))
    uuids = [t.uuid for t in tasks]

    await until(lambda: finished(app, uuids) >= 25, 60, "25 tasks done")
    w3 = cluster.start_worker(concurrency=4)
    await until(lambda: any(w3.assignments()), 60, "worker3 joined")
    await until(lambda: finished(app, uuids) >= 75, 60, "75 tasks done")
    await until(lambda: len(running_on(app, uuids, w1)) >= 1, 30, "a task running on worker1")
    done_at_sigterm = finished(app, uuids)
    w1.popen.send_signal(signal.SIGTERM)
    running_at_sigterm = running_on(app, uuids, w1)

    finals = await wait_all(app, uuids, timeout=120)
    code = await asyncio.to_thread(w1.popen.wait, 30)
    assert code == 0, f"worker1 did not stop gracefully (exit code {code})\n{w1.tail()}"
    assert done_at_sigterm < n_tasks, "every task ended before the SIGTERM: the test proves nothing"

    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    assert any(w3.ran(t) for t in finals.values()), "the worker that joined ran nothing"
    # A graceful stop lets the running tasks finish where they run.
    for u in running_at_sigterm:
        assert w1.ran(finals[u]) and finals[u].attempt == 1, finals[u]

    streams = await read_streams(app, uuids)
    for u in uuids:
        check_values(streams[u], n_values)
        assert streams[u] == finals[u].returning, u

    # Nothing lost is the contract; beyond it, the lease protocol promises no double run
    # when a rebalance moves a partition while its tasks run (the new owner waits).
    scanned = await scan_results(app)
    twice = {u: executions(scanned[u]) for u in uuids if executions(scanned[u]) != [1]}
    assert not twice, f"tasks run more than once across the rebalances: {twice}"
    assert Counter(t.attempt for t in finals.values()) == {1: n_tasks}


# -- 3. kill -9 of a worker running generators ------------------------------------------------


@pytest.mark.timeout(240)
async def test_sigkill_of_a_worker_mid_generator_is_taken_over(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(
        lease_timeout=3.0,
        lease_interval=0.5,
        kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=1000,
    )
    victim, survivor = cluster.start_worker(concurrency=6), cluster.start_worker(concurrency=6)
    await cluster.wait_assigned([victim, survivor])
    app = await cluster.client()

    n_tasks, n_values = 24, 8
    tasks = await asyncio.gather(*(app.add_task("gen", n_values, 0.4) for _ in range(n_tasks)))
    uuids = [t.uuid for t in tasks]

    # Kill it once it has streamed a value or two of several tasks.
    await until(lambda: len(running_on(app, uuids, victim)) >= 3, 60, "3 tasks running on the victim")
    await asyncio.sleep(1.0)
    victim.popen.kill()
    await asyncio.to_thread(victim.popen.wait, 10)
    # What the victim wrote before it died reaches this view within a moment.
    await asyncio.sleep(2.0)
    orphans = running_on(app, uuids, victim)
    assert len(orphans) >= 3, orphans

    finals = await wait_all(app, uuids, timeout=120)

    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    for u, t in finals.items():
        if u in orphans:
            assert t.attempt == 2, t
            assert survivor.ran(t), t
        else:
            assert t.attempt == 1, t
        assert t.yield_count == n_values, t
    assert "taking over" in survivor.log()

    scanned = await scan_results(app)
    for u in uuids:
        # An orphan the victim had not streamed a value of yet has no seq-0 record of attempt 1;
        # one it killed between its end marker and its status write has an attempt-1 marker too.
        if u in orphans:
            assert executions(scanned[u]) in ([1, 2], [2]), (u, scanned[u])
            assert end_markers(scanned[u]) in ([(2, "success")], [(1, "success"), (2, "success")]), scanned[u]
        else:
            assert executions(scanned[u]) == [1], (u, scanned[u])
            assert end_markers(scanned[u]) == [(1, "success")], (u, scanned[u])

    streams = await read_streams(app, uuids)
    for u in uuids:
        check_values(streams[u], n_values)
        pids = [v["pid"] for v in streams[u]]
        if u in orphans:
            # The values the victim streamed stand; the survivor's repeats of them are dropped.
            assert set(pids) <= {victim.pid, survivor.pid}, pids
            if (1, "success") not in end_markers(scanned[u]):
                assert pids[-1] == survivor.pid, pids
            assert pids == sorted(pids, key=lambda p: p == survivor.pid), pids
        else:
            assert len(set(pids)) == 1, pids


# -- 4. a task longer than max.poll.interval.ms -----------------------------------------------


@pytest.mark.timeout(120)
async def test_task_running_three_times_max_poll_interval_runs_once(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(
        kafka_max_poll_interval_ms=5000,
        kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=1000,
    )
    # Concurrency 1: while the long task runs the worker's partitions are paused (backpressure)
    # and a second task waits in the topic.
    worker = cluster.start_worker(concurrency=1)
    await cluster.wait_assigned([worker])
    app = await cluster.client()

    seconds = 15
    long = await app.add_task("long_run", seconds)
    short = await app.add_task("gen", 3)
    assert long is not None and short is not None
    arrivals: list[float] = []

    async def follow() -> list[Any]:
        values = []
        async for value in app.stream(long.uuid, timeout=90):
            arrivals.append(time.monotonic())
            values.append(value)
        return values

    cpu_before = worker.cpu_seconds()
    values = await follow()
    cpu_used = worker.cpu_seconds() - cpu_before
    # Paused partitions are polled with a timeout, not spun on.
    assert cpu_used < 5.0, f"worker used {cpu_used:.1f} s of CPU while one task slept for {seconds} s"
    finals = await wait_all(app, [long.uuid, short.uuid], timeout=60)

    final = finals[long.uuid]
    assert final.status == "success", final
    assert final.attempt == 1, final
    assert final.yield_count == seconds, final
    check_values(values, seconds)
    assert {v["pid"] for v in values} == {worker.pid}
    assert arrivals[-1] - arrivals[0] >= seconds - 3, "the values did not arrive live"
    assert finals[short.uuid].status == "success" and finals[short.uuid].attempt == 1

    scanned = await scan_results(app)
    assert executions(scanned[long.uuid]) == [1]
    assert executions(scanned[short.uuid]) == [1]
    assert worker.alive()
    assignments = worker.assignments()
    assert assignments == [list(range(PARTITIONS))], f"rebalanced: {assignments}\n{worker.tail()}"
    assert "taking over" not in worker.log()


# -- 5. the CLI on Kafka ---------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_cli_add_follow_and_status_against_a_worker(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    worker = cluster.start_worker(concurrency=4)
    await cluster.wait_assigned([worker])

    n_values = 6
    proc = await asyncio.create_subprocess_exec(
        *cluster.qtasks_argv("add", "gen", str(n_values), "0.4", "--follow", "--timeout", "60"),
        cwd=ROOT,
        env=cluster.env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[tuple[float, str]] = []

    async def read_out() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            lines.append((time.monotonic(), raw.decode().rstrip("\n")))

    try:
        async with asyncio.timeout(90):
            _, err = await asyncio.gather(read_out(), proc.stderr.read())  # type: ignore[union-attr]
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = err.decode(errors="replace")
    assert code == 0, stderr
    uuid = lines[0][1]
    values = [json.loads(text) for _, text in lines[1:]]
    check_values(values, n_values)
    assert {v["pid"] for v in values} == {worker.pid}
    # Live: the first value was printed well before the last (0.4 s between values).
    assert lines[-1][0] - lines[1][0] >= 1.0, lines
    assert f"success: {n_values} values" in stderr, stderr

    status = await asyncio.to_thread(
        subprocess.run,
        cluster.qtasks_argv("status", uuid),
        cwd=ROOT,
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["uuid"] == uuid
    assert shown["status"] == "success"
    assert shown["attempt"] == 1
    assert shown["yield_count"] == n_values
    assert f"-{worker.pid}-" in shown["worker"]
