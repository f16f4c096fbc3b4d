"""The worker's decisions, as pure functions tested with tables: no I/O, no clock of their own.

- :func:`admit`: what to do with a task record that was delivered (run it, skip it,
  wait for another worker's lease, end it as cancelled or as an unknown task).
- :func:`check_result`: a result that cannot be stored becomes an error.
- :func:`conclude`: the terminal status, ``returning`` and whether to retry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from qtasks.executor import Outcome
from qtasks.records import Status, StatusHead, TaskRecord, encode
from qtasks.retry import should_retry

Action = Literal["run", "skip", "expired", "wait", "cancel", "unknown", "limit", "again"]

#: What encoding a value can raise: not JSON, cyclic, an int out of range, NaN rules.
ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError)


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """What the worker does with a delivered task record; ``attempt`` is the run's number."""

    action: Action
    attempt: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ShareDelivery:
    """Share mode: how the share group handed a task record to this worker."""

    #: The record, as a run's ``source`` names it (``partition:offset`` of the tasks topic).
    source: str
    #: How many times the group has handed it out, this time included (1: the first).
    count: int
    #: The group's delivery limit: after this delivery the broker archives the record.
    limit: int
    #: The record was sent afresh at the last delivery of an earlier one (its header says so).
    again: bool = False

    @property
    def last(self) -> bool:
        """The broker hands this record out no more: nothing would end the task if this run died."""
        return self.count >= self.limit

    @property
    def announce_at_start(self) -> bool:
        """A record handed out before (or sent afresh) is run with its ``process`` status stored
        first, so each run that starts is counted (``attempt``) even if its worker dies at once."""
        return self.count > 1 or self.again


def admit(
    head: StatusHead | None,
    rec: TaskRecord,
    *,
    now: float,
    ttl: float,
    me: str,
    cancelled: bool,
    known: bool,
    fenced: bool = False,
    share: ShareDelivery | None = None,
) -> Admission:
    """Decide about a delivered record from the task's status head.

    - finished already (a redelivery after a crash before the commit): ``skip``;
    - no status although it is older than ``status_ttl``: it ran long ago (``expired``);
    - running under another worker's live lease (a rebalance moved it): ``wait``; but not
      when ``fenced`` (exactly-once: this worker fenced the partition's previous owner, which
      can commit nothing more, so the task is taken over at once); nor in share mode when
      the lease holder runs this very record: the group hands a record out again only once
      its holder's lock is gone (dead, frozen past the lock, or disconnected);
    - cancelled while queued: ``cancel``; a name this worker does not know: ``unknown``;
    - share mode, a task whose started runs (``attempt``, less those a stopping worker
      handed back) reached ``limit - 1`` without an ending: ``limit`` (it is poison: the worker ends it as error); else the record's last
      delivery: ``again`` (it is not run, because a run that died now would leave the task
      without an ending, and the deliveries before may have been hand-backs: the worker sends
      the record afresh, whose deliveries count from 1, and acknowledges this one);
    - otherwise ``run`` as attempt n + 1 (a lapsed lease is taken over).
    """
    if head is not None and head.is_finished:
        return Admission("skip")
    if head is None and ttl > 0 and rec.created_at < now - ttl:
        return Admission("expired")
    if (
        not fenced
        and head is not None
        and head.status == "process"
        and head.worker not in (None, me)
        and head.lease_until > now
        and (share is None or head.source != share.source)
    ):
        return Admission("wait")
    attempt = (head.attempt if head is not None else 0) + 1
    if cancelled:
        return Admission("cancel", attempt)
    if not known:
        return Admission("unknown", attempt)
    if share is not None:
        if head is not None and head.attempt - head.released >= share.limit - 1:
            return Admission("limit", attempt)
        if share.last:
            return Admission("again", attempt)
    return Admission("run", attempt)


def check_result(task_name: str, is_generator: bool, outcome: Outcome, limit: int) -> Outcome:
    """A function's result that cannot be stored (not JSON, cyclic, over ``limit`` bytes) is an error."""
    if outcome.status != "success" or is_generator:
        return outcome
    try:
        size = len(encode(outcome.returning))
    except ENCODE_ERRORS as exc:
        problem = f"the result of task {task_name!r} cannot be encoded as JSON: {type(exc).__name__}: {exc}"
    else:
        if size <= limit:
            return outcome
        problem = f"the result of task {task_name!r} is {size} bytes encoded, over returning_max_bytes={limit}"
    return Outcome("error", exc=TypeError(problem), traceback=f"TypeError: {problem}", yield_count=outcome.yield_count)


@dataclasses.dataclass(frozen=True, slots=True)
class Conclusion:
    """How a run is written down."""

    status: Status
    returning: Any
    truncated: bool
    #: Retries the child task gets (only when ``status == "retry"``).
    retries_left: int = 0


def conclude(
    outcome: Outcome,
    *,
    is_generator: bool,
    retries_left: int,
    retry_on_exc: Sequence[type[BaseException]] | None,
    items: list[Any] | None,
    count: int,
) -> Conclusion:
    """The terminal status of a run and what ``returning`` holds.

    A generator's ``returning`` is its list of handled values (``items``), or their
    ``count`` once the list outgrew its bound (``truncated``), whatever the status;
    a function's is its result on success, else None.
    """
    retrying = (
        outcome.status == "error" and outcome.exc is not None and should_retry(outcome.exc, retries_left, retry_on_exc)
    )
    status: Status = "retry" if retrying else outcome.status
    if is_generator:
        return Conclusion(status, items if items is not None else count, items is None, retries_left - 1)
    returning = outcome.returning if outcome.status == "success" else None
    return Conclusion(status, returning, False, retries_left - 1)
