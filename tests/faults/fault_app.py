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
import signal
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


@app.task
async def kill_my_worker(delay: float = 0.5):
    """A poison task: it kills the process running it (SIGKILL, so nothing is handed back), after a value."""
    yield {"pid": os.getpid()}
    await asyncio.sleep(delay)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(echo=True)
async def crunch(self, n: int, delay: float = 0.05):
    """``n`` steps of work, a checkpoint after each; a run taken over goes on from the last one.

    Every step is logged (``STEP <uuid> <i> pid=<pid>`` on stderr), so a test counts the
    work done, not only the values committed.
    """
    pid = os.getpid()
    state = self.ctx.resume_state
    for i in range(state["next"] if state else 0, n):
        print(f"STEP {self.ctx.task_uuid} {i} pid={pid}", file=sys.stderr, flush=True)
        await asyncio.sleep(delay)
        yield {"i": i, "pid": pid}
        self.ctx.checkpoint({"next": i + 1})


@app.task(echo=True)
async def block_once(self, seconds: float, marker: str, release: str | None = None):
    """Blocks the worker's event loop for ``seconds`` (``time.sleep`` in async code), once:
    the first run creates ``marker``, a run that finds it returns at once. The block ends
    sooner once ``release`` exists (a test that wants to try again)."""
    if os.path.exists(marker):  # noqa: ASYNC240 - blocking on purpose, as the sleep below
        return "again"
    # Its own ``process`` status (exactly-once: in its partition's transaction) reaches the
    # broker first, so that transaction is open there as the loop stops.
    await asyncio.sleep(0.2)
    with open(marker, "w") as f:  # noqa: ASYNC230
        f.write(str(os.getpid()))
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (release and os.path.exists(release)):  # noqa: ASYNC240
        time.sleep(0.05)  # noqa: ASYNC251 - a bug a user may well write: nothing on this loop runs meanwhile
    return "blocked"


if os.environ.get("QTASKS_FAULT_PERIODIC"):

    @app.periodic(every=1)
    async def beat():
        """A periodic task (only in the tests that ask for it): one value, so its executions can be counted."""
        yield {"pid": os.getpid()}
