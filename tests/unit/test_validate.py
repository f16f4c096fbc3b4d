"""What add_task accepts comes back to the worker exactly; everything else is refused with its path."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import random
import sys
import uuid
from typing import Any

import msgspec
import pytest

from qtasks.records import MAX_DEPTH, TaskRecord, decode_task, encode
from qtasks.validate import (
    MAX_ARGUMENT_DEPTH,
    MAX_INT_CHARS,
    check_arguments,
    check_priority,
    check_task_name,
    check_uuid,
    check_value,
    encode_task_record,
)

UUID = "0b6c2f7e-6a53-4d1f-9d5e-1f1f1f1f1f1f"


def _as_received(value: Any) -> Any:
    """What JSON gives back for an accepted value: tuples arrive as lists."""
    if isinstance(value, list | tuple):
        return [_as_received(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_received(v) for k, v in value.items()}
    return value


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _record(*args: Any, **kwargs: Any) -> TaskRecord:
    return TaskRecord(uuid=UUID, task_name="t", args=list(args), kwargs=kwargs, created_at=1.0)


ACCEPTED = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64,
    10 ** (MAX_INT_CHARS - 1),
    -(10 ** (MAX_INT_CHARS - 2)),
    0.1 + 0.2,
    -0.0,
    1e308,
    5e-324,
    "",
    "text",
    "zürich ✓ \U0001f600",
    "\x00",
    [],
    (),
    {},
    [1, "a", [2.5, None], {"k": (True,)}],
    (1, (2, (3,))),
    {"a": {"b": {"c": []}}, "": 1},
    _nested(MAX_ARGUMENT_DEPTH),
]


@pytest.mark.parametrize("value", ACCEPTED, ids=lambda v: repr(v)[:40])
def test_accepted_values_come_back_as_the_task_receives_them(value: Any) -> None:
    check_value(value)
    raw = encode_task_record(_record(value, k=value), 10_000_000)
    record = decode_task(raw, 10_000_000)
    assert record.args == [_as_received(value)]
    assert record.kwargs == {"k": _as_received(value)}


class Color(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    LOW = 1


@dataclasses.dataclass
class Point:
    x: int


class Point3(msgspec.Struct):
    x: int


class Text(str):
    pass


cyclic_list: list[Any] = [1]
cyclic_list.append(cyclic_list)
cyclic_dict: dict[str, Any] = {}
cyclic_dict["self"] = {"again": cyclic_dict}


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (float("nan"), ValueError, r"^value is nan: JSON has no NaN"),
        (float("inf"), ValueError, r"^value is inf"),
        ({"x": [1, 2, float("-inf")]}, ValueError, r"^value\['x'\]\[2\] is -inf"),
        ({1: "a"}, TypeError, r"^value has the key 1 of type int: JSON keys are str"),
        ({"a": {(1, 2): 0}}, TypeError, r"^value\['a'\] has the key \(1, 2\) of type tuple"),
        ({None: 0}, TypeError, "key None of type NoneType"),
        ({"\ud800": 0}, ValueError, r"^value has a key that is not valid Unicode"),
        (["ok", "\udcff"], ValueError, r"^value\[1\] is not valid Unicode text"),
        (10**MAX_INT_CHARS, ValueError, f"more than {MAX_INT_CHARS} characters"),
        (-(10 ** (MAX_INT_CHARS - 1)), ValueError, f"more than {MAX_INT_CHARS} characters"),
        ({1, 2}, TypeError, r"^value is a set; task arguments must be None, bool, int, float, str"),
        (frozenset(), TypeError, "is a frozenset"),
        (b"bytes", TypeError, "is a bytes"),
        (bytearray(b"x"), TypeError, "is a bytearray"),
        (datetime.datetime(2024, 1, 1), TypeError, "is a datetime.datetime"),
        (datetime.date(2024, 1, 1), TypeError, "is a datetime.date"),
        (uuid.UUID(UUID), TypeError, "is a uuid.UUID"),
        (decimal.Decimal("1.5"), TypeError, "is a decimal.Decimal"),
        (Color.RED, TypeError, "Color"),
        (Level.LOW, TypeError, "Level"),
        (Point(1), TypeError, "Point"),
        (Point3(1), TypeError, "Point3"),
        (Text("x"), TypeError, "Text"),
        (collections.OrderedDict(a=1), TypeError, "is a collections.OrderedDict"),
        (object(), TypeError, "is a object"),
        (len, TypeError, "builtin_function_or_method"),
        (cyclic_list, TypeError, r"^value\[1\] contains itself \(a cycle\)"),
        (cyclic_dict, TypeError, r"^value\['self'\]\['again'\] contains itself"),
        (
            _nested(MAX_ARGUMENT_DEPTH + 1),
            ValueError,
            rf"nests too deeply: an argument may nest at most {MAX_ARGUMENT_DEPTH}",
        ),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else type(v).__name__ if isinstance(v, int | float) else None,
)
def test_refused_values_name_the_path_and_the_reason(value: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        check_value(value)
    with pytest.raises(error):
        encode_task_record(_record(value), 10_000_000)
    with pytest.raises(error):
        encode_task_record(_record(x=[value]), 10_000_000)


def test_paths_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"^kwargs\['x'\]\[2\] is nan"):
        check_arguments([], {"x": [0, 1, float("nan")]})
    with pytest.raises(TypeError, match=r"^args\[1\]\['k'\] is a set"):
        encode_task_record(_record(1, {"k": {3}}), 1000)


def test_a_deep_path_is_shortened_in_the_message() -> None:
    with pytest.raises(ValueError, match=r"^args\[0\]\[0\]\[0\]\[0\]\.\.\.\[0\]\[0\] nests too deeply"):
        check_arguments([_nested(MAX_ARGUMENT_DEPTH + 1)], {})


def test_the_deepest_accepted_argument_fits_the_decoders_limit() -> None:
    raw = encode_task_record(_record(_nested(MAX_ARGUMENT_DEPTH)), 10_000_000)
    assert decode_task(raw).args == [_nested(MAX_ARGUMENT_DEPTH)]
    assert MAX_ARGUMENT_DEPTH == MAX_DEPTH - 2


def test_a_value_shared_without_a_cycle_is_accepted() -> None:
    shared = [1, 2]
    check_value([shared, {"a": shared}, shared])


def test_an_int_past_the_interpreters_str_limit_is_refused() -> None:
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        with pytest.raises(ValueError, match="more than"):
            check_value(10**700)
    finally:
        sys.set_int_max_str_digits(limit)


@pytest.mark.parametrize(
    ("task_name", "error"),
    [("", ValueError), (None, TypeError), (5, TypeError), (b"t", TypeError), (["t"], TypeError)],
)
def test_task_name_must_be_a_non_empty_str(task_name: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="task_name"):
        check_task_name(task_name)
    record = _record()
    record.task_name = task_name
    with pytest.raises(error, match="task_name"):
        encode_task_record(record, 1000)


def test_task_name_of_a_str_subclass_becomes_a_plain_str() -> None:
    assert type(check_task_name(Text("t"))) is str


@pytest.mark.parametrize(
    ("priority", "error"),
    [
        (True, TypeError),
        (1.0, TypeError),
        ("1", TypeError),
        (None, TypeError),
        (2**63, ValueError),
        (-(2**63) - 1, ValueError),
    ],
)
def test_priority_must_be_a_64_bit_int(priority: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="priority"):
        check_priority(priority)
    record = _record()
    record.priority = priority
    with pytest.raises(error, match="priority"):
        encode_task_record(record, 1000)


@pytest.mark.parametrize("priority", [0, -5, 2**63 - 1, -(2**63), Level.LOW])
def test_priority_accepts_ints(priority: int) -> None:
    assert check_priority(priority) == int(priority)
    assert type(check_priority(priority)) is int


def test_args_and_kwargs_must_be_a_list_and_a_dict() -> None:
    record = _record()
    record.args = (1,)  # type: ignore[assignment]
    with pytest.raises(TypeError, match="args must be a list, got tuple"):
        encode_task_record(record, 1000)
    record = _record()
    record.kwargs = [("a", 1)]  # type: ignore[assignment]
    with pytest.raises(TypeError, match="kwargs must be a dict, got list"):
        encode_task_record(record, 1000)


def test_a_record_over_max_bytes_is_refused_with_both_sizes() -> None:
    record = _record("x" * 500)
    size = len(encode(record))
    assert encode_task_record(record, size) == encode(record)
    with pytest.raises(ValueError, match=rf"task 't' is {size} bytes encoded, over max_record_bytes={size - 1}"):
        encode_task_record(record, size - 1)


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    leaves: list[Any] = [
        None,
        True,
        rng.randrange(-(2**70), 2**70),
        rng.random(),
        "s",
        "é",
        float("nan"),
        b"b",
        {1, 2},
        uuid.UUID(UUID),
        "\ud800",
        10**MAX_INT_CHARS,
    ]
    roll = rng.random()
    if depth < 6 and roll < 0.3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 6 and roll < 0.45:
        return tuple(_random_value(rng, depth + 1) for _ in range(rng.randrange(3)))
    if depth < 6 and roll < 0.6:
        keys: list[Any] = ["a", "b", "c", "d", 1]
        return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    # Refused leaves are rarer, so that many values pass.
    return rng.choice(leaves[:6]) if rng.random() < 0.93 else rng.choice(leaves[6:])


def test_random_values_either_round_trip_exactly_or_are_refused() -> None:
    rng = random.Random(1234)
    accepted = refused = 0
    for _ in range(3000):
        value = _random_value(rng)
        try:
            raw = encode_task_record(_record(value, k=value), 10_000_000)
        except (TypeError, ValueError):
            refused += 1
            with pytest.raises((TypeError, ValueError)):
                check_value(value)
            continue
        accepted += 1
        check_value(value)
        record = decode_task(raw, 10_000_000)
        assert record.args == [_as_received(value)]
        assert record.kwargs == {"k": _as_received(value)}
    assert accepted > 500 and refused > 500


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (UUID, UUID),
        (UUID.upper(), UUID),
        ("{" + UUID + "}", UUID),
        (UUID.replace("-", ""), UUID),
        (uuid.UUID(UUID), UUID),
        ("bad-types", "bad-types"),  # a key another producer chose: looked up as it is
    ],
)
def test_check_uuid_returns_the_canonical_form(value: Any, expected: str) -> None:
    assert check_uuid(value) == expected


@pytest.mark.parametrize(
    ("value", "error"),
    [(None, TypeError), (1, TypeError), (UUID.encode(), TypeError), ("", ValueError)],
)
def test_check_uuid_refuses_anything_else(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        check_uuid(value)
