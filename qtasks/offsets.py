"""Which offset of a partition may be committed while several of its tasks are in flight.

Kafka commits one offset per partition: "everything before this is done". With tasks
finishing out of order, the committable offset is the lowest one still unfinished (or
one past the highest finished when none is). A pure bookkeeping class, no I/O.
"""

from __future__ import annotations


class PartitionOffsets:
    """Tracks started and finished offsets of one partition.

    Only unfinished offsets are held (with how many runs of each are under way: a record
    given back by a rebalance may run twice for a moment), so a record that stays
    unfinished for hours (a long generator task, a chord's callback waiting for its
    tasks) costs nothing per record finished behind it.
    """

    __slots__ = ("_committed", "_first", "_next", "_unfinished")

    def __init__(self) -> None:
        self._unfinished: dict[int, int] = {}  # started, unfinished offset -> runs under way
        self._next: int | None = None  # one past the highest offset seen
        self._committed: int | None = None
        self._first: int | None = None  # the lowest offset taken since the assignment

    def start(self, offset: int) -> None:
        """A record at ``offset`` was taken."""
        unfinished = self._unfinished
        unfinished[offset] = unfinished.get(offset, 0) + 1
        if self._first is None or offset < self._first:
            self._first = offset
        if self._next is None or offset >= self._next:
            self._next = offset + 1

    def finish(self, offset: int) -> None:
        """The record at ``offset`` is done (its terminal status is written)."""
        unfinished = self._unfinished
        runs = unfinished.get(offset)
        if runs is None:
            return
        if runs > 1:
            unfinished[offset] = runs - 1
        else:
            del unfinished[offset]

    @property
    def in_flight(self) -> int:
        """How many taken records are not done."""
        return sum(self._unfinished.values())

    def committable(self) -> int | None:
        """The offset to commit now (the next one to read), or None when nothing new is done."""
        if self._next is None:
            return None
        # The lowest unfinished offset: few are unfinished at once (the runs, the records
        # queued behind their keys, the chords' callbacks), and this runs once per commit.
        target = min(self._unfinished) if self._unfinished else self._next
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
