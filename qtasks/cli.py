"""The command line: ``qtasks -A module:app run | add | status | inspect | tasks | cancel | dlq | tail``.

- ``run [--concurrency N] [--guarantee at_least_once|exactly_once] [--metrics-port P]
  [--log-format text|json]``: a worker in the foreground (SIGINT/SIGTERM stop it
  gracefully). ``--guarantee`` sets the worker's ``processing_guarantee``; clients of an
  exactly-once app should set it too (in the app or ``QTASKS_PROCESSING_GUARANTEE``), so
  they read committed records only. ``--metrics-port`` serves ``/metrics``, ``/healthz``
  and ``/readyz`` (docs/operations.md).
- ``add NAME [ARGS...] [-k key=value ...] [--follow]``: submit a task; with ``--follow``,
  stream its values to the terminal live, then its final status. Arguments are read as
  JSON when they parse (``3``, ``"x"``, ``[1,2]``), else as strings. On ``memory://``
  the log lives in this process, so ``add`` runs a worker here too.
- ``status UUID``: the task's status as JSON.
- The operator's commands, each with ``--json`` for scripts (docs/operations.md):
  ``inspect`` (the group's workers, their partitions and running tasks, lag per
  partition), ``tasks [--status S] [--name N] [--limit K]``, ``cancel UUID [--reason R]``,
  ``dlq list | show N | replay (N... | --all)`` and ``tail [--count N]``.

``add --follow`` prints every value as it comes, a plain task's return value, a retry
(``task X failed (...); retried as Y``), and the end (its status, an error's last line,
a cancel's reason) on stderr. On ``memory://`` the log lives in one process: ``status``
says so and fails, ``run`` warns that only its own program can reach it.

A worker started before its broker waits for it (one WARNING, then quiet retries with a
capped backoff). Any command that cannot reach the broker prints one line
(``qtasks: cannot reach Kafka at host:port within 10 s``) and exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import logging
import os
import sys
import time
from typing import Any

import msgspec

from qtasks import ops
from qtasks.app import QueueTasks as AsyncQueueTasks
from qtasks.config import QueueConfig
from qtasks.connectors import from_url
from qtasks.exc import BrokerUnavailableError, ConnectorError, StreamIncompleteError, error_of
from qtasks.logs import formatter
from qtasks.supervise import raise_if_cancelled

log = logging.getLogger("qtasks.cli")


def load_app(target: str) -> AsyncQueueTasks:
    """Import ``module:attribute`` and return the asyncio app behind it."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"-A takes module:app, got {target!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"cannot import {module_name!r}: {exc}") from None
    app = getattr(module, attribute, None)
    if app is None:
        raise SystemExit(f"{module_name!r} has no attribute {attribute!r}")
    core = getattr(app, "_core", app)
    if not isinstance(core, AsyncQueueTasks):
        raise SystemExit(f"{target!r} is not a qtasks QueueTasks app")
    return core


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _kwargs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"-k takes key=value, got {pair!r}")
        out[key] = _value(value)
    return out


def _show(value: Any) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


async def _add(app: AsyncQueueTasks, args: argparse.Namespace) -> int:
    embedded = app.broker_url.startswith("memory://")
    gave_up = False
    if embedded:
        await app.start()
    try:
        task = await app.add_task(args.name, *[_value(a) for a in args.args], **_kwargs(args.kwarg))
        print(task.uuid, flush=True)
        if not (args.follow or embedded):
            return 0
        limit = asyncio.timeout(args.timeout)
        try:
            async with limit:
                return await _follow(app, task.uuid, args.progress and sys.stderr.isatty())
        except asyncio.CancelledError:
            gave_up = True  # Ctrl-C: the embedded worker is not waited for either
            raise
        except TimeoutError:
            if not limit.expired():
                raise
            gave_up = True
            latest = await app.get(task.uuid)
            where = latest.status if latest is not None else "unknown"
            print(f"gave up after {args.timeout} s: task {task.uuid} is still {where}", file=sys.stderr)
            return 2
    finally:
        if embedded:
            # The log lives in this process: a task given up on is not waited for.
            await app.stop(timeout=0 if gave_up else None)
        else:
            await app.close()


async def _follow(app: AsyncQueueTasks, uuid: str, progress: bool) -> int:
    """Print the task's values as they come, then how it ended; the exit code."""
    started = time.monotonic()
    count = 0
    clear = "\r\x1b[K"  # the progress line goes before anything else is printed
    async for item in app.stream(uuid, meta=True):
        if progress and count:
            print(clear, end="", file=sys.stderr, flush=True)
        if item.retried_as is not None:
            failed = await app.get(item.uuid)
            why = _error_line(failed.traceback) if failed is not None else None
            print(f"task {item.uuid} failed ({why or 'error'}); retried as {item.retried_as}", file=sys.stderr)
            continue
        count += 1
        print(_show(item.value), flush=True)
        if progress:
            rate = count / max(time.monotonic() - started, 1e-9)
            print(f"  {count} values, {rate:,.0f}/s", end="", file=sys.stderr, flush=True)
    if progress and count:
        print(clear, end="", file=sys.stderr, flush=True)
    final = await app.wait(uuid)
    elapsed = time.monotonic() - started
    if final.status == "success" and final.yield_count == 0:
        print(_show(final.returning), flush=True)  # a plain task's return value
    print(f"{final.status}: {count} values in {elapsed:.2f} s (task {final.uuid})", file=sys.stderr)
    if final.status == "error" and final.traceback:
        print(_error_line(final.traceback), file=sys.stderr)
    if final.status == "cancel":
        print(f"cancelled: {final.cancel_reason or 'no reason given'}", file=sys.stderr)
    return 0 if final.status == "success" else 1


def _error_line(traceback: str | None) -> str | None:
    """The exception of a traceback, on one line (``ValueError: the message``)."""
    kind, message = error_of(traceback)
    text = f"{kind}: {message}" if kind and message else kind or message
    return " ".join(text.split()) or None


STATUSES = ("new", "process", "success", "error", "cancel", "retry")

MEMORY_IS_ONE_PROCESS = (
    "memory:// keeps its log inside one process: this {what} sees no other process's tasks; "
    "use kafka:// to share tasks between processes"
)


async def _status(app: AsyncQueueTasks, uuid: str) -> int:
    if app.broker_url.startswith("memory://"):
        print(f"qtasks: {MEMORY_IS_ONE_PROCESS.format(what='status')}", file=sys.stderr)
        return 1
    try:
        task = await app.get(uuid)
    finally:
        await app.close()
    if task is None:
        print(f"no task {uuid}", file=sys.stderr)
        return 1
    print(msgspec.json.format(msgspec.json.encode(task)).decode())
    return 0


def backoff(attempt: int, cap: float = 30.0) -> float:
    """Seconds to wait before connection attempt ``attempt`` + 1: 1, 2, 4, ... up to ``cap``."""
    return float(min(cap, 2.0**attempt))


async def wait_for_broker(app: AsyncQueueTasks, cap: float = 30.0) -> None:
    """Return once the app's broker answers; until then retry with a capped backoff.

    Tries with a connector of its own (the app's state is not touched), so the worker
    then starts as if the broker had always been there.
    """
    attempt = 0
    while True:
        probe = from_url(app.broker_url, app.config)
        try:
            await probe.start()
        except BrokerUnavailableError as exc:
            raise_if_cancelled()
            if attempt == 0:
                log.warning("waiting for Kafka at %s (%s)", app.broker_url.partition("://")[2].partition("?")[0], exc)
            await asyncio.sleep(backoff(attempt, cap))
            attempt += 1
            continue
        await probe.stop()
        if attempt:
            log.info("Kafka answers; starting the worker")
        return


async def _run(app: AsyncQueueTasks, concurrency: int | None) -> None:
    """``run``: the metrics server first (a probe finds the process alive while it waits), the broker, the worker."""
    if app.config.metrics_port:
        await app.serve_metrics()
    try:
        if not app.broker_url.startswith("memory://"):
            await wait_for_broker(app)
        await app.serve(concurrency)
    finally:
        if app.metrics is not None:  # serve() stops it; this covers an interrupted wait for the broker
            await app.metrics.stop()


def tune_collector(config: QueueConfig) -> None:
    """What ``qtasks run`` does to the garbage collector of its process (``worker_gc_threshold``)."""
    # What was imported so far lives as long as the worker: keep it out of the
    # collector's way (fewer objects to walk in every full collection).
    gc.freeze()
    if config.worker_gc_threshold:
        gc.set_threshold(config.worker_gc_threshold, *gc.get_threshold()[1:])


def build_parser() -> argparse.ArgumentParser:
    """The ``qtasks`` command's arguments (docs/reference.md shows its help)."""
    parser = argparse.ArgumentParser(prog="qtasks", description="qtasks: Kafka-native streaming tasks")
    parser.add_argument("-A", "--app", required=True, help="the app, as module:attribute")
    parser.add_argument("--broker", help="broker URL (overrides the app's)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a worker")
    run.add_argument("--concurrency", type=int, help="tasks at once (default: config.concurrency)")
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="text, or one JSON object a line with the task's uuid, name and attempt (default: config.log_format)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics, /healthz and /readyz on this port (default: config.metrics_port; 0: none)",
    )
    run.add_argument(
        "--guarantee",
        choices=("at_least_once", "exactly_once"),
        help="processing guarantee (default: config.processing_guarantee; see docs/guarantees.md)",
    )
    add = commands.add_parser("add", help="submit a task")
    add.add_argument("name")
    add.add_argument("args", nargs="*", help="positional arguments (JSON, else strings)")
    add.add_argument("-k", "--kwarg", action="append", default=[], help="keyword argument key=value")
    add.add_argument("--follow", "-f", action="store_true", help="stream the values live until the task ends")
    add.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line on stderr")
    add.add_argument(
        "--timeout", type=float, default=None, help="with --follow: give up after this many seconds (exit code 2)"
    )
    status = commands.add_parser("status", help="show a task's status")
    status.add_argument("uuid")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    commands.add_parser(
        "inspect", parents=[as_json], help="the workers of the group, their partitions and tasks, lag per partition"
    )
    tasks = commands.add_parser("tasks", parents=[as_json], help="tasks from the status table, newest change first")
    tasks.add_argument("--status", choices=STATUSES, help="only tasks with this status")
    tasks.add_argument("--name", help="only tasks of this name")
    tasks.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    cancel = commands.add_parser("cancel", parents=[as_json], help="cancel a queued or running task")
    cancel.add_argument("uuid")
    cancel.add_argument("--reason", default="", help="the cancel_reason the task ends with")
    dlq = commands.add_parser("dlq", help="the dead-letter topic: list, show, replay")
    letters = dlq.add_subparsers(dest="dlq_command", required=True)
    letters.add_parser("list", parents=[as_json], help="every dead letter: its number, origin and reason")
    show = letters.add_parser("show", parents=[as_json], help="one dead letter with its value")
    show.add_argument("number", type=int)
    again = letters.add_parser("replay", parents=[as_json], help="put dead letters back on the tasks topic")
    which = again.add_mutually_exclusive_group(required=True)
    which.add_argument("numbers", type=int, nargs="*", default=[], help="the letters' numbers")
    which.add_argument("--all", action="store_true", help="every dead letter that can be replayed")
    web = commands.add_parser("web", help="the dashboard (needs the web extra: pip install 'qtasks-kafka[web]')")
    web.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    web.add_argument("--port", type=int, default=8000, help="the port (default 8000)")
    web.add_argument(
        "--allow-host",
        action="append",
        default=[],
        help="a name the dashboard may be reached as, besides its address (repeat it; * for any)",
    )
    tail = commands.add_parser("tail", parents=[as_json], help="status changes as they happen (Ctrl-C stops)")
    tail.add_argument("--count", type=int, help="stop after this many changes")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qtasks`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "add" and args.timeout is not None and not args.follow:
        parser.error("--timeout applies to --follow (add returns once the task is submitted)")

    app = load_app(args.app)
    if args.broker:
        app.use_broker(args.broker)
    try:
        return _dispatch(app, args)
    except (ConnectorError, StreamIncompleteError) as exc:
        print(f"qtasks: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(app: AsyncQueueTasks, args: argparse.Namespace) -> int:
    if args.command == "run":
        if args.guarantee:
            app.config.set(processing_guarantee=args.guarantee)
        if args.metrics_port is not None:
            app.config.set(metrics_port=args.metrics_port)
        if args.log_format:
            app.config.set(log_format=args.log_format)
        if not logging.getLogger().handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(formatter(app.config.log_format))
            logging.basicConfig(level=app.config.log_level, handlers=[handler])
        tune_collector(app.config)
        if app.broker_url.startswith("memory://"):
            log.warning(MEMORY_IS_ONE_PROCESS.format(what="worker") + " (only tasks this program submits run here)")
        asyncio.run(_run(app, args.concurrency))
        return 0
    # add and status print what the user asked for; the worker's INFO lines (an embedded
    # worker on memory://) would only be noise there.
    qtasks_logger = logging.getLogger("qtasks")
    qtasks_logger.setLevel(max(logging.WARNING, qtasks_logger.getEffectiveLevel()))
    if args.command == "add":
        return asyncio.run(_add(app, args))
    if args.command == "status":
        return asyncio.run(_status(app, args.uuid))
    if app.broker_url.startswith("memory://"):
        print(f"qtasks: {MEMORY_IS_ONE_PROCESS.format(what=args.command)}", file=sys.stderr)
        return 1
    if args.command == "web":
        try:
            from qtasks import web
        except ImportError as exc:
            print(
                f"qtasks: the dashboard needs the web extra (pip install 'qtasks-kafka[web]'): {exc}", file=sys.stderr
            )
            return 1
        asyncio.run(web.serve(app, args.host, args.port, args.allow_host))
        return 0
    return asyncio.run(_operate(app, args))


async def _operate(app: AsyncQueueTasks, args: argparse.Namespace) -> int:
    """The operator commands (qtasks.ops), then disconnect."""
    try:
        if args.command == "inspect":
            return _print_group(await ops.inspect_group(app), args.json)
        if args.command == "tasks":
            found = await ops.list_tasks(app, status=args.status, name=args.name, limit=args.limit)
            return _print_tasks(found, args.json)
        if args.command == "cancel":
            done = await app.cancel(args.uuid, args.reason)
            if args.json:
                print(json.dumps({"uuid": args.uuid, "cancelled": done}))
            else:
                print(f"cancelled {args.uuid}" if done else f"{args.uuid} is not queued or running", file=sys.stderr)
            return 0 if done else 1
        if args.command == "dlq":
            return await _dlq(app, args)
        return await _tail(app, args)
    finally:
        await app.close()


#: Control characters shown as escapes: text from records (names, reasons, values) never
#: drives the operator's terminal.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def _plain(text: object) -> str:
    return str(text).translate(_CONTROL)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [[_plain(cell) for cell in row] for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )


def _ago(at: float) -> str:
    seconds = max(time.time() - at, 0.0)
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _print_group(report: ops.GroupReport, as_json: bool) -> int:
    if as_json:
        print(json.dumps(report.to_dict()))
        return 0
    print(f"group {report.group}: {report.state}, {len(report.workers)} worker(s), lag {report.lag}")
    if report.workers:
        print()
        print(
            _table(
                ["WORKER", "HOST", "PARTITIONS", "RUNNING"],
                [
                    [w.worker, w.host, ",".join(map(str, w.partitions)) or "-", str(len(w.running))]
                    for w in report.workers
                ],
            )
        )
        running = [(w.worker, t) for w in report.workers for t in w.running]
        if running:
            print()
            print(
                _table(
                    ["TASK", "NAME", "WORKER", "ATTEMPT", "VALUES", "RUNNING FOR"],
                    [
                        [
                            t.uuid,
                            t.task_name,
                            worker,
                            str(t.attempt),
                            str(t.yield_count),
                            _ago(t.started_at or t.updated_at),
                        ]
                        for worker, t in running
                    ],
                )
            )
    print()
    print(
        _table(
            ["PARTITION", "END", "COMMITTED", "LAG", "WORKER"],
            [
                [
                    str(p.partition),
                    str(p.end),
                    "-" if p.committed is None else str(p.committed),
                    str(p.lag),
                    p.worker or "-",
                ]
                for p in report.partitions
            ],
        )
    )
    return 0


def _print_tasks(found: list[Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps([msgspec.to_builtins(t) for t in found]))
        return 0
    print(
        _table(
            ["UUID", "NAME", "STATUS", "ATTEMPT", "VALUES", "WORKER", "UPDATED"],
            [
                [
                    t.uuid,
                    t.task_name,
                    t.status,
                    str(t.attempt),
                    str(t.yield_count),
                    t.worker or "-",
                    f"{_ago(t.updated_at)} ago",
                ]
                for t in found
            ],
        )
    )
    return 0


async def _dlq(app: AsyncQueueTasks, args: argparse.Namespace) -> int:
    letters = await ops.dead_letters(app)
    if args.dlq_command == "list":
        if args.json:
            print(json.dumps([letter.to_dict() for letter in letters]))
        else:
            print(
                _table(
                    ["NUMBER", "AT", "ORIGIN", "SIZE", "REASON"],
                    [
                        [
                            str(letter.offset),
                            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.letter.at)),
                            f"{letter.letter.topic}[{letter.letter.partition}]@{letter.letter.offset}",
                            str(len(letter.letter.value or b"")),
                            letter.letter.reason,
                        ]
                        for letter in letters
                    ],
                )
            )
        return 0
    by_number = {letter.offset: letter for letter in letters}
    if args.dlq_command == "show":
        letter = by_number.get(args.number)
        if letter is None:
            print(f"no dead letter {args.number}", file=sys.stderr)
            return 1
        shown = letter.to_dict(value=True)
        print(json.dumps(shown) if args.json else "\n".join(f"{key}: {_plain(value)}" for key, value in shown.items()))
        return 0
    missing = [n for n in args.numbers if n not in by_number]
    if missing:
        print(f"no dead letter {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    chosen = letters if args.all else [by_number[n] for n in args.numbers]
    results = await ops.replay(app, chosen)
    if args.json:
        print(json.dumps([{"number": r.letter.offset, "uuid": r.uuid, "refused": r.refused} for r in results]))
    for r in results:
        if not args.json:
            if r.refused is None:
                print(f"{r.letter.offset}: replayed as task {r.uuid}")
            else:
                print(_plain(f"{r.letter.offset}: not replayed: {r.refused}"), file=sys.stderr)
    return 0 if all(r.refused is None for r in results) else 1


async def _tail(app: AsyncQueueTasks, args: argparse.Namespace) -> int:
    seen = 0
    async for task in ops.status_changes(app):
        if args.json:
            print(json.dumps(msgspec.to_builtins(task)), flush=True)
        else:
            moment = time.strftime("%H:%M:%S", time.localtime(task.updated_at))
            detail = f" attempt {task.attempt}" if task.attempt else ""
            if task.yield_count:
                detail += f", {task.yield_count} values"
            if task.status == "error" and task.traceback:
                detail += f": {_error_line(task.traceback)}"
            print(_plain(f"{moment} {task.uuid} {task.task_name} {task.status}{detail}"), flush=True)
        seen += 1
        if args.count is not None and seen >= args.count:
            return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
