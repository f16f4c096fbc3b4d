"""An app is not tied to the first event loop that used it: several ``asyncio.run`` in a row,
a loop per test, ``async with app:`` / ``with app:``, and ``close()`` on both apps."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import qtasks
from qtasks.asyncio import QueueTasks
from tests.helpers import FAST, unique

ROOT = Path(__file__).resolve().parents[2]

# One app for the whole module, as a program's module-level app: every test below runs on
# its own loop (pytest-asyncio's default), and each uses it.
shared = QueueTasks(name=unique("loops"), broker_url=f"memory://{unique()}", **FAST)


@shared.task
async def count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@pytest.mark.parametrize("round_", range(3))
async def test_one_app_serves_a_loop_per_test(round_: int) -> None:
    async with shared:
        await shared.start()
        task = await shared.add_task("count", 3 + round_)
        assert [v async for v in shared.stream(task.uuid, timeout=10)] == list(range(3 + round_))


@pytest.mark.parametrize("round_", range(2))
async def test_a_client_left_open_is_closed_by_the_end_of_its_loop(round_: int) -> None:
    task = await shared.add_task("count", 2)  # no worker here, no close: the next test's loop reuses the app
    assert (await shared.get(task.uuid)) is not None


def test_a_worker_left_running_at_the_end_of_its_loop_is_named_and_closed(caplog: pytest.LogCaptureFixture) -> None:
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique()}", **FAST)

    @app.task
    def one() -> int:
        return 1

    async def forgetful() -> None:
        await app.start()
        assert (await app.add_task("one", timeout=10)).returning == 1  # type: ignore[union-attr]

    asyncio.run(forgetful())
    assert any("ended while app" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert not app.core.connected
    asyncio.run(forgetful())  # and the app works on the next loop


def test_a_close_stopped_halfway_by_a_stray_cancel_at_the_loop_s_end_still_disconnects_and_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Kafka consumer's stop could raise a CancelledError of its own (a fetch it cancelled):
    # asyncio drops what the loop's last step raises without a word, and the connector,
    # its producer with it, was left open.
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique()}", **FAST)
    stopped: list[bool] = []

    async def submit() -> None:
        await app.add_task("anything")
        core = app.core

        async def stop_raising_a_cancel() -> None:
            raise asyncio.CancelledError

        broker_stop = core.broker.stop

        async def broker_stopped() -> None:
            stopped.append(True)
            await broker_stop()

        monkeypatch.setattr(core.store, "stop", stop_raising_a_cancel)
        monkeypatch.setattr(core.broker, "stop", broker_stopped)

    asyncio.run(submit())
    assert stopped == [True]
    assert not app.core.connected
    assert any(
        "could not be closed at the end of its event loop" in r.getMessage() and r.levelname == "WARNING"
        for r in caplog.records
    )


def test_a_client_call_then_a_worker_under_two_asyncio_runs() -> None:
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique()}", **FAST)

    @app.task
    def double(x: int) -> int:
        return 2 * x

    async def submit() -> str:
        task = await app.add_task("double", 21)
        return task.uuid

    async def work(uuid: str) -> int:
        await app.start()
        try:
            return (await app.wait(uuid, 10)).returning
        finally:
            await app.stop()

    uuid = asyncio.run(submit())
    assert not app.core.connected  # the first loop's end closed it
    assert asyncio.run(work(uuid)) == 42
    assert asyncio.run(work(asyncio.run(submit()))) == 42


def test_async_with_connects_and_stops_everything() -> None:
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique()}", **FAST)

    @app.task
    def one() -> int:
        return 1

    async def main() -> None:
        async with app:
            assert app.core.connected
            await app.start()
            done = await app.add_task("one", timeout=10)
            assert done is not None and done.returning == 1
        assert not app.core.connected
        assert app.worker is not None and not app.worker._started

    asyncio.run(main())


def test_an_app_in_use_by_another_running_loop_says_so() -> None:
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique()}", **FAST)
    ready, done = threading.Event(), threading.Event()

    async def hold() -> None:
        await app.get("3b878272-66f2-4dbc-83e7-e54bb4289bb7")
        ready.set()
        await asyncio.to_thread(done.wait)

    thread = threading.Thread(target=asyncio.run, args=(hold(),))
    thread.start()
    try:
        assert ready.wait(10)
        with pytest.raises(RuntimeError, match="in use by another event loop that is still open \\(running\\)"):
            asyncio.run(app.get("3b878272-66f2-4dbc-83e7-e54bb4289bb7"))
    finally:
        done.set()
        thread.join(10)
    # That loop ended: the app serves this one now.
    assert asyncio.run(app.get("3b878272-66f2-4dbc-83e7-e54bb4289bb7")) is None


def test_the_blocking_app_closes_and_works_as_a_context_manager() -> None:
    with qtasks.QueueTasks(name=unique(), broker_url=f"memory://{unique()}", **FAST) as app:

        @app.task
        def one() -> int:
            return 1

        app.start()
        done = app.add_task("one", timeout=10)
        assert done is not None and done.returning == 1
    assert not app._core.core.connected
    app.close()  # idempotent
    # Used again after closing: it connects again.
    assert app.get(done.uuid) is not None
    app.close()


def test_a_script_that_never_closes_its_app_exits_cleanly() -> None:
    # No stop(), no close(): the end of asyncio.run closes the app; nothing is left running
    # and nothing is reported as unclosed (warnings are errors here).
    script = textwrap.dedent(
        """
        import asyncio
        from qtasks.asyncio import QueueTasks

        app = QueueTasks(name="script", broker_url="memory://script")

        @app.task
        async def gen(n):
            for i in range(n):
                yield i

        async def main():
            await app.start()
            task = await app.add_task("gen", 3)
            print([v async for v in app.stream(task.uuid)])

        asyncio.run(main())
        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[0, 1, 2]", "[0, 1, 2]"]
    assert "Traceback" not in done.stderr and "never awaited" not in done.stderr, done.stderr


def test_a_blocking_program_that_never_stops_its_worker_is_told_and_exits() -> None:
    script = textwrap.dedent(
        """
        import time
        import qtasks

        app = qtasks.QueueTasks(name="forgot", broker_url="memory://forgot")

        @app.task
        def slow():
            time.sleep(30)

        app.start()
        app.add_task("slow")
        time.sleep(0.2)
        """
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "the program ended while app 'forgot' ran a worker" in done.stderr, done.stderr
    assert time.monotonic() - started < 20


def test_a_paused_loop_that_still_holds_the_app_s_worker_is_not_left_behind() -> None:
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique()}", **FAST)

    @app.task
    def one() -> int:
        return 1

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(app.start())  # the worker lives on this loop, which is now paused
        with pytest.raises(RuntimeError, match=r"still open \(paused\)"):
            asyncio.run(app.get("3b878272-66f2-4dbc-83e7-e54bb4289bb7"))
        loop.run_until_complete(app.stop())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    assert asyncio.run(app.get("3b878272-66f2-4dbc-83e7-e54bb4289bb7")) is None  # stopped there: usable here
