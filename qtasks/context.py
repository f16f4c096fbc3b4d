"""Task contexts: ``self.ctx`` inside a task, as the QTasks "Contexts" page describes.

``AsyncContext`` serves coroutine functions and async generators, ``SyncContext`` sync
functions and sync generators (which run in a thread). The app comes from the
executor, or from ``qtasks._state.app_main`` when a context is built outside one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any
from uuid import UUID

from qtasks import _state
from qtasks.exc import TaskCancelError, TaskPluginTriggerError
from qtasks.logs import Logger
from qtasks.threads import TaskAbandoned, wait_future


class CancelToken:
    """Set when a running task is asked to stop; read from the loop and from threads.

    The ``threading.Event`` a sleeping thread waits on is made only when one sleeps:
    most tasks never need it, and making one per task costs more than the task.
    """

    __slots__ = ("_event", "_set", "abandoned", "reason")
    _lock = threading.Lock()

    def __init__(self) -> None:
        self._event: threading.Event | None = None
        self._set = False
        self.abandoned = False
        self.reason = ""

    def set(self, reason: str) -> None:
        """Ask the task to stop with ``reason``."""
        with self._lock:
            if self._set:
                return
            self.reason = reason
            self._set = True
            event = self._event
        if event is not None:
            event.set()

    def abandon(self) -> None:
        """The run is no longer wanted (past ``max_time``, worker stopping): wake a sleeping thread.

        Unlike :meth:`set` this is not a cancel request: the outcome was already decided.
        """
        with self._lock:
            self.abandoned = True
            event = self._event
        if event is not None:
            event.set()

    @property
    def is_set(self) -> bool:
        """Whether the task was asked to stop."""
        return self._set

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds; True when the task was asked to stop or abandoned."""
        with self._lock:
            if self._set or self.abandoned:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)


class _BaseContext:
    def __init__(
        self,
        *,
        task_name: str | None = None,
        task_uuid: UUID | str | None = None,
        generate_handler: Callable[[Any], Any] | None = None,
        app: Any = None,
        token: CancelToken | None = None,
        checkpoint: Callable[[Any], None] | None = None,
        resume_state: Any = None,
    ) -> None:
        self.task_name = task_name
        self.task_uuid = task_uuid
        self.generate_handler = generate_handler
        self._app = app
        self._token = token or CancelToken()
        self._metadata: Any = None
        self._has_metadata = False
        self._checkpoint = checkpoint
        #: The state the task's earlier attempt stored with :meth:`checkpoint` (None: it starts afresh).
        #: A generator that goes on from it has its next value numbered where the checkpoint was.
        self.resume_state = resume_state

    @property
    def app(self) -> Any:
        """The app: the executor's, else the last one created in the process."""
        return self._app if self._app is not None else _state.app_main

    def get_logger(self, name: str | None = None) -> Logger:
        """A logger named ``name``, else the task's name, else the context class's name."""
        return Logger(name or self.task_name or type(self).__name__)

    def get_config(self) -> Any:
        """``app.config``."""
        return self.app.config

    def get_component(self, name: str) -> Any:
        """``getattr(app, name, None)``: ``broker``, ``worker``, ``config``, ``plugins``, ..."""
        return getattr(self.app, name, None)

    def cancel(self, reason: str = "") -> None:
        """Stop the task: it ends with status ``cancel`` and ``cancel_reason``; never retried."""
        raise TaskCancelError(reason or f"{self.task_name}.cancel")

    def checkpoint(self, state: Any) -> None:
        """Store ``state`` (JSON, at most ``checkpoint_max_bytes``) to go on from at the next value.

        If this run stops (its worker dies, the worker stops past ``stop_timeout``), the
        next attempt reads it as ``ctx.resume_state`` and its values go on from here.
        Exactly-once, the state commits with the values yielded before it; at least once,
        it is stored with the next lease renewal, once those values are stored.
        """
        if self._checkpoint is None:
            raise RuntimeError("ctx.checkpoint works only inside a task run by a worker")
        self._checkpoint(state)

    def plugin_error(self, **kwargs: Any) -> None:
        """Raise ``TaskPluginTriggerError(**kwargs)`` for plugins of ``task_executor_run_task_trigger_error``."""
        raise TaskPluginTriggerError(**kwargs)

    def _core(self) -> Any:
        app = self.app
        return getattr(app, "_core", app)

    async def _own_metadata(self) -> Any:
        """``app.get(task_uuid)`` as this task sees itself (exactly-once: its own uncommitted writes too)."""
        uuid = str(self.task_uuid)
        token = _state.own_task.set(uuid)
        try:
            return await self._core().get(uuid)
        finally:
            _state.own_task.reset(token)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task_name={self.task_name!r}, task_uuid={self.task_uuid!r})"


class AsyncContext(_BaseContext):
    """The context of coroutine functions and async generators; I/O methods are coroutines."""

    async def get_metadata(self, cache: bool = True) -> Any:
        """``await app.get(task_uuid)``; with ``cache`` the first answer is kept."""
        if cache and self._has_metadata:
            return self._metadata
        metadata = await self._own_metadata()
        if cache:
            self._metadata, self._has_metadata = metadata, True
        return metadata

    async def get_task(self, uuid: UUID | str) -> Any:
        """``await app.get(uuid)``."""
        return await self._core().get(str(uuid))

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep``; a cancel request ends it with ``TaskCancelError``."""
        if self._token.is_set:
            raise TaskCancelError(self._token.reason)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            if self._token.is_set:
                raise TaskCancelError(self._token.reason) from None
            raise


class SyncContext(_BaseContext):
    """The context of sync functions and sync generators, which run in a worker thread."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._loop = loop

    def _run(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        loop = self._loop
        if loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                raise RuntimeError("a SyncContext method cannot block the event loop; use it from the task's thread")
            return wait_future(asyncio.run_coroutine_threadsafe(make(), loop))
        portal = getattr(self.app, "_portal", None)
        if portal is not None:
            return portal.call(make())
        return asyncio.run(make())

    def get_metadata(self, cache: bool = True) -> Any:
        """``app.get(task_uuid)``; with ``cache`` the first answer is kept."""
        if cache and self._has_metadata:
            return self._metadata
        metadata = self._run(self._own_metadata)
        if cache:
            self._metadata, self._has_metadata = metadata, True
        return metadata

    def get_task(self, uuid: UUID | str) -> Any:
        """``app.get(uuid)``."""
        return self._run(lambda: self._core().get(str(uuid)))

    def sleep(self, seconds: float) -> None:
        """``time.sleep``, but a cancel request ends it at once with ``TaskCancelError``.

        It waits on an event rather than in ``time.sleep`` (which nothing can interrupt),
        so an abandoned run (past ``max_time``, worker stopping) also ends here at once,
        with ``TaskAbandoned``.
        """
        token = self._token
        if token.wait(seconds):
            if token.abandoned:
                raise TaskAbandoned()
            raise TaskCancelError(token.reason)


class AsyncTask:
    """What an ``echo=True`` async task gets as its first argument."""

    def __init__(self, ctx: AsyncContext, spec: Any) -> None:
        self.ctx = ctx
        self.task_name = ctx.task_name
        self._spec = spec

    async def add_task(self, task_name: str, *args: Any, **kwargs: Any) -> Any:
        """Submit another task through the same app."""
        return await self.ctx._core().add_task(task_name, *args, **kwargs)


class SyncTask:
    """What an ``echo=True`` sync task gets as its first argument."""

    def __init__(self, ctx: SyncContext, spec: Any) -> None:
        self.ctx = ctx
        self.task_name = ctx.task_name
        self._spec = spec

    def add_task(self, task_name: str, *args: Any, **kwargs: Any) -> Any:
        """Submit another task through the same app (blocks until it is written); returns its Task."""
        submitted = self.ctx._run(lambda: self.ctx._core().add_task(task_name, *args, **kwargs))
        return getattr(submitted, "task", submitted)
