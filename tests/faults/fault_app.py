"""The app the fault tests run in worker processes (``qtasks -A tests.faults.fault_app:app run``).

The app name comes from ``QTASKS_FAULT_APP_NAME`` so that every test has its own
topics and consumer group; every other setting comes from ``QTASKS_*`` variables.
Every value a task yields carries the pid of the process that ran it, so a test can
tell which process produced which value (and count executions).

``qtasks run`` configures no logging handler, so this module sends the INFO logs of
the worker (assignments, take-overs) to stderr, which the tests redirect to a file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time

from qtasks.asyncio import QueueTasks

logging.basicConfig(
    level=logging.INFO,
    stream=sys.stderr,
    format="%(asctime)s pid=%(process)d %(name)s %(levelname)s %(message)s",
)

app = QueueTasks(name=os.environ.get("QTASKS_FAULT_APP_NAME", "qtasks_fault"))


def _exit_with_parent(parent: int) -> None:
    """A process started by a test dies with the test run (no orphan workers if pytest is killed)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(3)


if os.environ.get("QTASKS_FAULT_PARENT_PID"):
    threading.Thread(target=_exit_with_parent, args=(int(os.environ["QTASKS_FAULT_PARENT_PID"]),), daemon=True).start()


@app.task
async def gen(n: int, delay: float = 0.0):
    """``n`` values ``{"i": i, "pid": pid}``, with ``await asyncio.sleep(delay)`` before each."""
    pid = os.getpid()
    for i in range(n):
        await asyncio.sleep(delay)
        yield {"i": i, "pid": pid}


@app.task
async def long_run(seconds: int, step: float = 0.1):
    """Runs ``seconds`` seconds in small sleeps, one value per second."""
    pid = os.getpid()
    per_second = max(1, round(1.0 / step))
    for i in range(seconds):
        for _ in range(per_second):
            await asyncio.sleep(step)
        yield {"i": i, "pid": pid}
