"""Hot-path benchmarks on memory:// (not tests): per-yield emit and per-task overhead.

    python bench/bench_memory.py [--yields 1000000] [--tasks 100000] [--file [--fsync interval|always|never]]

``--file`` runs the same on ``file://`` (the memory log with its journal on disk, in a
fresh temporary directory per app), with the journal's ``--fsync`` policy.

1. One async generator yielding N small values through executor + worker + memory
   connector (each value encoded and appended as its own result record), against a bare
   Python loop over the same generator: the ratio is the engine's overhead per yield.
   The same for a sync generator (it runs in a thread; values cross to the loop in batches).
2. N no-op tasks submitted with one add_task at a time, then with one add_tasks (no worker).
3. N no-op tasks submitted and run to their terminal status: tasks per second.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import sys
import tempfile
import time
import uuid

from qtasks.asyncio import QueueTasks
from qtasks.connectors.file_log import close_file_log
from qtasks.connectors.memory import drop_log

#: ``--file``: the fsync policy of a file:// log (None: memory://).
FSYNC: str | None = None


def make_app() -> QueueTasks:
    name = f"bench{uuid.uuid4().hex[:8]}"
    if FSYNC is None:
        return QueueTasks(name=name, broker_url=f"memory://bench{uuid.uuid4().hex}")
    directory = tempfile.mkdtemp(prefix="qtasks-bench-")
    return QueueTasks(name=name, broker_url=f"file://{directory}?fsync={FSYNC}")


async def agen(n: int):
    for i in range(n):
        yield i


def sgen(n: int):
    yield from range(n)


async def bare_loop(n: int) -> float:
    started = time.perf_counter()
    async for _ in agen(n):
        pass
    return time.perf_counter() - started


async def bench_yields(n: int, kind: str) -> float:
    app = make_app()
    app.task(name="gen")(agen if kind == "async" else sgen)
    await app.start()
    try:
        started = time.perf_counter()
        task = await app.add_task("gen", n, timeout=600)
        elapsed = time.perf_counter() - started
        assert task is not None and task.status == "success" and task.yield_count == n, task
        return elapsed
    finally:
        await app.stop()
        if FSYNC is None:
            drop_log(app.broker_url)
        else:
            close_file_log(app.broker_url)
        gc.collect()


async def bench_noop(n: int, concurrency: int) -> float:
    app = make_app()
    app.config.concurrency = concurrency

    @app.task
    async def noop() -> None:
        return None

    await app.start()
    try:
        started = time.perf_counter()
        tasks = [await app.add_task("noop") for _ in range(n)]
        last = await app.wait(tasks[-1].uuid, timeout=600)
        for t in tasks[:: max(1, n // 100)]:
            assert (await app.wait(t.uuid, timeout=600)).status == "success"
        elapsed = time.perf_counter() - started
        assert last.status == "success"
        return elapsed
    finally:
        await app.stop()


async def bench_submit(n: int) -> tuple[float, float]:
    """Seconds to submit n tasks one add_task at a time, then with one add_tasks (no worker)."""
    app = make_app()

    @app.task
    async def noop() -> None:
        return None

    try:
        started = time.perf_counter()
        for _ in range(n):
            await app.add_task("noop")
        one = time.perf_counter() - started
        started = time.perf_counter()
        handles = await app.add_tasks("noop", [()] * n)
        bulk = time.perf_counter() - started
        assert len(handles) == n
        return one, bulk
    finally:
        await app.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--yields", type=int, default=1_000_000)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--file", action="store_true", help="on file:// (a journal on disk) instead of memory://")
    parser.add_argument("--fsync", choices=("interval", "always", "never"), default="interval")
    args = parser.parse_args()
    global FSYNC
    FSYNC = args.fsync if args.file else None
    where = f"file:// (fsync={args.fsync})" if args.file else "memory://"
    print(f"python {platform.python_version()} on {platform.machine()}, {sys.platform}; {where}")
    n = args.yields
    bare = await bare_loop(n)
    print(f"bare async-generator loop : {n / bare:>12,.0f} yields/s  ({bare:.2f} s for {n:,})")
    for kind in ("async", "sync"):
        t = await bench_yields(n, kind)
        print(f"qtasks {kind:5} generator     : {n / t:>12,.0f} yields/s  ({t:.2f} s; {t / bare:.1f}x the bare loop)")
    one, bulk = await bench_submit(args.tasks)
    print(
        f"add_task one at a time     : {args.tasks / one:>12,.0f} tasks/s   ({one:.2f} s for {args.tasks:,}; no worker)"
    )
    print(f"add_tasks, one call        : {args.tasks / bulk:>12,.0f} tasks/s   ({bulk:.2f} s; {one / bulk:.1f}x)")
    t = await bench_noop(args.tasks, args.concurrency)
    print(
        f"qtasks no-op tasks        : {args.tasks / t:>12,.0f} tasks/s   ({t:.2f} s for {args.tasks:,}, concurrency {args.concurrency})"
    )


if __name__ == "__main__":
    asyncio.run(main())
