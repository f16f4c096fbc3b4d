"""Starting aiokafka clients so that a caller who gives up leaves no connection behind."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("qtasks.kafka")

#: How often (seconds) an abandoned start is looked at to see whether it is past its bootstrap.
_LOOK = 0.02


class Starts:
    """A connector's client starts, each run whole.

    aiokafka's bootstrap keeps its first connection in a local variable until the
    cluster's metadata has come back: a cancel that lands there (a stream given up, a
    timeout, a worker stopping) leaves that connection open and unreachable. So a start
    runs as a task of its own and a caller who gives up does not reach into it: the
    caller gets its cancel or timeout at once, and the start is *abandoned*: once it ends
    (each of aiokafka's requests is bounded by ``request_timeout_ms``; the whole by
    ``bound``) its client is stopped. :meth:`drain` waits for the abandoned ones (the
    connector's stop).
    """

    def __init__(self, bound: float) -> None:
        self._bound = bound
        self._abandoned: set[asyncio.Task[None]] = set()

    async def run(
        self,
        start: Callable[[], Awaitable[Any]],
        stop: Callable[[], Awaitable[Any]],
        *,
        bootstrapped: Callable[[], bool] | None = None,
    ) -> None:
        """``start()`` the client, or leave it stopped (now, or once an abandoned start ends).

        On return the client is started. Whatever this raises (the start's own error, the
        caller's cancel or timeout), the caller must not stop the client: it is stopped here.
        ``bootstrapped`` (the client is past its bootstrap) lets an abandoned start be
        cancelled as soon as that is safe: a transactional producer's start goes on to ask
        for its producer id until it gets one, and a late answer would fence the producer
        that replaced it.
        """
        task = asyncio.ensure_future(start())
        try:
            await asyncio.shield(task)
        except BaseException:
            if task.done():
                if not task.cancelled():
                    task.exception()  # looked at: its own error is raised, or the caller's
                await asyncio.shield(self._stop(stop))
            else:
                finisher = asyncio.ensure_future(self._finish(task, stop, bootstrapped))
                self._abandoned.add(finisher)
                finisher.add_done_callback(self._abandoned.discard)
            raise

    async def _finish(
        self, task: asyncio.Future[Any], stop: Callable[[], Awaitable[Any]], bootstrapped: Callable[[], bool] | None
    ) -> None:
        try:
            async with asyncio.timeout(self._bound):
                if bootstrapped is not None:
                    while not task.done() and not bootstrapped():
                        await asyncio.wait([task], timeout=_LOOK)
                    task.cancel()
                await task
        except BaseException as exc:  # the caller has its own error already
            log.debug("an abandoned Kafka client start ended with %r", exc)
        await self._stop(stop)

    @staticmethod
    async def _stop(stop: Callable[[], Awaitable[Any]]) -> None:
        try:
            await stop()
        except Exception as exc:  # the client is being dropped anyway
            log.debug("stopping a Kafka client that did not start: %r", exc)

    async def drain(self) -> None:
        """Wait until every abandoned start has ended and its client is stopped.

        A cancel of this wait leaves them running (``asyncio.wait`` cancels nothing).
        """
        while self._abandoned:
            await asyncio.wait(set(self._abandoned))
