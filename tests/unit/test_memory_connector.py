"""The memory connector is a real log: partitions, offsets, groups, compaction."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from qtasks.connectors import TopicPartition, TopicSpec
from qtasks.connectors.memory import MemoryConnector
from qtasks.exc import CommitFailedError, TopicConfigError
from tests.helpers import unique


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, set[TopicPartition]]] = []

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.events.append(("revoked", revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.events.append(("assigned", assigned))


@pytest.fixture
async def conn() -> MemoryConnector:
    c = MemoryConnector(f"memory://{unique()}")
    await c.ensure_topics([TopicSpec("t", 4), TopicSpec("s", 1, compacted=True, config={"delete.retention.ms": "0"})])
    return c


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
    await b.getmany(0)
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
