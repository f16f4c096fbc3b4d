"""Python 3.11's asyncio.wait_for can turn a cancellation into its inner call's error: retry loops must still stop.

aiokafka waits with wait_for inside. When ``task.cancel()`` and the inner call's failure
land in the same loop iteration, 3.11's wait_for raises the failure instead of
CancelledError; a loop that retries on that failure would run on after the cancel.
These tests make exactly that happen and check that every retry loop stops.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from qtasks.connectors.kafka.errors import kafka_errors
from qtasks.delivery import deliver
from qtasks.exc import ConnectorError
from qtasks.supervise import Supervisor


async def lost_cancel(fut: asyncio.Future[None]) -> None:
    """What aiokafka does: wait for an inner call with wait_for."""
    await asyncio.wait_for(fut, 10)


async def cancel_as_it_fails(task: asyncio.Task[Any], fut: asyncio.Future[None]) -> None:
    await asyncio.sleep(0.01)  # the task waits in wait_for now
    task.cancel()
    fut.set_exception(OSError("connection refused"))  # the same loop iteration


async def test_wait_for_really_loses_a_cancellation_here() -> None:
    """The hazard itself, so the tests below test something."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(lost_cancel(fut))
    await cancel_as_it_fails(task, fut)
    with pytest.raises((OSError, asyncio.CancelledError)) as caught:
        await task
    if sys.version_info < (3, 12):
        assert caught.type is OSError  # 3.11 loses it; 3.12's wait_for keeps it


async def test_the_kafka_error_edge_raises_a_lost_cancellation_as_one() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def call() -> None:
        with kafka_errors("probe", servers="127.0.0.1:1"):
            await lost_cancel(fut)

    task = asyncio.ensure_future(call())
    await cancel_as_it_fails(task, fut)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_retried_delivery_stops_when_its_cancellation_was_lost() -> None:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[None]] = []

    async def send() -> None:
        fut: asyncio.Future[None] = loop.create_future()
        futures.append(fut)
        try:
            await lost_cancel(fut)
        except OSError as exc:
            raise ConnectorError(str(exc), retriable=True) from exc

    task = asyncio.ensure_future(deliver(send, what="a record"))
    await asyncio.sleep(0.01)  # the delivery waits in its first try now
    await cancel_as_it_fails(task, futures[0])
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert len(futures) == 1  # no retry after the cancel


async def test_a_supervised_loop_whose_cancellation_was_lost_is_not_restarted() -> None:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[None]] = []

    async def body() -> None:
        fut: asyncio.Future[None] = loop.create_future()
        futures.append(fut)
        await lost_cancel(fut)

    supervisor = Supervisor("test")
    supervisor.spawn("loop", body)
    await asyncio.sleep(0.01)  # the loop waits in its first run now
    (task,) = supervisor._tasks.values()
    await cancel_as_it_fails(task, futures[0])
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert len(futures) == 1 and supervisor.error is None
