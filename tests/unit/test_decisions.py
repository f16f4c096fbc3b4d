"""Pure decisions, as tables: offsets, retry, status precedence, partitioning, config, records."""

from __future__ import annotations

import random
import sys

import pytest
from aiokafka.partitioner import murmur2 as kafka_murmur2

from qtasks.config import QueueConfig
from qtasks.exc import ConfigError, RecordError, TaskCancelError
from qtasks.offsets import PartitionOffsets
from qtasks.partitioner import murmur2, partition_for
from qtasks.records import Task, TaskRecord, decode_task, encode
from qtasks.retry import backoff, should_retry
from qtasks.status import supersedes


@pytest.mark.parametrize(
    ("started", "finished", "expected"),
    [
        ([], [], None),
        ([5], [], 5),
        ([5], [5], 6),
        ([5, 6, 7], [6, 7], 5),
        ([5, 6, 7], [5, 7], 6),
        ([5, 6, 7], [5, 6, 7], 8),
        ([10, 11, 12, 13], [13, 10], 11),
    ],
)
def test_committable_offset_is_the_lowest_unfinished(
    started: list[int], finished: list[int], expected: int | None
) -> None:
    offsets = PartitionOffsets()
    for o in started:
        offsets.start(o)
    for o in finished:
        offsets.finish(o)
    assert offsets.committable() == expected


def test_committable_offset_is_not_repeated_after_commit() -> None:
    offsets = PartitionOffsets()
    offsets.start(0)
    offsets.finish(0)
    assert offsets.committable() == 1
    offsets.committed(1)
    assert offsets.committable() is None
    offsets.start(1)
    assert offsets.committable() is None
    offsets.finish(1)
    assert offsets.committable() == 2


def test_a_redelivered_offset_stays_pending_until_both_runs_finish() -> None:
    offsets = PartitionOffsets()
    offsets.start(3)
    offsets.start(3)
    offsets.finish(3)
    assert offsets.in_flight == 1
    offsets.finish(3)
    assert offsets.in_flight == 0 and offsets.committable() == 4


def test_records_finished_behind_one_that_stays_unfinished_are_not_held() -> None:
    # A long generator task (or a chord's callback) at offset 0; a million short tasks
    # finish behind it. The commit waits at 0, and nothing is kept per finished record.
    offsets = PartitionOffsets()
    offsets.start(0)
    for o in range(1, 1_000_001):
        offsets.start(o)
        offsets.finish(o)
    assert offsets.committable() == 0 and offsets.in_flight == 1
    assert sys.getsizeof(offsets._unfinished) < 1_000  # type: ignore[attr-defined]
    offsets.finish(0)
    assert offsets.committable() == 1_000_001 and offsets.in_flight == 0


def test_finishing_an_offset_never_started_changes_nothing() -> None:
    offsets = PartitionOffsets()
    offsets.start(4)
    offsets.finish(9)
    offsets.start(9)
    assert offsets.in_flight == 2 and offsets.committable() == 4


class Base(Exception):
    pass


class Child(Base):
    pass


@pytest.mark.parametrize(
    ("exc", "left", "on", "expected"),
    [
        (Base(), 1, [Base], True),
        (Child(), 1, [Base], True),
        (Base(), 1, [Child], False),
        (KeyError(), 1, None, True),
        (KeyError(), 1, [], True),
        (Base(), 0, [Base], False),
        (TaskCancelError("x"), 3, None, False),
        (KeyboardInterrupt(), 3, None, False),
    ],
)
def test_should_retry(exc: BaseException, left: int, on: list[type[BaseException]] | None, expected: bool) -> None:
    assert should_retry(exc, left, on) is expected


@pytest.mark.parametrize(
    ("n", "low", "high"), [(0, 0.5, 1.0), (1, 1.0, 2.0), (3, 4.0, 8.0), (10, 30.0, 60.0), (99, 30.0, 60.0)]
)
def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(n: int, low: float, high: float) -> None:
    rand = random.Random(n)
    delays = [backoff(n, 1.0, 60.0, rand) for _ in range(50)]
    assert all(low <= d <= high for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize(
    ("current", "new", "expected"),
    [
        (None, (0, 0, False), True),
        ((1, 0, False), (1, 1, False), True),
        ((1, 2, False), (1, 1, False), False),
        ((1, 2, True), (1, 3, False), False),
        ((1, 2, False), (1, 3, True), True),
        ((1, 2, True), (1, 3, True), True),
        ((1, 3, True), (1, 2, True), False),
        ((1, 1, False), (1, 1, False), True),
        # attempt 2 took the task over (rev 4); attempt 1's worker woke and renewed (rev 4, then 5)
        ((2, 4, False), (1, 4, False), False),
        ((2, 4, False), (1, 5, False), False),
        ((1, 5, False), (2, 4, False), True),
        # an ending is never undone by a run, and an earlier attempt's ending still ends the task
        ((1, 5, True), (2, 6, False), False),
        ((2, 4, False), (1, 5, True), True),
        # attempt 2 ends with a lower rev than attempt 1's late renewals (views that dropped them)
        ((1, 5, False), (2, 4, True), True),
    ],
)
def test_status_precedence(current: tuple[int, int, bool] | None, new: tuple[int, int, bool], expected: bool) -> None:
    assert supersedes(current, new) is expected


@pytest.mark.parametrize(
    "key", [b"", b"a", b"ab", b"abc", b"abcd", b"abcde", b"some-uuid-0123456789", bytes(range(256))]
)
def test_murmur2_matches_kafka(key: bytes) -> None:
    assert murmur2(key) & 0x7FFFFFFF == kafka_murmur2(key) & 0x7FFFFFFF


def test_partition_for_spreads_keys_over_every_partition() -> None:
    seen = {partition_for(f"key-{i}", 6) for i in range(200)}
    assert seen == set(range(6))


def test_config_defaults_env_and_overrides() -> None:
    config = QueueConfig.from_env({"QTASKS_CONCURRENCY": "7", "QTASKS_STATUS_TTL": "1.5"}, stop_timeout=3)
    assert (config.concurrency, config.status_ttl, config.stop_timeout) == (7, 1.5, 3)


@pytest.mark.parametrize(
    ("env", "overrides", "message"),
    [
        ({"QTASKS_CONCURRENCY": "many"}, {}, "QTASKS_CONCURRENCY must be an int"),
        ({}, {"concurrency": 0}, "concurrency must be greater than 0"),
        ({}, {"lease_timeout": 1.0, "lease_interval": 2.0}, "lease_timeout"),
        ({}, {"no_such_setting": 1}, "unknown setting"),
    ],
)
def test_config_errors_name_the_setting(env: dict[str, str], overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QueueConfig.from_env(env, **overrides)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "no value"),
        (b"{not json", "not valid JSON"),
        (b'{"uuid": 1, "task_name": "x", "created_at": 0}', "wrong shape"),
        (b'{"uuid": "u", "task_name": "x", "created_at": 0, "args": "nope"}', "wrong shape"),
        (b'{"uuid": "u", "created_at": 0}', "wrong shape"),
        (b'{"uuid": "", "task_name": "x", "created_at": 0}', "empty uuid"),
        (b"[" + b"1," * 600 + b"1]", "over the limit"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_task_records_are_refused_with_a_reason(raw: bytes | None, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        decode_task(raw, limit=1000)


def test_task_record_round_trips_and_ignores_unknown_fields() -> None:
    record = TaskRecord(uuid="u", task_name="t", args=[1, "a"], kwargs={"k": [1]}, created_at=1.5)
    assert decode_task(encode(record)) == record
    assert decode_task(b'{"uuid":"u","task_name":"t","created_at":1.5,"added_later":true}').uuid == "u"


def test_a_task_record_of_a_newer_version_is_refused_not_run_by_guess() -> None:
    with pytest.raises(RecordError, match="written by a newer qtasks") as newer:
        decode_task(b'{"v":2,"uuid":"u","task_name":"t","created_at":1.5}')
    assert newer.value.kind == "newer_version"
    with pytest.raises(RecordError, match="written by a newer qtasks"):  # whose shape changed, too
        decode_task(b'{"v":3,"uuid":"u","function":"t","created_at":"today"}')
    with pytest.raises(RecordError, match="wrong shape"):
        decode_task(b'{"v":"2","uuid":"u","task_name":"t","created_at":1.5}')
    with pytest.raises(RecordError, match="versions start at 1"):
        decode_task(b'{"v":0,"uuid":"u","task_name":"t","created_at":1.5}')
    assert decode_task(b'{"v":1,"uuid":"u","task_name":"t","created_at":1.5}').v == 1


@pytest.mark.parametrize("due", ["1e15", "-1", "1e11"])
def test_a_task_record_due_at_no_real_time_is_refused(due: str) -> None:
    with pytest.raises(RecordError, match="not a time between 1970 and the year 5138"):
        decode_task(b'{"uuid":"u","task_name":"t","created_at":1.5,"not_before":' + due.encode() + b"}")


def test_task_is_finished_only_in_terminal_statuses() -> None:
    def make(status: str) -> Task:
        return Task(uuid="u", task_name="t", status=status, created_at=0, updated_at=0)  # type: ignore[arg-type]

    assert [s for s in ("new", "process", "success", "error", "cancel", "retry") if make(s).is_finished] == [
        "success",
        "error",
        "cancel",
        "retry",
    ]
