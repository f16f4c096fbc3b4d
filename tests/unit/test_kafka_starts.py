"""A Kafka client's start that its caller gives up is finished, then stopped: no connection is left open.

aiokafka's bootstrap leaks its first connection when a cancel lands inside it; these
tests stand a controllable start in for aiokafka's (no broker needed).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from qtasks.config import QueueConfig
from qtasks.connectors.kafka.connector import KafkaConnector
from qtasks.connectors.kafka.starts import Starts
from qtasks.exc import BrokerUnavailableError


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


async def abandon(starts: Starts, client: Client, **options: Any) -> None:
    """Start ``client`` and cancel the caller while the start is under way."""
    caller = asyncio.create_task(starts.run(client.start, client.stop, **options))
    await client.entered.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


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
    await abandon(starts, client)
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
    await abandon(starts, client)
    async with asyncio.timeout(5):
        await starts.drain()
    assert client.cancelled and client.stops == 1


async def test_a_cancelled_drain_leaves_the_abandoned_starts_running() -> None:
    starts, client = Starts(bound=5), Client()
    await abandon(starts, client)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):
            await starts.drain()  # a stop under a deadline
    assert not client.cancelled  # still not cut inside aiokafka's bootstrap
    client.release.set()
    await starts.drain()
    assert client.started and client.stops == 1


async def test_an_abandoned_start_past_its_bootstrap_is_cancelled_at_once() -> None:
    # A transactional producer's start asks for its producer id until it gets one; left
    # running, a late answer would fence the producer that replaced it.
    starts, client = Starts(bound=30), Client()
    bootstrapped = False
    await abandon(starts, client, bootstrapped=lambda: bootstrapped)
    await asyncio.sleep(0.05)
    assert not client.cancelled  # still bootstrapping: left alone
    bootstrapped = True
    async with asyncio.timeout(1):
        await starts.drain()
    assert client.cancelled and client.stops == 1


async def test_a_connector_whose_start_is_given_up_raises_at_once_and_stops_the_client_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release, closed = asyncio.Event(), []

    async def slow_start(self: object) -> None:  # a bootstrap whose metadata request is not answered yet
        await release.wait()

    async def close(self: object) -> None:
        closed.append(self)

    async def reachable(timeout: float) -> None:
        return None

    monkeypatch.setattr(AIOKafkaAdminClient, "start", slow_start)
    monkeypatch.setattr(AIOKafkaAdminClient, "close", close)
    kafka = KafkaConnector("kafka://127.0.0.1:1?connect_timeout=0.2", QueueConfig())
    monkeypatch.setattr(kafka.health, "wait_until_reachable", reachable)
    started = asyncio.get_running_loop().time()
    with pytest.raises(BrokerUnavailableError):
        await kafka.start()
    assert asyncio.get_running_loop().time() - started < 1.0
    assert not closed
    release.set()
    await kafka.stop()
    assert len(closed) == 1
