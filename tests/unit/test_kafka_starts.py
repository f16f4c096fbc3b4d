"""A Kafka client's start that its caller gives up is finished, then stopped: no connection is left open.

aiokafka's bootstrap leaks its first connection when a cancel lands inside it; these
tests stand a controllable start in for aiokafka's (no broker needed).
"""

from __future__ import annotations

import asyncio

import pytest

from qtasks.connectors.kafka.starts import Starts


class Client:
    def __init__(self, fails: bool = False) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.fails = fails
        self.started = False
        self.stops = 0
        self.cancelled = False

    async def start(self) -> None:
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fails:
            raise OSError("connection refused")
        self.started = True

    async def stop(self) -> None:
        self.stops += 1


async def test_a_start_that_ends_leaves_the_client_to_its_caller() -> None:
    starts, client = Starts(bound=5), Client()
    client.release.set()
    await starts.run(client.start, client.stop)
    assert client.started and client.stops == 0


async def test_a_start_that_fails_is_stopped_and_raises() -> None:
    starts, client = Starts(bound=5), Client(fails=True)
    client.release.set()
    with pytest.raises(OSError, match="refused"):
        await starts.run(client.start, client.stop)
    assert client.stops == 1


async def test_a_cancelled_caller_returns_at_once_and_the_start_is_finished_then_stopped() -> None:
    starts, client = Starts(bound=5), Client()
    caller = asyncio.create_task(starts.run(client.start, client.stop))
    await client.entered.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # The cancel did not reach into the start (where aiokafka would leak its connection).
    assert not client.cancelled and client.stops == 0
    client.release.set()
    await starts.drain()
    assert client.started and client.stops == 1


async def test_a_callers_timeout_is_its_own_and_the_start_is_stopped_when_it_ends() -> None:
    starts, client = Starts(bound=5), Client()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await starts.run(client.start, client.stop)
    assert not client.cancelled
    client.release.set()
    await starts.drain()
    assert client.stops == 1


async def test_an_abandoned_start_that_never_ends_is_cancelled_at_the_bound_and_stopped() -> None:
    starts, client = Starts(bound=0.05), Client()
    caller = asyncio.create_task(starts.run(client.start, client.stop))
    await client.entered.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    async with asyncio.timeout(5):
        await starts.drain()
    assert client.cancelled and client.stops == 1
