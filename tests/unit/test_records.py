"""Decoding is total: any input gives a record or a RecordError, never another exception."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from qtasks.exc import RecordError
from qtasks.records import (
    MAX_DEPTH,
    ControlRecord,
    DeadLetter,
    ResultRecord,
    StatusHead,
    Task,
    TaskRecord,
    decode_control,
    decode_dead_letter,
    decode_key,
    decode_result,
    decode_status,
    decode_status_head,
    decode_task,
    encode,
    nesting_depth,
)

DECODERS: list[tuple[Callable[..., Any], type]] = [
    (decode_task, TaskRecord),
    (decode_status, Task),
    (decode_status_head, StatusHead),
    (decode_result, ResultRecord),
    (decode_control, ControlRecord),
    (decode_dead_letter, DeadLetter),
]
IDS = [decoder.__name__ for decoder, _ in DECODERS]

UUID = "0b6c2f7e-6a53-4d1f-9d5e-1f1f1f1f1f1f"
VALID: list[bytes] = [
    encode(
        TaskRecord(uuid=UUID, task_name="t", args=[1, "a", [2.5, None]], kwargs={"x": {"y": [True]}}, created_at=1.0)
    ),
    encode(TaskRecord(uuid=UUID, task_name="t", created_at=1.0, retry=2, retry_parent_uuid=UUID, retry_count=1)),
    encode(
        Task(
            uuid=UUID,
            task_name="t",
            status="success",
            args=[1],
            kwargs={"k": "v"},
            created_at=1.0,
            updated_at=2.0,
            returning=[{"a": [1, 2]}, "é✓"],
            traceback="Traceback ...\n",
            worker="w-1",
            rev=3,
            lease_until=5.0,
            results_partition=2,
            results_offset=10,
        )
    ),
    encode(ResultRecord(uuid=UUID, seq=4, attempt=2, value={"v": [1, [2, [3]]]})),
    encode(ResultRecord(uuid=UUID, seq=5, end=True, status="success")),
    encode(ControlRecord(kind="cancel", uuid=UUID, reason="why", at=1.0)),
    encode(DeadLetter(reason="bad", topic="a.tasks", partition=0, offset=7, key=b"k\xff", value=b"{\x00", at=1.0)),
]

# Pieces a mutation splices in: JSON tokens msgspec refuses or treats specially.
NASTY = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e999",
    b"9" * 5000,
    b"-" + b"9" * 4300,
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\\ud800",
    b'"\\u0000"',
    b"[" * 100_000,
    b"{" * 1000,
    b'{"a":' * 2000,
    b"]" * 50,
    b",,",
    b"\x00",
    b'"',
    b"\\",
    b"null",
    b"true",
    b'"uuid":"x"',
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    pos = rng.randrange(len(data) + 1)
    match rng.randrange(8):
        case 0:
            return data[:pos]
        case 1:
            return data[pos:]
        case 2 if data:
            i = rng.randrange(len(data))
            return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
        case 3:
            return data[:pos] + rng.choice(NASTY) + data[pos:]
        case 4:
            end = rng.randrange(pos, len(data) + 1)
            return data[:pos] + data[end:]
        case 5:
            return data[:pos] + rng.randbytes(rng.randrange(1, 16)) + data[pos:]
        case 6:
            other = rng.choice(VALID)
            return data[:pos] + other[rng.randrange(len(other) + 1) :]
        case _:
            return rng.randbytes(rng.randrange(64))


def _fuzz_inputs(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        data = rng.choice(VALID)
        for _ in range(rng.randrange(1, 4)):
            data = _mutate(rng, data)
        out.append(data)
    return out


@pytest.mark.parametrize(("decoder", "kind"), DECODERS, ids=IDS)
def test_every_mutated_record_decodes_or_raises_record_error(decoder: Callable[..., Any], kind: type) -> None:
    decoded = 0
    for data in _fuzz_inputs(seed=20240601, count=4000):
        try:
            record = decoder(data, 10_000_000)
        except RecordError as exc:
            assert str(exc)
        else:
            assert isinstance(record, kind)
            decoded += 1
    assert decoded > 0  # the mutations also keep some records valid


@pytest.mark.parametrize(("decoder", "kind"), DECODERS, ids=IDS)
def test_valid_records_of_the_matching_type_decode(decoder: Callable[..., Any], kind: type) -> None:
    for data in VALID:
        try:
            assert isinstance(decoder(data), kind)
        except RecordError:
            pass  # a record of another type


def test_records_round_trip() -> None:
    record = TaskRecord(uuid=UUID, task_name="t", args=[1, [2]], kwargs={"x": -0.0}, created_at=1.5)
    assert decode_task(encode(record)) == record


ARGS_AT = b'{"uuid":"u","task_name":"t","created_at":1,"args":%s}'


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "has no value"),
        (b"", "not valid JSON"),
        (b" ", "not valid JSON"),
        ("{}", "must be bytes, got str"),
        (5, "must be bytes, got int"),
        ([b"{}"], "must be bytes, got list"),
        (b"\xff\xfe", "not valid JSON: it is not UTF-8"),
        (b'{"uuid":"u\xc3","task_name":"t","created_at":1}', "not UTF-8"),
        # msgspec skips unknown fields without checking their UTF-8: the check is ours.
        (b'{"uuid":"u","task_name":"t","created_at":1,"\xff":1}', "not UTF-8"),
        (b'{"uuid":"u","task_name":"t","created_at":1,"x":"\xed\xa0\x80"}', "not UTF-8"),
        (b'{"uuid":"\\ud800","task_name":"t","created_at":1}', "not valid JSON"),
        (b'{"uuid":"u","task_name":"t","created_at":NaN}', "not valid JSON"),
        (ARGS_AT % b"[Infinity]", "not valid JSON"),
        (ARGS_AT % b"[-Infinity]", "not valid JSON"),
        (b'{"uuid":"u","task_name":"t","created_at":1e999}', "wrong shape"),
        (ARGS_AT % (b"[" + b"9" * 4301 + b"]"), "wrong shape"),
        (b'{"uuid":"u","task_name":"t","created_at":1} x', "trailing characters"),
        (b'{"uuid":"u","task_name":"t","created_at":1}{}', "trailing characters"),
        (b'{"uuid":"u","task_name":"t","created_at":"1"}', "wrong shape"),
        (b'{"uuid":"","task_name":"t","created_at":1}', "empty uuid"),
        (b"[" * 100_000, f"over the limit of {MAX_DEPTH}"),
        (ARGS_AT % (b"[" * 100_000 + b"]" * 100_000), f"over the limit of {MAX_DEPTH}"),
        (ARGS_AT % (b'[{"a":' * 3000 + b"1" + b"}]" * 3000), f"over the limit of {MAX_DEPTH}"),
        (b'{"uuid":"u","task_name":"t","created_at":1,"x":' + b"[" * 5000 + b"]" * 5000 + b"}", "over the limit"),
    ],
)
def test_bad_task_records_raise_record_error_with_the_reason(data: Any, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        decode_task(data, 10_000_000)


@pytest.mark.parametrize("decoder", [d for d, _ in DECODERS], ids=IDS)
def test_deep_nesting_in_any_field_is_a_record_error_for_every_decoder(decoder: Callable[..., Any]) -> None:
    deep = b'{"uuid":"u","value":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    with pytest.raises(RecordError, match="nests 50001 containers deep"):
        decoder(deep, 10_000_000)


def test_nesting_up_to_the_limit_decodes() -> None:
    # The record and its args list take two levels: args[0] may nest MAX_DEPTH - 2 containers.
    inner = MAX_DEPTH - 2
    record = decode_task(ARGS_AT % (b"[" + b"[" * inner + b"]" * inner + b"]"))
    assert nesting_depth(encode(record)) == MAX_DEPTH
    with pytest.raises(RecordError, match=f"nests {MAX_DEPTH + 1} containers deep"):
        decode_task(ARGS_AT % (b"[" + b"[" * (inner + 1) + b"]" * (inner + 1) + b"]"))


def test_brackets_inside_strings_do_not_count_towards_the_depth() -> None:
    text = "[{" * 500 + '\\"' + "]}" * 3
    record = decode_task(b'{"uuid":"u","task_name":"t","created_at":1,"args":["' + text.encode() + b'"]}')
    assert record.args == [text.replace('\\"', '"')]


def test_duplicate_keys_keep_the_last_value() -> None:
    record = decode_task(b'{"uuid":"a","uuid":"b","task_name":"t","created_at":1}')
    assert record.uuid == "b"


def test_big_ints_decode_up_to_4300_characters() -> None:
    assert decode_task(ARGS_AT % (b"[" + b"9" * 4300 + b"]")).args == [int("9" * 4300)]
    with pytest.raises(RecordError, match="out of range"):
        decode_task(ARGS_AT % (b"[-" + b"9" * 4300 + b"]"))


def test_memoryview_and_bytearray_decode_like_bytes() -> None:
    data = VALID[0]
    assert decode_task(memoryview(data)) == decode_task(bytearray(data)) == decode_task(data)


def test_size_is_checked_before_anything_else() -> None:
    with pytest.raises(RecordError, match="5 bytes, over the limit of 4"):
        decode_task(b"\xff\xff\xff\xff\xff", 4)


@pytest.mark.parametrize(
    ("data", "depth"),
    [
        (b"", 0),
        (b"1", 0),
        (b"[]", 1),
        (b'[[1],{"a":[2]}]', 3),
        (b'["[[[["]', 1),
        (b'["\\\\",[[]]]', 3),
        (b'["\\"[["]', 1),
        (b'["\\\\\\"[["]', 1),
        (b'["unterminated [[[', 1),
        (b"[[[", 3),
        (b"]]][", 0),
    ],
)
def test_nesting_depth_counts_containers_outside_strings(data: bytes, depth: int) -> None:
    assert nesting_depth(data) == depth


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def test_nesting_depth_agrees_with_msgspec_on_random_json() -> None:
    rng = random.Random(7)
    decoder = msgspec.json.Decoder()
    agreed = 0
    for _ in range(20_000):
        data = bytes(rng.choice(b'[]{}"\\,:1n ') for _ in range(rng.randrange(1, 24)))
        try:
            value = decoder.decode(data)
        except msgspec.DecodeError:
            continue
        assert nesting_depth(data) == _depth(value), data
        agreed += 1
    assert agreed > 100


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (None, "has no key"),
        (b"", "key is empty"),
        (b"\xff", "not UTF-8"),
        (b"abc\xc3", "not UTF-8"),
        ("abc", "must be bytes, got str"),
        (7, "must be bytes, got int"),
    ],
)
def test_decode_key_refuses_what_is_not_utf8_text(key: Any, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        decode_key(key)


def test_decode_key_returns_the_text() -> None:
    assert decode_key(UUID.encode()) == UUID
    assert decode_key("zürich".encode()) == "zürich"
    assert decode_key(bytearray(b"k")) == "k"
