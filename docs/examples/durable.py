"""A queue that outlives its process, with no broker: file://.

Run it twice. The first run queues three tasks and exits before any runs; the second
finds them on disk and runs them (a third run finds them done).

    python docs/examples/durable.py [DIRECTORY]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from qtasks.asyncio import QueueTasks

directory = Path(sys.argv[1] if len(sys.argv) > 1 else Path(tempfile.gettempdir()) / "qtasks-durable-example")
app = QueueTasks(name="durable", broker_url=f"file://{directory}")
handles = directory / "queued.txt"


@app.task
async def resize(image: str, width: int):
    for step in ("load", "scale", "save"):
        yield f"{image}: {step} to {width}px"


async def main() -> None:
    if not handles.exists():
        queued = [await app.add_task("resize", name, 640) for name in ("a.png", "b.png", "c.png")]
        handles.write_text("\n".join(h.uuid for h in queued))
        print(f"queued {len(queued)} tasks in {directory}; run me again to run them")
        await app.stop()
        return
    await app.start()  # a worker: it finds the queued tasks on disk
    for uuid in handles.read_text().split():
        done = await app.wait(uuid, timeout=30)
        print(f"{done.status}: {done.returning[-1]}")
    await app.stop()


if __name__ == "__main__":
    asyncio.run(main())
