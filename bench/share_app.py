"""The app bench/bench_share.py runs in its worker processes (``qtasks -A share_app:app run``, from bench/).

The app name comes from ``BENCH_SHARE_APP``, so that every run has fresh topics and
groups; every other setting (``processing_mode``, ``tasks_partitions``) from ``QTASKS_*``
variables. ``qtasks run`` configures no logging handler, so the worker's INFO logs
(assignments, share-group membership, warnings) go to stderr here, which the benchmark
keeps in a file per process and reads to know when the workers are in their group, the
CPU used before the first task, and how many tasks each process ran.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator

from qtasks.asyncio import QueueTasks

logging.basicConfig(
    level=logging.INFO,
    stream=sys.stderr,
    format="%(asctime)s pid=%(process)d %(name)s %(levelname)s %(message)s",
)

app = QueueTasks(name=os.environ.get("BENCH_SHARE_APP", "bench_share"))

#: Tasks run in this process (the first one logs the CPU used before it; the count is logged at exit).
_ran = 0


@atexit.register
def _report() -> None:
    print(f"BENCH ran {_ran} tasks", file=sys.stderr, flush=True)


def _exit_with_parent(parent: int) -> None:
    """A worker dies with the benchmark that started it (none is left behind if it is killed)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(3)


if os.environ.get("BENCH_PARENT_PID"):
    threading.Thread(target=_exit_with_parent, args=(int(os.environ["BENCH_PARENT_PID"]),), daemon=True).start()


@app.task
async def gen(k: int, delay: float = 0.0) -> AsyncIterator[int]:
    """``await asyncio.sleep(delay)``, then ``k`` values (0 .. k-1)."""
    global _ran
    _ran += 1
    if _ran == 1:
        # The CPU of start-up and joining, which the benchmark leaves out of the CPU per task.
        print(f"BENCH first task, cpu {time.process_time():.3f}", file=sys.stderr, flush=True)
    if delay:
        await asyncio.sleep(delay)
    for i in range(k):
        yield i
