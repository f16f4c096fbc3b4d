"""A three-stage pipeline (each stage reads the one before it as it produces, qtasks.Stream), then a chord.

readings -> smooth (a moving average, streamed on) -> alerts (a summary at the end). All
three are submitted at once and run at the same time; a value goes through all of them
while the first stage is still producing. With no broker set this is ``memory://``;
``QTASKS_BROKER_URL=kafka://127.0.0.1:9092`` runs the same on Kafka.

    python docs/examples/pipeline.py
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import deque

from qtasks import Stream
from qtasks.asyncio import QueueTasks

app = QueueTasks(name="sensors", broker_url=os.environ.get("QTASKS_BROKER_URL", "memory://sensors"))


@app.task
async def readings(n: int):
    """Stage 1: a sensor's readings, one every 20 ms."""
    for i in range(n):
        await asyncio.sleep(0.02)
        yield round(20 + 5 * math.sin(i / 3), 2)


@app.task
async def smooth(values: Stream[float], window: int = 3):
    """Stage 2: the moving average of the last `window` readings, as each comes."""
    last: deque[float] = deque(maxlen=window)
    async for value in values:
        last.append(value)
        yield round(sum(last) / len(last), 2)


@app.task
async def alerts(values: Stream[float], above: float) -> dict[str, int]:
    """Stage 3: how many smoothed values went above a threshold."""
    count = total = 0
    async for value in values:
        total += 1
        count += value > above
    return {"values": total, "above": count}


@app.task
async def hottest(series: list[list[float]]) -> dict[str, float]:
    """A chord's callback: the peak of each sensor's readings, once all of them have ended."""
    peaks = [max(values) for values in series]
    return {"sensor": peaks.index(max(peaks)), "peak": max(peaks)}


async def main() -> None:
    await app.start()
    first = await app.add_task("readings", 30)
    second = await app.add_task("smooth", first.uuid)
    third = await app.add_task("alerts", second.uuid, 23.0)
    shown = [v async for v in second.stream(timeout=30)]
    summary = await third.result(timeout=30)
    print(f"smoothed: {shown[:6]} ... ({len(shown)} values)")
    print(f"alerts: {summary}")
    # Fan out and in: three sensors' readings at once, then one callback with all of them.
    callback = await app.chord("readings", [(10,), (20,), (15,)], "hottest")
    print(f"hottest: {await callback.result(timeout=30)}")
    await app.stop()


if __name__ == "__main__":
    asyncio.run(main())
