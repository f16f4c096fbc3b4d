"""The worker's fault paths on memory://: redelivery during a run, supervised loops, Python 3.11 shutdown."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
import uuid as uuid_mod
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from qtasks.asyncio import QueueTasks
from qtasks.connectors.base import Record, TopicPartition
from qtasks.deadletter import ends_its_task, uuid_of_key
from qtasks.executor import TaskExecutor
from qtasks.partitioner import partition_for
from qtasks.records import StatusHead, TaskRecord, encode
from tests.engine_suite import status_log
from tests.helpers import FAST, free_port, unique, until
from tests.unit.test_metrics import sample, scrape

NOW = 1_700_000_000.0


async def test_a_record_of_a_task_running_here_joins_the_run_and_takes_no_slot(app: QueueTasks) -> None:
    gate = asyncio.Event()

    @app.task
    async def hold() -> str:
        await gate.wait()
        return "held"

    worker = await app.start(concurrency=2)
    task = await app.add_task("hold")
    await app.view.wait_for(task.uuid, lambda h: h is not None and h.status == "process", 10)
    # The same record again, as after a rebalance that gave the partition back.
    rec = TaskRecord(uuid=task.uuid, task_name="hold", created_at=task.created_at)
    again = Record(app.topics.tasks, 0, 10_000, task.uuid.encode(), encode(rec), 0)
    in_flight = worker._in_flight
    worker._take(again)
    worker._fill()
    assert worker._in_flight == in_flight and not worker._backlog
    tracker = worker._offsets[again.tp]
    assert tracker.in_flight >= 1
    gate.set()
    done = await app.wait(task.uuid, 10)
    assert done.status == "success" and done.attempt == 1
    for _ in range(100):
        if tracker.committable() is not None and tracker.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert tracker.in_flight == 0  # the joined offset finished with the run


async def test_a_handler_cancelled_before_it_ran_gives_its_slot_back_and_its_record_runs_later(app: QueueTasks) -> None:
    # Exactly once, a partition whose transaction is lost has its handlers cancelled at once;
    # one made a moment before (a slot freed just then) is cancelled before its first step.
    @app.task
    def quick() -> str:
        return "ran"

    worker = await app.start(concurrency=2)
    uuid = "0d56ad3f-0f63-456c-b5b6-7e2f681abc93"
    rec = TaskRecord(uuid=uuid, task_name="quick", created_at=0.0)
    record = Record(app.topics.tasks, 0, 10_000, uuid.encode(), encode(rec), 0)
    in_flight = worker._in_flight
    worker._take(record)
    worker._fill()  # the handler is made, not yet run
    [handler] = [t for t in worker._handlers if not t.done()]
    handler.cancel()
    await asyncio.wait([handler])
    assert worker._in_flight == in_flight and uuid not in worker._active
    # The record, read again (the partition handed out again), runs: it joins no ghost.
    worker._take(record)
    worker._fill()
    assert worker._in_flight == in_flight + 1
    await asyncio.wait([t for t in worker._handlers if not t.done()])
    assert worker._in_flight == in_flight


async def test_a_control_loop_that_raises_is_restarted_and_cancel_still_works(app: QueueTasks) -> None:
    @app.task
    async def slow() -> None:
        await asyncio.sleep(30)

    worker = await app.start()
    consumer: Any = worker._control
    real = consumer.getmany
    failures = 0
    recovered = asyncio.Event()

    async def broken(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise RuntimeError("a bug in a loop")
        recovered.set()
        return await real(*args, **kwargs)

    consumer.getmany = broken
    task = await app.add_task("slow")
    await app.view.wait_for(task.uuid, lambda h: h is not None and h.status == "process", 10)
    await asyncio.wait_for(recovered.wait(), 10)
    assert await app.cancel(task.uuid, "stop") is True
    done = await app.wait(task.uuid, 10)
    assert done.status == "cancel" and worker.error is None


def _run_script(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_asyncio_run_of_add_task_returns() -> None:
    result = _run_script(
        """
        import asyncio
        from qtasks.asyncio import QueueTasks

        app = QueueTasks(name="script", broker_url="memory://script")
        task = asyncio.run(app.add_task("anything", 1))
        print("submitted", task.status)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "submitted new" in result.stdout


def test_a_script_that_raises_after_add_task_prints_its_traceback_and_exits() -> None:
    result = _run_script(
        """
        import asyncio
        from qtasks.asyncio import QueueTasks

        async def main():
            app = QueueTasks(name="script", broker_url="memory://script")
            await app.add_task("anything")
            raise SystemExit("the script's own error")

        asyncio.run(main())
        """
    )
    assert result.returncode == 1 and "the script's own error" in result.stderr


async def test_stop_and_close_right_after_add_task_and_cancel_return(make_app: Any) -> None:
    for _ in range(20):
        app = make_app()
        task = await app.add_task("nothing")
        await app.cancel(task.uuid)
        await asyncio.wait_for(app.stop(), 10)
        other = make_app()
        await other.add_task("nothing")
        await asyncio.wait_for(other.close(), 10)


async def test_a_rebalance_writes_held_back_process_statuses_so_no_run_starts_twice(make_app: Any) -> None:
    """Runs younger than process_grace have written nothing yet: a revoke writes it, the next owner waits."""
    settings = {"process_grace": 0.4, "lease_interval": 0.5, "lease_timeout": 3.0, "tasks_partitions": 3}
    first = make_app(**settings)
    second = make_app(first.name, **settings)
    runs: Counter[str] = Counter()

    async def hold(i: int) -> int:
        runs[i] += 1
        await asyncio.sleep(1.0)
        return i

    first.task(name="hold")(hold)
    second.task(name="hold")(hold)
    await first.start()
    tasks = [await first.add_task("hold", i) for i in range(9)]
    for task in tasks:
        await first.view.wait_for(task.uuid, lambda h: h is not None and h.status == "process", 5)
    assert len(runs) == 9
    worker = await second.start()  # well within process_grace of the runs' start: the group rebalances
    for task in tasks:
        assert (await first.wait(task.uuid, 10)).status == "success"
    await asyncio.sleep(0.5)  # the second worker's admissions settle
    assert worker._owned  # it took partitions over
    assert runs == Counter(range(9))


class BrokenExecutor(TaskExecutor):
    """A user's executor with a bug: the run fails outside the task, before process_grace passes."""

    async def execute(self) -> Any:
        raise RuntimeError("a bug in a custom executor")


async def test_a_run_that_fails_outside_the_task_never_writes_process_after_its_ending(make_app: Any) -> None:
    """The held-back process status dies with the run: on a compacted topic the last record wins."""
    app = make_app(process_grace=0.3)

    @app.task(executor=BrokenExecutor)
    async def job() -> None:
        return None

    await app.start()
    task = await app.add_task("job")
    done = await app.wait(task.uuid, 5)
    assert done.status == "error" and "a bug in a custom executor" in (done.traceback or "")
    await asyncio.sleep(0.5)  # past process_grace: a timer left behind would have written by now
    # The lease released as the run failed, then the ending; nothing after it.
    assert await status_log(app, task.uuid) == ["new", "process", "error"]


async def test_a_run_storing_its_ending_during_a_rebalance_is_not_started_again_by_the_next_owner() -> None:
    """A run whose code is done writes no process status any more: its ending is on its way.
    A worker that joins then takes some of its partitions; the first worker lets them go
    only once those endings are stored, so the new owner finds the tasks ended, not new."""
    name, url = unique(), f"faulty+memory://{unique('log')}"
    # The revoke waits at most lease_interval. The delayed endings queue per status partition,
    # one after another, and which partition a uuid's status lands in is random: the bound must
    # hold all 12 in one (3.6 s). Past it the worker lets go anyway, as if the broker were away,
    # and the next owner runs the tasks again (at least once): what this test must not see.
    settings = {**FAST, "tasks_partitions": 6, "concurrency": 8, "lease_interval": 6.0, "lease_timeout": 20.0}
    first, second = QueueTasks(name=name, broker_url=url, **settings), QueueTasks(name=name, broker_url=url, **settings)
    runs: Counter[int] = Counter()

    async def short(i: int) -> int:
        runs[i] += 1
        return i

    for app in (first, second):
        app.task(name="short")(short)
    try:
        await first.start()
        handles = await first.add_tasks("short", [(i,) for i in range(12)])
        # Every ending now takes 0.3 s more to be stored, after the ones before it in its partition.
        first.broker.faults.delay("delivery", 0.3, topic=first.topics.status)  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)  # the runs are done and store their endings
        await second.start()  # the rebalance lands while they do
        for handle in handles:
            assert (await first.wait(handle.uuid, 30)).status == "success"
        assert [i for i, n in runs.items() if n > 1] == [] and len(runs) == 12
    finally:
        first.broker.faults.clear()  # type: ignore[attr-defined]
        await second.stop(timeout=2)
        await first.stop(timeout=2)


async def test_workers_joining_a_busy_group_run_no_short_task_twice(make_app: Any) -> None:
    """Short runs write no process status; a rebalance must still never start one twice."""
    # The revoke waits for the endings under way at most lease_interval; past it the worker
    # lets go as if the broker were away and the next owner may run them again (at least
    # once). FAST's 0.5 s is less than a loaded machine can stall: the bound must not be what
    # this test measures.
    settings = {"concurrency": 8, "tasks_partitions": 6, "lease_interval": 6.0, "lease_timeout": 20.0}
    first = make_app(**settings)
    runs: Counter[int] = Counter()

    async def short(i: int) -> int:
        runs[i] += 1
        await asyncio.sleep(0.01)
        return i

    first.task(name="short")(short)
    handles = await first.add_tasks("short", [(i,) for i in range(1000)])
    await first.start()
    others = []
    for _ in range(5):
        await asyncio.sleep(0.05)  # joins land while runs start and end all the time
        other = make_app(first.name, **settings)
        other.task(name="short")(short)
        await other.start()
        others.append(other)
    for handle in handles:
        assert (await first.wait(handle.uuid, 30)).status == "success"
    assert any(other.worker is not None and other.worker.tasks_done for other in others)  # they took part
    assert [i for i, n in runs.items() if n > 1] == [] and len(runs) == 1000


@pytest.mark.parametrize("known", [True, False], ids=["known", "unknown here"])
@pytest.mark.parametrize("waits_in", ["the status lookup", "the catch-up"])
async def test_records_admitted_across_a_rebalance_are_decided_once_each(
    faulty_app: Any, waits_in: str, known: bool
) -> None:
    """Records taken before a rebalance whose admission ends after it (their tasks' statuses
    not read yet) are not decided on from the old assignment: a partition that went to the
    other worker is run there, one that stayed is read again here; each task runs once, and
    a task this worker does not know is not ended as unknown while the other one runs it."""
    # Found in CI: admissions that outlived a revoke and the next assignment saw no revoke
    # and started their runs, and the partitions' new owner ran the same tasks (8 twice).
    # The runs stay quiet (no process status) until they end, as short runs do.
    log = unique("log")
    settings = {"concurrency": 32, "tasks_partitions": 2, "lease_interval": 30.0, "lease_timeout": 60.0}
    first = faulty_app(log, **settings, process_grace=20.0)
    client = faulty_app(log, first.name, **settings)
    runs: Counter[int] = Counter()
    go = asyncio.Event()

    async def job(i: int) -> int:
        runs[i] += 1
        await go.wait()
        return i

    first.task(name="job")(job)
    name = "job" if known else "deployed_since"  # only the worker that joins later knows it
    worker = await first.start()
    go.set()
    warm_up = await client.add_task("job", -1, timeout=10)  # the worker is assigned; its view caught up
    assert warm_up is not None and warm_up.status == "success"
    go.clear()
    # The view reads nothing more of the status topic, nor its end, until the holds end:
    # records taken now wait in their status lookup or, after a rebalance of this worker
    # alone, in the catch-up that follows it.
    holds = [first.broker.faults.hold(op, topic=first.topics.status) for op in ("fetch", "end_offsets")]
    await until(lambda: holds[0].waiting == 1, 20, "the view's reads to be held")  # its read under way ended
    if waits_in == "the catch-up":
        worker._consumer.rejoin()
        await until(lambda: worker._view_ready is not None and not worker._view_ready.done(), 20, "the rebalance")
    handles = []
    while len({partition_for(h.uuid, 2) for h in handles}) < 2 or len(handles) < 8:  # on both partitions
        handles += await client.add_tasks(name, [(len(handles),)])
    await until(lambda: len(worker._active) == len(handles), 20, "the records taken")
    assert not runs.keys() - {-1}
    second = faulty_app(log, first.name, **settings, process_grace=20.0)
    for registered in {"job", name}:
        second.task(name=registered)(job)
    other = await second.start()
    await until(lambda: len(worker._owned) == 1 and len(other._owned) == 1, 20, "one partition each")
    theirs = {h.uuid for h in handles if TopicPartition(first.topics.tasks, partition_for(h.uuid, 2)) in other._owned}
    for hold in holds:
        hold.release()
    started = len(handles) if known else len(theirs)
    await until(lambda: len(runs) == started + 1, 20, "every task to start")
    for w in (worker, other):  # and no record is still being admitted anywhere
        await until(lambda w=w: len(w._handlers) == len(w._running), 20, "the admissions to end")
    assert [i for i, n in runs.items() if n > 1] == []
    go.set()
    for handle in handles:
        ended = await client.wait(handle.uuid, 30)
        if known or handle.uuid in theirs:
            assert ended.status == "success", ended.traceback
        else:  # read again here, where it is not known
            assert ended.status == "error" and "unknown task 'deployed_since'" in (ended.traceback or "")
    assert [i for i, n in runs.items() if n > 1] == []
    assert other.tasks_done and worker.tasks_done + other.tasks_done == started + 1  # the warm-up too


async def test_copies_of_a_keyed_task_read_again_while_it_ran_are_done_with_it_once_its_retry_is_taken(
    make_app: Any,
) -> None:
    # Found by review: a rebalance gave the running keyed task's record back (a copy joins the
    # run); the run failed and its retry waited in the delays topic. The copy was never done,
    # so the partition's commit stopped there for good.
    from qtasks.connectors.base import TopicPartition

    app = make_app(tasks_partitions=1, retry_backoff_base=1.5, retry_backoff_max=1.5)
    order: list[int] = []
    running = asyncio.Event()

    @app.task(retry=1)
    async def step(i: int) -> int:
        order.append(i)
        if i == 0 and order.count(0) == 1:
            running.set()
            await asyncio.sleep(0.5)
            raise RuntimeError("fails once")
        return i

    worker = await app.start()
    first = await app.add_task("step", 0, key="k")
    await asyncio.wait_for(running.wait(), 10)
    worker._consumer.rejoin()  # a rebalance while it runs; this worker keeps the partition
    handles = [first, *[await app.add_task("step", i, key="k") for i in (1, 2)]]
    handles += [await app.add_task("step", i) for i in range(3, 6)]
    for handle in handles:
        assert (await app.wait(handle.uuid, timeout=30)).status == "success"
    assert [i for i in order if i < 3] == [0, 0, 1, 2]  # the key's order
    tp = TopicPartition(app.core.topics.tasks, 0)
    end = app.core.broker.producer.known_end(tp.topic, 0)
    deadline = asyncio.get_running_loop().time() + 10
    log = app.core.broker.log  # type: ignore[attr-defined]
    while worker._offsets[tp].in_flight or log.committed(worker.group_id, tp) != end:
        assert asyncio.get_running_loop().time() < deadline, (worker._offsets[tp].in_flight, end)
        await asyncio.sleep(0.05)


async def _taken_over_while_it_streams(make_app: Any, lease: float, **settings: Any) -> _TakenOver:
    """A generator task streaming here, and a status that says another worker took it over
    (its attempt 2, leased for ``lease`` seconds): what a worker frozen past its lease finds
    when it wakes."""
    app = make_app(**settings)
    yielded: list[int] = []

    @app.task
    async def stream(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yielded.append(i)
            yield i
            await asyncio.sleep(0.01)

    worker = await app.start(concurrency=2)
    task = await app.add_task("stream", 100_000)
    await app.view.wait_for(task.uuid, lambda h: h is not None and h.status == "process", 10)
    await _until(lambda: len(yielded) >= 5, "streaming")
    running = app.view.get(task.uuid)
    assert running is not None and running.worker == worker.id and running.attempt == 1
    taken = _TakenOver(app, worker, task.uuid, yielded)
    now = time.time()
    await taken.write(running, worker="another-worker", attempt=2, lease_until=now + lease, updated_at=now)
    return taken


class _TakenOver:
    """The task's status writes from here on (the compacted log keeps none of the history)."""

    def __init__(self, app: QueueTasks, worker: Any, uuid: str, yielded: list[int]) -> None:
        self.app, self.worker, self.uuid, self.yielded = app, worker, uuid, yielded
        self.writes: list[tuple[str, str | None, int]] = []
        #: How many writes began before the other worker's first status was in this worker's view.
        self.seen_at: int | None = None
        store = app.core.store
        write = store.write

        async def spy(task: Any, *args: Any, **kwargs: Any) -> Any:
            self.writes.append((task.status, task.worker, task.attempt))
            return await write(task, *args, **kwargs)

        store.write = spy  # type: ignore[method-assign]
        tasks = TopicPartition(app.topics.tasks, partition_for(uuid, app.config.tasks_partitions))
        self.record = worker._offsets[tasks]
        self._results = TopicPartition(app.topics.results, partition_for(uuid, app.config.results_partitions))

    async def write(self, task: Any, **changes: Any) -> None:
        """A status of the task as another worker would write it."""
        await self.app.core.store.write(msgspec.structs.replace(task, **changes), durable=True)
        if self.seen_at is None:  # a renewal that began before it was in the view could not know of it
            self.seen_at = len(self.writes)

    def results(self) -> int:
        return int(self.app.core.broker.log.end_offset(self._results))

    def here(self) -> list[tuple[str, str | None, int]]:
        """What this worker wrote once it could see the other worker's status."""
        return [w for w in self.writes[self.seen_at or 0 :] if w[1] == self.worker.id]


async def test_a_run_another_worker_took_over_stops_writes_nothing_more_and_its_record_waits_for_that_run(
    make_app: Any,
) -> None:
    taken = await _taken_over_while_it_streams(make_app, lease=30, metrics_port=free_port())
    app, worker, uuid = taken.app, taken.worker, taken.uuid
    await _until(lambda: worker.runs_superseded == 1 and not worker._running, "stopped")
    stopped_at, written = len(taken.yielded), taken.results()
    await asyncio.sleep(0.3)
    assert len(taken.yielded) == stopped_at and taken.results() == written, "the run went on after it was taken over"
    head = app.view.head(uuid)
    assert head is not None and (head.status, head.worker, head.attempt) == ("process", "another-worker", 2)
    # Its record is not done: admitted again, it waits for the other worker's run (leased for 30 s).
    assert taken.record.in_flight == 1 and taken.record.committable() is None
    running = app.view.get(uuid)
    assert running is not None
    await taken.write(running, status="success", lease_until=0.0, updated_at=time.time())
    await _until(lambda: taken.record.in_flight == 0, "the record finished once the other run ended")
    assert taken.here() == [], "the run wrote a status after it was taken over"
    assert worker._in_flight == 0
    assert sample(await scrape(app), "qtasks_runs_superseded_total") == 1


async def test_a_run_taken_over_by_a_worker_that_then_died_is_taken_over_again_from_its_record(make_app: Any) -> None:
    # The other worker's lease runs out 1 s later (it died too): the record admitted again here
    # takes the task over as attempt 3, from what the earlier attempts streamed.
    taken = await _taken_over_while_it_streams(make_app, lease=1.0)
    app, worker, uuid = taken.app, taken.worker, taken.uuid
    await _until(lambda: worker.runs_superseded == 1, "stopped")
    await _until(lambda: (h := app.view.head(uuid)) is not None and h.attempt == 3 and h.worker == worker.id, "again")
    assert uuid in worker._running
    await app.cancel(uuid)
    end = await app.wait(uuid, 10)
    assert (end.status, end.attempt) == ("cancel", 3)
    await _until(lambda: taken.record.in_flight == 0, "the record finished")
    assert [w for w in taken.here() if w[2] < 3] == [], "the stopped run (attempt 1) wrote after it was taken over"


async def _until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        await asyncio.sleep(0.01)


async def test_a_copy_of_the_record_that_joined_a_run_taken_over_waits_with_it_and_finishes_with_the_other_run(
    make_app: Any,
) -> None:
    # A rebalance gave the partition back while the task ran here: its record, read again,
    # joined the run. When the run stops, both records wait for the other worker's run.
    app = make_app()

    @app.task
    async def hold() -> AsyncIterator[int]:
        while True:
            yield 1
            await asyncio.sleep(0.01)

    worker = await app.start(concurrency=2)
    task = await app.add_task("hold")
    await app.view.wait_for(task.uuid, lambda h: h is not None and h.status == "process", 10)
    rec = TaskRecord(uuid=task.uuid, task_name="hold", created_at=task.created_at)
    partition = partition_for(task.uuid, app.config.tasks_partitions)
    worker._take(Record(app.topics.tasks, partition, 10_000, task.uuid.encode(), encode(rec), 0))
    worker._fill()
    tracker = worker._offsets[TopicPartition(app.topics.tasks, partition)]
    assert tracker.in_flight == 2 and len(worker._active[task.uuid]) == 1
    taken = _TakenOver(app, worker, task.uuid, [])
    running = app.view.get(task.uuid)
    assert running is not None
    await taken.write(running, worker="another-worker", attempt=2, lease_until=time.time() + 30)
    await _until(lambda: worker.runs_superseded == 1 and not worker._running, "stopped")
    await asyncio.sleep(0.1)
    assert tracker.in_flight == 2 and tracker.committable() is None, "a record of the task finished before it ended"
    running = app.view.get(task.uuid)
    assert running is not None
    await taken.write(running, status="success", lease_until=0.0, updated_at=time.time())
    await _until(lambda: tracker.in_flight == 0, "both records finished once the other run ended")
    assert taken.here() == [] and worker._in_flight == 0


async def test_the_next_task_of_a_key_waits_while_another_worker_runs_the_task_taken_over(make_app: Any) -> None:
    # Another worker took over the key's running task: the task stops here, and its record,
    # admitted again, keeps the key until that other run ends.
    app = make_app()
    started: list[int] = []

    @app.task
    async def step(i: int) -> AsyncIterator[int]:
        started.append(i)
        while i == 0:
            yield 0
            await asyncio.sleep(0.01)
        yield i

    worker = await app.start(concurrency=2)
    first = await app.add_task("step", 0, key="k")
    await app.view.wait_for(first.uuid, lambda h: h is not None and h.status == "process", 10)
    second = await app.add_task("step", 1, key="k")
    await _until(lambda: worker._queued_by_key == 1, "the second task behind the first")
    taken = _TakenOver(app, worker, first.uuid, [])
    running = app.view.get(first.uuid)
    assert running is not None
    await taken.write(running, worker="another-worker", attempt=2, lease_until=time.time() + 30)
    await _until(lambda: worker.runs_superseded == 1 and first.uuid not in worker._running, "stopped")
    await asyncio.sleep(0.3)
    assert started == [0], "the key's next task started while the other worker ran its task"
    running = app.view.get(first.uuid)
    assert running is not None
    await taken.write(running, status="success", lease_until=0.0, updated_at=time.time())
    end = await app.wait(second.uuid, 10)
    assert end.status == "success" and started == [0, 1]


@pytest.mark.parametrize("evicted", [False, True])
async def test_a_task_record_over_the_worker_s_limit_ends_its_task_as_error_instead_of_leaving_it_new(
    make_app: Any, evicted: bool
) -> None:
    # Clients and workers may differ in max_record_bytes: the worker dead-letters the record,
    # whose value it does not read, so its key names the task (its `new` is unreadable here too,
    # also when read back from the topic, as for a view that has dropped finished tasks).
    worker_app = make_app(name=(name := unique()), status_cache_size=1 if evicted else 100_000)
    client = make_app(name=name, max_record_bytes=3_000_000)

    @worker_app.task
    def size(text: str) -> int:
        return len(text)

    await worker_app.start()
    if evicted:
        for _ in range(3):
            await worker_app.add_task("size", "a", timeout=10)
        assert worker_app.core.view.evicted > 0
    handle = await client.add_task("size", "x" * 1_500_000)
    task = await client.wait(handle.uuid, timeout=10)
    assert task.status == "error" and "over the limit of 1000000" in (task.traceback or "")
    assert task.args == [] and len(encode(task)) < 1000, "the error copies the huge arguments"
    seen = await worker_app.get(handle.uuid)
    assert seen is not None and seen.status == "error"
    assert await worker_app.add_task("size", "small", timeout=10) is not None  # the worker goes on


async def test_a_record_whose_uuid_cannot_be_read_ends_the_task_its_key_names(app: QueueTasks) -> None:
    await app.start()
    named, junk = str(uuid_mod.uuid4()), str(uuid_mod.uuid4()).upper()  # a key not as qtasks writes it
    value = b'{"uuid": "' + named.encode() + b'", "task_name": "x", "created_at": 1e400}'  # out of range
    for key in (named, junk):
        await app.broker.producer.send(app.topics.tasks, value, key=key.encode(), partition=0)
    await _until(lambda: sum(app.core.stats.dead_letters.values()) == 2, "both dead-lettered")
    task = await app.get(named)
    assert task is not None and task.status == "error" and "Number out of range" in (task.traceback or "")
    assert await app.get(junk) is None and await app.get(junk.lower()) is None


async def test_a_bad_record_keyed_by_a_running_or_finished_task_leaves_that_task_alone(make_app: Any) -> None:
    app = make_app(process_grace=0)
    gate = asyncio.Event()

    @app.task
    async def hold() -> str:
        await gate.wait()
        return "held"

    await app.start()
    running = await app.add_task("hold")
    await app.view.wait_for(running.uuid, lambda h: h is not None and h.status == "process", 10)
    gate.set()
    done = await app.wait(running.uuid, timeout=10)
    gate.clear()
    running = await app.add_task("hold")
    await app.view.wait_for(running.uuid, lambda h: h is not None and h.status == "process", 10)
    for uuid in (done.uuid, running.uuid):  # another producer's records: the value or the key names a task
        named = b'{"uuid": "' + uuid.encode() + b'", "task_name": 5}'
        await app.broker.producer.send(app.topics.tasks, named, key=b"other", partition=0)
        await app.broker.producer.send(app.topics.tasks, b"{not json", key=uuid.encode(), partition=0)
    await _until(lambda: sum(app.core.stats.dead_letters.values()) == 4, "all dead-lettered")
    assert (await app.wait(done.uuid, timeout=1)).status == "success"
    gate.set()
    assert (await app.wait(running.uuid, timeout=10)).status == "success"


@pytest.mark.parametrize(
    ("head", "ends"),
    [
        (None, True),  # unknown here, or its status is over this worker's limit
        (StatusHead(uuid="u", status="new"), True),
        (StatusHead(uuid="u", status="process", attempt=1, lease_until=NOW - 1), True),  # its worker is gone
        (StatusHead(uuid="u", status="process", attempt=1, lease_until=NOW + 30), False),  # a run in progress
        (StatusHead(uuid="u", status="success", rev=3), False),
        (StatusHead(uuid="u", status="error", rev=3), False),
        (StatusHead(uuid="u", status="cancel", rev=1), False),
        (StatusHead(uuid="u", status="retry", rev=2), False),
    ],
)
def test_a_dead_lettered_record_ends_its_task_only_if_nothing_runs_or_ended_it(
    head: StatusHead | None, ends: bool
) -> None:
    assert ends_its_task(head, NOW) is ends


@pytest.mark.parametrize(
    ("key", "uuid"),
    [
        (b"6f1c2a9e-8d1b-4c5e-9a3f-0b2d4e6f8a1c", "6f1c2a9e-8d1b-4c5e-9a3f-0b2d4e6f8a1c"),
        (b"6F1C2A9E-8D1B-4C5E-9A3F-0B2D4E6F8A1C", None),  # not as qtasks writes it
        (b"6f1c2a9e8d1b4c5e9a3f0b2d4e6f8a1c", None),
        (b"junk", None),
        (b"\xff" * 36, None),
        (None, None),
    ],
)
def test_the_uuid_of_a_record_s_key(key: bytes | None, uuid: str | None) -> None:
    assert uuid_of_key(key) == uuid
