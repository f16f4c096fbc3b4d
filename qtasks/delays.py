"""Delayed tasks: where a task waits for its time, and how it moves on.

Kafka has no delayed delivery, so a task submitted with ``countdown``/``eta`` waits in
the delays topic (``<app>.delays``), whose partitions are *levels*: partition ``i``
holds records for :data:`LEVELS` ``[i]`` seconds (1 s, 4 s, 16 s, ... about 18 h). A record
goes to the longest level that does not pass its due time, so within one partition the
records come due in the order they were written, and a reader only ever needs to look
at the first record of each partition: it holds that one (pauses the partition) until
its time and moves it on, to a shorter level or, within a second of its time, to the
tasks topic. A million delayed tasks cost a million records on the log and one held
record per partition in memory; no timer per task. See :mod:`qtasks.scheduler`.

The record's value is the task record exactly as the client encoded it (moved on
unchanged; its ``not_before`` is the due time, which the worker checks again before it
runs the task). Two headers say when it is due and when it was written to its level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from qtasks.exc import RecordError
from qtasks.records import LATEST_DUE

#: Seconds each partition of the delays topic holds its records (partition i: LEVELS[i]).
LEVELS: Final = (1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0)
#: Header names: the task's due time, and when the record was written to its level (Unix time, seconds).
DUE: Final = "qtasks-due"
AT: Final = "qtasks-at"
#: Header name: the ordering key of a keyed task (its tasks partition is the key's, not the uuid's).
KEY: Final = "qtasks-key"
#: On a task record the delays topic moved to the tasks topic: when it was moved (the mover's clock).
MOVED: Final = "qtasks-moved"


def level_for(remaining: float, partitions: int) -> int | None:
    """The partition of the delays topic for a task due in ``remaining`` seconds; None: under a second, go now."""
    if remaining < LEVELS[0]:
        return None
    level = 0
    for i in range(1, min(len(LEVELS), partitions)):
        if LEVELS[i] > remaining:
            break
        level = i
    return level


def level_seconds(partition: int) -> float:
    """How long partition ``partition`` holds its records (a topic made with more partitions uses the last level)."""
    return LEVELS[min(partition, len(LEVELS) - 1)]


def delay_headers(due: float, at: float, others: Sequence[tuple[str, bytes]] = ()) -> list[tuple[str, bytes]]:
    """The headers of a delayed task's record: due and written-at times, then the record's other headers."""
    return [(DUE, repr(due).encode()), (AT, repr(at).encode()), *others]


def read_headers(headers: Sequence[tuple[str, bytes]]) -> tuple[float, float, list[tuple[str, bytes]]]:
    """(due, at, the other headers) of a delays-topic record; :class:`RecordError` if either time is missing or bad."""
    due = at = None
    others = []
    for name, value in headers:
        if name == DUE:
            due = _seconds(value, DUE)
        elif name == AT:
            at = _seconds(value, AT)
        else:
            if name == KEY and not (isinstance(value, (bytes, bytearray)) and value):
                # Kafka headers may have no value: the key names the task's partition.
                raise RecordError(f"delayed task record has a bad {KEY} header: {value!r:.60}", "wrong_shape")
            others.append((name, value))
    if due is None or at is None:
        missing = " and ".join(n for n, v in ((DUE, due), (AT, at)) if v is None)
        raise RecordError(f"delayed task record has no {missing} header", "wrong_shape")
    return due, at, others


def _seconds(value: object, name: str) -> float:
    try:
        if not isinstance(value, (bytes, bytearray)) or len(value) > 32:
            raise ValueError
        seconds = float(value.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise RecordError(f"delayed task record has a bad {name} header: {value!r:.60}", "wrong_shape") from None
    if not 0.0 <= seconds < LATEST_DUE:  # NaN fails too
        raise RecordError(f"delayed task record has a bad {name} header: {value!r:.60}", "wrong_shape")
    return seconds
