"""Plugins (QTasks' trigger mechanism) and lifecycle events.

A plugin is any object with ``trigger(name, **kwargs)``, and optionally ``start()`` and
``stop()``; each may be a plain function or a coroutine function. A trigger may return
a dict, which replaces values at that moment (QTasks' contract): for
``task_executor_run_task_trigger_error``, ``{"result": X}`` makes the task succeed with X.

Events are plain callbacks: ``@app.events.on.task_success()`` registers one; each is
called with the keyword arguments it names (``app``, ``task``, ``worker``, ...).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("qtasks.plugins")


@dataclass(frozen=True)
class Hook:
    """When a trigger or event fires, the keyword arguments it passes, and what a returned dict replaces."""

    when: str
    arguments: tuple[str, ...]
    replaces: str = ""


#: The triggers the engine fires (QTasks' names where the same moment exists), in the
#: order a task meets them. A plugin's ``trigger(name, **arguments)`` gets these keyword
#: arguments; a dict it returns may replace what ``replaces`` says.
TRIGGER_HOOKS: dict[str, Hook] = {
    "worker_execute_before": Hook("a worker is about to run a task (its status is `process`)", ("worker", "task")),
    "task_executor_args_replace": Hook(
        "before the task's function is called",
        ("task_executor", "args", "kwargs"),
        '`{"new_args": (args, kwargs)}` replaces the arguments',
    ),
    "task_executor_before_execute": Hook("right after `task_executor_args_replace`", ("task_executor",)),
    "task_executor_run_task_gen": Hook(
        "a generator task ended; `results` is its `returning` (its values were streamed already)",
        ("task_executor", "results"),
        '`{"new_results": [...]}` replaces `returning`',
    ),
    "task_executor_run_task": Hook(
        "the task's function returned (a generator's: its values)",
        ("task_executor", "result"),
        '`{"new_result": x}` replaces the result',
    ),
    "task_executor_after_execute": Hook("after `task_executor_run_task`", ("task_executor", "result")),
    "task_executor_decode": Hook(
        "after the task's `decode` function (only for tasks with one)",
        ("task_executor", "result"),
        '`{"new_result": x}` replaces the decoded result',
    ),
    "task_executor_run_task_trigger_error": Hook(
        "the task called `ctx.plugin_error(**kwargs)` (only then: any other exception is an ordinary error); "
        "`e` is the `TaskPluginTriggerError`, its `kwargs` those given",
        ("task_executor", "task_func", "task_broker", "e"),
        '`{"result": x}` makes the task succeed with `x`',
    ),
    "worker_task_error": Hook(
        "a task ended in `error` (or `retry`, handing over to a retry); its status is written",
        ("worker", "task", "exc"),
    ),
    "worker_execute_after": Hook(
        "a task ended, whatever its status; its terminal status is written", ("worker", "task")
    ),
}
TRIGGERS = tuple(TRIGGER_HOOKS)

#: Lifecycle events; a handler gets the keyword arguments it names among ``arguments``.
EVENT_HOOKS: dict[str, Hook] = {
    "starting": Hook("`app.start()` begins", ("app",)),
    "worker_running": Hook("the worker joined its group and takes tasks", ("app", "worker")),
    "task_running": Hook("a task starts (its status is `process`)", ("app", "task", "worker")),
    "task_success": Hook("a task ended in `success`", ("app", "task", "exc", "worker")),
    "task_error": Hook(
        "a task ended in `error`, or its record could not be run (`worker` is then not given)",
        ("app", "task", "exc", "worker"),
    ),
    "task_cancel": Hook(
        "a task ended in `cancel` (`exc` is not given for one cancelled while queued)", ("app", "task", "exc", "worker")
    ),
    "task_stopping": Hook("after a task's ending event", ("app", "task", "worker")),
    "stopping": Hook("`app.stop()` begins", ("app",)),
    "worker_stopping": Hook("the worker is about to stop", ("app", "worker")),
}
EVENTS = tuple(EVENT_HOOKS)


async def _call(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    result = func(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


class PluginManager:
    """The plugins of an app, each bound to some trigger names (or all) and a component."""

    def __init__(self) -> None:
        self._plugins: list[tuple[Any, frozenset[str] | None, str | None]] = []

    def add(self, plugin: Any, trigger_names: list[str] | None = None, component: str | None = None) -> None:
        """Register ``plugin`` for ``trigger_names`` (None: all triggers)."""
        if not callable(getattr(plugin, "trigger", None)):
            raise TypeError(f"a plugin needs a trigger(name, **kwargs) method; {plugin!r} has none")
        if isinstance(trigger_names, str):
            trigger_names = [trigger_names]
        names = None if trigger_names is None else frozenset(trigger_names)
        unknown = sorted((names or frozenset()) - set(TRIGGERS))
        if unknown:
            raise ValueError(
                f"unknown trigger name(s) {', '.join(map(repr, unknown))}; the triggers are: {', '.join(TRIGGERS)}"
            )
        self._plugins.append((plugin, names, component))

    def __len__(self) -> int:
        return len(self._plugins)

    def __iter__(self) -> Any:
        return iter(p for p, _, _ in self._plugins)

    def has(self, name: str) -> bool:
        """Whether any plugin listens to ``name`` (lets hot paths skip the call)."""
        return any(names is None or name in names for _, names, _ in self._plugins)

    async def trigger(self, name: str, **kwargs: Any) -> dict[str, Any] | None:
        """Fire a trigger; return the merged dicts the plugins returned (later plugins win), or None."""
        merged: dict[str, Any] | None = None
        for plugin, names, _ in self._plugins:
            if names is not None and name not in names:
                continue
            result = await _call(plugin.trigger, name, **kwargs)
            if isinstance(result, dict):
                merged = {**(merged or {}), **result}
        return merged

    async def start(self) -> None:
        """Start the plugins that have a ``start``."""
        for plugin, _, _ in self._plugins:
            if callable(getattr(plugin, "start", None)):
                await _call(plugin.start)

    async def stop(self) -> None:
        """Stop the plugins that have a ``stop``; one failing does not keep the others running."""
        for plugin, _, _ in self._plugins:
            if callable(getattr(plugin, "stop", None)):
                try:
                    await _call(plugin.stop)
                except Exception:
                    log.exception("plugin %r failed to stop", plugin)


class _On:
    def __init__(self, events: Events) -> None:
        self._events = events

    def __getattr__(self, name: str) -> Callable[[], Callable[[Callable[..., Any]], Callable[..., Any]]]:
        if name not in EVENTS:
            raise AttributeError(f"unknown event {name!r}; events are: {', '.join(EVENTS)}")

        def decorator_factory() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
            def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
                self._events.add(name, func)
                return func

            return decorator

        return decorator_factory


class Events:
    """Lifecycle callbacks: ``@app.events.on.worker_running()``."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[tuple[Callable[..., Any], set[str] | None]]] = {}
        self.on = _On(self)

    def add(self, name: str, func: Callable[..., Any]) -> None:
        """Call ``func`` at event ``name``."""
        if name not in EVENTS:
            raise ValueError(f"unknown event {name!r}; events are: {', '.join(EVENTS)}")
        params = inspect.signature(func).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
        offered = EVENT_HOOKS[name].arguments
        unknown = [
            p.name
            for p in params.values()
            if p.name not in offered and p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        if unknown:
            raise ValueError(
                f"a handler of event {name!r} takes {', '.join(map(repr, unknown))}, which the event does not "
                f"give; it gives (by name) {', '.join(offered)}"
            )
        self._handlers.setdefault(name, []).append((func, None if takes_all else set(params)))

    def has(self, name: str) -> bool:
        """Whether anything listens to ``name``."""
        return bool(self._handlers.get(name))

    async def fire(self, name: str, **kwargs: Any) -> None:
        """Call the handlers of ``name``; a failing handler is logged, never raised."""
        for func, accepted in self._handlers.get(name, ()):
            args = kwargs if accepted is None else {k: v for k, v in kwargs.items() if k in accepted}
            try:
                await _call(func, **args)
            except Exception:
                log.exception("event handler %r for %r failed", func, name)
