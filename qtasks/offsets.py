"""Which offset of a partition may be committed while several of its tasks are in flight.

Kafka commits one offset per partition: "everything before this is done". With tasks
finishing out of order, the committable offset is the lowest one still unfinished (or
one past the highest finished when none is). A pure bookkeeping class, no I/O.
"""

from __future__ import annotations

import heapq


class PartitionOffsets:
    """Tracks started and finished offsets of one partition."""

    __slots__ = ("_committed", "_done", "_first", "_next", "_pending")

    def __init__(self) -> None:
        self._pending: list[int] = []  # heap of started, unfinished offsets
        self._done: set[int] = set()  # finished offsets still above the lowest unfinished
        self._next: int | None = None  # one past the highest offset seen
        self._committed: int | None = None
        self._first: int | None = None  # the lowest offset taken since the assignment

    def start(self, offset: int) -> None:
        """A record at ``offset`` was taken."""
        heapq.heappush(self._pending, offset)
        if self._first is None or offset < self._first:
            self._first = offset
        if self._next is None or offset >= self._next:
            self._next = offset + 1

    def finish(self, offset: int) -> None:
        """The record at ``offset`` is done (its terminal status is written)."""
        self._done.add(offset)
        pending = self._pending
        while pending and pending[0] in self._done:
            self._done.discard(heapq.heappop(pending))

    @property
    def in_flight(self) -> int:
        """How many taken records are not done."""
        return len(self._pending)

    def committable(self) -> int | None:
        """The offset to commit now (the next one to read), or None when nothing new is done."""
        if self._next is None:
            return None
        target = self._pending[0] if self._pending else self._next
        if self._committed is not None and target <= self._committed:
            return None
        return target

    @property
    def base(self) -> int | None:
        """The group's offset here as this worker knows it: the last commit, else the first record taken."""
        return self._committed if self._committed is not None else self._first

    @property
    def seen(self) -> int | None:
        """One past the highest offset taken (None: none taken)."""
        return self._next

    def committed(self, offset: int) -> None:
        """Record that ``offset`` was committed."""
        self._committed = offset
