"""What ``add_task`` returns: the submitted :class:`~qtasks.records.Task`'s fields, and the
calls that follow the task from there (its result, its stream, cancel, its latest status).

``handle.uuid``, ``handle.status``, ``handle.args`` ... are the fields of the task as it was
submitted (status ``new``), as QTasks' ``add_task`` returns them; ``handle.task`` is that
:class:`Task`. ``await handle.get()`` is the task's latest status. The blocking app's handle
has the same calls, blocking.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

from qtasks.exc import TaskCancelError, TaskFailedError
from qtasks.records import Task


class AsyncClient(Protocol):
    """What a handle needs of the asyncio app."""

    async def wait(self, uuid: str, timeout: float | None = None) -> Task: ...

    def stream(
        self, uuid: str, *, timeout: float | None = None, from_seq: int = 0, meta: bool = False
    ) -> AsyncIterator[Any]: ...

    async def cancel(self, uuid: str, reason: str = "") -> bool: ...

    async def get(self, uuid: str) -> Task | None: ...


class Client(Protocol):
    """What a handle needs of the blocking app."""

    def wait(self, uuid: str, timeout: float | None = None) -> Task: ...

    def stream(
        self, uuid: str, *, timeout: float | None = None, from_seq: int = 0, meta: bool = False
    ) -> Iterator[Any]: ...

    def cancel(self, uuid: str, reason: str = "") -> bool: ...

    def get(self, uuid: str) -> Task | None: ...


def outcome(final: Task) -> Any:
    """The return value of a finished task, or the error it ended with, raised here."""
    if final.status == "success":
        return final.returning
    if final.status == "cancel":
        error = TaskCancelError(f"task {final.uuid} ({final.task_name}) was cancelled: {final.cancel_reason or ''}")
        error.reason, error.task = final.cancel_reason, final
        raise error
    raise TaskFailedError.of(final)


def _timed_out(uuid: str, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"task {uuid} did not end within {timeout} s")


class _Fields:
    """The submitted task's fields, read through the handle."""

    task: Task

    def __getattr__(self, name: str) -> Any:
        if name == "task":  # not set yet (during construction or unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(uuid={self.task.uuid!r}, task_name={self.task.task_name!r})"


class AsyncTaskHandle(_Fields):
    """A submitted task, for the asyncio app: ``await handle.result()``, ``handle.stream()``, ..."""

    def __init__(self, app: AsyncClient, task: Task) -> None:
        """``app``: the asyncio app (``qtasks.asyncio.QueueTasks``) that submitted ``task``."""
        self.app = app
        self.task = task

    async def result(self, timeout: float | None = None) -> Any:
        """The task's return value (a generator's: its values), once it ends; follows retries.

        A task that failed raises :class:`~qtasks.exc.TaskFailedError` (with the remote
        error's type, message and traceback); a cancelled one :class:`~qtasks.exc.TaskCancelError`;
        ``TimeoutError`` when ``timeout`` passes first.
        """
        try:
            final = await self.app.wait(self.task.uuid, timeout)
        except TimeoutError:
            raise _timed_out(self.task.uuid, timeout) from None
        return outcome(final)

    async def wait(self, timeout: float | None = None) -> Task:
        """The final task of the chain, once it ends (``app.wait``)."""
        return await self.app.wait(self.task.uuid, timeout)

    def stream(self, *, timeout: float | None = None, from_seq: int = 0, meta: bool = False) -> AsyncIterator[Any]:
        """The task's values as they are yielded (``app.stream``)."""
        return self.app.stream(self.task.uuid, timeout=timeout, from_seq=from_seq, meta=meta)

    async def cancel(self, reason: str = "") -> bool:
        """Cancel it, or the retry it handed over to (``app.cancel``)."""
        return await self.app.cancel(self.task.uuid, reason)

    async def get(self) -> Task | None:
        """The task's latest status (``app.get``)."""
        return await self.app.get(self.task.uuid)


class TaskHandle(_Fields):
    """A submitted task, for the blocking app: ``handle.result()``, ``handle.stream()``, ..."""

    def __init__(self, app: Client, task: Task) -> None:
        """``app``: the blocking app (``qtasks.QueueTasks``) that submitted ``task``."""
        self.app = app
        self.task = task

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value once it ends (as :meth:`AsyncTaskHandle.result`)."""
        try:
            final = self.app.wait(self.task.uuid, timeout)
        except TimeoutError:
            raise _timed_out(self.task.uuid, timeout) from None
        return outcome(final)

    def wait(self, timeout: float | None = None) -> Task:
        """The final task of the chain, once it ends."""
        return self.app.wait(self.task.uuid, timeout)

    def stream(self, *, timeout: float | None = None, from_seq: int = 0, meta: bool = False) -> Iterator[Any]:
        """The task's values as they are yielded."""
        return self.app.stream(self.task.uuid, timeout=timeout, from_seq=from_seq, meta=meta)

    def cancel(self, reason: str = "") -> bool:
        """Cancel it, or the retry it handed over to."""
        return self.app.cancel(self.task.uuid, reason)

    def get(self) -> Task | None:
        """The task's latest status."""
        return self.app.get(self.task.uuid)
