"""Checks at the edge: what a client sends must come back to the worker exactly.

The rule for task arguments (``args`` and ``kwargs``) is: a value is accepted when
the task function receives it unchanged after the trip through JSON, and refused
with a ``TypeError`` or ``ValueError`` naming the argument's path otherwise. Accepted:

- ``None``, ``bool``, ``str``, and ``int`` whose decimal form is at most 4300 characters
  (msgspec decodes no longer integers);
- finite ``float`` (``NaN`` and ``±inf`` are refused: msgspec would write ``null``);
- ``list``, and ``tuple``, which arrives as a ``list`` (JSON's one array type);
- ``dict`` whose keys are all ``str`` (JSON would turn ``1`` into ``"1"``).

Everything else is refused, including what msgspec can encode but decodes as something
else (``set``, ``bytes``, ``datetime``, ``UUID``, ``Decimal``, ``Enum``, dataclasses,
``Struct``\\s, and subclasses of the types above such as ``OrderedDict`` or
``IntEnum``): convert it first (``sorted(s)``, ``str(u)``, ``d.isoformat()``, ...), so
the task receives what the caller chose. Cycles are refused (``TypeError``), and so is
nesting deeper than the records' :data:`~qtasks.records.MAX_DEPTH` allows
(``ValueError``). Checking is one walk over the arguments, with no extra encoding.
"""

from __future__ import annotations

import datetime
import math
import time
import uuid as uuid_mod
from collections.abc import Iterable, Iterator
from typing import Any, Final

import msgspec

from qtasks.records import LATEST_DUE, MAX_DEPTH, TaskRecord, encode

__all__ = [
    "MAX_ARGUMENT_DEPTH",
    "MAX_INT_CHARS",
    "check_arguments",
    "check_priority",
    "check_task_name",
    "check_uuid",
    "check_value",
    "encode_task_record",
]

#: Containers an argument may nest: a record and its ``args`` / ``kwargs`` take two of
#: the levels :data:`~qtasks.records.MAX_DEPTH` allows.
MAX_ARGUMENT_DEPTH: Final = MAX_DEPTH - 2
#: The longest integer (in decimal, with its sign) msgspec decodes.
MAX_INT_CHARS: Final = 4300
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_SCALARS: Final = frozenset({str, bool, type(None)})
_ACCEPTED: Final = "None, bool, int, float, str, list, tuple or dict with str keys"


class _Refused(Exception):
    """Raised inside the walk; carries the path (innermost first) to build the message once."""

    def __init__(self, error: type[Exception], what: str) -> None:
        self.error = error
        self.what = what
        self.path: list[str] = []


def check_value(value: Any, path: str = "value", *, max_depth: int = MAX_ARGUMENT_DEPTH) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the path if ``value`` would not survive JSON unchanged.

    ``path`` names the value in the message (``"kwargs['x']"``); ``max_depth`` is how
    many containers it may nest (a list or dict at the top counts as one).
    """
    # One quick walk that only answers yes or no; the slower walk that finds the
    # path and the reason runs only for a value that is refused.
    if _ok(value, max_depth):
        return
    try:
        _walk(value, max_depth, set())
    except _Refused as refused:
        steps = refused.path[::-1]
        if len(steps) > 8:  # a path 100 levels deep says no more than its ends
            steps = [*steps[:4], "...", *steps[-2:]]
        raise refused.error(f"{path}{''.join(steps)} {refused.what}") from None
    raise AssertionError(f"{path}: the two walks disagree")  # pragma: no cover


def _ok(value: Any, depth: int) -> bool:
    """True if ``value`` is accepted. A cycle nests forever, so ``depth`` stops it too."""
    return _all_ok((value,), depth + 1)


def _all_ok(values: Iterable[Any], depth: int) -> bool:
    """True if every one of ``values`` (the items of a container ``depth`` levels up) is accepted."""
    # Scalars are checked inline: a call per argument would double the cost of add_task.
    for value in values:
        kind = type(value)
        if kind is str:
            if not (value.isascii() or _is_text(value)):
                return False
        elif kind is int:
            if not (_INT64_MIN <= value <= _INT64_MAX or _int_fits(value)):
                return False
        elif kind is float:
            if not math.isfinite(value):
                return False
        elif kind is bool or value is None:
            pass
        elif depth <= 1:
            return False
        elif kind is list or kind is tuple:
            if not _all_ok(value, depth - 1):
                return False
        elif kind is dict:
            for key in value:
                if type(key) is not str or not (key.isascii() or _is_text(key)):
                    return False
            if not _all_ok(value.values(), depth - 1):
                return False
        else:
            return False
    return True


def _is_text(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _int_fits(value: int) -> bool:
    try:
        return len(str(value)) <= MAX_INT_CHARS
    except ValueError:  # past sys.get_int_max_str_digits(): msgspec could not write it either
        return False


def _walk(value: Any, depth: int, open_ids: set[int]) -> None:
    kind = type(value)
    if kind in _SCALARS:
        if kind is str and not value.isascii():
            _check_text(value)
        return
    if kind is int:
        if not _INT64_MIN <= value <= _INT64_MAX:
            _check_big_int(value)
        return
    if kind is float:
        if not math.isfinite(value):
            raise _Refused(ValueError, f"is {value!r}: JSON has no NaN or infinity (msgspec would send null)")
        return
    if kind is list or kind is tuple or kind is dict:
        _walk_container(value, depth, open_ids)
        return
    raise _Refused(TypeError, f"is a {_type_name(value)}; task arguments must be {_ACCEPTED} (see qtasks.validate)")


def _walk_container(value: list[Any] | tuple[Any, ...] | dict[Any, Any], depth: int, open_ids: set[int]) -> None:
    ident = id(value)
    if ident in open_ids:
        raise _Refused(TypeError, "contains itself (a cycle), which JSON cannot represent")
    if depth <= 0:
        raise _Refused(ValueError, f"nests too deeply: an argument may nest at most {MAX_ARGUMENT_DEPTH} containers")
    open_ids.add(ident)
    for step, item in _items(value):
        try:
            _walk(item, depth - 1, open_ids)
        except _Refused as refused:
            refused.path.append(step)
            raise
    open_ids.discard(ident)


def _items(value: list[Any] | tuple[Any, ...] | dict[Any, Any]) -> Iterator[tuple[str, Any]]:
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise _Refused(
                    TypeError,
                    f"has the key {key!r} of type {_type_name(key)}: JSON keys are str (it would arrive as a str)",
                )
            if not key.isascii():
                try:
                    _check_text(key)
                except _Refused as refused:
                    refused.what = f"has a key that {refused.what}"
                    raise
            yield f"[{key!r}]", item
    else:
        for index, item in enumerate(value):
            yield f"[{index}]", item


def _check_text(text: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise _Refused(ValueError, f"is not valid Unicode text ({exc.reason} at index {exc.start})") from None


def _check_big_int(value: int) -> None:
    try:
        chars = len(str(value))
    except ValueError:  # past sys.get_int_max_str_digits(): msgspec could not write it either
        chars = MAX_INT_CHARS + 1
    if chars > MAX_INT_CHARS:
        raise _Refused(ValueError, f"is an int with more than {MAX_INT_CHARS} characters, more than msgspec decodes")


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_task_name(task_name: Any) -> str:
    """``task_name`` as a plain ``str``: ``TypeError`` if it is not a str, ``ValueError`` if it is empty."""
    if not isinstance(task_name, str):
        raise TypeError(f"task_name must be a str, got {_type_name(task_name)}")
    if not task_name:
        raise ValueError("task_name must not be empty")
    return str(task_name)


def check_priority(priority: Any) -> int:
    """``priority`` as a plain ``int`` (lower runs first): ``TypeError`` unless an int (bool is not), ``ValueError`` outside 64 bits."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise TypeError(f"priority must be an int, got {_type_name(priority)}")
    if not _INT64_MIN <= priority <= _INT64_MAX:
        raise ValueError(f"priority must fit in a signed 64-bit int, got {priority}")
    return int(priority)


def check_due(countdown: Any = None, eta: Any = None) -> float:
    """When a task submitted with ``countdown`` (seconds from now) or ``eta`` may start: Unix time, 0.0 for at once.

    ``eta`` is a ``datetime`` (a naive one is local time, as ``datetime.timestamp()`` reads
    it) or Unix time in seconds. ``TypeError`` for both or the wrong type, ``ValueError`` for a
    negative, infinite or NaN number.
    """
    if countdown is None and eta is None:
        return 0.0
    if countdown is not None and eta is not None:
        raise TypeError("give countdown or eta, not both")
    if countdown is not None:
        seconds = _real(countdown, "countdown")
        if seconds < 0.0:
            raise ValueError(f"countdown must be a number of seconds from 0 on, got {countdown!r}")
        due = time.time() + seconds if seconds else 0.0
        if due >= LATEST_DUE:
            raise ValueError(f"countdown {countdown!r} puts the task past the year 5138")
        return due
    if isinstance(eta, datetime.datetime):
        due = eta.timestamp()
    else:
        due = _real(eta, "eta (a datetime or Unix time in seconds)")
    if not 0.0 <= due < LATEST_DUE:
        raise ValueError(f"eta must be a time between 1970 and the year 5138, got {eta!r}")
    return due


def _real(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {_type_name(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{what} is too large: {value!r:.40}") from None
    if math.isnan(number):
        raise ValueError(f"{what} must be a number, got NaN")
    return number


#: The longest ordering key (characters).
MAX_KEY: Final = 256


def check_key(key: Any) -> str | None:
    """An ordering key: None, or a non-empty ``str`` of at most :data:`MAX_KEY` characters."""
    if key is None:
        return None
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {_type_name(key)}")
    if not key or len(key) > MAX_KEY:
        raise ValueError(f"key must be 1 to {MAX_KEY} characters, got {len(key)}")
    return str(key)


def check_arguments(args: Any, kwargs: Any) -> None:
    """Check a task's positional and keyword arguments (see the module docstring for the rule)."""
    check_value(args, "args", max_depth=MAX_ARGUMENT_DEPTH + 1)
    check_value(kwargs, "kwargs", max_depth=MAX_ARGUMENT_DEPTH + 1)


def encode_task_record(record: TaskRecord, max_bytes: int) -> bytes:
    """Check a task record's name, priority and arguments, encode it, and check its size.

    Raises ``TypeError`` or ``ValueError`` saying what is wrong; a record larger than
    ``max_bytes`` (the ``max_record_bytes`` setting: the worker would send it to the
    dead-letter topic) is a ``ValueError`` giving both sizes.
    """
    if type(record.task_name) is not str or not record.task_name:
        check_task_name(record.task_name)
    if type(record.priority) is not int or not _INT64_MIN <= record.priority <= _INT64_MAX:
        check_priority(record.priority)
    args, kwargs = record.args, record.kwargs
    if type(args) is not list:
        raise TypeError(f"args must be a list, got {_type_name(args)}")
    if type(kwargs) is not dict:
        raise TypeError(f"kwargs must be a dict, got {_type_name(kwargs)}")
    # The quick walk, inlined (this runs on every add_task); check_arguments explains a refusal.
    ok = _all_ok(args, MAX_ARGUMENT_DEPTH + 1) if args else True
    if kwargs and ok:
        for key in kwargs:
            if type(key) is not str or not (key.isascii() or _is_text(key)):
                ok = False
                break
        ok = ok and _all_ok(kwargs.values(), MAX_ARGUMENT_DEPTH + 1)
    if not ok:
        check_arguments(args, kwargs)
    try:
        raw = encode(record)
    except (TypeError, ValueError, msgspec.EncodeError) as exc:  # not expected once the walk passed
        raise TypeError(f"task {record.task_name!r} cannot be encoded: {exc}") from None
    if len(raw) > max_bytes:
        raise ValueError(
            f"task {record.task_name!r} is {len(raw)} bytes encoded, over max_record_bytes={max_bytes}: "
            "pass a reference to large data (a path, a URL, a key) instead of the data"
        )
    return raw


def check_uuid(value: Any) -> str:
    """A task uuid (``str`` or ``uuid.UUID``) as the status topic keys it.

    A str that is a UUID comes back in its canonical form (lower case, with hyphens);
    another non-empty str as it is (a record written by another producer may name its
    task so, and its status says why it failed). ``TypeError`` for any other type,
    ``ValueError`` for an empty str.
    """
    if isinstance(value, uuid_mod.UUID):
        return str(value)
    if not isinstance(value, str):
        raise TypeError(f"a task uuid must be a str or uuid.UUID, got {_type_name(value)}")
    if not value:
        raise ValueError("a task uuid must not be empty")
    try:
        return str(uuid_mod.UUID(value))
    except ValueError:
        return value
