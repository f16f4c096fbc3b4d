"""The CLI against a Kafka broker that cannot be reached (no broker needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from qtasks.cli import backoff

UNREACHABLE = "kafka://127.0.0.1:1?connect_timeout=1"


def qtasks(*args: str) -> list[str]:
    return [sys.executable, "-m", "qtasks", "-A", "tests.unit.cli_app:app", "--broker", UNREACHABLE, *args]


@pytest.mark.parametrize("command", [["status", "some-uuid"], ["add", "count", "3"]])
def test_a_command_against_an_unreachable_broker_prints_one_line(command: list[str]) -> None:
    result = subprocess.run(qtasks(*command), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["qtasks: cannot reach Kafka at 127.0.0.1:1 within 1 s"], result.stderr


#: Runs ``python -m qtasks`` with Ctrl-C's usual handler. A process started in the
#: background by a non-interactive shell (as a CI runner may start the suite) inherits
#: SIGINT *ignored*, and Python then keeps ignoring it, as ``nohup cmd &`` intends: the
#: test is about a worker a user can interrupt, so it gives the worker that handler.
INTERRUPTIBLE = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'qtasks'; runpy.run_module('qtasks', run_name='__main__')"
)


def test_a_worker_waits_for_its_broker_with_one_warning_until_interrupted() -> None:
    # PYTHONFAULTHANDLER: a worker that does not stop is made to print its threads' stacks.
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-c", INTERRUPTIBLE, *qtasks("run")[3:]]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env) as worker:
        try:
            watch(worker)
        except BaseException:
            worker.kill()
            raise


def watch(worker: subprocess.Popen[str]) -> None:
    assert worker.stderr is not None
    first = worker.stderr.readline()  # blocks until the worker has tried once (1 s)
    assert "WARNING qtasks.cli: waiting for Kafka at 127.0.0.1:1" in first, first
    time.sleep(2.5)  # two more attempts (backoff 1 s, 2 s): still waiting, still quiet
    assert worker.poll() is None
    worker.send_signal(signal.SIGINT)
    try:
        code = worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.send_signal(signal.SIGABRT)  # faulthandler prints where it is stuck
        pytest.fail(f"the worker ignored SIGINT; its stacks:\n{worker.stderr.read()}")
    rest = worker.stderr.read()
    assert code == 130
    assert rest == "", rest


@pytest.mark.parametrize(("attempt", "seconds"), [(0, 1.0), (1, 2.0), (4, 16.0), (5, 30.0), (50, 30.0)])
def test_backoff_doubles_up_to_its_cap(attempt: int, seconds: float) -> None:
    assert backoff(attempt) == seconds
