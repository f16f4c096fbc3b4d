"""The memory connector is a real log: partitions, offsets, groups, compaction."""

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

from qtasks.connectors import TopicPartition, TopicSpec
from qtasks.connectors.file_log import close_file_log
from qtasks.connectors.memory import DEFAULT_RETENTION, RECORD_OVERHEAD, MemoryConnector, url_options
from qtasks.exc import CommitFailedError, ConfigError, TopicConfigError
from tests.helpers import unique


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, set[TopicPartition]]] = []

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.events.append(("revoked", revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.events.append(("assigned", assigned))


@pytest.fixture(params=["memory", "file"])
async def conn(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MemoryConnector]:
    """The connector suite runs on memory:// and on file:// (the same log, kept on disk)."""
    url = f"memory://{unique()}" if request.param == "memory" else f"file://{tmp_path}/log"
    c = MemoryConnector(url)
    await c.ensure_topics([TopicSpec("t", 4), TopicSpec("s", 1, compacted=True, config={"delete.retention.ms": "0"})])
    yield c
    if request.param == "file":
        close_file_log(url)


async def test_offsets_grow_per_partition_and_order_is_kept(conn: MemoryConnector) -> None:
    for i in range(3):
        await conn.producer.send("t", f"a{i}".encode(), key=b"k", partition=1)
    await conn.producer.send("t", b"b0", key=b"k", partition=2)
    consumer = conn.consumer()
    consumer.assign([TopicPartition("t", 1), TopicPartition("t", 2)])
    records = await consumer.getmany(0.1)
    by_partition = {(r.partition, r.offset): r.value for r in records}
    assert by_partition == {(1, 0): b"a0", (1, 1): b"a1", (1, 2): b"a2", (2, 0): b"b0"}


async def test_seek_end_offsets_and_offsets_for_times(conn: MemoryConnector) -> None:
    tp = TopicPartition("t", 0)
    await conn.producer.send("t", b"old", key=None, partition=0)
    await asyncio.sleep(0.01)
    middle = int(time.time() * 1000)
    await conn.producer.send("t", b"new", key=None, partition=0)
    consumer = conn.consumer()
    consumer.assign([tp])
    assert await consumer.end_offsets([tp]) == {tp: 2}
    assert await consumer.offsets_for_times({tp: middle}) == {tp: 1}
    assert await consumer.offsets_for_times({tp: middle + 60_000}) == {tp: None}
    await consumer.seek(tp, 1)
    assert [r.value for r in await consumer.getmany(0.1)] == [b"new"]
    await consumer.seek_to_end([tp])
    assert await consumer.getmany(0.05) == []


async def test_getmany_wakes_as_soon_as_a_record_arrives(conn: MemoryConnector) -> None:
    consumer = conn.consumer()
    consumer.assign([TopicPartition("t", 3)])
    await consumer.start()

    async def later() -> None:
        await asyncio.sleep(0.05)
        await conn.producer.send("t", b"x", key=None, partition=3)

    started = time.monotonic()
    writer = asyncio.create_task(later())
    records = await consumer.getmany(5.0)
    await writer
    assert [r.value for r in records] == [b"x"]
    assert time.monotonic() - started < 1.0


async def test_group_members_split_partitions_and_rebalance_on_join_and_leave(conn: MemoryConnector) -> None:
    a, b = conn.consumer("g", client_id="a"), conn.consumer("g", client_id="b")
    ra, rb = Recorder(), Recorder()
    a.subscribe(["t"], ra)
    b.subscribe(["t"], rb)
    await a.start()
    await a.getmany(0)
    assert a.assignment() == {TopicPartition("t", p) for p in range(4)}
    await b.start()
    await a.getmany(0)
    # Eager protocol: a gave its partitions up, and takes new ones only once b has too.
    assert a.assignment() == set() and ra.events[-1][0] == "revoked"
    await b.getmany(0)
    await a.getmany(0)
    assert a.assignment() | b.assignment() == {TopicPartition("t", p) for p in range(4)}
    assert len(a.assignment()) == len(b.assignment()) == 2
    assert ra.events[1][0] == "revoked"
    await b.stop()
    await a.getmany(0)
    assert len(a.assignment()) == 4


async def test_committed_offsets_survive_a_member_and_commits_follow_kafkas_rules(conn: MemoryConnector) -> None:
    for i in range(5):
        await conn.producer.send("t", str(i).encode(), key=None, partition=0)
    a = conn.consumer("g2", client_id="a")
    a.subscribe(["t"], Recorder())
    await a.start()
    records = await a.getmany(0.1)
    assert len(records) == 5
    await a.commit({TopicPartition("t", 0): 3})
    b = conn.consumer("g2", client_id="b")
    b.subscribe(["t"], Recorder())
    await b.start()
    # Until it joins the new generation (its revoke callback), a may commit what it held.
    await a.commit({TopicPartition("t", 1): 0})
    await a.getmany(0)
    moved = {TopicPartition("t", p) for p in range(4)} - a.assignment()
    assert moved
    with pytest.raises(CommitFailedError):
        await a.commit({next(iter(moved)): 1})
    await a.stop()
    with pytest.raises(CommitFailedError):
        await a.commit({TopicPartition("t", 0): 5})
    records = await b.getmany(0.1)
    assert [r.value for r in records if r.partition == 0] == [b"3", b"4"]


async def test_paused_partitions_return_nothing_until_resumed(conn: MemoryConnector) -> None:
    await conn.producer.send("t", b"x", key=None, partition=0)
    a = conn.consumer("g3")
    a.subscribe(["t"], Recorder())
    await a.start()
    assert [r.value for r in await a.getmany(0)] == [b"x"]
    a.pause(a.assignment())
    await conn.producer.send("t", b"y", key=None, partition=0)
    assert await a.getmany(0.05) == []
    a.resume(a.assignment())
    assert [r.value for r in await a.getmany(0.05)] == [b"y"]


async def test_compaction_keeps_the_last_record_per_key_and_drops_tombstones(conn: MemoryConnector) -> None:
    for value in (b"1", b"2", b"3"):
        await conn.producer.send("s", value, key=b"a", partition=0)
    await conn.producer.send("s", b"x", key=b"b", partition=0)
    await conn.producer.send("s", None, key=b"b", partition=0)
    conn.log.compact("s")
    consumer = conn.consumer()
    consumer.assign([TopicPartition("s", 0)])
    records = await consumer.getmany(0.05)
    assert [(r.key, r.value, r.offset) for r in records] == [(b"a", b"3", 2)]
    assert await consumer.end_offsets([TopicPartition("s", 0)]) == {TopicPartition("s", 0): 5}


async def test_a_topic_with_the_wrong_cleanup_policy_is_an_error(conn: MemoryConnector) -> None:
    with pytest.raises(TopicConfigError, match=r"cleanup\.policy"):
        await conn.ensure_topics([TopicSpec("t", 4, compacted=True)])


async def test_a_reader_moves_past_offsets_compaction_removed(conn: MemoryConnector) -> None:
    await conn.producer.send("s", b"v", key=b"k", partition=0)
    await conn.producer.send("s", None, key=b"k", partition=0)
    conn.log.compact("s")  # delete.retention.ms is 0 here: both records go, the end stays at 2
    consumer = conn.consumer()
    tp = TopicPartition("s", 0)
    consumer.assign([tp])
    await consumer.start()
    assert await consumer.getmany(0.05) == []
    assert await consumer.position(tp) == 2
    started = time.monotonic()
    assert await consumer.getmany(0.2) == []  # waits for new records instead of spinning
    assert time.monotonic() - started >= 0.15


# -- cancellation: a cancel that meets a record must still end the reader ------------


async def _blocked_reader(conn: MemoryConnector, tp: TopicPartition) -> asyncio.Task[None]:
    """A ``while True: getmany`` loop, as the engine's readers are, parked in ``getmany``."""
    consumer = conn.consumer()
    consumer.assign([tp])
    await consumer.start()

    async def loop() -> None:
        while True:
            await consumer.getmany(5.0)

    task = asyncio.create_task(loop())
    for _ in range(3):  # let it reach its wait
        await asyncio.sleep(0)
    return task


async def _ends_cancelled(task: asyncio.Task[None]) -> bool:
    await asyncio.wait({task}, timeout=2.0)
    if not task.done():
        task.cancel()  # do not leak the reader into other tests
        await asyncio.wait({task}, timeout=2.0)
        return False
    return task.cancelled()


async def test_a_reader_cancelled_as_a_record_arrives_on_its_loop_is_cancelled(conn: MemoryConnector) -> None:
    tp = TopicPartition("t", 0)
    for _ in range(50):
        reader = await _blocked_reader(conn, tp)
        await conn.producer.send("t", b"x", key=None, partition=0)  # resolves the reader's wait at once
        reader.cancel()  # in the same loop iteration
        assert await _ends_cancelled(reader)


async def test_a_reader_cancelled_as_another_thread_appends_is_cancelled(conn: MemoryConnector) -> None:
    tp = TopicPartition("t", 1)
    loop = asyncio.get_running_loop()
    for _ in range(50):
        reader = await _blocked_reader(conn, tp)

        def from_thread(reader: asyncio.Task[None] = reader) -> None:
            conn.log.append("t", 1, None, b"x")  # wakes the reader through call_soon_threadsafe
            loop.call_soon_threadsafe(reader.cancel)

        thread = threading.Thread(target=from_thread)
        thread.start()
        ended = await _ends_cancelled(reader)
        thread.join()
        assert ended


def test_asyncio_run_returns_when_main_leaves_a_reader_running_after_a_write() -> None:
    # asyncio.run cancels the tasks main leaves behind and waits for them: the write
    # wakes the reader in the same iteration as that cancel (``asyncio.run(app.add_task(...))``).
    script = textwrap.dedent(
        """
        import asyncio
        from qtasks.connectors import TopicPartition, TopicSpec
        from qtasks.connectors.memory import MemoryConnector

        async def main() -> None:
            conn = MemoryConnector("memory://run")
            await conn.ensure_topics([TopicSpec("t", 1)])
            consumer = conn.consumer()
            consumer.assign([TopicPartition("t", 0)])
            await consumer.start()

            async def reader() -> None:
                while True:
                    await consumer.getmany(1.0)

            asyncio.create_task(reader())
            await asyncio.sleep(0.01)
            await conn.producer.send("t", b"x", key=None, partition=0)

        asyncio.run(main())
        print("returned")
        """
    )
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("asyncio.run did not return: the reader swallowed its cancellation")
    assert done.stdout.strip() == "returned", done.stderr


async def test_waits_that_time_out_do_not_pile_up_on_an_idle_partition(conn: MemoryConnector) -> None:
    consumer = conn.consumer()
    consumer.assign([TopicPartition("t", 2)])
    await consumer.start()
    for _ in range(20):
        assert await consumer.getmany(0.001) == []
    assert conn.log.topics["t"].partitions[2].waiters == []


# -- retention: non-compacted topics stay bounded, as with cleanup.policy=delete ------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _held(conn: MemoryConnector, topic: str, partition: int) -> list[int]:
    return list(conn.log.topics[topic].partitions[partition].offsets)


async def test_a_partition_stays_under_retention_bytes_over_many_appends() -> None:
    conn = MemoryConnector(f"memory://{unique()}?retention_bytes=20000")
    await conn.ensure_topics([TopicSpec("t", 1)])
    p = conn.log.topics["t"].partitions[0]
    record_size = 3 + 100 + RECORD_OVERHEAD
    for _ in range(5000):
        await conn.producer.send("t", b"v" * 100, key=b"key", partition=0)
        assert p.size <= 20000
    assert p.size == len(p.records) * record_size  # the running count matches what is held
    assert len(p.records) * record_size > 20000 * 3 // 4 - record_size  # cut to 3/4 of the limit, no lower
    offsets = _held(conn, "t", 0)
    assert offsets == list(range(offsets[0], 5000))
    tp = TopicPartition("t", 0)
    consumer = conn.consumer()
    assert await consumer.end_offsets([tp]) == {tp: 5000}
    assert conn.log.first_offset(tp) == offsets[0] > 0


async def test_records_older_than_retention_ms_are_dropped() -> None:
    conn = MemoryConnector(f"memory://{unique()}")
    clock = conn.log.clock = FakeClock()
    await conn.ensure_topics([TopicSpec("t", 1, config={"retention.ms": "1000"})])
    tp = TopicPartition("t", 0)
    for _ in range(5):
        await conn.producer.send("t", b"old", key=None, partition=0)
        clock.now += 0.1
    clock.now += 2.0
    await conn.producer.send("t", b"new", key=None, partition=0)
    assert _held(conn, "t", 0) == [5]
    assert conn.log.first_offset(tp) == 5
    assert conn.log.offset_for_time(tp, 0) == 5
    consumer = conn.consumer()
    consumer.assign([tp])
    assert [(r.offset, r.value) for r in await consumer.getmany(0)] == [(5, b"new")]


async def test_time_retention_is_checked_in_batches_not_per_append() -> None:
    conn = MemoryConnector(f"memory://{unique()}")
    clock = conn.log.clock = FakeClock()
    await conn.ensure_topics([TopicSpec("t", 1, config={"retention.ms": "1000"})])
    for _ in range(30):  # one record every 50 ms: at most a tenth of retention.ms past it
        await conn.producer.send("t", b"v", key=None, partition=0)
        clock.now += 0.05
        ages = [clock.now * 1000 - r[3] for r in conn.log.topics["t"].partitions[0].records]
        assert max(ages) <= 1000 + 100 + 50
    assert _held(conn, "t", 0)[0] > 0


async def test_retain_applies_time_retention_to_an_idle_partition() -> None:
    conn = MemoryConnector(f"memory://{unique()}?retention_ms=1000")
    clock = conn.log.clock = FakeClock()
    await conn.ensure_topics([TopicSpec("t", 1)])
    await conn.producer.send("t", b"a", key=None, partition=0)
    await conn.producer.send("t", b"b", key=None, partition=0)
    clock.now += 5
    conn.log.retain("t")
    assert _held(conn, "t", 0) == [1]  # the newest record is always kept


async def test_a_lagging_reader_continues_from_the_first_kept_offset() -> None:
    conn = MemoryConnector(f"memory://{unique()}?retention_bytes=5000")
    await conn.ensure_topics([TopicSpec("t", 1)])
    tp = TopicPartition("t", 0)
    consumer = conn.consumer()
    consumer.assign([tp])
    seen: list[int] = []
    for i in range(200):
        await conn.producer.send("t", str(i).encode(), key=None, partition=0)
        if i in (3, 150):
            seen += [r.offset for r in await consumer.getmany(0)]
    seen += [r.offset for r in await consumer.getmany(0)]
    first = conn.log.first_offset(tp)
    assert seen[:4] == [0, 1, 2, 3]
    assert seen == sorted(set(seen))  # offsets only grow
    assert seen[4] > 4  # the reader skipped what retention deleted...
    assert seen[-1] == 199 and first <= 199
    assert await consumer.position(tp) == 200  # ...and is at the end


async def test_a_group_whose_committed_offset_was_deleted_reads_from_the_first_kept_offset() -> None:
    conn = MemoryConnector(f"memory://{unique()}?retention_bytes=5000")
    await conn.ensure_topics([TopicSpec("t", 1)])
    tp = TopicPartition("t", 0)
    a = conn.consumer("g")
    a.subscribe(["t"], Recorder())
    await a.start()
    await a.getmany(0)
    await a.commit({tp: 0})
    await a.stop()
    for i in range(100):
        await conn.producer.send("t", str(i).encode(), key=None, partition=0)
    b = conn.consumer("g")
    b.subscribe(["t"], Recorder())
    await b.start()
    records = await b.getmany(0)
    assert records[0].offset == conn.log.first_offset(tp) > 0
    assert records[-1].offset == 99


async def test_compacted_topics_keep_compaction_and_ignore_retention() -> None:
    conn = MemoryConnector(f"memory://{unique()}?retention_bytes=1000&retention_ms=1")
    clock = conn.log.clock = FakeClock()
    await conn.ensure_topics([TopicSpec("s", 1, compacted=True)])
    for i in range(20):
        await conn.producer.send("s", b"v" * 100, key=str(i).encode(), partition=0)
        clock.now += 1
    assert _held(conn, "s", 0) == list(range(20))


def test_the_url_query_sets_retention_and_is_not_part_of_the_log_name() -> None:
    name = unique()
    conn = MemoryConnector(f"memory://{name}?retention_ms=600000&retention_bytes=1000000")
    assert conn.log is MemoryConnector(f"memory://{name}").log
    assert url_options(conn.url) == {"retention.ms": "600000", "retention.bytes": "1000000"}
    assert url_options("memory://x?retention_ms=-1") == {"retention.ms": "-1"}
    assert url_options("memory://x") == {}


async def test_topics_get_the_default_retention_unless_config_or_url_set_it() -> None:
    conn = MemoryConnector(f"memory://{unique()}?retention_ms=5000")
    await conn.ensure_topics([TopicSpec("a", 1), TopicSpec("b", 1, config={"retention.bytes": "-1"})])
    a, b = conn.log.topics["a"], conn.log.topics["b"]
    assert a.retention_bytes == int(DEFAULT_RETENTION["retention.bytes"]) == 16 * 2**20
    assert a.retention_ms == b.retention_ms == 5000
    assert b.retention_bytes > 2**60  # -1: no limit


@pytest.mark.parametrize(
    "url",
    ["memory://x?retention_ms=abc", "memory://x?retention_bytes=0", "memory://x?retention_ms=-5", "memory://x?size=1"],
)
def test_bad_url_options_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match=r"retention"):
        MemoryConnector(url)


async def test_an_append_does_not_fail_when_a_waiting_readers_loop_closes_under_it(conn: MemoryConnector) -> None:
    class ClosingLoop:
        """A loop that closes between ``is_closed()`` and ``call_soon_threadsafe``."""

        def is_closed(self) -> bool:
            return False

        def call_soon_threadsafe(self, *args: object) -> None:
            raise RuntimeError("Event loop is closed")

    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    conn.log.topics["t"].partitions[0].waiters.append((ClosingLoop(), fut))  # type: ignore[arg-type]
    assert conn.log.append("t", 0, None, b"x") == 0
