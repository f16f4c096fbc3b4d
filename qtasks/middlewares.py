"""Task middlewares as QTasks has them: classes made with the task's executor and called around the task.

``app.add_middleware(MyMiddleware)`` runs one before every task of the app (``position="after"``:
after every task), ahead of the task's own ``middlewares_before``/``middlewares_after``;
those take these classes too. A middleware reads and changes the run through its
executor: ``args`` and ``kwargs`` before the task, ``result`` after it::

    class Stamp(TaskMiddleware):
        async def __call__(self):
            self.task_executor.kwargs["stamp"] = time.time()

A function ``(task_name, args, kwargs) -> (args, kwargs) | None`` (before) or
``(task_name, result) -> result`` (after) is a middleware too (qtasks' own shape).
Either may be sync or async. One that raises ends the task as ``error``.
"""

from __future__ import annotations

import inspect
from typing import Any


class BaseMiddleware:
    """The root of QTasks' middleware classes: a name."""

    def __init__(self, name: str) -> None:
        self.name = name


class TaskMiddleware(BaseMiddleware):
    """A task middleware: ``TaskMiddleware(task_executor)`` is made for each run and called (awaited if async)."""

    def __init__(self, task_executor: Any) -> None:
        super().__init__(name=type(self).__name__)
        self.task_executor = task_executor

    def __call__(self) -> Any:
        """What the middleware does (a subclass overrides it; sync or async). Its return value is not used."""
        return None


def is_task_middleware(middleware: Any) -> bool:
    """True for a :class:`TaskMiddleware` subclass (made per run), False for a function middleware."""
    return isinstance(middleware, type) and issubclass(middleware, TaskMiddleware)


async def run_task_middleware(middleware: type[TaskMiddleware], task_executor: Any) -> None:
    """Make ``middleware`` for this run and call it."""
    done = middleware(task_executor)()
    if inspect.isawaitable(done):
        await done


def check_middleware(middleware: Any, position: str) -> None:
    """``TypeError``/``ValueError`` unless ``middleware`` can run at ``position`` (``before`` or ``after``)."""
    if position not in ("before", "after"):
        raise ValueError(f"a middleware's position is 'before' or 'after', got {position!r}")
    if isinstance(middleware, TaskMiddleware):
        raise TypeError(
            f"pass the middleware class {type(middleware).__name__}, not an instance: it is made for each run"
        )
    if isinstance(middleware, type) and not issubclass(middleware, TaskMiddleware):
        raise TypeError(
            f"middleware class {middleware.__name__} must subclass qtasks.middlewares.TaskMiddleware (or be a function)"
        )
    if not callable(middleware):
        raise TypeError(f"a middleware is a TaskMiddleware subclass or a function, got {type(middleware).__name__}")
