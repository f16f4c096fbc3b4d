"""The records qtasks writes to its topics, and their one encoder and decoder each.

Records are versioned ``msgspec.Struct``s encoded as JSON. Schema evolution: new
fields get defaults and go last, existing fields never change type. Decoding is
typed and strict and checks the byte size first; every failure is a
:class:`~qtasks.exc.RecordError` whose message says what was wrong, so the worker
can send the record to the dead-letter topic with that reason. Nothing is ever
unpickled.

Decoding is total: for *any* input (``None``, non-bytes, invalid UTF-8, truncated or
trailing bytes, ``NaN``/``Infinity`` tokens, numbers out of range, wrong types) each
``decode_*`` returns a record or raises ``RecordError``, never anything else. Before
msgspec sees the bytes they are checked to be UTF-8 (msgspec would skip invalid UTF-8
inside unknown fields, and raise ``UnicodeDecodeError`` elsewhere) and to nest at most
:data:`MAX_DEPTH` containers deep: msgspec recurses once per level and only stops at
the interpreter's recursion limit (a ``RecursionError`` whose depth depends on the
caller's stack, or a crash on a thread with a small C stack before Python 3.14).
A duplicated key is not an error: the last value wins, as in msgspec and most JSON
readers (RFC 8259 leaves it open).

=========  ==============  ===========================================
topic      key             value
=========  ==============  ===========================================
tasks      task uuid       :class:`TaskRecord`
results    task uuid       :class:`ResultRecord` (one per yielded value, then an end marker)
status     task uuid       :class:`Task` (compacted; a tombstone expires it)
control    task uuid       :class:`ControlRecord` (cancel requests)
delays     task uuid       a :class:`TaskRecord` waiting for its time (headers: :mod:`qtasks.delays`)
schedule   tick:<name>     :class:`TickRecord` (compacted: each periodic task's last tick)
dlq        original key    :class:`DeadLetter`
=========  ==============  ===========================================
"""

from __future__ import annotations

from array import array
from itertools import accumulate
from typing import Any, Final, Literal

import msgspec

from qtasks.exc import RecordError

Status = Literal["new", "process", "success", "error", "cancel", "retry"]

#: Statuses after which a task never changes again.
TERMINAL: Final = frozenset({"success", "error", "cancel", "retry"})


#: The latest time a task may be due (Unix time: the year 5138); ``eta`` is checked against it.
LATEST_DUE: Final = 1e11

#: The version of the task record this qtasks writes and reads. A field added later is
#: ignored by older readers and keeps the version; a newer qtasks that changes what a task
#: record means writes a higher one, which this one dead-letters rather than run by guess.
TASK_RECORD_VERSION: Final = 1


class TaskRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A request to run a task (the tasks topic)."""

    v: int = TASK_RECORD_VERSION
    uuid: str
    task_name: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    priority: int = 0
    created_at: float
    #: Retries left for this run (None: the task's own ``retry`` setting).
    retry: int | None = None
    #: The task this one retries (QTasks' retry chain).
    retry_parent_uuid: str | None = None
    #: How many times the chain has been retried so far (drives the backoff).
    retry_count: int = 0
    #: Epoch seconds before which the task must not start (``countdown``/``eta``, a retry's backoff); 0: at once.
    not_before: float = 0.0
    #: Tasks of one key run one at a time, in the order they reach the tasks topic (its partition is the key's).
    key: str | None = None
    #: A chord's callback: it runs once these tasks have ended, with the list of their results first.
    after: list[str] = []


class Task(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A task's state: what ``app.get(uuid)`` returns and the status topic holds.

    ``rev`` orders the writes of one task: a record with a lower ``rev`` than the one
    already seen is stale. ``lease_until`` is when a running task's worker must have
    renewed its claim, or another worker takes the task over (``attempt`` + 1).
    """

    #: The record format's version.
    v: int = 1
    #: The task's id (a uuid4), the key of its status and result records.
    uuid: str
    #: The registered name of the task's function.
    task_name: str
    #: ``new`` (queued), ``process`` (running), then ``success``, ``error``, ``cancel`` or
    #: ``retry`` (failed and handed over to a retry: ``retry_child_uuid``).
    status: Status
    #: Lower runs first among the records a worker holds (prefetch).
    priority: int = 0
    #: The positional arguments (JSON values).
    args: list[Any] = []
    #: The keyword arguments (JSON values).
    kwargs: dict[str, Any] = {}
    #: When it was submitted (Unix time, seconds).
    created_at: float
    #: When this status was written.
    updated_at: float
    #: The return value; a generator's handled values (up to ``returning_max_items``).
    returning: Any = None
    #: The error's traceback, as the worker formatted it (status ``error``/``retry``).
    traceback: str | None = None
    #: Retries left for this task (the ``retry=`` of ``@app.task``, counting down along the chain).
    retry: int | None = None
    #: The task this one retries (a retry is a new task with its own uuid).
    retry_parent_uuid: str | None = None
    #: The retry this one handed over to (status ``retry``); ``wait`` and ``stream`` follow it.
    retry_child_uuid: str | None = None
    #: Why it was cancelled (status ``cancel``).
    cancel_reason: str | None = None
    #: Values the task yielded (handled and written as result records).
    yield_count: int = 0
    #: Which run of this task this is: 1, or more when a worker died mid-run and another
    #: took it over (same uuid; a retry after an error is a new task instead).
    attempt: int = 0
    #: The worker running or last to run it (``host-pid-id``).
    worker: str | None = None
    #: Orders the status writes of one task (a lower one is stale).
    rev: int = 0
    #: A running task's lease: past this time, another worker may take it over.
    lease_until: float = 0.0
    #: True when ``returning`` holds the count, not the list, of a generator's values.
    returning_truncated: bool = False
    #: Where the task's results live (the results partition; set once it ran).
    results_partition: int | None = None
    #: How many retries came before this task in its chain (0 for the first).
    retry_count: int = 0
    #: An offset of the results partition at or before the task's first result (set once it runs).
    results_offset: int | None = None
    #: The state the task stored with ``ctx.checkpoint(state)`` (JSON); a later attempt
    #: reads it as ``ctx.resume_state`` ...
    checkpoint: Any = None
    #: ... and its values go on from this seq (the values before it were stored with it).
    checkpoint_seq: int = 0
    #: CRC-32 of the encoded values before ``checkpoint_seq`` (a resumed run checks it goes on alike).
    checkpoint_crc: int = 0
    #: Exactly-once: CRC-32 of the encoded values before ``yield_count``, committed with them.
    values_crc: int | None = None
    #: When this attempt started running (Unix time; 0 before it ran).
    started_at: float = 0.0
    #: A delayed task (``countdown``/``eta``) does not start before this time (Unix time; 0: at once).
    not_before: float = 0.0
    #: The task's ordering key (``add_task(key=...)``): tasks of one key run one at a time, in order.
    key: str | None = None
    #: A chord's callback (``app.chord``): the tasks whose results it gets, once they have all ended.
    after: list[str] = []
    #: Share mode: the task record this attempt runs (``partition:offset`` of the tasks
    #: topic). That record handed to another worker means this attempt lost its lock.
    source: str | None = None
    #: Share mode: runs handed back by a stopping worker (past ``stop_timeout``): of the
    #: ``attempt`` runs, these did not die, so the poison limit does not count them.
    released: int = 0
    #: Status ``error`` because a value could not be stored (the broker refused it): that
    #: value's seq. It and the values after it may be missing from the results topic (a
    #: stream ends before the first one missing from there on, with no error of its own).
    lost_from: int | None = None

    @property
    def is_finished(self) -> bool:
        """True once the status is terminal (success, error, cancel or retry)."""
        return self.status in TERMINAL


class StatusHead(msgspec.Struct, gc=False, kw_only=True):
    """The few fields of a status record the engine decides on; decoding it skips the rest (fast)."""

    uuid: str
    status: Status
    rev: int = 0
    attempt: int = 0
    worker: str | None = None
    lease_until: float = 0.0
    updated_at: float = 0.0
    retry_child_uuid: str | None = None
    source: str | None = None
    released: int = 0

    @property
    def is_finished(self) -> bool:
        """True once the status is terminal."""
        return self.status in TERMINAL


class ResultRecord(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    """One handled value of a generator task, or (``end=True``) the end of an attempt."""

    v: int = 1
    uuid: str
    seq: int
    attempt: int = 1
    value: Any = None
    end: bool = False
    #: On an end marker: the status the attempt ended with.
    status: str | None = None


class StreamItem(msgspec.Struct, frozen=True, kw_only=True):
    """A value of ``app.stream(uuid, meta=True)``, with where it came from.

    ``uuid`` is the task of the retry chain that yielded it and ``seq`` its place among
    that task's values (0, 1, ...): ``app.stream(uuid, from_seq=seq + 1)`` resumes right
    after it. ``attempt`` is the run that yielded it (a run cut short by a dead worker is
    taken over by the next attempt, which goes on with the same seqs). An item with
    ``retried_as`` carries no value: task ``uuid`` failed after ``seq`` values and the
    chain goes on as task ``retried_as``, whose items follow; to resume after such an
    item, stream ``retried_as`` from its start.
    """

    uuid: str
    seq: int
    attempt: int
    value: Any = None
    retried_as: str | None = None


class ControlRecord(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    """A command to whichever worker runs a task."""

    v: int = 1
    kind: Literal["cancel"]
    uuid: str
    reason: str = ""
    at: float = 0.0


class DeadLetter(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    """A record the worker could not use, with why and where it came from."""

    v: int = 1
    reason: str
    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    value: bytes | None = None
    at: float = 0.0
    #: The value was cut to fit the dead-letter topic (the letter cannot be replayed).
    cut: bool = False


_encoder = msgspec.json.Encoder()
encode = _encoder.encode
"""Encode any record (or value) as JSON bytes."""


class TickRecord(msgspec.Struct, gc=False, kw_only=True, omit_defaults=True):
    """The schedule topic (compacted): a periodic task's last tick, or the ticking worker's sign of life.

    ``kind="tick"`` (key ``tick:<task name>``): the tick at ``tick`` was submitted as task
    ``uuid`` (empty: no run, the mark where a new schedule starts). ``kind="alive"`` (key ``alive``): ``worker`` was ticking at ``at``.
    """

    v: int = 1
    kind: Literal["tick", "alive"]
    name: str = ""
    tick: float = 0.0
    uuid: str = ""
    worker: str = ""
    at: float
    #: ``alive``: the periodic tasks the worker ticks (none named: all of them, as older workers wrote it).
    names: list[str] = msgspec.field(default_factory=list)


_task_decoder = msgspec.json.Decoder(TaskRecord)
_tick_decoder = msgspec.json.Decoder(TickRecord)
_status_decoder = msgspec.json.Decoder(Task)
_head_decoder = msgspec.json.Decoder(StatusHead)
_result_decoder = msgspec.json.Decoder(ResultRecord)
_control_decoder = msgspec.json.Decoder(ControlRecord)
_dead_decoder = msgspec.json.Decoder(DeadLetter)


#: Containers (JSON objects and arrays) one record may nest, counting the record itself.
#: A task's arguments sit two levels down (the record, then ``args`` or ``kwargs``), so a
#: container inside an argument may nest ``MAX_DEPTH - 2`` levels (see ``qtasks.validate``).
MAX_DEPTH: Final = 128

# Opening brackets become 1, closing ones -1 (as signed bytes); every other byte is deleted.
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")


def nesting_depth(data: bytes | bytearray) -> int:
    """How deeply the containers of a JSON text nest; brackets inside strings do not count.

    A linear scan in C (about 30 ms per MB of bracket-dense JSON). For malformed text
    the result is at least as deep as a parser gets before it fails, which is what
    bounding a recursive parser needs.
    """
    # Escapes go first (left to right, as JSON reads them), so the quotes left delimit
    # strings: every other piece between quotes lies outside the strings.
    unescaped = bytes(data).replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    return max(accumulate(array("b", outside.translate(_BRACKETS, _NOT_BRACKETS)), initial=0))


def _utf8(data: object, what: str) -> bytes | bytearray:
    """``data`` as bytes that are valid UTF-8, or :class:`RecordError` naming ``what``."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise RecordError(f"{what} must be bytes, got {type(data).__name__}", "not_bytes")
    # ASCII (nearly every record) is valid UTF-8; isascii() is a fast scan without a copy.
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError as exc:
            raise RecordError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})", "not_utf8") from None
    return data


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes | None, limit: int, what: str) -> Any:
    if data is None:
        raise RecordError(f"{what} record has no value", "no_value")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(f"{what} record must be bytes, got {type(data).__name__}", "not_bytes")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > limit:
        raise RecordError(f"{what} record is {size} bytes, over the limit of {limit}", "too_large")
    raw = _utf8(data, f"{what} record is not valid JSON: it")
    # Most records hold few containers: counting brackets bounds the depth without a scan.
    if raw.count(0x5B) + raw.count(0x7B) > MAX_DEPTH:  # "[" and "{"
        depth = nesting_depth(raw)
        if depth > MAX_DEPTH:
            raise RecordError(f"{what} record nests {depth} containers deep, over the limit of {MAX_DEPTH}", "too_deep")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise RecordError(f"{what} record has the wrong shape: {exc}", "wrong_shape") from None
    except msgspec.DecodeError as exc:
        raise RecordError(f"{what} record is not valid JSON: {exc}", "not_json") from None
    except RecursionError:
        # Only if the caller's own stack is already deep: MAX_DEPTH keeps msgspec far below the limit.
        raise RecordError(f"{what} record nests too deeply to decode here", "too_deep") from None
    except ValueError as exc:
        # Not expected after the checks above (msgspec raises UnicodeDecodeError for bad
        # UTF-8 in strings); caught so that decoding stays total.
        raise RecordError(f"{what} record could not be decoded: {exc}") from None


def decode_key(key: bytes | None) -> str:
    """A record's key as text (qtasks keys are task uuids); :class:`RecordError` if it is missing, empty or not UTF-8.

    Use it wherever a key read from a topic becomes a ``str`` (instead of ``key.decode()``).
    """
    if key is None:
        raise RecordError("record has no key", "no_key")
    text = _utf8(key, "record key").decode()
    if not text:
        raise RecordError("record key is empty", "no_key")
    return text


def decode_task(data: bytes | None, limit: int = 1_000_000) -> TaskRecord:
    """Decode a tasks-topic record; raise :class:`RecordError` with the reason."""
    try:
        record: TaskRecord = _decode(_task_decoder, data, limit, "task")
    except RecordError as exc:
        # A newer version may well change the shape: say so rather than "wrong shape".
        if exc.kind == "wrong_shape" and (version := _version_of(data)) > TASK_RECORD_VERSION:
            raise _newer(version) from None
        raise
    if not record.uuid or not record.task_name:
        raise RecordError("task record has an empty uuid or task_name", "wrong_shape")
    if record.v > TASK_RECORD_VERSION:
        raise _newer(record.v)
    if record.v < 1:
        raise RecordError(f"task record has version {record.v}: versions start at 1", "wrong_shape")
    if not 0.0 <= record.not_before < LATEST_DUE:  # NaN fails too
        raise RecordError(
            f"task record's not_before {record.not_before!r} is not a time between 1970 and the year 5138",
            "wrong_shape",
        )
    return record


class _Versioned(msgspec.Struct):
    v: int = TASK_RECORD_VERSION


_version_decoder = msgspec.json.Decoder(_Versioned)


def _version_of(data: Any) -> int:
    """The ``v`` of a task record of the wrong shape (one already checked for size and depth)."""
    try:
        return _version_decoder.decode(data).v
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError):
        return TASK_RECORD_VERSION


def _newer(version: int) -> RecordError:
    return RecordError(
        f"task record is of version {version}, written by a newer qtasks: this one reads version "
        f"{TASK_RECORD_VERSION} (upgrade the workers, then replay it)",
        "newer_version",
    )


def decode_status(data: bytes | None, limit: int = 1_000_000) -> Task:
    """Decode a status-topic record."""
    result: Task = _decode(_status_decoder, data, limit, "status")
    return result


def decode_status_head(data: bytes | None, limit: int = 1_000_000) -> StatusHead:
    """Decode only the head of a status record."""
    result: StatusHead = _decode(_head_decoder, data, limit, "status")
    return result


def head_of(task: Task) -> StatusHead:
    """The head of a full status record."""
    return StatusHead(
        uuid=task.uuid,
        status=task.status,
        rev=task.rev,
        attempt=task.attempt,
        worker=task.worker,
        lease_until=task.lease_until,
        updated_at=task.updated_at,
        retry_child_uuid=task.retry_child_uuid,
        source=task.source,
        released=task.released,
    )


def decode_result(data: bytes | None, limit: int = 1_000_000) -> ResultRecord:
    """Decode a results-topic record."""
    result: ResultRecord = _decode(_result_decoder, data, limit, "result")
    return result


def decode_control(data: bytes | None, limit: int = 1_000_000) -> ControlRecord:
    """Decode a control-topic record."""
    result: ControlRecord = _decode(_control_decoder, data, limit, "control")
    return result


def decode_tick(data: bytes | None, limit: int = 1_000_000) -> TickRecord:
    """Decode a schedule-topic record."""
    result: TickRecord = _decode(_tick_decoder, data, limit, "schedule")
    return result


def decode_dead_letter(data: bytes | None, limit: int = 4_000_000) -> DeadLetter:
    """Decode a dead-letter record."""
    result: DeadLetter = _decode(_dead_decoder, data, limit, "dead-letter")
    return result
