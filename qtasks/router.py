"""Tasks registered away from the app, as QTasks has them: routers and shared tasks.

A :class:`Router` collects tasks in a module that does not import the app;
``app.include_router(router)`` registers them::

    router = Router()

    @router.task(retry=2)
    async def resize(path: str): ...

    app.include_router(router)

``@shared_task`` registers a task with every app of the process, at the start of the
app's worker (a task of the app's own with that name wins). A router's task that submits
itself (``resize.add_task(...)``) goes through the app it was included in first; a shared
task, through the last app made in the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtasks import _state
from qtasks.registry import TaskSpec, make_spec


class Router:
    """A set of tasks (and periodic tasks) to include in an app: ``@router.task``, then ``app.include_router``."""

    def __init__(self) -> None:
        self.specs: list[TaskSpec] = []

    def task(self, func: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Register a task with this router: ``@router.task`` or ``@router.task(name=..., retry=3, ...)``."""

        def register(fn: Callable[..., Any]) -> TaskSpec:
            spec = make_spec(fn, **options)
            if any(other.name == spec.name for other in self.specs):
                raise ValueError(f"a task named {spec.name!r} is already in this router")
            self.specs.append(spec)
            return spec

        return register(func) if func is not None else register

    def periodic(self, func: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Register a periodic task with this router (as ``app.periodic``)."""
        from qtasks.periodic import schedule_of

        schedule = schedule_of(options)

        def register(fn: Callable[..., Any]) -> TaskSpec:
            spec: TaskSpec = self.task(**options)(schedule.check(fn, options))
            spec.schedule = schedule
            return spec

        return register(func) if func is not None else register


#: QTasks' names for the router of each kind of app: one router serves both here.
AsyncRouter = Router
SyncRouter = Router


def shared_task(func: Callable[..., Any] | None = None, *, awaiting: bool = False, **options: Any) -> Any:
    """Register a task with every app of this process: ``@shared_task`` or ``@shared_task(name=..., ...)``.

    ``awaiting`` is QTasks' switch for the kind of task object; here the app a call goes
    through decides (``add_task`` is a coroutine on the asyncio app), so it is taken and
    has no effect. Every other keyword is ``@app.task``'s.
    """
    del awaiting

    def register(fn: Callable[..., Any]) -> TaskSpec:
        spec = make_spec(fn, **options)
        if any(other.name == spec.name for other in _state.shared_tasks):
            raise ValueError(f"a shared task named {spec.name!r} is already registered")
        _state.shared_tasks.append(spec)
        return spec

    return register(func) if func is not None else register
