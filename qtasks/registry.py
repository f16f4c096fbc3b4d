"""Registered tasks: what ``@app.task`` records about a function."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from qtasks import _state
from qtasks.pipe import stream_parameters

Kind = Literal["async", "async_gen", "sync", "sync_gen"]


def kind_of(func: Callable[..., Any]) -> Kind:
    """How the executor drives ``func``: coroutine, async generator, plain function or generator."""
    target = inspect.unwrap(func)
    if inspect.isasyncgenfunction(target):
        return "async_gen"
    if inspect.iscoroutinefunction(target):
        return "async"
    if inspect.isgeneratorfunction(target):
        return "sync_gen"
    return "sync"


@dataclasses.dataclass(eq=False)
class TaskSpec:
    """A registered task. Calling it calls the function directly; ``add_task`` submits it."""

    name: str
    func: Callable[..., Any]
    priority: int = 0
    echo: bool = False
    max_time: float | None = None
    retry: int | None = None
    retry_on_exc: Sequence[type[BaseException]] | None = None
    decode: Callable[[Any], Any] | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    description: str | None = None
    generate_handler: Callable[[Any], Any] | None = None
    executor: type | None = None
    middlewares_before: list[Callable[..., Any]] = dataclasses.field(default_factory=list)
    middlewares_after: list[Callable[..., Any]] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    app: Any = None
    #: A periodic task's schedule (``@app.periodic``): a :class:`qtasks.periodic.Schedule`.
    schedule: Any = None
    kind: Kind = dataclasses.field(init=False)
    signature: inspect.Signature = dataclasses.field(init=False)
    _plain: tuple[dict[str, int], int] | None = dataclasses.field(init=False, repr=False, compare=False)
    handler_is_async: bool = dataclasses.field(init=False)
    #: Parameters annotated ``qtasks.Stream``: each takes an upstream task's uuid (:mod:`qtasks.pipe`).
    streams: frozenset[str] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.kind = kind_of(self.func)
        self.signature = inspect.signature(self.func)
        self._plain = _plain_parameters(self.signature)
        self.streams = stream_parameters(self.func)
        handler = self.generate_handler
        self.handler_is_async = handler is not None and inspect.iscoroutinefunction(inspect.unwrap(handler))
        if self.max_time is not None and self.max_time <= 0:
            raise ValueError(f"task {self.name!r}: max_time must be greater than 0, got {self.max_time}")
        if self.retry is not None and self.retry < 0:
            raise ValueError(f"task {self.name!r}: retry must be 0 or more, got {self.retry}")
        if self.retry_on_exc is not None:
            bad = [e for e in self.retry_on_exc if not (isinstance(e, type) and issubclass(e, BaseException))]
            if bad:
                raise ValueError(f"task {self.name!r}: retry_on_exc must list exception classes, got {bad!r}")
        self.__doc__ = self.description or self.func.__doc__

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise Python's own TypeError unless the function takes these arguments.

        Every run checks its arguments before the task starts; for a function with plain
        parameters (no ``*args``, ``**kwargs``, positional- or keyword-only ones) that is
        a count and a few lookups, else ``Signature.bind`` (also for the error's message).
        """
        plain = self._plain
        if plain is not None:
            index, required = plain
            given = len(args)
            if given <= len(index):
                covered = min(given, required)
                for name in kwargs:
                    at = index.get(name)
                    if at is None or at < given:
                        break  # unknown, or given twice: bind says which
                    if at < required:
                        covered += 1
                else:
                    if covered == required:
                        return
        self.signature.bind(*args, **kwargs)

    @property
    def is_generator(self) -> bool:
        """True for sync and async generator tasks."""
        return self.kind in ("sync_gen", "async_gen")

    @property
    def is_async(self) -> bool:
        """True for coroutine functions and async generators (they get an ``AsyncContext``)."""
        return self.kind in ("async", "async_gen")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def add_task(self, *args: Any, priority: int | None = None, timeout: float | None = None, **kwargs: Any) -> Any:
        """Submit this task through its app (a coroutine on the asyncio app)."""
        return self._app().add_task(self.name, *args, priority=priority, timeout=timeout, **kwargs)

    def map(self, values: Iterable[Any], *, priority: int | None = None, **when: Any) -> Any:
        """Submit one task per value (the task's one argument), in one batch: ``app.add_tasks``
        (``countdown=``/``eta=`` delay them all)."""
        return self._app().add_tasks(self.name, [(value,) for value in values], priority=priority, **when)

    def starmap(self, calls: Iterable[Iterable[Any]], *, priority: int | None = None, **when: Any) -> Any:
        """Submit one task per tuple (or list) of positional arguments, in one batch: ``app.add_tasks``
        (``countdown=``/``eta=`` delay them all)."""
        return self._app().add_tasks(self.name, calls, priority=priority, **when)

    def _app(self) -> Any:
        """The app this task submits through: its own, or (a shared task, a router's not yet
        included) the last app made in this process."""
        app = self.app if self.app is not None else _state.app_main
        if app is None:
            raise RuntimeError(f"task {self.name!r} belongs to no app yet: make a QueueTasks first")
        return app


def make_spec(
    func: Callable[..., Any],
    *,
    name: str | None = None,
    priority: int | None = None,
    echo: bool = False,
    max_time: float | None = None,
    retry: int | None = None,
    retry_on_exc: Sequence[type[BaseException]] | None = None,
    decode: Callable[[Any], Any] | None = None,
    tags: list[str] | None = None,
    description: str | None = None,
    generate_handler: Callable[[Any], Any] | None = None,
    executor: type | None = None,
    middlewares_before: list[Callable[..., Any]] | None = None,
    middlewares_after: list[Callable[..., Any]] | None = None,
    app: Any = None,
    **extra: Any,
) -> TaskSpec:
    """The :class:`TaskSpec` ``@app.task(...)`` (or a router, or ``shared_task``) makes of ``func``."""
    return TaskSpec(
        name=name or func.__name__,
        func=func,
        priority=priority or 0,
        echo=echo,
        max_time=max_time,
        retry=retry,
        retry_on_exc=retry_on_exc,
        decode=decode,
        tags=list(tags or []),
        description=description,
        generate_handler=generate_handler,
        executor=executor,
        middlewares_before=list(middlewares_before or []),
        middlewares_after=list(middlewares_after or []),
        extra=extra,
        app=app,
    )


class Registry:
    """Task name -> :class:`TaskSpec`, and the middlewares every task of the app runs."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}
        #: ``app.add_middleware``: run before (and after) every task, ahead of its own.
        self.middlewares_before: list[Any] = []
        self.middlewares_after: list[Any] = []

    def add(self, spec: TaskSpec) -> None:
        """Register a task; a name already taken is a ``ValueError``."""
        if spec.name in self._tasks:
            raise ValueError(f"a task named {spec.name!r} is already registered")
        self._tasks[spec.name] = spec

    def include(self, spec: TaskSpec) -> None:
        """Register a task made elsewhere (a router's, a shared task); the same one again is a no-op."""
        if self._tasks.get(spec.name) is spec:
            return
        self.add(spec)

    def get(self, name: str) -> TaskSpec | None:
        """The task registered under ``name``, or None."""
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Any:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._tasks)


def _plain_parameters(signature: inspect.Signature) -> tuple[dict[str, int], int] | None:
    """Each parameter's position and how many come first without a default; None if any is not plain."""
    index: dict[str, int] = {}
    required = 0
    for at, parameter in enumerate(signature.parameters.values()):
        if parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            return None
        if parameter.default is inspect.Parameter.empty:
            if required != at:
                return None  # cannot be written in Python, but a signature can say it
            required += 1
        index[parameter.name] = at
    return index, required
