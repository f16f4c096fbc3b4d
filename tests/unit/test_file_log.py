"""file://: the memory log kept on disk. What survives a restart, a torn write and a kill -9."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.connectors import TopicPartition, TopicSpec
from qtasks.connectors.file_log import JOURNAL, FileLog, close_file_log, get_file_log
from qtasks.connectors.memory import MemoryConnector
from qtasks.exc import ConfigError, ConnectorError

ROOT = Path(__file__).resolve().parents[2]


def state(log: FileLog) -> dict[str, object]:
    """What a reader of the log sees: every partition's records and offsets, and the groups' commits."""
    topics = {
        name: [[tuple(r) for r in p.records] + [("next", p.next_offset)] for p in t.partitions]
        for name, t in log.topics.items()
    }
    groups = {g: dict(group.committed) for g, group in log.groups.items()}
    return {"topics": topics, "groups": groups}


def test_topics_records_commits_and_transactions_survive_a_restart(tmp_path: Path) -> None:
    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("t", 2))
    log.create_topic(TopicSpec("s", 1, compacted=True, config={"delete.retention.ms": "0"}))
    for i in range(5):
        log.append("t", i % 2, f"k{i}".encode(), f"v{i}".encode(), [("traceparent", b"00-ab")] if i == 3 else None)
    for i in range(4):
        log.append("s", 0, b"same", f"rev{i}".encode())
    log.append("s", 0, b"gone", b"x")
    log.append("s", 0, b"gone", None)  # a tombstone
    log.compact("s")
    epoch = log.init_txn("tx", 60_000)
    log.txn_append("tx", epoch, "t", 0, b"in", b"committed")
    log.txn_offsets("tx", epoch, "g", {TopicPartition("t", 1): 2})
    log.txn_end("tx", epoch, commit=True)
    open_epoch = log.init_txn("tx2", 60_000)
    log.txn_append("tx2", open_epoch, "t", 1, b"in", b"never committed")  # open when the process ends
    before = state(log)
    log.close()

    again = FileLog(tmp_path)
    after = state(again)
    # the open transaction was aborted: its record is gone, its marker takes an offset
    t1_before = [r for r in before["topics"]["t"][1] if r[0] != "next" and r[2] != b"never committed"]  # type: ignore[index]
    assert [r for r in after["topics"]["t"][1] if r[0] != "next"] == t1_before  # type: ignore[index]
    assert after["topics"]["t"][0] == before["topics"]["t"][0]  # type: ignore[index]
    assert after["topics"]["s"] == before["topics"]["s"]  # type: ignore[index]
    assert after["groups"] == {"g": {TopicPartition("t", 1): 2}}
    assert again.txns["tx2"].epoch > open_epoch  # the producer that was gone is fenced
    assert [r[4] for r in again.topics["t"].partitions[1].records if len(r) > 4] == [(("traceparent", b"00-ab"),)]
    again.close()


def test_a_torn_last_entry_is_dropped_and_cut_off(tmp_path: Path) -> None:
    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("t", 1))
    for i in range(3):
        log.append("t", 0, b"k", f"v{i}".encode())
    log.close()
    journal = tmp_path / JOURNAL
    whole = journal.stat().st_size
    with open(journal, "ab") as f:
        f.write(b"\x00\x00\x00\x40\x12\x34\x56\x78partial")  # a frame cut short by a kill
    again = FileLog(tmp_path)
    assert [r[2] for r in again.topics["t"].partitions[0].records] == [b"v0", b"v1", b"v2"]
    assert journal.stat().st_size == whole
    assert again.append("t", 0, b"k", b"v3") == 3  # and it goes on from there
    again.close()


def test_the_journal_is_rewritten_once_it_holds_much_more_than_the_log(tmp_path: Path) -> None:
    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("s", 1, compacted=True))
    for i in range(30_000):
        log.append("s", 0, f"key{i % 10}".encode(), f"value{i}".encode())
    assert log.entries < 12_000  # rewritten at least once: about 10 keys left, not 30,000 records
    expected = {r[1]: r[2] for r in log.topics["s"].partitions[0].records}
    assert expected[b"key9"] == b"value29999"
    log.close()
    again = FileLog(tmp_path)
    assert {r[1]: r[2] for r in again.topics["s"].partitions[0].records} == expected
    assert again.append("s", 0, b"key0", b"next") == 30_000  # offsets go on where they were
    again.close()


def test_a_second_process_cannot_open_the_same_log(tmp_path: Path) -> None:
    log = get_file_log(f"file://{tmp_path}")
    script = (
        f"from qtasks.connectors.file_log import FileLog; from pathlib import Path; FileLog(Path({str(tmp_path)!r}))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode != 0 and "is in use by another process" in done.stderr
    assert get_file_log(f"file://{tmp_path}") is log  # one log per directory in a process
    close_file_log(f"file://{tmp_path}")


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("file://", "needs a directory"),
        ("file:///tmp/x?fsync=sometimes", "fsync must be"),
        ("file:///tmp/x?color=blue", "unknown file:// option 'color'"),
    ],
)
def test_bad_file_urls_are_config_errors(url: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        MemoryConnector(url)


def test_fsync_always_and_retention_options_are_taken(tmp_path: Path) -> None:
    url = f"file://{tmp_path}?fsync=always&retention_ms=600000"
    conn = MemoryConnector(url)
    assert isinstance(conn.log, FileLog) and conn.log.fsync == "always"
    conn.log.create_topic(TopicSpec("t", 1), {"retention.ms": "600000"})
    conn.log.append("t", 0, None, b"x")
    close_file_log(url)


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from qtasks.asyncio import QueueTasks

    app = QueueTasks(name="k9", broker_url=sys.argv[1], concurrency=8, lease_interval=0.5, lease_timeout=3.0)

    @app.task
    async def gen(n: int):
        for i in range(n):
            await asyncio.sleep(0.01)
            yield i

    async def main() -> None:
        await app.start()
        while True:
            handle = await app.add_task("gen", 20)
            print(handle.uuid, flush=True)  # acknowledged: add_task returned
            await asyncio.sleep(0.005)

    asyncio.run(main())
    """
)


async def test_a_kill_9_mid_run_loses_no_acknowledged_task(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/log"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, url, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    acknowledged: list[str] = []
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 60
        while len(acknowledged) < 150 and time.monotonic() < deadline:
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            if line:
                acknowledged.append(line.decode().strip())
    finally:
        os.kill(child.pid, signal.SIGKILL)  # mid-run: tasks running, values and statuses being written
        await child.wait()
    assert len(acknowledged) >= 150

    # The runs the kill cut short are taken over once their leases (3 s) run out.
    app = QueueTasks(name="k9", broker_url=url, concurrency=16, lease_interval=0.5, lease_timeout=3.0)

    @app.task
    async def gen(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    try:
        await app.start()
        attempts = []
        for uuid in acknowledged:
            done = await app.wait(uuid, timeout=60)
            assert done.status == "success" and done.yield_count == 20, done
            assert [v async for v in app.stream(uuid, timeout=20)] == list(range(20))
            attempts.append(done.attempt)
        taken_over = sum(a > 1 for a in attempts)
        print(
            f"kill -9 of a file:// process: {len(acknowledged)} acknowledged tasks, none lost; {taken_over} taken over"
        )
    finally:
        await app.stop()
        close_file_log(url)


# -- found by review -------------------------------------------------------------------------


def test_an_exactly_once_journal_opens_after_its_transactions_timeout_has_passed(tmp_path: Path) -> None:
    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("t", 1))
    epoch = log.init_txn("tx", 200)  # a 0.2 s transaction timeout
    log.txn_append("tx", epoch, "t", 0, b"k", b"v")
    log.txn_offsets("tx", epoch, "g", {TopicPartition("t", 0): 1})
    log.txn_end("tx", epoch, commit=True)
    log.close()
    time.sleep(0.3)  # the replay must not judge the transaction by today's clock
    again = FileLog(tmp_path)
    assert [r[2] for r in again.topics["t"].partitions[0].records] == [b"v"]
    assert again.groups["g"].committed == {TopicPartition("t", 0): 1}
    again.close()


def test_a_transaction_that_timed_out_stays_aborted_after_a_restart(tmp_path: Path) -> None:
    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("t", 1))
    epoch = log.init_txn("tx", 100)
    log.txn_append("tx", epoch, "t", 0, b"k", b"expired")
    time.sleep(0.2)
    log.append("t", 0, b"k", b"after")  # a read or write past the timeout aborts it
    log.end_offset(TopicPartition("t", 0), committed=True)
    assert [r[2] for r in log.topics["t"].partitions[0].records] == [b"after"]
    before = [tuple(r) for r in log.topics["t"].partitions[0].records], log.txns["tx"].epoch
    log.close()
    again = FileLog(tmp_path)
    assert ([tuple(r) for r in again.topics["t"].partitions[0].records], again.txns["tx"].epoch) == before
    again.close()


def test_a_write_the_disk_refuses_is_not_acknowledged_and_leaves_no_half_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qtasks.connectors import file_log

    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("t", 1))
    log.append("t", 0, b"k", b"v0")
    size = (tmp_path / JOURNAL).stat().st_size
    real_write = os.write

    def full_disk(fd: int, data: object) -> int:
        real_write(fd, bytes(data)[:5])  # a short write, then the disk is full  # type: ignore[call-overload]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_log.os, "write", full_disk)
    with pytest.raises(ConnectorError, match="No space left") as refused:
        log.append("t", 0, b"k", b"v1")
    assert refused.value.retriable
    assert (tmp_path / JOURNAL).stat().st_size == size  # cut back
    assert [r[2] for r in log.topics["t"].partitions[0].records] == [b"v0"]  # not stored either
    monkeypatch.setattr(file_log.os, "write", real_write)
    assert log.append("t", 0, b"k", b"v1") == 1  # the retry
    log.close()
    again = FileLog(tmp_path)
    assert [r[2] for r in again.topics["t"].partitions[0].records] == [b"v0", b"v1"]
    again.close()


@pytest.mark.parametrize("change", ["create_topic", "init_txn", "txn_offsets", "txn_end", "commit"])
def test_every_change_the_disk_refuses_is_not_made_and_a_retry_makes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    from qtasks.connectors import file_log

    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("t", 1))
    tp = TopicPartition("t", 0)
    epoch = log.init_txn("tx", 60_000)
    log.txn_append("tx", epoch, "t", 0, b"k", b"in the transaction")

    class Member:
        client_id, topics = "m", {"t"}

        def wake(self) -> None:
            pass

    member = log.join("g", Member()) if change == "commit" else ""
    calls = {
        "create_topic": lambda: log.create_topic(TopicSpec("u", 2)),
        "init_txn": lambda: log.init_txn("tx", 60_000),
        "txn_offsets": lambda: log.txn_offsets("tx", epoch, "g", {tp: 1}),
        "txn_end": lambda: log.txn_end("tx", epoch, commit=True),
        "commit": lambda: log.commit("g", member, -1, {tp: 1}, {tp}),  # as a member that held tp
    }
    before = state(log), log.txns["tx"].epoch, dict(log.txns["tx"].offsets)
    real_write = os.write

    def full_disk(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_log.os, "write", full_disk)
    with pytest.raises(ConnectorError, match="No space left"):
        calls[change]()
    assert (state(log), log.txns["tx"].epoch, dict(log.txns["tx"].offsets)) == before  # nothing changed
    monkeypatch.setattr(file_log.os, "write", real_write)
    calls[change]()  # the retry
    after = state(log)
    log.close()
    again = FileLog(tmp_path)
    if change == "txn_end":  # committed before the restart: kept
        assert state(again) == after
    elif change == "create_topic":
        assert "u" in again.topics
    elif change == "commit":
        assert again.groups["g"].committed == {tp: 1}
    again.close()


def test_a_transaction_past_its_timeout_cannot_end_committed_in_the_journal(tmp_path: Path) -> None:
    from qtasks.exc import ProducerFencedError

    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("t", 1))
    epoch = log.init_txn("tx", 100)
    log.txn_append("tx", epoch, "t", 0, b"k", b"too late")
    time.sleep(0.2)
    log._expiry_check = time.time() * 1000 + 60_000  # the expiry check is not due by its throttle
    with pytest.raises(ProducerFencedError):
        log.txn_end("tx", epoch, commit=True)
    assert [r[2] for r in log.topics["t"].partitions[0].records] == []
    log.close()
    again = FileLog(tmp_path)
    assert [r[2] for r in again.topics["t"].partitions[0].records] == []
    again.close()


def test_the_journal_is_rewritten_with_transactions_open_and_replays_them(tmp_path: Path) -> None:
    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("s", 2, compacted=True))
    epochs = {p: log.init_txn(f"tx{p}", 600_000) for p in (0, 1)}
    for i in range(30_000):  # two transactions always open, as exactly-once workers keep them
        p = i % 2
        log.txn_append(f"tx{p}", epochs[p], "s", p, f"key{i % 10}".encode(), f"value{i}".encode())
        if i % 200 >= 198:  # each commits every 100 of its records
            log.txn_offsets(f"tx{p}", epochs[p], "g", {TopicPartition("s", p): i})
            log.txn_end(f"tx{p}", epochs[p], commit=True)
    log.txn_append("tx0", epochs[0], "s", 0, b"key0", b"open at the end")
    log.txn_offsets("tx0", epochs[0], "g", {TopicPartition("s", 0): 99_999})
    assert log.entries < 20_000  # rewritten, although a transaction was open every time
    committed = [
        [(r[1], r[2]) for r in part.records if r[2] != b"open at the end"] for part in log.topics["s"].partitions
    ]
    log.txn_end("tx0", epochs[0], commit=True)
    log.close()
    again = FileLog(tmp_path)
    kept = [[(r[1], r[2]) for r in part.records] for part in again.topics["s"].partitions]
    assert kept[1] == committed[1]
    assert kept[0][-1] == (b"key0", b"open at the end")  # its commit came after the rewrite
    assert again.groups["g"].committed[TopicPartition("s", 0)] == 99_999
    again.close()


def test_a_journal_damaged_in_the_middle_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("t", 1))
    for i in range(100):
        log.append("t", 0, b"k", f"value-{i}".encode())
    log.close()
    journal = tmp_path / JOURNAL
    data = bytearray(journal.read_bytes())
    data[len(data) // 2] ^= 0x01
    journal.write_bytes(bytes(data))
    with pytest.raises(ConnectorError, match="is damaged at byte"):
        FileLog(tmp_path)
    assert journal.read_bytes() == bytes(data)  # nothing cut off


def _frames(journal: Path) -> list[int]:
    """The byte where each entry of a journal begins."""
    data, at, starts = journal.read_bytes(), 0, []
    while at < len(data):
        starts.append(at)
        at += 8 + int.from_bytes(data[at : at + 4], "big")
    return starts


@pytest.mark.parametrize("bit", [31, 24, 12])
def test_a_length_damaged_in_the_middle_is_refused_not_taken_for_a_torn_tail(tmp_path: Path, bit: int) -> None:
    log = FileLog(tmp_path, fsync="always")
    log.create_topic(TopicSpec("t", 1))
    for i in range(100):
        log.append("t", 0, b"k", f"value-{i}".encode())
    log.close()
    journal = tmp_path / JOURNAL
    data = bytearray(journal.read_bytes())
    at = _frames(journal)[10]
    size = int.from_bytes(data[at : at + 4], "big") ^ (1 << bit)  # one bit flipped: past the end of the file
    data[at : at + 4] = size.to_bytes(4, "big")
    journal.write_bytes(bytes(data))
    with pytest.raises(ConnectorError, match=f"is damaged at byte {at} "):
        FileLog(tmp_path)
    assert journal.read_bytes() == bytes(data)  # nothing cut off


@pytest.mark.parametrize(
    "tail", [bytes(8), bytes(4096), b"\x00\x00\x00\x05\x00\x00\x00\x00abc", random.Random(7).randbytes(3000)]
)
def test_a_tail_a_power_loss_left_unwritten_is_cut_off(tmp_path: Path, tail: bytes) -> None:
    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("t", 1))
    for i in range(3):
        log.append("t", 0, b"k", f"v{i}".encode())
    log.close()
    journal = tmp_path / JOURNAL
    whole = journal.stat().st_size
    with open(journal, "ab") as f:
        f.write(tail)  # zeros, or junk, where the file's end was never written
    again = FileLog(tmp_path)
    assert [r[2] for r in again.topics["t"].partitions[0].records] == [b"v0", b"v1", b"v2"]
    assert journal.stat().st_size == whole
    again.close()


def test_a_whole_entry_that_cannot_be_replayed_is_refused_with_where_it_is(tmp_path: Path) -> None:
    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("t", 1))
    log.append("t", 0, b"k", b"v0")
    log.close()
    journal = tmp_path / JOURNAL
    whole = journal.read_bytes()
    payload = b"\xc1"  # a CRC-32 that matches, but not msgpack
    journal.write_bytes(whole + len(payload).to_bytes(4, "big") + zlib.crc32(payload).to_bytes(4, "big") + payload)
    with pytest.raises(ConnectorError, match=f"has an entry at byte {len(whole)} that cannot be replayed"):
        FileLog(tmp_path)


def test_a_closed_log_refuses_writes_and_is_freed(tmp_path: Path) -> None:
    import gc
    import weakref

    log = FileLog(tmp_path)
    log.create_topic(TopicSpec("t", 1))
    log.close()
    with pytest.raises(ConnectorError, match="is closed"):
        log.append("t", 0, b"k", b"v")
    assert log.topics["t"].partitions[0].records == []
    log._syncer.join(5)  # the sync thread ends with the log
    gone = weakref.ref(log)
    del log
    gc.collect()
    assert gone() is None  # nothing (atexit) keeps a closed log alive


def test_one_directory_takes_one_set_of_options_in_a_process(tmp_path: Path) -> None:
    get_file_log(f"file://{tmp_path}")
    with pytest.raises(ConfigError, match="every app on one file:// log uses the same options"):
        get_file_log(f"file://{tmp_path}?fsync=always")
    with pytest.raises(ConfigError, match="fsync_interval_ms must be"):
        get_file_log(f"file://{tmp_path}?fsync_interval_ms=-1")
    close_file_log(f"file://{tmp_path}")
