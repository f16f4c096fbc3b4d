"""The redesign's pure decisions as tables (rev, slimming, admission, conclusion) and the supervisor."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from qtasks.decisions import ShareDelivery, admit, check_result, conclude
from qtasks.executor import Outcome
from qtasks.records import StatusHead, Task, TaskRecord, encode
from qtasks.status import StatusView, next_rev, slim
from qtasks.supervise import LoopFailedError, Supervisor, restart_delay

NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("held", "status", "expected"),
    [(-1, "new", 0), (-1, "process", 1), (0, "process", 1), (4, "success", 5), (7, "new", 0), (-1, "cancel", 1)],
)
def test_next_rev_puts_every_worker_write_above_new(held: int, status: str, expected: int) -> None:
    assert next_rev(held, status) == expected


def _task(**fields: Any) -> Task:
    base: dict[str, Any] = {"uuid": "u", "task_name": "t", "status": "new", "created_at": 1.0, "updated_at": 1.0}
    return Task(**{**base, **fields})


def test_a_late_new_never_replaces_a_process_written_by_a_worker_that_had_not_seen_it() -> None:
    view = StatusView()
    process = _task(status="process", rev=next_rev(view.rev("u"), "process"))
    view.apply(process, encode(process))
    late_new = _task(status="new", rev=next_rev(-1, "new"))
    assert view.apply(late_new, encode(late_new)) is False
    assert view.head("u") is not None and view.head("u").status == "process"  # type: ignore[union-attr]


def test_a_record_read_after_a_finished_one_it_cannot_replace_marks_the_task_stale_until_the_ending_is_read() -> None:
    view = StatusView()
    ending = _task(status="success", rev=2)
    view.apply_raw(b"u", encode(ending))
    late_new = _task(status="new", rev=0)
    view.apply_raw(b"u", encode(late_new))
    assert list(view.stale) == ["u"] and view.stale_found.is_set()
    assert view.head("u").status == "success"  # type: ignore[union-attr]
    view.apply_raw(b"u", encode(ending))  # the ending written again, read back
    assert view.stale == {}


def test_a_workers_own_ending_shown_before_its_older_writes_are_read_back_is_not_left_stale() -> None:
    view = StatusView()
    process, ending = _task(status="process", rev=1), _task(status="success", rev=2)
    view.apply(process, encode(process))
    view.apply(ending, encode(ending))  # shown at once, before the log has them
    view.apply_raw(b"u", encode(process))  # read back: older than what is shown, and before it in the topic
    assert view.stale == {}
    view.apply_raw(b"u", encode(ending))  # ... and the ending right after it
    assert view.stale == {}
    view.apply_raw(b"u", encode(_task(status="new", rev=0)))  # a record after the ending, read back
    assert list(view.stale) == ["u"]
    view.apply_raw(b"v", encode(_task(uuid="v", status="process", rev=1)))
    view.apply_raw(b"v", encode(_task(uuid="v", status="new", rev=0)))
    assert "v" not in view.stale  # a task not finished is never stale


def test_a_workers_own_ending_read_back_before_its_delivery_was_seen_is_not_awaited_forever() -> None:
    # The tailer can read a durable write back before the producer's acknowledgement of it
    # is handled: the write's own apply then comes second, and must not wait to be read
    # back again (it never would be), or a stale record after it is never noticed.
    view = StatusView()
    ending = _task(status="success", rev=2)
    view.apply_raw(b"u", encode(ending))  # read back first
    assert view.apply(ending, encode(ending))  # then the write's acknowledgement
    view.apply_raw(b"u", encode(_task(status="new", rev=0)))  # a stale record after the ending
    assert list(view.stale) == ["u"]


@pytest.mark.parametrize(
    ("fields", "status", "has_args", "returning"),
    [
        ({"status": "success", "args": ["x" * 900], "returning": "ok"}, "success", False, "ok"),
        ({"status": "success", "returning": "y" * 900}, "error", False, None),
        ({"status": "error", "traceback": "z" * 20_000, "returning": None}, "error", False, None),
    ],
)
def test_slim_fits_a_record_and_never_hides_a_lost_result(
    fields: dict[str, Any], status: str, has_args: bool, returning: Any
) -> None:
    task = _task(**fields)
    slimmed = slim(task, 600 if "traceback" not in fields else 9000)
    assert (slimmed.status, bool(slimmed.args), slimmed.returning) == (status, has_args, returning)
    assert task.status == fields["status"]  # a copy: the caller's task is unchanged


def _head(**fields: Any) -> StatusHead:
    return StatusHead(**{"uuid": "u", "status": "new", **fields})


REC = TaskRecord(uuid="u", task_name="t", created_at=NOW - 10)
OLD = TaskRecord(uuid="u", task_name="t", created_at=NOW - 100_000)


@pytest.mark.parametrize(
    ("head", "rec", "cancelled", "known", "expected"),
    [
        (None, REC, False, True, ("run", 1)),
        (_head(), REC, False, True, ("run", 1)),
        (_head(status="success"), REC, False, True, ("skip", 0)),
        (_head(status="retry"), REC, True, True, ("skip", 0)),
        (None, OLD, False, True, ("expired", 0)),
        (_head(status="process", worker="other", lease_until=NOW + 5, attempt=1), REC, False, True, ("wait", 0)),
        (_head(status="process", worker="other", lease_until=NOW - 1, attempt=1), REC, False, True, ("run", 2)),
        (_head(status="process", worker="me", lease_until=NOW + 5, attempt=1), REC, False, True, ("run", 2)),
        (_head(), REC, True, True, ("cancel", 1)),
        (_head(), REC, False, False, ("unknown", 1)),
    ],
)
def test_admit(
    head: StatusHead | None, rec: TaskRecord, cancelled: bool, known: bool, expected: tuple[str, int]
) -> None:
    decision = admit(head, rec, now=NOW, ttl=86_400, me="me", cancelled=cancelled, known=known)
    assert (decision.action, decision.attempt) == expected


def test_a_share_delivery_counts_its_run_before_it_starts_once_the_record_went_out_before() -> None:
    assert not ShareDelivery("0:1", 1, 5).announce_at_start
    assert ShareDelivery("0:1", 2, 5).announce_at_start
    assert ShareDelivery("0:1", 1, 5, again=True).announce_at_start


RUNNING_ELSEWHERE = _head(status="process", worker="other", lease_until=NOW + 5, attempt=1, source="0:7")


@pytest.mark.parametrize(
    ("head", "delivery", "cancelled", "expected"),
    [
        # The record whose lock the lease holder had came here: its lock is gone, so at once.
        (RUNNING_ELSEWHERE, ShareDelivery("0:7", 2, 5), False, ("run", 2)),
        # Another record of the same task runs elsewhere under its own lock: wait for it.
        (RUNNING_ELSEWHERE, ShareDelivery("1:3", 2, 5), False, ("wait", 0)),
        # The last delivery is not run: it goes out afresh, as fewer runs started than allowed ...
        (RUNNING_ELSEWHERE, ShareDelivery("0:7", 5, 5), False, ("again", 2)),
        (None, ShareDelivery("0:7", 5, 5), False, ("again", 1)),
        # ... but a task whose started runs reached limit - 1 is poison, at any delivery.
        (
            _head(status="process", worker="other", lease_until=NOW - 1, attempt=4),
            ShareDelivery("0:7", 2, 5),
            False,
            ("limit", 5),
        ),
        (
            _head(status="process", worker="other", lease_until=NOW - 1, attempt=3),
            ShareDelivery("0:7", 4, 5),
            False,
            ("run", 4),
        ),
        # Runs a stopping worker handed back did not die: they are not counted.
        (_head(status="process", attempt=6, released=3), ShareDelivery("0:7", 2, 5), False, ("run", 7)),
        # ... but a task that ended, or was cancelled, ends as it would have anyway.
        (_head(status="success", source="0:7"), ShareDelivery("0:7", 5, 5), False, ("skip", 0)),
        (None, ShareDelivery("0:7", 5, 5), True, ("cancel", 1)),
        (None, ShareDelivery("0:7", 4, 5), False, ("run", 1)),
    ],
)
def test_admit_in_share_mode(
    head: StatusHead | None, delivery: ShareDelivery, cancelled: bool, expected: tuple[str, int]
) -> None:
    decision = admit(head, REC, now=NOW, ttl=86_400, me="me", cancelled=cancelled, known=True, share=delivery)
    assert (decision.action, decision.attempt) == expected


@pytest.mark.parametrize(
    ("outcome", "is_generator", "left", "items", "expected"),
    [
        (Outcome("success", returning=3), False, 0, [], ("success", 3, False)),
        (Outcome("error", exc=ValueError("x")), False, 2, [], ("retry", None, False)),
        (Outcome("error", exc=ValueError("x")), False, 0, [], ("error", None, False)),
        (Outcome("cancel", cancel_reason="r"), False, 3, [], ("cancel", None, False)),
        (Outcome("success"), True, 0, [1, 2], ("success", [1, 2], False)),
        (Outcome("error", exc=ValueError("x")), True, 0, None, ("error", 7, True)),
    ],
)
def test_conclude(
    outcome: Outcome, is_generator: bool, left: int, items: list[int] | None, expected: tuple[str, Any, bool]
) -> None:
    done = conclude(outcome, is_generator=is_generator, retries_left=left, retry_on_exc=None, items=items, count=7)
    assert (done.status, done.returning, done.truncated) == expected


def test_check_result_turns_unstorable_results_into_errors() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    assert check_result("t", False, Outcome("success", returning=cyclic), 100).status == "error"
    assert check_result("t", False, Outcome("success", returning="x" * 200), 100).status == "error"
    assert check_result("t", False, Outcome("success", returning="ok"), 100).status == "success"


def test_restart_delay_is_capped() -> None:
    assert [restart_delay(n) for n in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert restart_delay(50) == 5.0


async def test_a_loop_that_raises_is_restarted() -> None:
    runs: list[float] = []
    third = asyncio.Event()

    async def flaky() -> None:
        runs.append(time.monotonic())
        if len(runs) < 3:
            raise RuntimeError("boom")
        third.set()
        await asyncio.sleep(60)

    supervisor = Supervisor("test")
    supervisor.spawn("flaky", flaky)
    await asyncio.wait_for(third.wait(), 10)
    assert supervisor.running() == ["flaky"] and supervisor.error is None
    await supervisor.stop()
    assert supervisor.running() == []


async def test_a_loop_that_keeps_failing_is_fatal_and_wakes_whoever_waits() -> None:
    fatal: list[BaseException] = []

    async def broken() -> None:
        raise RuntimeError("always")

    supervisor = Supervisor("test", on_fatal=fatal.append, max_failures=2)
    supervisor.spawn("broken", broken)
    never = asyncio.Event()
    with pytest.raises(LoopFailedError, match="broken failed 2 times"):
        await supervisor.wait(never.wait(), timeout=10)
    assert len(fatal) == 1
    await supervisor.stop()


async def test_a_wait_whose_caller_is_cancelled_leaves_nothing_waiting_behind() -> None:
    # The status view's catch-up waits through the supervisor; a rebalance cancels it.
    supervisor = Supervisor("test")
    started, ended = asyncio.Event(), asyncio.Event()

    async def behind() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            ended.set()

    waiter = asyncio.ensure_future(supervisor.wait(behind(), timeout=60))
    await asyncio.wait_for(started.wait(), 10)
    waiter.cancel()
    await asyncio.wait((waiter,))
    assert waiter.cancelled()
    await asyncio.wait_for(ended.wait(), 1)  # the job was cancelled with its caller
    await supervisor.stop()


async def test_a_loop_that_returns_is_restarted_too() -> None:
    runs = 0
    third = asyncio.Event()

    async def returns() -> None:
        nonlocal runs
        runs += 1
        if runs > 2:
            third.set()
            await asyncio.sleep(60)

    supervisor = Supervisor("test")
    supervisor.spawn("returns", returns)
    await asyncio.wait_for(third.wait(), 10)
    await supervisor.stop()
