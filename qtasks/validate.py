"""Checks at the edge: what ``add_task`` accepts, the worker can decode back."""

from __future__ import annotations

import msgspec

from qtasks.records import TaskRecord, encode


def encode_task_record(record: TaskRecord, max_bytes: int) -> bytes:
    """Encode a task record, or raise TypeError/ValueError saying what is wrong."""
    try:
        raw = encode(record)
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"arguments of task {record.task_name!r} must be JSON-encodable: {exc}") from None
    if len(raw) > max_bytes:
        raise ValueError(f"task {record.task_name!r} is {len(raw)} bytes encoded, over max_record_bytes={max_bytes}")
    return raw


def check_submission(task_name: object, priority: object) -> None:
    """``add_task``'s own arguments: a non-empty name and an int priority (or None)."""
    if not isinstance(task_name, str) or not task_name:
        raise TypeError(f"task_name must be a non-empty str, got {task_name!r}")
    if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
        raise TypeError(f"priority must be an int or None, got {priority!r}")


def check_uuid(value: object) -> str:
    """A task uuid as str (``uuid.UUID`` accepted); TypeError for anything else."""
    import uuid

    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"a task uuid must be a str or uuid.UUID, got {type(value).__name__}")
