"""Kafka deliveries as the engine sees them (no broker: aiokafka's futures are driven by hand)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, NotLeaderForPartitionError, ProducerFenced

from qtasks.connectors.kafka.producer import KafkaProducer
from qtasks.connectors.kafka.transactions import KafkaTxnProducer
from qtasks.exc import ConnectorError, ProducerFencedError


def bare_producer() -> KafkaProducer:
    producer = KafkaProducer.__new__(KafkaProducer)
    producer._client = None
    producer._connector = SimpleNamespace(where="127.0.0.1:1")  # type: ignore[assignment]
    producer._deliveries = {}
    return producer


@pytest.mark.parametrize("outcome", ["stored", "failed"])
async def test_a_delivery_whose_caller_gave_up_ends_without_an_error_in_a_callback(outcome: str) -> None:
    """A caller that awaits a delivery under a timeout cancels it when time runs out; the broker's
    answer comes later. That answer must not raise in the loop's callback (InvalidStateError)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    raw: asyncio.Future[Any] = loop.create_future()
    delivery = bare_producer()._mapped(raw, "t", 0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await delivery
    assert delivery.cancelled()
    if outcome == "stored":
        raw.set_result("metadata")
    else:
        raw.set_exception(KafkaTimeoutError())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert errors == []


async def test_each_delivery_ends_as_its_own_record_did_also_out_of_order() -> None:
    """One callback serves a partition's deliveries; records usually end in the order sent,
    but a stopping producer fails what it holds in any order: each caller still gets its own
    record's outcome, a failure as a ConnectorError already marked as retrieved."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    producer = bare_producer()
    raws: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(4)]
    deliveries = [producer._mapped(raw, "t", 0) for raw in raws]
    other = producer._mapped(loop.create_future(), "t", 1)  # another partition: untouched
    raws[2].set_exception(NotLeaderForPartitionError())
    raws[0].set_result("first")
    raws[3].cancel()
    raws[1].set_result("second")
    await asyncio.sleep(0)
    assert deliveries[0].result() == "first"
    assert deliveries[1].result() == "second"
    failed = deliveries[2].exception()
    assert isinstance(failed, ConnectorError) and failed.retriable
    assert "t[0]" in str(failed)
    assert deliveries[3].cancelled()
    assert not other.done()
    del deliveries, failed
    assert errors == []


async def test_a_transactional_delivery_moves_the_partition_end_and_says_fenced_when_fenced() -> None:
    """Exactly-once: a stored record moves ``known_end`` (where a stream of the task starts);
    a record refused because a newer owner took the transactional id says so."""
    loop = asyncio.get_running_loop()
    producer = KafkaTxnProducer.__new__(KafkaTxnProducer)
    producer._connector = SimpleNamespace(where="127.0.0.1:1")  # type: ignore[assignment]
    producer.transactional_id = "qtasks-tasks-0"
    producer._ends = {}
    producer._deliveries = {}
    stored, fenced = loop.create_future(), loop.create_future()
    first, second = producer._mapped(stored, "t", 2), producer._mapped(fenced, "t", 2)
    stored.set_result(SimpleNamespace(offset=41))
    fenced.set_exception(ProducerFenced())
    await asyncio.sleep(0)
    assert first.result().offset == 41
    assert producer.known_end("t", 2) == 42
    assert isinstance(second.exception(), ProducerFencedError)
