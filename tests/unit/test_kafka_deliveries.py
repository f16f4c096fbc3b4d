"""A Kafka delivery whose caller gave up on it (no broker: the producer's future is driven by hand)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError

from qtasks.connectors.kafka.producer import KafkaProducer


def bare_producer() -> KafkaProducer:
    producer = KafkaProducer.__new__(KafkaProducer)
    producer._client = None
    producer._connector = SimpleNamespace(where="127.0.0.1:1")  # type: ignore[assignment]
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
