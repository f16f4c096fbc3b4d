"""On Kafka too, an app outlives the event loop that first used it, and leaves nothing open."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import unique

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]


APP = """
import asyncio, time
from qtasks.asyncio import QueueTasks

app = QueueTasks(name="{name}", broker_url="{url}", tasks_partitions=2, results_partitions=2,
                 status_partitions=2, lease_interval=0.5, lease_timeout=3.0)

@app.task
async def gen(n):
    for i in range(n):
        yield i

async def submit():
    return (await app.add_task("gen", 3)).uuid

async def work(uuid):
    async with app:
        await app.start()
        print([v async for v in app.stream(uuid, timeout=60)])
"""


def run(broker_url: str, main: str, *flags: str) -> subprocess.CompletedProcess[str]:
    script = APP.format(name=unique("loops"), url=broker_url) + textwrap.dedent(main)
    return subprocess.run([sys.executable, *flags, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_client_under_one_asyncio_run_and_a_worker_under_the_next_leave_nothing_open(broker_url: str) -> None:
    # The client never closes the app: the end of its loop does. Nothing is reported as
    # unclosed (warnings are errors, development mode on).
    done = run(
        broker_url,
        """
        uuid = asyncio.run(submit())
        asyncio.run(work(uuid))
        asyncio.run(work(asyncio.run(submit())))
        """,
        "-X",
        "dev",
        "-W",
        "error",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[0, 1, 2]", "[0, 1, 2]"]
    for word in ("Unclosed", "Traceback", "never awaited", "Task was destroyed", "WARNING"):
        assert word not in done.stderr, done.stderr


def test_a_worker_left_running_when_its_loop_ends_is_named_and_the_program_exits(broker_url: str) -> None:
    done = run(
        broker_url,
        """
        async def forgetful():
            await app.start()
            print([v async for v in app.stream(await submit(), timeout=60)])

        started = time.monotonic()
        asyncio.run(forgetful())
        print(f"{time.monotonic() - started:.1f}")
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "[0, 1, 2]"
    assert "the event loop ended while app" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
