"""Ordering keys: three devices' events, interleaved, each device's applied one at a time in order.

With no broker set this is ``memory://``; ``QTASKS_BROKER_URL=kafka://127.0.0.1:9092``
runs the same on Kafka.

    python docs/examples/ordering.py
"""

from __future__ import annotations

import asyncio
import os
import random

from qtasks.asyncio import QueueTasks

app = QueueTasks(name="devices", broker_url=os.environ.get("QTASKS_BROKER_URL", "memory://devices"), concurrency=16)
applied: dict[str, list[int]] = {}


@app.task
async def apply(device: str, seq: int) -> None:
    """Apply one event; the sleep stands for work of varying length."""
    await asyncio.sleep(random.uniform(0.0, 0.02))
    applied.setdefault(device, []).append(seq)


async def main() -> None:
    await app.start()
    handles = []
    for seq in range(10):
        for device in ("pump-1", "pump-2", "valve-9"):
            handles.append(await app.add_task("apply", device, seq, key=device))
    for handle in handles:
        await handle.wait(timeout=30)
    await app.stop()
    for device, seqs in sorted(applied.items()):
        print(f"{device}: {seqs} ({'in order' if seqs == sorted(seqs) else 'OUT OF ORDER'})")


if __name__ == "__main__":
    asyncio.run(main())
