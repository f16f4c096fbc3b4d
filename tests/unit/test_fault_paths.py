"""Every I/O fault path of the engine, in milliseconds, on the fault-injecting connector."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from qtasks import ops
from qtasks.asyncio import QueueTasks
from qtasks.connectors.base import TopicPartition
from qtasks.connectors.memory import MemoryConsumer, MemoryProducer
from qtasks.core import Core
from qtasks.delays import AT
from qtasks.exc import AppClosedError, ConnectorError, StreamIncompleteError
from qtasks.reader import ResultsReader
from tests.helpers import FAST, unique
from tests.unit.test_exactly_once import crash


def committed_everything(app: QueueTasks) -> bool:
    log = app.broker.inner.log  # type: ignore[attr-defined]
    for p in range(app.core.tasks_partitions):
        tp = TopicPartition(app.topics.tasks, p)
        if log.end_offset(tp) and log.committed(app.group_id, tp) != log.end_offset(tp):
            return False
    return True


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Poll a condition outside asyncio (the memory log's committed offsets)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_an_outage_while_a_task_ends_is_waited_out_quietly_and_nothing_is_lost(
    faulty_app: Callable[..., QueueTasks], caplog: pytest.LogCaptureFixture
) -> None:
    app = faulty_app()
    gate = asyncio.Event()

    @app.task
    async def job(i: int) -> int:
        await gate.wait()
        return i

    await app.start()
    task = await app.add_task("job", 1)
    await app.view.wait_for(task.uuid, lambda h: h is not None and h.status == "process", 10)
    faults = app.broker.faults  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO, logger="qtasks")
    faults.down()
    gate.set()
    await asyncio.sleep(1.0)  # the terminal status waits for the broker, retrying
    assert app.worker is not None and app.worker._paused  # no new task is taken meanwhile
    faults.up()
    done = await app.wait(task.uuid, 10)
    assert (done.status, done.returning) == ("success", 1)
    lines = [r for r in caplog.records if r.name.startswith("qtasks") and r.levelno >= logging.INFO]
    lines = [r for r in lines if "broker" in r.getMessage()]
    assert [r.levelname for r in lines] == ["WARNING", "INFO"]  # one line when it starts, one when it is over
    after = await app.add_task("job", 2, timeout=10)
    assert after is not None and after.status == "success"
    await until(lambda: committed_everything(app))
    # No lease renewal that waited out the outage landed after the ending: once the
    # compacted topic keeps only the last record, a new process still reads success.
    app.broker.inner.log.compact(app.topics.status)  # type: ignore[attr-defined]
    fresh = QueueTasks(name=app.name, broker_url=app.broker_url, **FAST)
    try:
        seen = await fresh.get(task.uuid)
    finally:
        await fresh.close()
    assert seen is not None and seen.status == "success"


async def test_a_lost_value_ends_its_task_as_error_and_does_not_poison_later_tasks(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    app = faulty_app()

    @app.task
    async def gen(n: int):
        for i in range(n):
            yield i

    await app.start()
    app.broker.faults.fail("delivery", topic=app.topics.results, error=ConnectorError("lost", retriable=False))  # type: ignore[attr-defined]
    first = await app.add_task("gen", 3, timeout=10)
    assert first is not None and first.status == "error" and "was not stored" in (first.traceback or "")
    for _ in range(3):
        later = await app.add_task("gen", 3, timeout=10)
        assert later is not None and (later.status, later.returning) == ("success", [0, 1, 2])
    await until(lambda: committed_everything(app))


async def test_a_status_write_refused_for_good_still_ends_the_task(faulty_app: Callable[..., QueueTasks]) -> None:
    app = faulty_app()

    @app.task
    async def job() -> str:
        return "ok"

    await app.start()
    faults = app.broker.faults  # type: ignore[attr-defined]
    task = await app.add_task("job")
    # The next status send is the terminal one (a task this short writes no process status),
    # refused for good.
    faults.fail("send", nth=1, topic=app.topics.status, error=ConnectorError("refused", retriable=False))
    done = await app.wait(task.uuid, 10)
    assert done.status == "error" and "could not finish" in (done.traceback or "")
    assert "refused" in (done.traceback or "")
    await until(lambda: committed_everything(app))


async def test_failed_commits_and_fetches_are_retried(faulty_app: Callable[..., QueueTasks]) -> None:
    app = faulty_app()

    @app.task
    async def job(i: int) -> int:
        return i

    await app.start()
    faults = app.broker.faults  # type: ignore[attr-defined]
    faults.fail("commit", times=3)
    faults.fail("fetch", times=3, topic=app.topics.tasks)
    results = [await app.add_task("job", i, timeout=10) for i in range(5)]
    assert [r.returning for r in results if r is not None] == [0, 1, 2, 3, 4]
    await until(lambda: committed_everything(app))
    assert app.worker is not None and app.worker.error is None


async def test_a_submit_during_an_outage_is_stored_once_the_broker_is_back(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    app = faulty_app()

    @app.task
    async def job() -> str:
        return "ran"

    await app.start()
    faults = app.broker.faults  # type: ignore[attr-defined]
    faults.down()
    submit = asyncio.ensure_future(app.add_task("job"))
    await asyncio.sleep(0.3)
    assert not submit.done()
    faults.up()
    task = await asyncio.wait_for(submit, 10)
    done = await app.wait(task.uuid, 10)
    assert done.status == "success"


async def streaming_five_values(app: QueueTasks) -> tuple[Any, Any]:
    """Start ``app`` with a generator of five values, submit it; its faults plan and the task."""

    @app.task
    async def gen(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    await app.start()
    return app.broker.faults, await app.add_task("gen", 5)  # type: ignore[attr-defined]


async def test_a_stream_outlives_failing_reads_of_its_results_partition(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    # A node down or frozen makes the stream's lookups (the partition's end, an offset by
    # time) fail for a while: the stream waits them out, as the worker does.
    app = faulty_app()

    faults, task = await streaming_five_values(app)
    faults.fail("end_offsets", topic=app.topics.results, times=4)
    before = faults.calls["end_offsets"]
    assert [v async for v in app.stream(task.uuid, timeout=10)] == list(range(5))
    assert faults.calls["end_offsets"] - before > 4  # it failed four times and was asked again


async def test_a_stream_whose_reads_keep_failing_ends_at_its_timeout(faulty_app: Callable[..., QueueTasks]) -> None:
    app = faulty_app()

    faults, task = await streaming_five_values(app)
    faults.fail("end_offsets", topic=app.topics.results, times=10_000)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError, match=f"stream of {task.uuid} did not end within 0.5 s"):
        [v async for v in app.stream(task.uuid, timeout=0.5)]
    assert asyncio.get_running_loop().time() - started < 2.0


async def test_a_stream_read_refused_for_good_is_raised(faulty_app: Callable[..., QueueTasks]) -> None:
    app = faulty_app()

    faults, task = await streaming_five_values(app)
    faults.fail("end_offsets", topic=app.topics.results, error=ConnectorError("not authorized", retriable=False))
    with pytest.raises(ConnectorError, match="not authorized"):
        [v async for v in app.stream(task.uuid, timeout=10)]


async def test_a_stream_read_that_hangs_ends_at_the_stream_s_timeout(faulty_app: Callable[..., QueueTasks]) -> None:
    # A frozen node answers nothing: one try alone is bounded by the stream's deadline too.
    app = faulty_app()

    faults, task = await streaming_five_values(app)
    faults.delay("end_offsets", 30.0, topic=app.topics.results)
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError, match=r"did not end within 0\.5 s"):
        [v async for v in app.stream(task.uuid, timeout=0.5)]
    assert asyncio.get_running_loop().time() - started < 2.0


async def test_a_stream_whose_position_waits_for_the_broker_ends_at_its_timeout(
    faulty_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Kafka consumer asks the broker for a position while the partition's offset is being
    # reset (past retention, say): a frozen node must not hold the stream past its deadline,
    # neither when it opens nor when it has read every value and looks where it stands.
    app = faulty_app()

    faults, task = await streaming_five_values(app)
    assert (await app.wait(task.uuid, timeout=5)).status == "success"
    faults.delay("position", 30.0, topic=app.topics.results)  # the stream's first: its opening
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError, match=r"did not end within 0\.5 s"):
        [v async for v in app.stream(task.uuid, timeout=0.5)]
    assert asyncio.get_running_loop().time() - started < 2.0
    faults.clear()
    # Nothing of the stream that gave up is left registered: the next one reads every value.
    assert [v async for v in app.stream(task.uuid, timeout=5)] == list(range(5))
    assert app._reader is not None and not app._reader._streams

    # A task that wrote no end marker: once it has ended, the stream reads the partition's end
    # (every record before it is the task's or older), then looks where it stands: that hangs.
    @app.task
    async def plain() -> int:
        return 1

    real = ResultsReader.end_with_undecided

    async def then_hang(self: ResultsReader, tp: TopicPartition) -> int:
        end = await real(self, tp)
        faults.delay("position", 30.0, topic=app.topics.results)
        return end

    monkeypatch.setattr(ResultsReader, "end_with_undecided", then_hang)
    done = await app.add_task("plain")
    assert (await app.wait(done.uuid, timeout=5)).status == "success"
    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError, match=r"did not end within 1\.0 s"):
        [v async for v in app.stream(done.uuid, timeout=1.0)]
    assert asyncio.get_running_loop().time() - started < 2.5


async def test_closing_the_app_ends_a_stream_that_waits_for_the_broker(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    app = faulty_app()

    faults, task = await streaming_five_values(app)
    faults.fail("end_offsets", topic=app.topics.results, times=100_000)
    reading = asyncio.create_task(anext(aiter(app.stream(task.uuid))))
    await asyncio.sleep(0.3)
    assert not reading.done()
    await app.close()
    with pytest.raises(AppClosedError):
        async with asyncio.timeout(5):
            await reading


async def test_the_stream_of_a_task_that_yields_nothing_ends_with_its_status(
    faulty_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No end marker is written for a task without values: its terminal status ends the
    # stream, at once (here, the stream's own polling is made too slow to be what ends it).
    from qtasks import stream

    monkeypatch.setattr(stream, "_POLL", 60.0)
    app = faulty_app()

    @app.task
    async def plain() -> int:
        return 1

    await app.start()
    for _ in range(3):
        task = await app.add_task("plain")
        assert [v async for v in app.stream(task.uuid, timeout=10)] == []


async def test_a_task_whose_status_cannot_be_looked_up_during_an_outage_waits_and_then_runs(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    """A record the view knows nothing of is looked up to the status log's end; while the
    broker does not answer that lookup, the worker waits for it (never ends the task as error)."""
    import time
    import uuid as uuid_mod

    from qtasks.partitioner import partition_for
    from qtasks.records import TaskRecord, encode

    app = faulty_app()

    @app.task
    async def job(i: int) -> int:
        return i * 2

    await app.start()
    faults = app.broker.faults  # type: ignore[attr-defined]
    # A record written by another producer, its `new` status not in this view: the worker
    # looks it up (ListOffsets), which fails five times in a row.
    faults.fail("end_offsets", times=5)
    uuid = str(uuid_mod.uuid4())
    record = TaskRecord(uuid=uuid, task_name="job", args=[21], kwargs={}, created_at=time.time())
    await app.broker.producer.send(
        app.topics.tasks, encode(record), key=uuid.encode(), partition=partition_for(uuid, app.core.tasks_partitions)
    )
    await until(lambda: faults.calls["end_offsets"] >= 6)  # five failed lookups, then one that answers
    await until(lambda: app.view.head(uuid) is not None)  # the task had no status before the worker's
    done = await app.wait(uuid, 10)
    assert (done.status, done.returning) == ("success", 42), done.traceback


async def test_a_finished_run_gives_its_slot_up_while_its_ending_is_stored(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    app = faulty_app(concurrency=1, tasks_partitions=1)
    started: dict[int, float] = {}

    @app.task
    async def job(i: int) -> int:
        started[i] = time.monotonic()
        return i

    first = await app.add_task("job", 1)
    second = await app.add_task("job", 2)
    # The next status stored (the first task's ending) takes a second to be acknowledged.
    app.broker.faults.delay("delivery", 1.0, topic=app.topics.status, times=1)  # type: ignore[attr-defined]
    await app.start()
    done = await app.wait(first.uuid, 10)
    stored = time.monotonic()
    assert done.status == "success" and (await app.wait(second.uuid, 10)).status == "success"
    # The only slot went to the second task while the first one's ending waited for the broker.
    assert started[2] < stored - 0.5
    await until(lambda: committed_everything(app))


async def test_a_worker_that_cannot_join_its_group_leaves_no_consumer_running(
    faulty_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = faulty_app()

    @app.task
    async def job() -> int:
        return 1

    connector: Any = app.broker
    made: list[Any] = []
    original = connector.consumer

    def consumer(*args: Any, **kwargs: Any) -> Any:
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(connector, "consumer", consumer)
    await app.core.connect()
    made.clear()  # the app's own readers, started by connect
    connector.faults.fail("start", topic=app.topics.tasks)
    with pytest.raises(ConnectorError, match="injected fault"):
        await app.start()
    assert len(made) == 2  # the control reader (started) and the group member (failed)
    assert not any(c._inner._started for c in made)
    await app.start()  # the fault was one call: the next start joins
    assert (await app.add_task("job", timeout=10)).returning == 1


async def test_values_whose_deliveries_are_settled_when_sent_are_all_counted(
    faulty_app: Callable[..., QueueTasks], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connector may hand back a delivery that is already done (the protocol allows it).
    app = faulty_app()

    @app.task
    async def three() -> AsyncIterator[int]:
        for i in range(3):
            yield i

    await app.start()
    producer: Any = app.broker.producer
    inner_send = producer.send

    async def send(*args: Any, **kwargs: Any) -> Any:
        await inner_send(*args, **kwargs)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    monkeypatch.setattr(producer, "send", send)
    task = await app.add_task("three", timeout=10)
    assert task is not None and task.status == "success" and task.returning == [0, 1, 2], task


async def test_a_stream_whose_first_values_are_gone_from_the_log_raises_after_reading_again() -> None:
    """Values past the results topic's retention cannot be streamed: the stream reads the
    partition again from its start, then says which values are missing (never ends short)."""
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique('log')}?retention_bytes=1500", **FAST)

    @app.task(echo=True)
    async def wide(self: Any) -> Any:
        for i in range(40):
            yield {"i": i, "pad": "x" * 100}

    try:
        await app.start()
        task = await app.add_task("wide")
        assert (await app.wait(task.uuid, 10)).status == "success"
        seen: list[int] = []
        with pytest.raises(StreamIncompleteError) as raised:
            async for value in app.stream(task.uuid, timeout=10):
                seen.append(value["i"])
        missing = raised.value.missing
        assert raised.value.uuid == task.uuid and seen == []
        assert missing.start == 0 and 0 < missing.stop < 40, missing  # retention kept the last few
        assert f"seq 0 to {missing.stop - 1} are not in the results topic" in str(raised.value)
    finally:
        await app.stop(timeout=2)


async def test_streams_that_fall_behind_while_the_reader_is_busy_get_every_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream that fell behind its buffer reads again from its first dropped record. The
    reader may be busy meanwhile (another stream's seek): what comes in that time must not
    land in the buffer before the records it missed (that looked like a hole in the log)."""
    original = ResultsReader.rewind

    async def busy(self: ResultsReader, tp: TopicPartition, offset: int) -> None:
        await asyncio.sleep(0.005)
        await original(self, tp, offset)

    monkeypatch.setattr(ResultsReader, "rewind", busy)
    settings = {**FAST, "stream_buffer": 4, "results_partitions": 1}  # the two tasks share the partition
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique('log')}", **settings)

    @app.task
    async def steady(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
            await asyncio.sleep(0.001)

    async def read(uuid: str, pause: float) -> list[int]:
        seen = []
        async for value in app.stream(uuid, timeout=30):
            seen.append(value)
            await asyncio.sleep(pause)
        return seen

    try:
        await app.start()
        tasks = [await app.add_task("steady", 300) for _ in range(2)]
        fast, slow = await asyncio.gather(read(tasks[0].uuid, 0), read(tasks[1].uuid, 0.003))
        assert fast == slow == list(range(300))
    finally:
        await app.stop(timeout=2)


async def test_a_stream_that_looks_its_start_up_keeps_no_live_value_ahead_of_the_earlier_ones(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that does not know where its results start (on Kafka: its producer's first write
    to the partition) makes a stream look the start up by time. Values that came live during
    that lookup come again after the earlier ones: no gap, no read again."""
    monkeypatch.setattr(MemoryProducer, "known_end", lambda self, topic, partition: None)
    original = MemoryConsumer.offsets_for_times

    async def slow(self: MemoryConsumer, timestamps: dict[TopicPartition, int]) -> dict[TopicPartition, int | None]:
        await asyncio.sleep(0.05)
        return await original(self, timestamps)

    monkeypatch.setattr(MemoryConsumer, "offsets_for_times", slow)
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique('log')}", process_grace=0.0, **FAST)

    @app.task
    async def steady(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
            await asyncio.sleep(0.002)

    try:
        await app.start()
        task = await app.add_task("steady", 100)
        await asyncio.sleep(0.1)
        with caplog.at_level(logging.WARNING, logger="qtasks.stream"):
            seen = [value async for value in app.stream(task.uuid, timeout=30)]
        assert seen == list(range(100))
        assert not [r for r in caplog.records if "reading again" in r.getMessage()]
    finally:
        await app.stop(timeout=2)


async def test_a_stream_follows_a_retry_whose_status_is_slow_to_come(monkeypatch: pytest.MonkeyPatch) -> None:
    """The end marker of a run that is retried says so: the stream goes on to the retry's
    values even when the retry's status takes longer than a lease to be written."""
    original = Core.submit

    async def slow_retry(self: Core, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("retry_parent_uuid"):
            await asyncio.sleep(FAST["lease_timeout"] + 1.0)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(Core, "submit", slow_retry)
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique('log')}", **FAST)
    runs: list[str] = []

    @app.task(retry=1)
    async def flaky() -> AsyncIterator[str]:
        runs.append("run")
        if len(runs) == 1:
            yield "a"
            yield "b"
            raise ValueError("first run fails")
        yield "c"

    try:
        await app.start()
        task = await app.add_task("flaky")
        assert [value async for value in app.stream(task.uuid, timeout=30)] == ["a", "b", "c"]
    finally:
        await app.stop(timeout=2)


async def test_a_stream_that_cannot_decode_a_value_says_so(make_app: Any, broker_url: str) -> None:
    """A client whose ``max_record_bytes`` is below the worker's cannot read a big value: the
    stream ends with an error naming that cause, not a guess about retention."""
    # (a small returning_max_bytes keeps the terminal status, which sums the values up, small)
    worker = QueueTasks(
        name=unique(), broker_url=broker_url, max_record_bytes=200_000, returning_max_bytes=1000, **FAST
    )
    client = QueueTasks(name=worker.name, broker_url=broker_url, max_record_bytes=100_000, **FAST)

    @worker.task
    async def big() -> AsyncIterator[str]:
        yield "a"
        yield "x" * 150_000
        yield "c"

    try:
        await worker.start()
        task = await worker.add_task("big")
        assert (await worker.wait(task.uuid, 10)).status == "success"
        seen = []
        with pytest.raises(StreamIncompleteError, match="cannot be read here") as raised:
            async for value in client.stream(task.uuid, timeout=30):
                seen.append(value)
        assert seen == ["a"] and raised.value.missing == range(1, 2) and raised.value.undecodable
    finally:
        await client.stop(timeout=2)
        await worker.stop(timeout=2)


async def test_a_value_not_stored_ends_its_task_as_error_and_its_stream_with_the_values_before_it(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    """The ending counts the values a reader finds: those before the first one not stored.
    A later value stored anyway (sent once the failed one was settled) does not count, and
    the stream ends with the values before the failed one, no error of its own."""
    app = faulty_app()

    @app.task
    async def paced() -> AsyncIterator[int]:
        for i in range(6):
            yield i
            await asyncio.sleep(0.05)  # each delivery settles before the next value

    await app.start()
    app.broker.faults.fail("delivery", nth=3, error=ConnectorError("refused"), topic=app.topics.results)  # type: ignore[attr-defined]
    task = await app.add_task("paced")
    values = [value async for value in app.stream(task.uuid, timeout=10)]
    done = await app.wait(task.uuid, 10)
    assert done.status == "error" and "a value of this task was not stored" in (done.traceback or "")
    assert (done.yield_count, done.lost_from, values) == (6, 2, [0, 1])


def _two_workers(url: str, register: Callable[[QueueTasks], None]) -> tuple[QueueTasks, QueueTasks]:
    name = unique()
    apps = QueueTasks(name=name, broker_url=url, **FAST), QueueTasks(name=name, broker_url=url, **FAST)
    for app in apps:
        register(app)
    return apps


async def test_a_value_refused_to_the_attempt_that_took_over_leaves_the_values_the_first_one_stored_readable() -> None:
    """Attempt 1 stored values 0..11 and died; attempt 2 ran from the start and its value 2 was
    refused (the task ends as error). Every value is in the log all the same (2 from attempt 1):
    a stream opened before and one opened after the ending read all 20."""

    def register(app: QueueTasks) -> None:
        @app.task
        async def paced(n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i
                await asyncio.sleep(0.05)

    a, b = _two_workers(f"faulty+memory://{unique('log')}", register)
    try:
        await a.start()
        task = await a.add_task("paced", 20)
        before = asyncio.create_task(_values(b, task.uuid))
        await asyncio.sleep(0.6)
        await crash(a)
        b.broker.faults.fail("delivery", nth=3, error=ConnectorError("refused"), topic=b.topics.results)  # type: ignore[attr-defined]
        await b.start()
        done = await b.wait(task.uuid, 30)
        assert (done.status, done.attempt, done.lost_from, done.yield_count) == ("error", 2, 2, 20)
        assert await before == list(range(20))
        assert await _values(b, task.uuid) == list(range(20))
    finally:
        await b.stop(timeout=2)
        await a.stop(timeout=2)


async def test_no_checkpoint_is_stored_past_a_value_that_was_refused() -> None:
    """A checkpoint says every value before it is stored. Value 3 was refused and later ones
    stored: no checkpoint past 3 is written, so the attempt that takes over after a crash
    sends value 3 again and the task's values are all there."""

    def register(app: QueueTasks) -> None:
        @app.task(echo=True)
        async def resumable(self: Any, n: int) -> AsyncIterator[int]:
            state = self.ctx.resume_state
            for i in range(state["next"] if state else 0, n):
                yield i
                self.ctx.checkpoint({"next": i + 1})
                await asyncio.sleep(0.05)

    a, b = _two_workers(f"faulty+memory://{unique('log')}", register)
    try:
        await a.start()
        a.broker.faults.fail("delivery", nth=4, error=ConnectorError("refused"), topic=a.topics.results)  # type: ignore[attr-defined]
        task = await a.add_task("resumable", 30)
        await asyncio.sleep(1.2)  # past two lease renewals, each with the last checkpoint
        await crash(a)
        await b.start()
        done = await b.wait(task.uuid, 30)
        assert (done.status, done.attempt) == ("success", 2)
        assert await _values(b, task.uuid) == list(range(30))
    finally:
        await b.stop(timeout=2)
        await a.stop(timeout=2)


async def _values(app: QueueTasks, uuid: str) -> list[Any]:
    return [value async for value in app.stream(uuid, timeout=30)]


def quick_task(app: QueueTasks) -> None:
    @app.task
    def quick(x: int) -> int:
        return x


async def test_a_delayed_task_read_with_a_bad_record_whose_dead_letter_is_refused_is_not_lost(
    faulty_app: Callable[..., QueueTasks],
) -> None:
    """Found by review: the refused dead letter failed the whole pass of the delays loop, which
    was restarted past the batch, so the good delayed task read with the bad record stayed
    `new` for ever. The bad record is now left to be read again, and the good one moves on."""
    app = faulty_app()
    quick_task(app)
    await app.start()
    handle = await app.add_task("quick", 1, countdown=2)  # level 0 (partition 0), held there for 1 s
    bad = str(uuid_mod.uuid4())  # no qtasks-due header: dead-lettered in the same pass
    at = [(AT, repr(time.time()).encode())]
    await app.broker.producer.send(app.topics.delays, b"{}", key=bad.encode(), partition=0, headers=at)
    app.broker.faults.fail("send", topic=app.topics.dlq, error=ConnectorError("refused", retriable=False))  # type: ignore[attr-defined]
    assert (await app.wait(handle.uuid, timeout=10)).status == "success"
    letters: list[ops.Letter] = []
    async with asyncio.timeout(10):
        while not letters:  # the bad record is read again a second later, and dead-lettered then
            letters = await ops.dead_letters(app)
            await asyncio.sleep(0.05)
    assert [letter.letter.key for letter in letters] == [bad.encode()]


async def test_a_dead_letter_the_delays_loop_cannot_send_is_logged_once_not_at_every_try(
    faulty_app: Callable[..., QueueTasks], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = faulty_app()
    await app.start()
    bad = str(uuid_mod.uuid4())  # no qtasks-due header
    at = [(AT, repr(time.time()).encode())]
    refused = ConnectorError("refused", retriable=False)
    app.broker.faults.fail("send", topic=app.topics.dlq, error=refused, times=4)  # type: ignore[attr-defined]
    await app.broker.producer.send(app.topics.delays, b"{}", key=bad.encode(), partition=0, headers=at)
    letters: list[ops.Letter] = []
    async with asyncio.timeout(15):
        while not letters:  # tried again every second: the fifth try gets through
            letters = await ops.dead_letters(app)
            await asyncio.sleep(0.05)
    said = [r for r in caplog.records if r.getMessage().startswith("delays:") and "dead-letter topic" in r.getMessage()]
    assert [r.levelname for r in said] == ["ERROR", "INFO"], [r.getMessage() for r in said]
    assert "reached the dead-letter topic after" in said[1].getMessage()


async def test_a_pass_of_the_delays_loop_that_fails_leaves_its_records_to_be_read_again(
    faulty_app: Callable[..., QueueTasks], caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever fails in a pass (here: setting level 0 back to a record not due yet) restarts the
    loop on a consumer whose position is past the batch: the due task read before it in the same
    pass, not moved on yet, must be read again, not skipped."""
    log = unique("log")
    client = faulty_app(log=log)
    due = await client.add_task("quick", 1, countdown=1.5)  # level 0
    await asyncio.sleep(1.1)  # due at its level by now
    later = await client.add_task("quick", 2, countdown=2)  # level 0 too, behind it: held
    worker = faulty_app(log=log, name=client.name)
    quick_task(worker)
    worker.broker.faults.fail("seek", topic=worker.topics.delays)  # type: ignore[attr-defined]
    await worker.start()  # its first pass reads both
    assert (await worker.wait(due.uuid, timeout=10)).status == "success"
    assert (await worker.wait(later.uuid, timeout=10)).status == "success"
    assert any("loop delays failed" in r.getMessage() for r in caplog.records)  # the pass did fail
