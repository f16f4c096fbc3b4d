"""The short-task path on a real broker, for a profiler (a benchmark aid, not a test).

    .venv/bin/python bench/profile_short.py submit --bootstrap 127.0.0.1:19392 [--tasks 10000]
    py-spy record -r 250 -f flamegraph -o docs/flamegraph-short-tasks.svg -- \\
        .venv/bin/python bench/profile_short.py work --bootstrap 127.0.0.1:19392

``submit`` queues N generator tasks of ``--k`` values (default 1) with ``add_tasks``, on
fresh topics (in its own process, so the profile holds no client work but ``app.wait``),
and writes the app's name and the uuids to a file;
``work`` runs a worker (concurrency 64) until every one of them has ended, then prints
tasks/s, this process's CPU per task, and the garbage collector's part of it (with Python's
thresholds, or with ``--run-collector`` those ``qtasks run`` sets).
The broker: ``make kafka-up KAFKA_PORT=19392``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import pathlib
import tempfile
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator

from qtasks.asyncio import QueueTasks
from qtasks.cli import tune_collector

UUIDS = pathlib.Path(tempfile.gettempdir()) / "qtasks-profile-short.uuids"


def make_app(bootstrap: str, name: str) -> QueueTasks:
    app = QueueTasks(name=name, broker_url=f"kafka://{bootstrap}", concurrency=64, log_level="WARNING")

    @app.task
    async def gen(k: int) -> AsyncIterator[int]:
        for i in range(k):
            yield i

    return app


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("submit", "work"))
    parser.add_argument("--bootstrap", default="127.0.0.1:19392")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=1, help="values per task (default 1)")
    parser.add_argument(
        "--run-collector", action="store_true", help="tune the garbage collector as `qtasks run` does (work)"
    )
    args = parser.parse_args()
    if args.mode == "submit":
        # Fresh topics each time: a worker's start reads its whole status topic, and what
        # earlier runs left there would be in the profile.
        name = f"profile{uuid_mod.uuid4().hex[:8]}"
        app = make_app(args.bootstrap, name)
        handles = await app.add_tasks("gen", [(args.k,)] * args.tasks)
        UUIDS.write_text("\n".join([name, *(h.uuid for h in handles)]))
        await app.stop()
        return
    name, *uuids = UUIDS.read_text().split()
    app = make_app(args.bootstrap, name)
    if args.run_collector:
        tune_collector(app.config)
    collector = Collector()
    await app.start()
    started, cpu = time.perf_counter(), time.process_time()
    gc.callbacks.append(collector.on)
    for uuid in uuids:
        assert (await app.wait(uuid, 600)).status == "success"
    gc.callbacks.remove(collector.on)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    n = len(uuids)
    print(f"{n / elapsed:,.0f} tasks/s, {cpu / n * 1e6:.0f} us CPU per task (after the worker's start)")
    print(
        f"the collector: {sum(collector.runs)} collections (by generation {collector.runs}), "
        f"{collector.cpu / n * 1e6:.0f} us CPU per task"
    )
    await app.stop()


class Collector:
    """The garbage collector's runs and the CPU they took (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.runs = [0, 0, 0]
        self.cpu = 0.0
        self._began = 0.0

    def on(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.process_time()
        else:
            self.cpu += time.process_time() - self._began
            self.runs[info["generation"]] += 1


if __name__ == "__main__":
    asyncio.run(main())
