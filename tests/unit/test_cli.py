"""The CLI, run as a user runs it (a subprocess)."""

from __future__ import annotations

import subprocess
import sys


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
