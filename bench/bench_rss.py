"""Memory over a long run on memory:// (a benchmark, not a test): does RSS level off?

    python bench/bench_rss.py [--tasks 1000000] [--every 100000] [--status-ttl 30]

Submits N no-op tasks in batches to one app with a worker, waits for each batch to
finish, and prints the process's resident set size after every ``--every`` tasks. What
is bounded and by what: the tasks and results topics by memory:// retention (16 MiB per
partition, 1 hour, unless the URL says otherwise), the status view by
``status_cache_size``, the compacted status topic by ``status_ttl`` (finished tasks are
tombstoned after it; with the default of a day, a day of statuses stays in the log,
which on memory:// is RAM).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import resource
import time
import uuid

from qtasks.asyncio import QueueTasks


def rss_mib() -> float:
    """The current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--status-ttl", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    app = QueueTasks(
        name=f"rss{uuid.uuid4().hex[:8]}",
        broker_url=f"memory://rss{uuid.uuid4().hex}",
        status_ttl=args.status_ttl,
        concurrency=args.concurrency,
    )

    @app.task
    async def noop() -> None:
        return None

    await app.start()
    print(f"python {platform.python_version()}; {args.tasks:,} no-op tasks, status_ttl={args.status_ttl} s")
    print(f"{'tasks':>10} {'RSS MiB':>8} {'view rows':>10} {'tasks/s':>8}")
    started = time.perf_counter()
    done = 0
    last_mark = started
    try:
        while done < args.tasks:
            batch = [await app.add_task("noop") for _ in range(args.batch)]
            for task in batch:
                finished = await app.wait(task.uuid, timeout=600)
                assert finished.status == "success", finished
            done += len(batch)
            if done % args.every == 0:
                now = time.perf_counter()
                rate = args.every / (now - last_mark)
                last_mark = now
                print(f"{done:>10,} {rss_mib():>8.0f} {len(app.view):>10,} {rate:>8,.0f}", flush=True)
    finally:
        await app.stop()
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    asyncio.run(main())
