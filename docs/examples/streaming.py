"""The main job: a generator task whose values stream live to the terminal.

A worker and a client run in one process. With no broker set this is ``memory://``;
``QTASKS_BROKER_URL=kafka://127.0.0.1:9092`` runs the same on Kafka (``make run BROKER=kafka``).

    python docs/examples/streaming.py [N]
"""

from __future__ import annotations

import asyncio
import sys
import time

from qtasks.asyncio import QueueTasks
from qtasks.config import redact_url

app = QueueTasks(name="demo")


def label(value: dict[str, float]) -> str:
    """generate_handler: applied to every yielded value before it is written."""
    return f"tick {value['i']:>3}  sqrt={value['sqrt']:.4f}"


@app.task(echo=True, generate_handler=label, max_time=120)
async def ticks(self, n: int, delay: float = 0.05):
    """Yield n values, one every `delay` seconds; each reaches the client as it is yielded."""
    log = self.ctx.get_logger()
    meta = await self.ctx.get_metadata()
    log.info("running %s (status %s, attempt %d)", self.ctx.task_uuid, meta.status, meta.attempt)
    for i in range(n):
        await self.ctx.sleep(delay)
        yield {"i": i, "sqrt": i**0.5}


async def main(n: int) -> None:
    await app.start()
    try:
        task = await app.add_task("ticks", n)
        print(f"task {task.uuid} on {redact_url(app.broker_url)}")
        started = time.monotonic()
        async for value in app.stream(task.uuid):
            print(f"{time.monotonic() - started:6.3f}s  {value}", flush=True)
        final = await app.wait(task.uuid, timeout=30)
        print(f"status={final.status} yield_count={final.yield_count} attempt={final.attempt}")
    finally:
        await app.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
