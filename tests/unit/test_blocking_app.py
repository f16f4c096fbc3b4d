"""The blocking app (``qtasks.QueueTasks``): the same engine through a facade."""

from __future__ import annotations

import time

import pytest

import qtasks
from qtasks import QueueTasks, _state
from tests.helpers import FAST, unique


@pytest.fixture
def sync_app() -> QueueTasks:
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique()}", **FAST)
    yield app
    app.stop(timeout=2)


def test_public_api_is_pinned() -> None:
    assert qtasks.__all__ == sorted(qtasks.__all__)
    assert set(qtasks.__all__) == {
        "Args",
        "AsyncContext",
        "AsyncRouter",
        "Logger",
        "QTasksError",
        "QueueConfig",
        "QueueTasks",
        "Router",
        "Stream",
        "StreamItem",
        "SyncContext",
        "SyncRouter",
        "Task",
        "TaskCancelError",
        "TaskPluginTriggerError",
        "UpstreamFailedError",
        "UpstreamRetriedError",
        "shared_task",
    }


def test_blocking_client_runs_streams_and_cancels(sync_app: QueueTasks) -> None:
    assert _state.app_main is sync_app

    @sync_app.task(echo=True, generate_handler=lambda v: v + 1)
    def gen(self, n: int):
        assert self.ctx.get_metadata().status == "process"
        assert self.ctx.get_component("config") is sync_app.config
        yield from range(n)

    @sync_app.task
    def forever(self=None) -> None:
        while True:
            time.sleep(0.01)
            yield None

    sync_app.start()
    task = sync_app.add_task("gen", 3)
    assert list(sync_app.stream(task.uuid)) == [1, 2, 3]
    assert list(task.stream()) == [1, 2, 3] and task.result(timeout=10) == [1, 2, 3]
    assert task.get().status == "success" and task.status == "new"  # the field: as submitted
    assert list(sync_app.stream(task.uuid, from_seq=1, meta=True)) == [
        qtasks.StreamItem(uuid=task.uuid, seq=1, attempt=1, value=2),
        qtasks.StreamItem(uuid=task.uuid, seq=2, attempt=1, value=3),
    ]
    assert sync_app.get(task.uuid).returning == [1, 2, 3]
    done = sync_app.add_task("gen", 2, timeout=10)
    assert done is not None and done.status == "success"

    running = sync_app.add_task("forever")
    for _ in range(100):
        if sync_app.get(running.uuid).status == "process":
            break
        time.sleep(0.02)
    assert sync_app.cancel(running.uuid, "enough")
    final = sync_app.wait(running.uuid, 10)
    assert (final.status, final.cancel_reason) == ("cancel", "enough")


def test_registered_task_can_submit_itself(sync_app: QueueTasks) -> None:
    @sync_app.task
    def square(x: int) -> int:
        return x * x

    assert square(3) == 9
    sync_app.start()
    assert square.add_task(4, timeout=10).returning == 16


def test_blocking_bulk_submit_and_merged_streams(sync_app: QueueTasks) -> None:
    @sync_app.task
    def count(n: int, step: int = 1):
        yield from range(0, n * step, step)

    sync_app.start()
    handles = count.map([1, 2, 3])
    handles += sync_app.add_tasks("count", [qtasks.Args(2, step=10)])
    by_task: dict[str, list[int]] = {h.uuid: [] for h in handles}
    for item in sync_app.stream_many([h.uuid for h in handles], timeout=20):
        by_task[item.uuid].append(item.value)
    assert list(by_task.values()) == [[0], [0, 1], [0, 1, 2], [0, 10]]
    assert [h.result(timeout=10) for h in handles] == [[0], [0, 1], [0, 1, 2], [0, 10]]


def test_blocking_delayed_and_periodic_tasks(sync_app: QueueTasks) -> None:
    ticks: list[float] = []

    @sync_app.task
    def stamp() -> float:
        return time.time()

    @sync_app.periodic(every=1)
    def beat() -> None:
        ticks.append(time.time())

    sync_app.start()
    one = sync_app.add_task("stamp", countdown=1.2)
    batch = sync_app.add_tasks("stamp", [(), ()], eta=time.time() + 1.2)
    for handle in [one, *batch]:
        assert handle.result(timeout=20) >= handle.task.not_before > 0
    deadline = time.monotonic() + 20
    while len(ticks) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(ticks) >= 2
