"""Moving from QTasks: tasks in routers and shared tasks, app-wide middlewares, one app.

The tasks live in ``docs/examples/shop/`` (modules that never import the app). With no
broker set this is ``memory://``; ``QTASKS_BROKER_URL=kafka://127.0.0.1:9092`` runs the
same on Kafka.

    python docs/examples/routers.py
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shop import audit, orders

from qtasks.asyncio import QueueTasks

app = QueueTasks(name="shop", broker_url=os.environ.get("QTASKS_BROKER_URL", "memory://shop"))
app.include_router(orders.router)  # the orders module's tasks
app.add_middleware(audit.Noted, position="after")  # after every task of the app


async def main() -> None:
    await app.start()
    items = [{"sku": "tea", "price": 450, "qty": 2}, {"sku": "mug", "price": 1200, "qty": 1}]
    done = await orders.total.add_task(items, timeout=20)  # a router's task submits through its app
    print(f"total: {done.returning} cents ({done.status})")
    async for line in (await app.add_task("pick", items)).stream(timeout=20):
        print(line)
    shared = await app.add_task("audit", "order 7 paid", timeout=20)  # a shared task: every app has it
    print(shared.returning)
    await app.stop()
    print("\n".join(audit.seen))


if __name__ == "__main__":
    asyncio.run(main())
