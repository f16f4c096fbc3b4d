"""Sync task code in a pool thread, and the way its values and errors cross back to the loop.

A sync generator's values reach the event loop through :class:`ThreadBridge`, a batch
per wake-up; what the task's code raises in its thread comes back as an exception the
loop will not take for its own (:class:`RaisedInThread`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from qtasks.threads import TaskAbandoned


class SinkFailed(Exception):
    """Raised in a sync generator's thread when the sink failed: the generator is closed, the loop raises the sink's error."""


class RaisedInThread(Exception):
    """Carries a non-``Exception`` (``KeyboardInterrupt``, ``SystemExit``, ...) that task code raised in its thread.

    Wrapped so the loop does not take it for its own: execute() unwraps it into an error outcome.
    """

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


def call_in_thread(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return func(*args, **kwargs)
    except (Exception, TaskAbandoned):
        raise
    except BaseException as exc:
        raise RaisedInThread(exc) from None


def close_generator(close: Callable[[], Any], error: BaseException) -> None:
    """Close a generator that stopped on ``error``; a failure to close is noted on ``error``, not lost."""
    try:
        close()
    except Exception as exc:
        error.add_note(f"closing the generator also failed: {exc!r}")


class Checkpoint:
    """A ``ctx.checkpoint(state)`` of a sync generator, carried in order with its values."""

    __slots__ = ("state",)

    def __init__(self, state: Any) -> None:
        self.state = state


class ThreadBridge:
    """Carries values from a generator's thread to the loop, in order, a batch per wake-up.

    One ``call_soon_threadsafe`` per batch rather than per value: while the loop is
    writing a batch, the thread keeps appending; ``max_pending`` bounds the buffer
    (the thread waits), so a slow transport slows the generator instead of filling memory.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        emit: Callable[[Any], Any],
        max_pending: int = 4096,
        mark: Callable[[Any], None] | None = None,
    ) -> None:
        self._loop = loop
        self._emit = emit
        self._mark = mark
        self._max = max_pending
        self._cond = threading.Condition()
        self._buf: list[Any] = []
        self._idle = True
        self._closed = False
        self._abandoned = False
        self.error: BaseException | None = None
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run())

    def put(self, value: Any) -> None:
        """Called in the thread for every handled value."""
        with self._cond:
            if self._abandoned:
                raise TaskAbandoned()
            if self.error is not None:
                raise SinkFailed()  # the loop raises the error itself, with its own traceback
            self._buf.append(value)
            notify, self._idle = self._idle, False
            while len(self._buf) >= self._max and not self._abandoned and self.error is None:
                if notify:
                    self._loop.call_soon_threadsafe(self._wake.set)
                    notify = False
                self._cond.wait(0.1)
        if notify:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                with self._cond:
                    items = self._buf
                    if not items:
                        self._idle = True
                        break
                    self._buf = []
                    self._cond.notify_all()
                try:
                    for value in items:
                        if type(value) is Checkpoint:
                            if self._mark is not None:
                                self._mark(value.state)
                        else:
                            await self._emit(value)
                except BaseException as exc:  # handed to the thread and to close()
                    with self._cond:
                        self.error = exc
                        self._cond.notify_all()
                    return
            if self._closed:
                return

    def abandon(self) -> None:
        """Make the thread's next ``put`` raise, so it stops."""
        with self._cond:
            self._abandoned = True
            self._cond.notify_all()

    async def close(self, *, raise_error: bool = True) -> None:
        """Wait until every value put so far is emitted; raise an emit error (if ``raise_error``)."""
        self._closed = True
        self._wake.set()
        await self._task
        if self.error is not None and raise_error:
            raise self.error
