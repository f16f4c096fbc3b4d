"""The worker's fault paths on memory://: redelivery during a run, supervised loops, Python 3.11 shutdown."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections import Counter
from typing import Any

from qtasks.asyncio import QueueTasks
from qtasks.connectors.base import Record
from qtasks.executor import TaskExecutor
from qtasks.records import TaskRecord, encode
from tests.engine_suite import status_log


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


async def test_workers_joining_a_busy_group_run_no_short_task_twice(make_app: Any) -> None:
    """Short runs write no process status; a rebalance must still never start one twice."""
    settings = {"concurrency": 8, "tasks_partitions": 6}
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
