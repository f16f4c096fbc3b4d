"""Python function calls per task on memory:// (a count that does not vary with the machine's load).

Runs one-value generator tasks (client, worker and log in this process: ``add_task`` one
at a time, then a wait for each) under cProfile at two sizes and prints the slope: the calls
one more task costs; then the objects each kind of task leaves in reference cycles, which
only the garbage collector frees (counted with the collector off). ``--otel`` instruments
the app with the OpenTelemetry SDK (a ``BatchSpanProcessor`` into an in-memory exporter) first.

    .venv/bin/python bench/profile_memory.py [--tasks 3000] [--otel]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import uuid


def calls(tasks: int, otel: bool) -> int:
    from qtasks.asyncio import QueueTasks

    app = QueueTasks(f"profile{uuid.uuid4().hex[:8]}", broker_url=f"memory://{uuid.uuid4().hex}", concurrency=64)
    if otel:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from qtasks.otel import instrument

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter(), max_queue_size=tasks * 4))
        instrument(app, tracer_provider=provider)

    @app.task
    async def one():  # type: ignore[no-untyped-def]
        yield 1

    async def main() -> None:
        await app.start()
        submitted = [await app.add_task("one") for _ in range(tasks)]
        for task in submitted:
            await app.wait(task.uuid, timeout=120)
        await app.stop()

    profile = cProfile.Profile()
    profile.enable()
    asyncio.run(main())
    profile.disable()
    return int(pstats.Stats(profile).total_calls)  # type: ignore[attr-defined]


def cycles(tasks: int) -> dict[str, float]:
    """Objects each kind of task leaves in reference cycles (what only the garbage collector frees)."""
    from qtasks.asyncio import QueueTasks

    app = QueueTasks(f"cycles{uuid.uuid4().hex[:8]}", broker_url=f"memory://{uuid.uuid4().hex}", concurrency=64)

    @app.task
    async def agen():  # type: ignore[no-untyped-def]
        yield 1

    @app.task
    def sgen():  # type: ignore[no-untyped-def]
        yield 1

    @app.task
    def plain():  # type: ignore[no-untyped-def]
        return 1

    @app.task
    async def fails():  # type: ignore[no-untyped-def]
        raise ValueError("meant to")

    found: dict[str, float] = {}

    async def run() -> None:
        await app.start()
        for name in ("agen", "sgen", "plain", "fails"):
            await app.add_task(name, timeout=30)  # first-use caches are not garbage
            gc.collect()
            gc.disable()
            try:
                for handle in await app.add_tasks(name, [()] * tasks):
                    await app.wait(handle.uuid, timeout=120)
                found[name] = gc.collect() / tasks
            finally:
                gc.enable()
        await app.stop()

    asyncio.run(run())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000, help="the larger size (the smaller is a third of it)")
    parser.add_argument("--otel", action="store_true", help="instrument the app with the OpenTelemetry SDK")
    args = parser.parse_args()
    small, large = args.tasks // 3, args.tasks
    low, high = calls(small, args.otel), calls(large, args.otel)
    print(f"{small} tasks: {low} calls; {large} tasks: {high} calls")
    print(f"calls per task: {(high - low) / (large - small):.0f}{' (traced)' if args.otel else ''}")
    left = ", ".join(f"{name} {count:.1f}" for name, count in cycles(small).items())
    print(f"objects left in reference cycles per task: {left}")


if __name__ == "__main__":
    main()
