"""Exactly-once: the transaction of one tasks partition on this worker.

In ``exactly_once`` mode a worker writes everything a task of tasks partition *p* causes
(its ``process`` status, its result records, its progress, its end marker, its terminal
status, a retry's child, a dead letter) through the transactional producer of *p*,
``transactional_id = <group>.<tasks topic>.<p>``, and commits *p*'s consumed offset in
the same transaction. One commit makes all of it visible to ``read_committed`` readers
at once; an abort drops all of it.

- **Fencing.** The producer is started when the partition is assigned (``start``): the
  broker then fences the previous owner's producer of that id and aborts its open
  transaction, so a worker that lost the partition (killed, frozen past its session,
  cut off) can commit nothing more. Only after that does this worker read the status
  topic to its end (:meth:`StatusStore.catch_up_all`), so what it knows of the
  partition's tasks includes everything the previous owner committed.
- **Chunks.** The worker commits each partition every ``eos_commit_interval``, or as
  soon as ``eos_commit_records`` records wait (``nudge``). While a commit runs, sends
  wait for it; the sends already under way finish first.
- **Loss.** A send or commit that fails (fenced, a transaction past its timeout, a
  delivery refused) loses the partition here: nothing written since the last commit
  will ever be visible. The worker then drops the partition's runs and reads it again
  from its committed offset; a task taken up again resumes from what was committed.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from qtasks.connectors.base import TopicPartition, TxnProducer
from qtasks.exc import ConnectorError, RecordTooLargeError
from qtasks.offsets import PartitionOffsets

#: The transaction whose commit runs in this task: its ``before`` hook sends past the closed gate.
_committing: contextvars.ContextVar[PartitionTxn | None] = contextvars.ContextVar("qtasks_committing", default=None)


class PartitionLostError(ConnectorError):
    """Exactly-once: this worker's transaction of a tasks partition failed; nothing it wrote since commits."""

    retriable = False


def transactional_id(group_id: str, tp: TopicPartition) -> str:
    """The transactional id of a tasks partition: the same for every worker of the group."""
    return f"{group_id}.{tp.topic}.{tp.partition}"


class PartitionTxn:
    """The open transaction of one tasks partition, its pending callbacks, and its committed offset."""

    def __init__(
        self,
        producer: TxnProducer,
        tp: TopicPartition,
        group_id: str,
        *,
        limit: int,
        nudge: Callable[[], None],
        commit_timeout: float = 60.0,
    ) -> None:
        self.producer = producer
        self.tp = tp
        self.group_id = group_id
        #: Records sent in the open transaction.
        self.records = 0
        #: Why the partition is lost here (a failed send, delivery or commit), or None.
        self.error: BaseException | None = None
        self.lost = False
        self._limit = limit
        self._nudge = nudge
        #: A commit that takes longer loses the partition (the broker has aborted the
        #: transaction by then anyway): nothing waits forever on an answer that never comes.
        self._commit_timeout = commit_timeout
        self._on_commit: list[Callable[[], object]] = []
        self._sending = 0
        #: Resolved when the sends under way have finished (a commit waits for it).
        self._drained: asyncio.Future[None] | None = None
        self._gate: asyncio.Future[None] | None = None
        self._committed: int | None = None
        #: The runs that write in this partition's transactions (each commit writes their progress).
        self.runs: set[Any] = set()
        #: One commit at a time (the worker's loop and a rebalance may both commit).
        self._commit_lock = asyncio.Lock()

    async def start(self) -> None:
        """Take the partition's transactional id over (the previous owner is fenced)."""
        await self.producer.start()

    async def close(self, timeout: float = 10.0) -> None:
        """Stop writing for this partition: the open transaction is aborted.

        A commit under way is let finish first (bounded by ``timeout``): a producer stopped
        in the middle of its commit leaves the commit waiting for an answer that never comes.
        """
        self.lost = True
        held = False
        try:
            async with asyncio.timeout(timeout):
                await self._commit_lock.acquire()
                held = True
        except TimeoutError:
            pass
        try:
            await self.producer.stop()
        finally:
            if held:
                self._commit_lock.release()  # a commit after this finds the partition lost

    def _lost(self) -> PartitionLostError:
        why = f": {self.error}" if self.error is not None else ""
        return PartitionLostError(f"the transaction of {self.tp.topic}[{self.tp.partition}] is lost here{why}")

    async def send(
        self,
        topic: str,
        raw: bytes | None,
        *,
        key: bytes,
        partition: int,
        on_commit: Callable[[], object] | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> None:
        """Send one record in the open transaction; ``on_commit`` runs once it is committed."""
        while self._gate is not None and _committing.get() is not self:
            await asyncio.shield(self._gate)
        if self.lost or self.error is not None:
            raise self._lost()
        self._sending += 1
        try:
            delivery = await self.producer.send(topic, raw, key=key, partition=partition, headers=headers)
        except RecordTooLargeError:
            raise  # refused before it was sent: the transaction is whole, the caller says why
        except ConnectorError as exc:
            if self.error is None:
                self.error = exc
                self._nudge()  # the worker's next commit finds the loss and drops the partition
            raise self._lost() from exc
        finally:
            self._sending -= 1
            drained = self._drained
            if not self._sending and drained is not None and not drained.done():
                drained.set_result(None)
        if delivery is not None:
            delivery.add_done_callback(self._delivered)  # type: ignore[attr-defined]
        if on_commit is not None:
            self._on_commit.append(on_commit)
        self.records += 1
        if self.records == self._limit:
            self._nudge()

    async def _until_drained(self) -> None:
        """Wait until no send is under way (new ones wait at the gate meanwhile)."""
        while self._sending:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def _delivered(self, delivery: Any) -> None:
        if delivery.cancelled():
            return
        error = delivery.exception()
        if error is not None and self.error is None:
            self.error = error
            self._nudge()

    def due(self, offsets: PartitionOffsets | None) -> int | None:
        """The offset a commit now would add (None: none new)."""
        if offsets is None:
            return None
        offset = offsets.committable()
        return offset if offset is not None and offset != self._committed else None

    async def commit(
        self, offsets: PartitionOffsets | None, before: Callable[[], Awaitable[None]] | None = None
    ) -> bool:
        """Commit the open transaction with the partition's committable offset; False if there was nothing to commit.

        ``before`` runs once new sends are held back and the ones under way have finished,
        so what it sends (the runs' progress) describes exactly what the transaction holds.
        Raises :class:`PartitionLostError` if the transaction failed: nothing of it is visible.
        """
        async with self._commit_lock:
            return await self._commit(offsets, before)

    async def _commit(self, offsets: PartitionOffsets | None, before: Callable[[], Awaitable[None]] | None) -> bool:
        if self.lost or self.error is not None:
            raise self._lost()
        offset = self.due(offsets)
        if not self.records and offset is None:
            return False
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gate = gate
        token = _committing.set(self)
        try:
            async with asyncio.timeout(self._commit_timeout):
                await self._until_drained()
                if before is not None:
                    await before()
                    await self._until_drained()
                if self.error is not None:
                    raise self._lost()
                if offset is not None:
                    await self.producer.send_offsets({self.tp: offset}, self.group_id)
                await self.producer.commit()
        except TimeoutError:
            if self.error is None:
                self.error = ConnectorError(f"the commit did not end within {self._commit_timeout:g} s")
            raise self._lost() from None
        except ConnectorError as exc:
            if self.error is None:
                self.error = exc
            if isinstance(exc, PartitionLostError):
                raise
            raise self._lost() from exc
        finally:
            _committing.reset(token)
            self._gate = None
            gate.set_result(None)
        callbacks, self._on_commit = self._on_commit, []
        self.records = 0
        if offset is not None and offsets is not None:
            self._committed = offset
            offsets.committed(offset)
        for callback in callbacks:
            callback()
        return True
