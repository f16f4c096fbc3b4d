"""Chaining streams: a task that consumes another task's values as they are produced.

A parameter annotated ``qtasks.Stream[T]`` (or bare ``Stream``) takes the uuid of an
upstream task; inside the task it is an async iterator of the upstream's handled values,
live and in order (sync tasks iterate it with a plain ``for``)::

    @app.task
    async def squares(numbers: Stream[int]):
        async for n in numbers:
            yield n * n

    first = await app.add_task("numbers", 10)
    second = await app.add_task("squares", first.uuid)

The values come from the results topic at the pace the downstream reads them (the log
is the buffer: backpressure without holding the upstream back). When the upstream ends:

- ``success``: the iteration ends;
- ``error``: the iteration raises :class:`UpstreamFailedError` (after the values it did
  produce), so the downstream fails too unless it catches it;
- ``retry`` (it failed and handed over to a retry): the iteration raises
  :class:`UpstreamRetriedError` with the retry's uuid: the values read so far came from
  a failed run, and the retry's start again from the first;
- ``cancel``: the iteration raises :class:`~qtasks.exc.TaskCancelError`, so the
  downstream ends as ``cancel`` with the upstream's reason.

Cancelling a downstream task does not cancel its upstream (another stage may read it);
cancel each stage to stop a pipeline (docs/pipelines.md).
"""

from __future__ import annotations

import asyncio
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from qtasks.context import CancelToken
from qtasks.exc import QTasksError, TaskCancelError
from qtasks.threads import TaskAbandoned, wait_future

T = TypeVar("T")


class UpstreamFailedError(QTasksError):
    """The task a ``Stream`` parameter reads ended as ``error``."""


class UpstreamRetriedError(UpstreamFailedError):
    """The task a ``Stream`` parameter reads failed and handed over to a retry, a new task
    whose values start again from its first: the values already read came from a run that
    failed. ``retried_as`` is the retry's uuid (``Stream(retried_as, ...)`` reads it)."""

    def __init__(self, message: str, retried_as: str) -> None:
        super().__init__(message)
        self.retried_as = retried_as


class Stream(Generic[T]):
    """The values of an upstream task, as it produces them: ``async for value in stream`` (``for`` in sync tasks)."""

    def __init__(
        self, uuid: str, app: Any, loop: asyncio.AbstractEventLoop | None = None, token: CancelToken | None = None
    ) -> None:
        #: The upstream task's uuid.
        self.uuid = uuid
        self._app = app
        self._loop = loop
        #: The reading run's cancel token: a sync stage waiting for a value stops at a cancel.
        self._token = token

    def __repr__(self) -> str:
        return f"Stream({self.uuid!r})"

    async def __aiter__(self) -> AsyncIterator[T]:
        # One task's values: a retry is a new run from its first value, never spliced onto
        # the failed one's (a stage that aggregates would count values twice).
        async for item in self._app.stream(self.uuid, meta=True):
            if item.retried_as is not None:
                raise UpstreamRetriedError(
                    f"upstream task {self.uuid} failed after {item.seq} value(s) and was retried as "
                    f"{item.retried_as}; the values read so far came from the failed run",
                    item.retried_as,
                )
            yield item.value
        task = await self._app.wait(self.uuid)
        if task.status == "cancel":
            raise TaskCancelError(f"upstream task {task.uuid} was cancelled: {task.cancel_reason or 'no reason'}")
        if task.status != "success":
            last = (task.traceback or "").strip().splitlines()[-1:] or ["no traceback"]
            raise UpstreamFailedError(f"upstream task {task.uuid} ended as {task.status}: {last[0]}")

    def __iter__(self) -> Iterator[T]:
        """For a sync task (it runs in a thread): each value is fetched on the app's loop."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("this Stream belongs to no running worker")
        values = self.__aiter__()
        token = self._token

        def stopped() -> BaseException | None:
            # A cancel of the reading run, or its abandon, stops the wait however long the
            # upstream is quiet.
            if token is None:
                return None
            if token.abandoned:
                return TaskAbandoned()
            return TaskCancelError(token.reason) if token.is_set else None

        while True:
            future: Future[T] = asyncio.run_coroutine_threadsafe(_next(values), loop)
            try:
                yield wait_future(future, stopped)
            except StopAsyncIteration:
                return


async def _next(values: AsyncIterator[T]) -> T:
    return await values.__anext__()


def stream_parameters(func: Callable[..., Any]) -> frozenset[str]:
    """The names of ``func``'s parameters annotated ``Stream`` or ``Stream[...]``."""
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # annotations that do not resolve: read their text
        hints = {}
        for name, annotation in getattr(func, "__annotations__", {}).items():
            text = annotation if isinstance(annotation, str) else ""
            if text.split("[", 1)[0].strip() in ("Stream", "qtasks.Stream", "pipe.Stream"):
                hints[name] = Stream
    return frozenset(
        name
        for name, hint in hints.items()
        if name != "return" and (hint is Stream or typing.get_origin(hint) is Stream)
    )
