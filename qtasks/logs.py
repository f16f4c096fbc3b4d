"""Logging: ``qtasks.logs.Logger``, a named logger on top of the standard library,
qtasks' logs shown on stderr while the program has configured no logging of its own, and
one JSON object a line (``log_format="json"``, ``qtasks run --log-format json``).

While a task is handled, :data:`current_task` holds its uuid, name and attempt: every
line logged then (by the worker, or by the task through ``ctx.get_logger()``, sync tasks
in their threads too) carries them in JSON.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The task being handled in this context: (uuid, name, attempt; None before its run starts).
current_task: contextvars.ContextVar[tuple[str, str, int | None] | None] = contextvars.ContextVar(
    "qtasks_current_task", default=None
)

#: Attributes every LogRecord has: what else a record holds came from ``extra=`` and goes in the JSON.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the task's
    ``task_uuid``, ``task_name`` and ``attempt`` while one is handled, ``exc`` with a
    traceback, and whatever the call passed in ``extra=``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        task = current_task.get()
        if task is not None:
            line["task_uuid"], line["task_name"], attempt = task
            if attempt is not None:
                line["attempt"] = attempt
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        return json.dumps(line, default=str, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``log_format`` (``text`` or ``json``)."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(FORMAT)


class _UntilConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes qtasks' records to stderr while nobody else would: the program's own logging
    configuration (a handler on the root logger or on ``qtasks``) takes over as soon as it exists."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:
        """Whatever ``sys.stderr`` is when a record is written (as logging's last resort does)."""
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers or len(logging.getLogger("qtasks").handlers) > 1:
            # The program configured logging since qtasks set its level: from now on its
            # levels apply too (this record already went its way).
            qtasks = logging.getLogger("qtasks")
            if logging.getLogger().handlers and qtasks.level == _set_by_us[0] != logging.NOTSET:
                qtasks.setLevel(logging.NOTSET)
                _set_by_us[0] = logging.NOTSET
            return
        super().emit(record)


_set_by_us: list[int] = [logging.NOTSET]  # the level show_logs last gave the qtasks logger


def show_logs(level: int | str, log_format: str = "text") -> None:
    """Make qtasks' logs (the worker, the connectors, every task's ``ctx.get_logger()``) show.

    While the program has configured no logging, they go to stderr at ``level``. Once it
    has (a handler on the root logger), its configuration applies, levels included: the
    ``qtasks`` logger then follows it. A level the program set on the ``qtasks`` logger
    itself is never changed. Called when an app is made and when its worker starts.
    """
    qtasks = logging.getLogger("qtasks")
    if qtasks.level in (logging.NOTSET, _set_by_us[0]):
        number = level if isinstance(level, int) else logging.getLevelNamesMapping().get(level, logging.INFO)
        wanted = logging.NOTSET if logging.getLogger().handlers else number
        qtasks.setLevel(wanted)
        _set_by_us[0] = qtasks.level
    handler = next((h for h in qtasks.handlers if isinstance(h, _UntilConfigured)), None)
    if handler is None:
        handler = _UntilConfigured()
        qtasks.addHandler(handler)
    handler.setFormatter(formatter(log_format))


class Logger:
    """A logger with a ``name`` (the task's, by default), writing to ``qtasks.<name>``.

    It has the standard methods (``debug``, ``info``, ``warning``, ``error``,
    ``exception``, ``critical``); a ``subname`` is shown after the name.
    """

    def __init__(self, name: str, subname: str | None = None, level: int | str | None = None) -> None:
        self.name = name
        self.subname = subname
        full = f"qtasks.{name}" + (f".{subname}" if subname else "")
        self._log = logging.getLogger(full)
        if level is not None:
            self._log.setLevel(level)

    def with_subname(self, subname: str) -> Logger:
        """A logger with the same name and another subname."""
        return Logger(self.name, subname)

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log at DEBUG."""
        self._log.debug(msg, *args, **kwargs)

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log at INFO."""
        self._log.info(msg, *args, **kwargs)

    def warning(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log at WARNING."""
        self._log.warning(msg, *args, **kwargs)

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log at ERROR."""
        self._log.error(msg, *args, **kwargs)

    def exception(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log at ERROR with the current exception's traceback."""
        self._log.exception(msg, *args, **kwargs)

    def critical(self, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log at CRITICAL."""
        self._log.critical(msg, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Logger(name={self.name!r})"
