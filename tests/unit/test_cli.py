"""The CLI, run as a user runs it (a subprocess), and what ``run`` sets up in its process."""

from __future__ import annotations

import gc
import subprocess
import sys
import time

import pytest

from qtasks import cli


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qtasks", "-A", "tests.unit.cli_app:app", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_add_follow_streams_values_then_the_status() -> None:
    result = run("add", "count", "3", "-k", "label=x", "--follow")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:] == ["x0", "x1", "x2"]
    assert "success: 3 values" in result.stderr


def test_add_of_a_failing_task_exits_non_zero_with_the_error() -> None:
    result = run("add", "fail", "--follow")
    assert result.returncode == 1
    assert "RuntimeError: it broke" in result.stderr


def test_unknown_app_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qtasks", "-A", "tests.unit.nope:app", "status", "u"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "cannot import" in result.stderr


def test_add_follow_prints_a_plain_task_s_return_value() -> None:
    result = run("add", "add", "2", "3", "--follow")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ['{"sum":5}']
    assert "success: 0 values" in result.stderr


def test_add_follow_says_when_it_follows_a_retry() -> None:
    result = run("add", "flaky", "2", "--follow", "--no-progress")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert result.stdout.splitlines()[1:] == ["0", "0", "1"]
    retried = [line for line in result.stderr.splitlines() if "retried as" in line]
    assert len(retried) == 1, result.stderr
    assert retried[0].startswith(f"task {first} failed (ValueError: first run fails); retried as ")
    child = retried[0].rsplit(" ", 1)[1]
    assert "success: 3 values" in result.stderr and f"(task {child})" in result.stderr


def test_add_follow_prints_a_cancel_reason() -> None:
    result = run("add", "quits", "--follow")
    assert result.returncode == 1
    assert result.stdout.splitlines()[1:] == ["before"]
    assert "cancelled: changed my mind" in result.stderr


def test_memory_status_and_run_say_the_log_lives_in_one_process() -> None:
    status = run("status", "3b878272-66f2-4dbc-83e7-e54bb4289bb7")
    assert status.returncode == 1
    assert "memory:// keeps its log inside one process" in status.stderr
    with subprocess.Popen(
        [sys.executable, "-m", "qtasks", "-A", "tests.unit.cli_app:app", "run"],
        stderr=subprocess.PIPE,
        text=True,
    ) as worker:
        try:
            assert worker.stderr is not None
            line = worker.stderr.readline()
            assert "memory:// keeps its log inside one process: this worker" in line, line
        finally:
            worker.terminate()
            worker.wait(timeout=30)


def test_add_follow_gives_up_at_its_timeout() -> None:
    started = time.monotonic()
    result = run("add", "sleepy", "30", "--follow", "--timeout", "0.5")
    assert result.returncode == 2, result.stderr
    assert "gave up after 0.5 s: task " in result.stderr and "is still process" in result.stderr
    assert time.monotonic() - started < 20


def test_an_error_with_a_message_on_several_lines_is_shown_whole() -> None:
    result = run("add", "multiline", "--follow")
    assert result.returncode == 1
    assert "ValueError: first line second line" in result.stderr, result.stderr


@pytest.mark.parametrize(("setting", "first"), [(10_000, 10_000), (0, None)])
def test_run_gives_the_worker_process_its_collector_threshold(
    monkeypatch: pytest.MonkeyPatch, setting: int, first: int | None
) -> None:
    from tests.unit.cli_app import app

    seen: list[tuple[int, int, int]] = []

    async def serve(concurrency: int | None = None) -> None:
        seen.append(gc.get_threshold())

    monkeypatch.setattr(app, "serve", serve)
    monkeypatch.setattr(app.config, "worker_gc_threshold", setting)
    before = gc.get_threshold()
    try:
        assert cli.main(["-A", "tests.unit.cli_app:app", "run"]) == 0
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
    assert seen == [((first or before[0]), *before[1:])]


def test_text_from_records_never_drives_the_terminal() -> None:
    # Task names, reasons and values come from any producer: escapes are shown, not obeyed.
    shown = cli._table(["NAME"], [["evil\x1b]0;title\x07\x1b[2J\nnext"]])
    assert "\x1b" not in shown and "\x07" not in shown
    assert shown.splitlines()[1] == "evil\\x1b]0;title\\x07\\x1b[2J\\x0anext"
