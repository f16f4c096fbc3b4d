"""qtasks' logs show without any set-up, at the app's ``log_level``; a program's own logging wins."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import asyncio, logging
{configure}
from qtasks.asyncio import QueueTasks

app = QueueTasks(name="logs", broker_url="memory://logs"{settings})
{configure_after}

@app.task(echo=True)
async def job(self):
    self.ctx.get_logger().info("an info line from the task")
    self.ctx.get_logger().warning("a warning line from the task")
    return 1

async def main():
    await app.start()
    task = await app.add_task("job", timeout=10)
    assert task is not None and task.status == "success", task
    await app.stop()

asyncio.run(main())
"""


def run(configure: str = "", settings: str = "", configure_after: str = "") -> str:
    code = textwrap.dedent(SCRIPT).format(configure=configure, settings=settings, configure_after=configure_after)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_a_task_s_log_lines_show_when_the_program_configured_no_logging() -> None:
    err = run()
    lines = [line for line in err.splitlines() if "from the task" in line]
    assert len(lines) == 2, err
    assert "INFO qtasks.job: an info line from the task" in lines[0]
    assert "WARNING qtasks.job: a warning line from the task" in lines[1]
    assert "INFO qtasks.worker: worker" in err  # the worker's own lines too


def test_log_level_hides_what_is_below_it() -> None:
    err = run(settings=', log_level="WARNING"')
    assert "an info line" not in err
    assert "a warning line from the task" in err


MINE = 'logging.basicConfig(level=logging.INFO, format="MINE %(name)s %(message)s")'


@pytest.mark.parametrize(("before", "after"), [(MINE, ""), ("", MINE)])
def test_the_program_s_own_logging_configuration_wins(before: str, after: str) -> None:
    # Before the app exists or after it: the program's format, and nothing written twice.
    err = run(configure=before, configure_after=after)
    lines = [line for line in err.splitlines() if "an info line" in line]
    assert lines == ["MINE qtasks.job an info line from the task"], err


def test_the_program_s_levels_win_too() -> None:
    # The program asked for warnings only: qtasks' info lines follow it.
    err = run(configure='logging.basicConfig(level=logging.WARNING, format="MINE %(name)s %(message)s")')
    assert "an info line" not in err and "INFO qtasks.worker" not in err, err
    assert "MINE qtasks.job a warning line from the task" in err.splitlines()


def test_a_level_the_program_set_on_qtasks_is_kept() -> None:
    err = run(configure='logging.getLogger("qtasks").setLevel(logging.WARNING)')
    assert "an info line" not in err and "INFO qtasks.worker" not in err, err
    assert any("WARNING qtasks.job: a warning line from the task" in line for line in err.splitlines()), err


def test_a_client_program_that_configures_logging_after_its_app_is_made_is_followed() -> None:
    # No worker start to look again: the first line after the configuration hands over.
    code = textwrap.dedent(
        """
        import logging
        from qtasks.asyncio import QueueTasks

        app = QueueTasks(name="late", broker_url="memory://late")
        logging.basicConfig(level=logging.WARNING, format="MINE %(name)s %(message)s")
        log = logging.getLogger("qtasks.late")
        log.info("first info")
        log.info("second info")
        log.warning("a warning")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "MINE qtasks.late a warning" in lines and not any("second info" in line for line in lines), lines


JSON_SCRIPT = """
import asyncio, logging
from qtasks.asyncio import QueueTasks

app = QueueTasks(name="jsonlogs", broker_url="memory://jsonlogs", log_format="json")

@app.task(echo=True)
async def in_loop(self):
    self.ctx.get_logger().info("from the loop", extra={"order": 42})
    return 1

@app.task(echo=True)
def in_thread(self):
    self.ctx.get_logger().warning("from a thread")
    return 2

@app.task
def fails():
    raise ValueError("it fails")

async def main():
    await app.start()
    for name in ("in_loop", "in_thread", "fails"):
        task = await app.add_task(name, timeout=10)
        print(name, task.uuid, flush=True)
    await app.stop()

asyncio.run(main())
"""


def test_json_logs_are_one_object_a_line_naming_the_task_on_every_line_about_it() -> None:
    done = subprocess.run([sys.executable, "-c", JSON_SCRIPT], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    uuids = dict(line.split() for line in done.stdout.splitlines())
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    by_message = {line["message"]: line for line in lines}
    loop_line = by_message["from the loop"]
    assert loop_line["task_uuid"] == uuids["in_loop"] and loop_line["task_name"] == "in_loop"
    assert loop_line["attempt"] == 1 and loop_line["level"] == "INFO" and loop_line["logger"] == "qtasks.in_loop"
    assert loop_line["order"] == 42  # extra= fields go in the object
    thread_line = by_message["from a thread"]  # a sync task logs from a pool thread
    assert (thread_line["task_uuid"], thread_line["attempt"]) == (uuids["in_thread"], 1)
    failed = [line for line in lines if line["logger"] == "qtasks.worker" and "failed" in line["message"]]
    assert [(line["task_uuid"], line["task_name"]) for line in failed] == [(uuids["fails"], "fails")]
    started = [line for line in lines if line["message"].startswith("worker ")]
    assert started and "task_uuid" not in started[0]  # a line about no task names none
    assert lines[0]["time"].endswith("Z")


async def test_a_record_s_handler_does_not_inherit_the_task_of_the_handler_before_it() -> None:
    import asyncio
    import logging

    from qtasks.asyncio import QueueTasks
    from qtasks.logs import current_task
    from tests.helpers import FAST, unique

    seen: list[tuple[str, object]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), current_task.get()))

    app = QueueTasks(name=unique(), broker_url=f"memory://{unique('log')}", concurrency=1, prefetch=1, **FAST)
    go_on = asyncio.Event()

    @app.task
    async def first() -> None:
        await go_on.wait()

    handler = Capture()
    logging.getLogger("qtasks.worker").addHandler(handler)
    try:
        worker = await app.start()
        task = await app.add_task("first")
        await app.view.wait_for(task.uuid, lambda h: h is not None and h.status != "new", 10)
        # A bad record waits for the slot the task holds: its handler starts as the task ends,
        # from the code that frees the slot, and must not carry the task.
        await app.broker.producer.send(app.topics.tasks, b"{bad", key=b"bad", partition=0)
        async with asyncio.timeout(10):
            while True:
                if worker._backlog:
                    break
                await asyncio.sleep(0.01)
            go_on.set()
            while True:
                if any("dead-letter" in message for message, _ in seen):
                    break
                await asyncio.sleep(0.01)
    finally:
        logging.getLogger("qtasks.worker").removeHandler(handler)
        await app.stop(timeout=2)
    [(_, named)] = [(m, t) for m, t in seen if "dead-letter" in m]
    assert named is None, f"the dead letter's line names task {named} (the earlier task was {task.uuid})"
