"""Periodic tasks: a heartbeat every second and a report on a cron schedule.

Two workers of one app run in this process (as two `qtasks run` processes would): one
of them ticks, and each tick runs once. Halfway through, that worker stops and the other
takes the ticking over without missing a tick. With no broker set this is ``memory://``;
``QTASKS_BROKER_URL=kafka://127.0.0.1:9092`` runs the same on Kafka.

    python docs/examples/periodic.py [SECONDS]
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys

from qtasks.asyncio import QueueTasks

url = os.environ.get("QTASKS_BROKER_URL", "memory://periodic-example")
ran: list[tuple[float, str]] = []  # (the tick, the worker that ran it: any, whichever ticked)


def make_worker(label: str) -> QueueTasks:
    app = QueueTasks(name="periodic_example", broker_url=url)

    @app.periodic(every=1, echo=True)
    async def heartbeat(self) -> str:
        task = await self.ctx.get_metadata()  # its status: not_before is the tick it runs for
        ran.append((task.not_before, label))
        return label

    @app.periodic(cron="0 9 * * mon-fri", tz="Europe/Paris", catch_up="skip")
    async def weekday_report() -> None:
        """At 09:00 Paris time on weekdays; ticks missed while no worker ran are skipped."""

    return app


async def main(seconds: float) -> None:
    first, second = make_worker("first"), make_worker("second")
    await first.start()
    await second.start()
    await asyncio.sleep(seconds / 2)
    leader = first if first.worker and first.worker.ticker.leading else second
    print(f"{len(ran)} ticks so far; the {'first' if leader is first else 'second'} worker ticks; stopping it")
    await leader.stop()
    await asyncio.sleep(seconds / 2)
    other = second if leader is first else first
    await other.stop()
    ticks = sorted(tick for tick, _ in ran)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    print(f"{len(ran)} runs for {len(set(ticks))} ticks, run by {sorted({who for _, who in ran})}; gaps {set(gaps)}")


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 6.0))
