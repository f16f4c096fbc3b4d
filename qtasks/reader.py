"""The results reader behind every stream of an app: one consumer, bounded queues.

One :class:`ResultsReader` per app serves every open stream: a single consumer that
assigns itself the partitions streams need and hands each record to the streams of its
key (a :class:`StreamQueue` each, bounded by ``stream_buffer``), so opening a stream costs
a seek, not a new connection. A partition stays assigned ``stream_linger`` seconds after
its last stream closes. :mod:`qtasks.stream` decides where a stream starts and ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from qtasks.connectors.base import Record, TopicPartition
from qtasks.core import Core
from qtasks.delivery import fetch
from qtasks.exc import AppClosedError
from qtasks.supervise import Supervisor

__all__ = ["ResultsReader", "StreamQueue"]


class StreamQueue:
    """The records of one open stream, bounded: past ``limit`` it remembers where it fell behind."""

    __slots__ = ("closed", "limit", "missed_from", "ready", "records", "woken")

    def __init__(self, limit: int) -> None:
        self.records: collections.deque[Record] = collections.deque()
        self.limit = limit
        #: The offset of the first record not buffered (the stream reads again from there).
        self.missed_from: int | None = None
        self.ready = asyncio.Event()
        self.closed = False
        #: Set by :meth:`wake`: the next :meth:`get` returns at once (the task's status changed).
        self.woken = False

    def put(self, record: Record) -> None:
        if self.missed_from is not None:
            return  # behind already: everything from the first dropped record is read again
        if len(self.records) >= self.limit:
            self.missed_from = record.offset
            return
        self.records.append(record)
        self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    def clear(self) -> None:
        self.records.clear()
        self.missed_from = None

    def wake(self) -> None:
        """Make a waiting (or the next) :meth:`get` return now, with or without a record."""
        self.woken = True
        self.ready.set()

    async def wait(self, timeout: float | None) -> None:
        """Wait until a record is here or :meth:`wake` is called (or ``timeout`` passes), taking nothing."""
        if self.woken:
            self.woken = False
        elif not self.records and not self.closed:
            self.ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.ready.wait()
        if self.closed:
            raise AppClosedError("the app was closed while this stream was open")

    async def get(self, timeout: float) -> Record | None:
        """The next record, or None after ``timeout`` seconds without one (or once woken)."""
        await self.wait(timeout)
        return self.records.popleft() if self.records else None


class ResultsReader:
    """One consumer of the results topic, shared by every open stream of an app.

    A partition stays assigned ``stream_linger`` seconds after its last stream closes,
    so the next stream on it starts from the live position with no lookup and no seek.
    """

    def __init__(self, core: Core) -> None:
        self._core = core
        self._consumer: Any = None
        self._streams: dict[bytes, list[StreamQueue]] = {}
        self._users: dict[TopicPartition, int] = {}
        self._idle_since: dict[TopicPartition, float] = {}
        self._lock = asyncio.Lock()
        self._starting = asyncio.Lock()
        self._closed = False  # for good: a closed app makes a new reader when used again
        self._needed = asyncio.Event()
        self._supervisor = Supervisor(f"{core.name} results reader")

    async def _ensure(self) -> Any:
        if self._closed:
            raise AppClosedError("the app was closed while this stream was open")
        if self._consumer is None:
            async with self._starting:  # streams opening at once make one consumer
                if self._closed:
                    raise AppClosedError("the app was closed while this stream was open")
                if self._consumer is None:
                    # Streams open and seek often: short broker waits make a seek take effect fast.
                    consumer = self._core.broker.consumer(None, client_id=f"{self._core.name}-results", max_wait_ms=5)
                    await consumer.start()
                    self._consumer = consumer
                    self._supervisor.spawn("results", self._run)
        return self._consumer

    def listening(self, tp: TopicPartition) -> bool:
        """Whether the reader reads ``tp`` now (a stream opened there needs no end offset)."""
        return tp in self._users

    async def open(self, uuid: str, tp: TopicPartition, end: int | None) -> tuple[StreamQueue, int] | None:
        """Register a stream of ``uuid`` on ``tp``, reading live from now; return its queue and start offset.

        ``end`` is ``tp``'s end offset, read by the caller (outside the lock: it may wait
        for the broker) when the reader was not :meth:`listening` on it. None when it was;
        if it stopped meanwhile, nothing is registered and this returns None: read the
        end and open again.
        """
        async with self._lock:
            if tp not in self._users and end is None:
                return None
            consumer = await self._ensure()
            queue = StreamQueue(self._core.config.stream_buffer)
            if tp not in self._users:
                assert end is not None
                await self._assign(set(self._users) | {tp})
                self._users[tp] = 0
                await consumer.seek(tp, end)
            self._streams.setdefault(uuid.encode(), []).append(queue)
            self._users[tp] += 1
            self._idle_since.pop(tp, None)
            self._needed.set()
            try:
                # Kafka asks the broker while the partition's offset is being reset: this may
                # wait, and a stream that gives up (its deadline) leaves nothing registered.
                return queue, await self.position(tp)
            except BaseException:
                self._unregister(uuid, tp, queue)
                raise

    async def rewind(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` again from ``offset`` (the other streams on it drop what they already saw)."""
        async with self._lock:
            if tp in self._users and offset < await self.position(tp):
                await self._consumer.seek(tp, offset)

    async def close(self, uuid: str, tp: TopicPartition, queue: StreamQueue) -> None:
        """Unregister a stream; its partition is released once no stream used it for ``stream_linger``."""
        async with self._lock:
            self._unregister(uuid, tp, queue)

    def _unregister(self, uuid: str, tp: TopicPartition, queue: StreamQueue) -> None:
        key = uuid.encode()
        queues = self._streams.get(key, [])
        if queue in queues:
            queues.remove(queue)
        if not queues:
            self._streams.pop(key, None)
        if tp in self._users:
            self._users[tp] = max(0, self._users[tp] - 1)
            if self._users[tp] == 0:
                self._idle_since[tp] = time.monotonic()

    async def _release_idle(self) -> None:
        linger = self._core.config.stream_linger
        now = time.monotonic()
        idle = [tp for tp, since in self._idle_since.items() if now - since >= linger]
        if not idle:
            return
        async with self._lock:
            keep = {tp for tp in self._users if tp not in idle or self._users[tp] > 0}
            await self._assign(keep)
            for tp in idle:
                if tp not in keep:
                    del self._users[tp], self._idle_since[tp]
            if not self._users:
                self._needed.clear()

    async def _assign(self, partitions: set[TopicPartition]) -> None:
        # A new assignment forgets the positions of the partitions it keeps (Kafka
        # resets them to the earliest offset): put them back.
        kept = {tp: await self.position(tp) for tp in self._users if tp in partitions}
        self._consumer.assign(partitions)
        for tp, position in kept.items():
            await self._consumer.seek(tp, position)

    async def position(self, tp: TopicPartition) -> int:
        """The next offset the reader returns from ``tp``: everything before it was handed out."""
        return int(await self._consumer.position(tp))

    async def end_offset(self, tp: TopicPartition) -> int:
        """The partition's end offset now (exactly-once: its last stable offset)."""
        return (await self.end_offsets([tp]))[tp]

    async def end_with_undecided(self, tp: TopicPartition) -> int:
        """The end of ``tp``, a partition the reader reads, including the records of transactions
        not decided yet (exactly-once, they may be committed already: see
        ``Consumer.high_watermark``). Never below :meth:`end_offset`."""
        stable = await self.end_offset(tp)
        consumer = await self._ensure()
        return max(stable, consumer.high_watermark(tp) or 0)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The end offsets now of any partitions (of any topic: nothing is assigned for it)."""
        consumer = await self._ensure()
        return {tp: int(offset) for tp, offset in (await consumer.end_offsets(tps)).items()}

    async def offset_for_time(self, tp: TopicPartition, timestamp_ms: int) -> int | None:
        """The first offset of ``tp`` whose record is as new as ``timestamp_ms``, or None."""
        consumer = await self._ensure()
        found = (await consumer.offsets_for_times({tp: timestamp_ms})).get(tp)
        return None if found is None else int(found)

    async def _run(self) -> None:
        while True:
            await self._needed.wait()
            records = await fetch(self._consumer, 0.5)
            streams = self._streams
            for record in records:
                queues = streams.get(record.key) if record.key is not None else None
                if queues:
                    for queue in queues:
                        queue.put(record)
            if self._idle_since:
                # After dispatching: a seek made meanwhile must not be undone by this batch.
                await self._release_idle()

    async def stop(self) -> None:
        """Stop the consumer; every open stream ends with :class:`~qtasks.exc.AppClosedError`."""
        self._closed = True
        await self._supervisor.stop()
        for queues in self._streams.values():
            for queue in queues:
                queue.close()
        self._streams.clear()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()
