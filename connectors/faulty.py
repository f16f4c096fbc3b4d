"""A connector that fails on demand: wrap any connector and plan its faults.

Tests of the engine's fault paths need I/O that fails when they say, in milliseconds
and without a broker. ``FaultyConnector`` wraps a connector (``memory://`` in practice;
``faulty+memory://name`` builds one) and follows a plan held in ``faults``::

    broker = FaultyConnector(MemoryConnector("memory://x"))   # app.broker of "faulty+memory://x"
    broker.faults.fail("send", nth=2)                   # the 2nd send from now raises
    broker.faults.fail("delivery", topic="app.results") # a result is lost; its delivery and the next flush raise
    broker.faults.delay("fetch", 0.5, times=3)          # the next 3 getmany calls wait 0.5 s first
    held = broker.faults.hold("fetch", topic="app.status")  # status reads wait until held.release()
    broker.faults.down()                                # an outage: every operation raises BrokerUnavailableError
    broker.faults.up()
    assert broker.faults.calls["commit"] == 3

The operations a plan names, and what a fault does to each:

- ``start`` (connector and consumers), ``ensure_topics``, ``send``, ``flush``, ``commit``,
  ``fetch`` (``getmany``), ``end_offsets`` (and ``offsets_for_times``: both are Kafka's
  ListOffsets), ``seek`` (and ``seek_to_end``, ``seek_to_beginning``): the call waits for
  any delay, then raises the error. ``position`` too, but an outage does not fail it: a
  Kafka consumer knows its positions and asks the broker only while a partition's offset
  is being reset, which a plan for ``position`` stands for.
- ``txn_send``, ``txn_commit`` (exactly-once): a transactional producer's ``send``, and
  its ``commit`` (a failed commit leaves the transaction open, as a lost commit request
  does); ``start`` covers its ``start`` too.
- ``delivery``: ``send`` succeeds and returns the record's delivery, an awaitable. A
  record whose delivery fails is never written, nor are the records of its partition
  sent while it was pending (their deliveries fail too, as an idempotent producer's
  batches behind a failed one do). One delayed is written when its delivery resolves.
  Records of one partition are written in the order they were sent.

``flush`` waits for every delivery pending when it is called, then raises the first
delivery failure since the last flush (once), as Kafka's producer reports a failed
batch. ``stop``, ``partitions_for`` and the calls that only change the consumer's own
state (``assign``, ``subscribe``, ``pause``, ...) never fail. ``topic=`` restricts a
fault to records of that topic, or to consumers that read it (or, for ``end_offsets``,
ask about it).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from qtasks.connectors.base import (
    Connector,
    Consumer,
    GroupInfo,
    Producer,
    RebalanceListener,
    Record,
    ShareConsumer,
    TopicPartition,
    TopicSpec,
    TxnProducer,
)
from qtasks.exc import BrokerUnavailableError, ConnectorError

__all__ = ["Faults", "FaultyConnector", "Hold", "Op"]

Op = Literal[
    "start",
    "ensure_topics",
    "send",
    "delivery",
    "flush",
    "commit",
    "fetch",
    "end_offsets",
    "seek",
    "position",
    "txn_send",
    "txn_commit",
    "describe_group",
]
_OPS = frozenset(get_args(Op))
Error = BaseException | type[BaseException]


@dataclass
class _Rule:
    op: Op
    topic: str | None
    skip: int  # matching calls to let through first
    times: int | None  # matching calls it then applies to (None: every one)
    delay: float = 0.0
    error: Error | None = None
    hold: Hold | None = None  # matching calls wait until it is released (then the rule goes)


class Hold:
    """Calls held by :meth:`Faults.hold`: how many wait now, and their release."""

    def __init__(self) -> None:
        self._released = asyncio.Event()
        #: Calls waiting for the release now.
        self.waiting = 0

    def release(self) -> None:
        """Let the held calls go, and every later one."""
        self._released.set()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released.is_set()

    async def wait(self) -> None:
        self.waiting += 1
        try:
            await self._released.wait()
        finally:
            self.waiting -= 1


class Faults:
    """The plan of a :class:`FaultyConnector`, and how often each operation was called."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._rules: list[_Rule] = []
        self._down = False

    def fail(
        self, op: Op, *, nth: int = 1, times: int = 1, error: Error | None = None, topic: str | None = None
    ) -> None:
        """Make the ``nth`` matching call of ``op`` from now on, and the ``times - 1`` after it, raise ``error``.

        The default error is a retriable ``ConnectorError("injected fault")``.
        """
        error = error if error is not None else ConnectorError("injected fault", retriable=True)
        self._add(_Rule(op, topic, nth - 1, times, error=error))

    def delay(
        self, op: Op, seconds: float, *, nth: int = 1, topic: str | None = None, times: int | None = None
    ) -> None:
        """Delay the matching calls of ``op`` by ``seconds``, from the ``nth`` from now on (the
        next ``times``; every one if None)."""
        self._add(_Rule(op, topic, nth - 1, times, delay=seconds))

    def hold(self, op: Op, *, topic: str | None = None) -> Hold:
        """Hold every matching call of ``op`` from now on until the returned hold is released
        (or :meth:`clear`): a wait as long as the test needs, not a guess in seconds. Any
        operation a delay applies to but ``delivery``. A call already in the inner connector
        is not held (one still sleeping out a delay is). Over memory://, a group consumer
        rebalances inside ``getmany``: holding its ``fetch`` holds its group's rebalances too."""
        if op == "delivery":
            raise ValueError("a delivery cannot be held: delay it")
        hold = Hold()
        self._add(_Rule(op, topic, 0, None, hold=hold))
        return hold

    def down(self) -> None:
        """Start an outage: every operation raises ``BrokerUnavailableError`` (retriable) until :meth:`up`."""
        self._down = True

    @property
    def is_down(self) -> bool:
        """Whether an outage is on."""
        return self._down

    def up(self) -> None:
        """End an outage."""
        self._down = False

    def clear(self) -> None:
        """Forget the plan and the call counts, end any outage and let held calls go."""
        for rule in self._rules:
            if rule.hold is not None:
                rule.hold.release()
        self._rules.clear()
        self.calls.clear()
        self._down = False

    def _add(self, rule: _Rule) -> None:
        if rule.op not in _OPS:
            raise ValueError(f"unknown operation {rule.op!r}: use one of {sorted(_OPS)}")
        if rule.skip < 0 or (rule.times is not None and rule.times < 1):
            raise ValueError("nth and times count calls: they must be 1 or more")
        self._rules.append(rule)

    def take(self, op: Op, topics: Iterable[str] = (), *, outage: bool = True) -> tuple[float, Error | None]:
        """Count a call of ``op`` on ``topics`` and return its fate: a delay, and an error or None
        (``outage``: whether an outage fails it)."""
        self.calls[op] += 1
        if self._down and outage:
            return 0.0, BrokerUnavailableError("injected outage: the broker is down until faults.up()")
        topics = set(topics)
        delay, error = 0.0, None
        for rule in list(self._rules):
            if rule.op != op or (rule.topic is not None and rule.topic not in topics) or rule.hold is not None:
                continue
            if rule.skip:
                rule.skip -= 1
                continue
            if rule.times is not None:
                rule.times -= 1
                if rule.times <= 0:
                    self._rules.remove(rule)
            delay += rule.delay
            error = error or rule.error
        return delay, error

    async def enter(self, op: Op, topics: Iterable[str] = (), *, outage: bool = True) -> None:
        """Apply the plan to a call of ``op``: wait for its delay, then raise its error, if any."""
        delay, error = self.take(op, topics, outage=outage)
        if delay:
            await asyncio.sleep(delay)
        topics = set(topics)
        for rule in list(self._rules):
            hold = rule.hold
            if hold is not None and rule.op == op and (rule.topic is None or rule.topic in topics):
                await hold.wait()
                if rule in self._rules:
                    self._rules.remove(rule)
        if error is not None:
            raise error


class FaultyProducer:
    """Sends through the inner producer, failing or delaying sends and deliveries as planned."""

    def __init__(self, inner: Producer, faults: Faults) -> None:
        self._inner = inner
        self._faults = faults
        self._tails: dict[tuple[str, int], asyncio.Task[Any]] = {}  # the last pending delivery per partition
        self._pending: set[asyncio.Task[Any]] = set()
        self._failure: BaseException | None = None  # the first failed delivery since the last flush

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        partition: int,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Awaitable[Any] | None:
        """Send a record; return its delivery if it has a planned fault or waits behind one."""
        await self._faults.enter("send", (topic,))
        delay, error = self._faults.take("delivery", (topic,))
        tail = self._tails.get((topic, partition))
        if not delay and error is None and tail is None:
            return await self._inner.send(topic, value, key=key, partition=partition, headers=headers)
        delivery = asyncio.create_task(self._deliver(tail, delay, error, topic, value, key, partition, headers))
        self._tails[(topic, partition)] = delivery
        self._pending.add(delivery)
        delivery.add_done_callback(lambda d: self._delivered((topic, partition), d))
        return delivery

    async def _deliver(
        self,
        tail: asyncio.Task[Any] | None,
        delay: float,
        error: Error | None,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        partition: int,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Any:
        if tail is not None:
            await asyncio.wait({tail})  # keep the partition's order
            if error is None and not tail.cancelled():
                # An idempotent producer fails the batches in flight behind a failed one.
                error = tail.exception()
        await asyncio.sleep(delay)
        if error is None and self._faults.is_down:
            error = BrokerUnavailableError("injected outage: the broker went down before the record was delivered")
        if error is not None:
            raise error
        sent = await self._inner.send(topic, value, key=key, partition=partition, headers=headers)
        return await sent if sent is not None else None

    def _delivered(self, tp: tuple[str, int], delivery: asyncio.Task[Any]) -> None:
        self._pending.discard(delivery)
        if self._tails.get(tp) is delivery:
            del self._tails[tp]
        error = None if delivery.cancelled() else delivery.exception()  # also marks it retrieved
        if error is not None and self._failure is None:
            self._failure = error

    async def flush(self) -> None:
        """Wait for the pending deliveries and the inner flush; raise the first delivery failure since the last flush."""
        await self._faults.enter("flush")
        if self._pending:
            await asyncio.wait(set(self._pending))
        await self._inner.flush()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def known_end(self, topic: str, partition: int) -> int | None:
        """What the inner producer knows."""
        return self._inner.known_end(topic, partition)


class FaultyConsumer:
    """Reads through the inner consumer, failing or delaying its broker calls as planned."""

    def __init__(self, inner: Consumer, faults: Faults) -> None:
        self._inner = inner
        self._faults = faults
        self._topics: set[str] = set()  # what it reads, for faults restricted to a topic

    async def start(self) -> None:
        """Start (a group member joins its group)."""
        await self._faults.enter("start", self._topics)
        await self._inner.start()

    async def stop(self) -> None:
        """Stop; never fails, so cleanup always can."""
        await self._inner.stop()

    def subscribe(self, topics: list[str], listener: RebalanceListener) -> None:
        """Subscribe as a group member."""
        self._topics = set(topics)
        self._inner.subscribe(topics, listener)

    def rejoin(self) -> None:
        """Ask the group for a rebalance (never fails)."""
        self._inner.rejoin()

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read these partitions."""
        partitions = list(partitions)
        self._topics = {tp.topic for tp in partitions}
        self._inner.assign(partitions)

    def assignment(self) -> set[TopicPartition]:
        """The partitions read now."""
        return self._inner.assignment()

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` on (op ``seek``)."""
        await self._faults.enter("seek", self._topics)
        await self._inner.seek(tp, offset)

    async def seek_to_end(self, partitions: Iterable[TopicPartition]) -> None:
        """Read only new records (op ``seek``)."""
        await self._faults.enter("seek", self._topics)
        await self._inner.seek_to_end(partitions)

    async def seek_to_beginning(self, partitions: Iterable[TopicPartition]) -> None:
        """Read from the oldest record (op ``seek``)."""
        await self._faults.enter("seek", self._topics)
        await self._inner.seek_to_beginning(partitions)

    async def getmany(self, timeout: float, max_records: int | None = None) -> list[Record]:
        """Fetch records (op ``fetch``: a delay comes before the inner wait)."""
        await self._faults.enter("fetch", self._topics)
        return await self._inner.getmany(timeout, max_records)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit offsets (op ``commit``)."""
        await self._faults.enter("commit", self._topics)
        await self._inner.commit(offsets)

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop returning records of these partitions."""
        self._inner.pause(partitions)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        """Return records of these partitions again."""
        self._inner.resume(partitions)

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The end of each partition (op ``end_offsets``)."""
        await self._faults.enter("end_offsets", self._topics | {tp.topic for tp in partitions})
        return await self._inner.end_offsets(partitions)

    def high_watermark(self, tp: TopicPartition) -> int | None:
        """The partition's end including undecided transactions, as last fetched."""
        return self._inner.high_watermark(tp)

    async def position(self, tp: TopicPartition) -> int:
        """The next offset this consumer returns from ``tp`` (op ``position``, which an outage
        does not fail: a Kafka consumer knows its positions, and asks the broker only while a
        partition's offset is being reset)."""
        await self._faults.enter("position", self._topics | {tp.topic}, outage=False)
        return await self._inner.position(tp)

    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict[TopicPartition, int | None]:
        """Offsets by time (op ``end_offsets``: Kafka's ListOffsets serves both)."""
        await self._faults.enter("end_offsets", self._topics | {tp.topic for tp in timestamps})
        return await self._inner.offsets_for_times(timestamps)


class FaultyTxnProducer:
    """A transactional producer whose ``start``, ``send`` and ``commit`` fail or wait as planned."""

    def __init__(self, inner: TxnProducer, faults: Faults) -> None:
        self.inner = inner
        self.transactional_id = inner.transactional_id
        self._faults = faults

    async def start(self) -> None:
        """Register the transactional id (op ``start``)."""
        await self._faults.enter("start")
        await self.inner.start()

    async def stop(self) -> None:
        """Abort what is open; never fails."""
        await self.inner.stop()

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        partition: int,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Any:
        """Send in the transaction (op ``txn_send``)."""
        await self._faults.enter("txn_send", [topic])
        return await self.inner.send(topic, value, key=key, partition=partition, headers=headers)

    async def send_offsets(self, offsets: dict[TopicPartition, int], group_id: str) -> None:
        """Add offsets to the transaction (it fails with the commit, op ``txn_commit``)."""
        await self.inner.send_offsets(offsets, group_id)

    async def commit(self) -> None:
        """Commit (op ``txn_commit``)."""
        await self._faults.enter("txn_commit")
        await self.inner.commit()

    async def abort(self) -> None:
        """Abort; never fails."""
        await self.inner.abort()

    def known_end(self, topic: str, partition: int) -> int | None:
        """The inner producer's."""
        return self.inner.known_end(topic, partition)


class FaultyConnector:
    """A connector that wraps ``inner`` and fails or delays its I/O as ``faults`` plans."""

    def __init__(self, inner: Connector) -> None:
        self.inner = inner
        self.url = f"faulty+{inner.url}"
        self.faults = Faults()
        self._producer = FaultyProducer(inner.producer, self.faults)

    async def start(self) -> None:
        """Connect (op ``start``)."""
        await self.faults.enter("start")
        await self.inner.start()

    @property
    def reachable(self) -> bool:
        """False during an injected outage."""
        return not self.faults.is_down and self.inner.reachable

    @property
    def unreachable_since(self) -> float | None:
        """The inner connector's (an injected outage has no start time of its own)."""
        return self.inner.unreachable_since

    def record_limit(self, topic: str) -> int:
        """The inner connector's limit."""
        return self.inner.record_limit(topic)

    async def describe_group(self, group_id: str) -> GroupInfo:
        """The inner connector's view of the group (op ``describe_group``)."""
        await self.faults.enter("describe_group")
        return await self.inner.describe_group(group_id)

    async def stop(self) -> None:
        """Disconnect; never fails, so cleanup always can."""
        await self.inner.stop()

    async def ensure_topics(self, specs: list[TopicSpec]) -> None:
        """Create the topics (op ``ensure_topics``)."""
        await self.faults.enter("ensure_topics", [spec.name for spec in specs])
        await self.inner.ensure_topics(specs)

    async def check_access(
        self,
        needs: Mapping[str, Collection[str]],
        group: str | Sequence[str] | None = None,
        share_group: str | None = None,
    ) -> None:
        """The inner connector's answer."""
        await self.inner.check_access(needs, group, share_group)

    async def partitions_for(self, topic: str, *, refresh: bool = False) -> int:
        """How many partitions a topic has (``refresh`` changes nothing: the count is always current here)."""
        return await self.inner.partitions_for(topic, refresh=refresh)

    @property
    def producer(self) -> FaultyProducer:
        """The one producer, faulty as planned."""
        return self._producer

    def consumer(
        self, group_id: str | None = None, *, client_id: str = "", max_wait_ms: int | None = None
    ) -> FaultyConsumer:
        """A new consumer of the inner connector, faulty as planned."""
        return FaultyConsumer(self.inner.consumer(group_id, client_id=client_id, max_wait_ms=max_wait_ms), self.faults)

    def share_consumer(self, group_id: str, topics: list[str], client_id: str | None = None) -> ShareConsumer:
        """A share-group member of the inner connector (no faults planned for it yet)."""
        return self.inner.share_consumer(group_id, topics, client_id)

    async def describe_share_group(self, group_id: str, topic: str) -> GroupInfo:
        """The inner connector's view of the share group (op ``describe_group``)."""
        await self.faults.enter("describe_group")
        return await self.inner.describe_share_group(group_id, topic)

    async def configure_share_group(self, group_id: str, settings: dict[str, str]) -> None:
        await self.inner.configure_share_group(group_id, settings)

    def transactional_producer(self, transactional_id: str) -> FaultyTxnProducer:
        """A transactional producer of the inner connector, faulty as planned."""
        return FaultyTxnProducer(self.inner.transactional_producer(transactional_id), self.faults)
