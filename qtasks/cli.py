"""The command line: ``qtasks -A module:app run | add | status``.

- ``run [--concurrency N] [--guarantee at_least_once|exactly_once] [--broker URL]``: a
  worker in the foreground (SIGINT/SIGTERM stop it gracefully). ``--guarantee`` sets the
  worker's ``processing_guarantee``; clients of an exactly-once app should set it too (in
  the app or ``QTASKS_PROCESSING_GUARANTEE``), so they read committed records only.
- ``add NAME [ARGS...] [-k key=value ...] [--follow]``: submit a task; with ``--follow``,
  stream its values to the terminal live, then its final status. Arguments are read as
  JSON when they parse (``3``, ``"x"``, ``[1,2]``), else as strings. On ``memory://``
  the log lives in this process, so ``add`` runs a worker here too.
- ``status UUID``: the task's status as JSON.

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

from qtasks.app import QueueTasks as AsyncQueueTasks
from qtasks.config import QueueConfig
from qtasks.connectors import from_url
from qtasks.exc import BrokerUnavailableError, ConnectorError, error_of
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
    except ConnectorError as exc:
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
    return asyncio.run(_status(app, args.uuid))


if __name__ == "__main__":
    raise SystemExit(main())
