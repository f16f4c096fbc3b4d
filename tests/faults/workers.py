"""Worker processes of one app on a real Kafka broker or cluster, and what they leave behind.

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
from qtasks.delays import LEVELS
from qtasks.records import ResultRecord, StatusHead, Task, decode_result
from tests.helpers import FAST, unique

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
_SHARES = re.compile(r"share group \S+: member \S+ shares (\d+) partition")
_LEVELS = re.compile(r"worker \S+ moves on the delayed tasks of levels \[([\d, ]*)\]")


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

    def levels(self) -> list[list[int]]:
        """Every list of delays partitions this worker logged as assigned, oldest first."""
        return [[int(p) for p in m.group(1).split(",") if p.strip()] for m in _LEVELS.finditer(self.log())]

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def ran(self, task: Task | StatusHead) -> bool:
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


class Workers:
    """Worker processes and clients of one app (fresh topics and group) on one broker or cluster."""

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

    def start_worker(self, concurrency: int, *, metrics_port: int | None = None) -> Proc:
        """A ``qtasks run`` process; ``metrics_port``: it serves its metrics and probes on 127.0.0.1 there."""
        options = ["--concurrency", str(concurrency)]
        env = self.env()
        if metrics_port is not None:
            options += ["--metrics-port", str(metrics_port)]
            env["QTASKS_METRICS_HOST"] = "127.0.0.1"
        return self.start_command(f"worker{len(self.procs) + 1}", ["run", *options], env)

    def start_command(self, label: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        """``qtasks -A <the app> ARGS...`` as a process (logs in ``<label>.log``), stopped at the end."""
        log_path = self.tmp_path / f"{label}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed by Proc.reap
        popen = subprocess.Popen(
            self.qtasks_argv(*args),
            cwd=ROOT,
            env=env or self.env(),
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

    async def wait_sharing(self, workers: Iterable[Proc], timeout: float = 60) -> None:
        """Share mode: until each worker's share group gave it partitions (every member shares every one)."""
        workers = list(workers)
        deadline = time.monotonic() + timeout
        while True:
            for w in workers:
                assert w.alive(), f"{w.label} exited early\n{w.tail()}"
            latest = [[int(n) for n in _SHARES.findall(w.log())][-1:] for w in workers]
            if all(shares and shares[0] > 0 for shares in latest):
                return
            assert time.monotonic() < deadline, f"share members without partitions after {timeout} s: {latest}"
            await asyncio.sleep(0.2)

    async def wait_levels(self, workers: Iterable[Proc], timeout: float = 60) -> None:
        """Until each worker's latest delays assignment is non-empty and together they cover every level."""
        workers = list(workers)
        deadline = time.monotonic() + timeout
        while True:
            for w in workers:
                assert w.alive(), f"{w.label} exited early\n{w.tail()}"
            latest = [w.levels()[-1:] for w in workers]
            if all(latest) and sorted(p for (parts,) in latest for p in parts) == list(range(len(LEVELS))):
                return
            assert time.monotonic() < deadline, f"delay levels not assigned within {timeout} s: {latest}"
            await asyncio.sleep(0.2)

    async def client(self) -> QueueTasks:
        app = QueueTasks(name=self.name, broker_url=self.broker_url, **self.settings)
        self.clients.append(app)
        await app._connect()
        return app

    def report(self) -> str:
        return "\n".join(p.tail() for p in self.procs)


@contextlib.asynccontextmanager
async def workers_of(tmp_path: Path, broker_url: str) -> AsyncIterator[Callable[..., Workers]]:
    """``make(**settings)`` starts no process yet: it gives a :class:`Workers` for a fresh app;
    every process and client made through it is stopped at the end."""
    made: list[Workers] = []

    def make(**settings: Any) -> Workers:
        group = Workers(tmp_path, broker_url, settings)
        made.append(group)
        return group

    try:
        yield make
    finally:
        for group in made:
            for proc in group.procs:
                proc.reap()
            for app in group.clients:
                with contextlib.suppress(Exception):
                    await app.close()
            # Shown by pytest only when the test failed.
            print(f"app {group.name}, logs in {tmp_path}\n{group.report()}")


# -- reading what happened ---------------------------------------------------------------


async def wait_all(app: QueueTasks, uuids: list[str], timeout: float) -> dict[str, Task]:
    """The final status of every task; on timeout, fail with a count of where they are."""
    try:
        async with asyncio.timeout(timeout):
            finals = await asyncio.gather(*(app.wait(u) for u in uuids))
    except TimeoutError:
        where = Counter((h.status, h.attempt) if (h := app.view.head(u)) else None for u in uuids)
        stuck = [
            (u, h.status if h else None, h.attempt if h else None, h.worker if h else None)
            for u in uuids
            if (h := app.view.head(u)) is None or not h.is_finished
        ]
        pytest.fail(
            f"not every task finished within {timeout} s: (status, attempt) counts {dict(where)}; "
            f"unfinished (uuid, status, attempt, worker): {stuck[:10]}"
        )
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
