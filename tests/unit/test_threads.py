"""TaskThreads: daemon threads, abandoned runs leave the pool and are stopped when Python can stop them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError

import pytest

from qtasks.threads import TaskAbandoned, TaskThreads, ThreadLimitError


@pytest.fixture
def pool():
    threads = TaskThreads(2, name_prefix="test-task")
    yield threads
    threads.shutdown(wait=False, cancel_futures=True, cancel_running=True)


def _hang(started: threading.Semaphore, release: threading.Event) -> bool:
    started.release()
    return release.wait()  # blocked in C: TaskAbandoned cannot land until it returns


def _wait_until(predicate, timeout: float = 2.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_runs_work_and_returns_results(pool: TaskThreads) -> None:
    assert pool.submit(lambda a, b=0: a + b, 40, b=2).result(timeout=1) == 42


def test_carries_any_exception_the_work_raises(pool: TaskThreads) -> None:
    def boom() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pool.submit(boom).result(timeout=1)
    assert pool.submit(lambda: "still works").result(timeout=1) == "still works"


async def test_run_in_executor_accepts_the_pool(pool: TaskThreads) -> None:
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(pool, threading.current_thread) is not threading.current_thread()


def test_threads_are_daemon_threads(pool: TaskThreads) -> None:
    assert pool.submit(lambda: threading.current_thread().daemon).result(timeout=1) is True


def test_an_abandoned_busy_loop_stops_at_once(pool: TaskThreads) -> None:
    counter = [0]

    def busy() -> None:
        while True:
            counter[0] += 1

    future = pool.submit(busy)
    assert _wait_until(lambda: counter[0] > 1000)
    assert pool.abandon(future) is True
    with pytest.raises(TaskAbandoned):
        future.result(timeout=0)
    time.sleep(0.1)
    stopped_at = counter[0]
    time.sleep(0.2)
    assert counter[0] == stopped_at
    assert _wait_until(lambda: pool.threads == 0)


def test_an_abandoned_sleep_stops_when_the_sleep_returns(pool: TaskThreads) -> None:
    # The documented limit: time.sleep is one C call; TaskAbandoned lands when it returns.
    after_sleep, started = threading.Event(), threading.Event()

    def sleeper() -> None:
        started.set()
        time.sleep(1.0)
        after_sleep.set()  # never reached: TaskAbandoned is raised first

    future = pool.submit(sleeper)
    assert started.wait(1)
    pool.abandon(future)
    assert pool.abandoned_threads == 1
    time.sleep(0.3)
    assert pool.threads == 1  # still in its sleep
    assert _wait_until(lambda: pool.threads == 0, timeout=2)
    assert not after_sleep.is_set()


def test_abandoned_runs_leave_the_pool_so_later_work_still_runs(pool: TaskThreads) -> None:
    release, started = threading.Event(), threading.Semaphore(0)
    hung = [pool.submit(_hang, started, release) for _ in range(2)]  # the pool's 2 threads
    for _ in hung:
        assert started.acquire(timeout=1)
    for future in hung:
        pool.abandon(future)
    assert pool.submit(lambda: "ran").result(timeout=1) == "ran"
    assert pool.abandoned_threads == 2
    release.set()
    assert _wait_until(lambda: pool.abandoned_threads == 0)


def test_past_max_threads_submit_raises_instead_of_hanging() -> None:
    pool = TaskThreads(1, max_threads=2)
    release, started = threading.Event(), threading.Semaphore(0)
    try:
        for _ in range(2):  # 2 threads, both abandoned, both blocked
            future = pool.submit(_hang, started, release)
            assert started.acquire(timeout=1)
            pool.abandon(future)
        with pytest.raises(ThreadLimitError, match="abandoned"):
            pool.submit(lambda: None)
        release.set()
        assert _wait_until(lambda: pool.threads == 0)
        assert pool.submit(lambda: "ok").result(timeout=1) == "ok"
    finally:
        release.set()
        pool.shutdown(wait=False, cancel_running=True)


def test_abandoning_a_queued_run_drops_it(pool: TaskThreads) -> None:
    release = threading.Event()
    busy = [pool.submit(release.wait) for _ in range(2)]
    queued = pool.submit(lambda: pytest.fail("an abandoned queued run must not start"))
    assert pool.abandon(queued) is True
    with pytest.raises(CancelledError):
        queued.result(timeout=0)
    release.set()
    for future in busy:
        assert future.result(timeout=1) is True


def test_abandon_after_the_run_ended_is_a_no_op(pool: TaskThreads) -> None:
    future = pool.submit(lambda: 1)
    assert future.result(timeout=1) == 1
    assert pool.abandon(future) is False
    assert [pool.submit(lambda i=i: i).result(timeout=1) for i in range(5)] == list(range(5))


def test_shutdown_cancel_running_abandons_and_does_not_join() -> None:
    pool = TaskThreads(2)
    release, started = threading.Event(), threading.Semaphore(0)
    running = pool.submit(_hang, started, release)
    assert started.acquire(timeout=1)
    started = time.monotonic()
    pool.shutdown(wait=True, cancel_running=True)
    assert time.monotonic() - started < 0.5
    with pytest.raises(TaskAbandoned):
        running.result(timeout=0)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: None)
    release.set()


def test_a_process_with_an_abandoned_sleeping_task_exits_promptly() -> None:
    code = (
        "import time\n"
        "from qtasks.threads import TaskThreads\n"
        "pool = TaskThreads(1)\n"
        "future = pool.submit(time.sleep, 30)\n"
        "time.sleep(0.1)\n"
        "pool.abandon(future)\n"
        "print('leaving')\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=15)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "leaving"
    assert time.monotonic() - started < 10  # not the 30 s sleep


def test_a_thread_still_starting_counts_as_free_so_submit_does_not_hit_the_cap() -> None:
    pool = TaskThreads(1, max_threads=2)
    release, started = threading.Event(), threading.Semaphore(0)
    try:
        hung = pool.submit(_hang, started, release)
        assert started.acquire(timeout=1)
        pool.abandon(hung)
        # Back to back: the first starts a thread; the second must wait for it, not ask for a third.
        futures = [pool.submit(lambda i=i: i) for i in range(2)]
        assert [f.result(timeout=1) for f in futures] == [0, 1]
    finally:
        release.set()
        pool.shutdown(wait=False, cancel_running=True)
