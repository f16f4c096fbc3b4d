"""Sending a record that must arrive: retried while the failure is retriable, quiet while it lasts.

Status writes and task submissions go through :func:`deliver`. A retriable
:class:`~qtasks.exc.ConnectorError` (the broker is unreachable, a leader moved) is
retried with a capped backoff until the record is stored or the caller gives up
(cancellation, or its own deadline); the first failure is logged once as a WARNING and
the recovery once as INFO, never a line per try. A non-retriable error (a record over
the size limit, an authorization failure) is raised at once. Result values are not sent
through here: they are the hot path, and their failures surface at the attempt's end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from qtasks.exc import ConnectorError
from qtasks.supervise import raise_if_cancelled

log = logging.getLogger("qtasks.delivery")

T = TypeVar("T")


class Trouble:
    """How many deliveries are waiting for the broker right now (a worker takes no new tasks meanwhile).

    The first one to wait logs one WARNING, the last one to get through one INFO with
    how long it lasted: an outage is two lines, however many records wait.
    """

    def __init__(self) -> None:
        self.waiting = 0
        self.since: float | None = None

    def enter(self, what: str, exc: BaseException) -> None:
        if self.waiting == 0:
            self.since = time.monotonic()
            log.warning("the broker does not take records (%s: %s); retrying until it does", what, exc)
        self.waiting += 1

    def leave(self) -> None:
        self.waiting -= 1
        if self.waiting == 0 and self.since is not None:
            log.info("the broker takes records again after %.1f s", time.monotonic() - self.since)
            self.since = None

    def __bool__(self) -> bool:
        return self.waiting > 0


def retry_delay(tries: int, base: float = 0.05, cap: float = 2.0) -> float:
    """Seconds before try number ``tries + 1`` of a delivery (``tries`` failed so far, 1-based)."""
    return min(cap, base * 2.0 ** max(0, tries - 1))


async def deliver(
    send: Callable[[], Awaitable[Awaitable[Any] | None]],
    *,
    what: str,
    durable: bool = True,
    trouble: Trouble | None = None,
    wanted: Callable[[], bool] | None = None,
) -> None:
    """Run ``send()`` (which enqueues one record and may return its delivery) until it succeeds.

    With ``durable`` the delivery is awaited too (the record is stored when this returns).
    ``wanted`` is asked before each new try: a record that is no longer wanted (a lease
    renewal of a task that ended meanwhile) is dropped instead of written late.
    """
    tries = 0
    started = 0.0
    try:
        while True:
            if tries and wanted is not None and not wanted():
                log.debug("%s dropped: no longer wanted", what)
                return
            try:
                delivery = await send()
                if durable and delivery is not None:
                    await delivery
            except ConnectorError as exc:
                raise_if_cancelled()
                if not exc.retriable:
                    raise
                tries += 1
                if tries == 1:
                    started = time.monotonic()
                    log.debug("%s waits for the broker: %s (retrying)", what, exc)
                    if trouble is not None:
                        trouble.enter(what, exc)
                await asyncio.sleep(retry_delay(tries))
                continue
            if tries:
                log.debug("%s stored after %d tries (%.1f s)", what, tries + 1, time.monotonic() - started)
            return
    finally:
        if tries and trouble is not None:
            trouble.leave()


async def deliver_together(
    sends: list[tuple[Callable[[], Awaitable[Awaitable[Any] | None]], str]], *, trouble: Trouble | None = None
) -> None:
    """Deliver several records durably with one wait: enqueue them all, then await their deliveries.

    A record whose enqueue or delivery fails goes through :func:`deliver` (retried while
    retriable). On a connector whose sends are stored at once (memory), nothing here yields
    to the event loop.
    """
    enqueued: list[tuple[Callable[[], Awaitable[Awaitable[Any] | None]], str, Awaitable[Any] | None, bool]] = []
    for send, what in sends:
        try:
            enqueued.append((send, what, await send(), True))
        except ConnectorError as exc:
            raise_if_cancelled()
            if not exc.retriable:
                raise
            enqueued.append((send, what, None, False))
    for send, what, delivery, ok in enqueued:
        if ok and delivery is not None:
            try:
                await delivery
            except ConnectorError as exc:
                raise_if_cancelled()
                if not exc.retriable:
                    raise
                ok = False
        if not ok:
            await deliver(send, what=what, trouble=trouble)


async def retried(call: Callable[[], Awaitable[T]], *, what: str, trouble: Trouble | None = None) -> T:
    """Run a read (``call()``) until it answers: a retriable failure (the broker is away) is
    tried again with a capped backoff, quietly (one WARNING and one INFO through ``trouble``);
    any other failure is raised."""
    tries = 0
    try:
        while True:
            try:
                return await call()
            except ConnectorError as exc:
                raise_if_cancelled()
                if not exc.retriable:
                    raise
                tries += 1
                if tries == 1 and trouble is not None:
                    trouble.enter(what, exc)
                await asyncio.sleep(retry_delay(tries))
    finally:
        if tries and trouble is not None:
            trouble.leave()


async def fetch(consumer: Any, timeout: float, max_records: int | None = None) -> list[Any]:
    """One ``getmany`` of a loop: a retriable failure (the broker is away) waits 0.5 s and
    returns nothing, quietly (the connector logs the outage once); any other is raised."""
    try:
        records: list[Any] = await consumer.getmany(timeout=timeout, max_records=max_records)
    except ConnectorError as exc:
        raise_if_cancelled()
        if not exc.retriable:
            raise
        await asyncio.sleep(0.5)
        return []
    return records
