"""Delayed tasks: reminders that run at their time, and one cancelled before it is due.

A worker and a client run in one process. With no broker set this is ``memory://``;
``QTASKS_BROKER_URL=kafka://127.0.0.1:9092`` runs the same on Kafka.

    python docs/examples/delayed.py
"""

from __future__ import annotations

import asyncio
import datetime
import os
import time

from qtasks.asyncio import QueueTasks

app = QueueTasks(name="reminders")


@app.task
async def remind(who: str, what: str) -> dict[str, object]:
    """Runs at (never before) the time it was given; returns when that was."""
    return {"who": who, "what": what, "at": time.time()}


async def main() -> None:
    if url := os.environ.get("QTASKS_BROKER_URL"):
        app.use_broker(url)
    await app.start()
    submitted = time.time()
    in_two = await app.add_task("remind", "ana", "stand up", countdown=2)
    at_three = await app.add_task(
        "remind", "bo", "drink water", eta=datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=3)
    )
    dropped = await app.add_task("remind", "cy", "never mind", countdown=2.5)
    later = await remind.starmap([("dee", "stretch"), ("eli", "walk")], countdown=1)  # a batch (add_tasks)
    print(f"submitted 5 reminders; status now: {in_two.task.status}, due in {in_two.task.not_before - submitted:.1f} s")
    await dropped.cancel("plans changed")

    for handle in [*later, in_two, at_three]:
        done = await handle.wait(timeout=30)
        due = handle.task.not_before - submitted
        ran = done.returning["at"] - submitted
        print(f"{done.returning['who']:>4}: due at +{due:.1f} s, ran at +{ran:.1f} s ({done.status})")
    gone = await dropped.wait(timeout=30)
    print(f"  cy: {gone.status} ({gone.cancel_reason}), never ran")
    await app.stop()


if __name__ == "__main__":
    asyncio.run(main())
