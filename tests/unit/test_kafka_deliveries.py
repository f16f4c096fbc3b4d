"""Kafka deliveries as the engine sees them (no broker: aiokafka's futures are driven by hand)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, NotLeaderForPartitionError, ProducerFenced

from qtasks.connectors.kafka.producer import KafkaProducer
from qtasks.connectors.kafka.transactions import KafkaTxnProducer
from qtasks.exc import ConnectorError, ProducerFencedError
from qtasks.runner import ResultSink


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
    delivery = bare_producer()._deliveries_of("t", 0, None).add(raw)
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
    deliveries = [producer._deliveries_of("t", 0, None).add(raw) for raw in raws]
    other = producer._deliveries_of("t", 1, None).add(loop.create_future())  # another partition: untouched
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
    # Records sent afterwards end in order as usual.
    later = [loop.create_future() for _ in range(2)]
    after = [producer._deliveries_of("t", 0, None).add(raw) for raw in later]
    for n, raw in enumerate(later):
        raw.set_result(n)
    await asyncio.sleep(0)
    assert [delivery.result() for delivery in after] == [0, 1]
    del deliveries, failed
    assert errors == []


async def test_a_rebuilt_producer_keeps_no_reference_to_the_client_it_replaced() -> None:
    """After a rebuild the old aiokafka producer (its connections, metadata and buffers) is
    garbage once its records are done, also when their partitions are never written again."""
    loop = asyncio.get_running_loop()
    producer = KafkaProducer(SimpleNamespace(where="127.0.0.1:1"))  # type: ignore[arg-type]

    class Client:  # stands for an AIOKafkaProducer
        async def stop(self) -> None:
            pass

    async def start() -> None:
        producer._client = Client()  # type: ignore[assignment]

    producer.start = start  # type: ignore[method-assign]
    old = Client()
    producer._client = old  # type: ignore[assignment]
    raw: asyncio.Future[Any] = loop.create_future()
    delivery = producer._deliveries_of("t", 0, producer._client).add(raw)
    raw.set_result(SimpleNamespace(offset=0))
    await asyncio.sleep(0)
    assert delivery.result().offset == 0
    await producer._rebuild("a delivery failed")
    assert producer._client is not old
    gone = weakref.ref(old)
    del old, raw, delivery
    gc.collect()
    assert gone() is None, "the replaced aiokafka producer is still referenced"


def bare_sink(deliveries: list[asyncio.Future[Any]]) -> ResultSink:
    """A result sink whose sends hand back ``deliveries``, one per value, in order."""
    handed = iter(deliveries)

    async def send(*args: Any, **kwargs: Any) -> Any:
        return next(handed)

    config = SimpleNamespace(resume_mismatch="warn", returning_max_items=100, returning_max_bytes=1 << 20)
    core: Any = SimpleNamespace(
        broker=SimpleNamespace(producer=SimpleNamespace(send=send)),
        topics=SimpleNamespace(results="results"),
        record_limit=lambda topic: 1 << 20,
        trouble=None,
        config=config,
    )
    return ResultSink(core, "u-1", 1, 0)


async def test_the_sink_settles_its_values_while_a_lease_renewal_takes_some_in() -> None:
    """A lease renewal waits for the last value's delivery, then takes in what is done
    (``settle_done``); a run that ends meanwhile with its end marker refused settles its
    values (``settle``) and waits for the same delivery. Whichever wakes first, every value
    is taken in once, with its own seq."""
    loop = asyncio.get_running_loop()
    first, last = loop.create_future(), loop.create_future()
    sink = bare_sink([first, last])
    await sink.emit("a")
    await sink.emit("b")

    async def renew() -> None:  # the steps of TaskRun.renew with a checkpoint to write
        await asyncio.wait([last], timeout=5)
        sink.settle_done()

    renewing = asyncio.create_task(renew())
    await asyncio.sleep(0)
    settling = asyncio.create_task(sink.settle())
    await asyncio.sleep(0)
    first.set_result(SimpleNamespace(offset=6))
    for _ in range(5):  # the settle takes the first in and waits for the last, after the renewal
        await asyncio.sleep(0)
    assert list(sink._pending) == [last] and not settling.done()
    last.set_exception(ConnectorError("refused"))
    await renewing
    await settling
    assert sink.failed_seq == 1
    assert isinstance(sink.error, ConnectorError)


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
