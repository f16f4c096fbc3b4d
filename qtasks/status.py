"""The status view: a materialized table of the compacted status topic.

Every process keeps one (like a Kafka Streams KTable): it reads the status topic from
the beginning at start, then tails it. ``app.get(uuid)`` and ``ctx.get_metadata()``
read it; a worker applies its own writes at once, so a running task sees itself as
``process``. Each entry is the raw record (small) with its decoded head (status, rev,
lease); the whole record is decoded only when asked for. Which of two records of one
task wins is a pure decision, :func:`supersedes`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterator

import msgspec

from qtasks.records import StatusHead, Task, decode_status, decode_status_head, encode, head_of

#: A traceback kept in a status record that had to be slimmed is cut to this many characters.
SLIM_TRACEBACK = 8000
#: The most tasks :attr:`StatusView.stale` holds (a process that writes none back keeps no more).
STALE_LIMIT = 10_000


def supersedes(current: tuple[int, int, bool] | None, new: tuple[int, int, bool]) -> bool:
    """Whether a record ``(attempt, rev, terminal)`` replaces the one held.

    A terminal status is never replaced by a non-terminal one (a late ``process`` write
    or the echo of an older write cannot undo ``success``). Over a run in progress, a later
    attempt's record wins and an earlier attempt's run loses, whatever their revs: a worker
    that wakes past its lease and renews it before it reads that another worker took the
    task over cannot undo the takeover (the views that dropped its renewals did not count
    their revs, so the taker's ending may carry a lower rev). Otherwise the higher or
    equal ``rev`` wins.
    """
    if current is None:
        return True
    cur_attempt, cur_rev, cur_terminal = current
    new_attempt, new_rev, new_terminal = new
    if cur_terminal and not new_terminal:
        return False
    if not cur_terminal and new_attempt != cur_attempt:
        if new_attempt > cur_attempt:
            return True  # a later attempt's run, or its ending
        if not new_terminal:
            return False  # an earlier attempt's run
    return new_rev >= cur_rev


#: The ``rev`` of a client's ``cancel`` of a task the log shows as ``new``: above any rev a
#: worker writes, so the cancel is final in every view, even over the ending of a short run
#: that had started meanwhile (its ``process`` held back, the log still said ``new``).
CANCEL_REV = 1 << 40


def next_rev(held: int, status: str) -> int:
    """The ``rev`` of a new write, given the ``rev`` this process holds for the task (-1: none).

    ``new`` is always rev 0 and every later write is at least 1, so a worker that has not
    yet seen ``new`` (its view lags) still writes ``process`` above it, and a late ``new``
    cannot win in a view. Compaction keeps a key's last record, so a late record that
    lands after a task's ending is covered by the ending written again
    (:meth:`qtasks.store.StatusStore.restate`).
    """
    if status == "new":
        return 0
    return max(held, 0) + 1


def slim(task: Task, limit: int) -> Task:
    """A copy of ``task`` that fits one status record of ``limit`` bytes.

    The arguments go first (they stay in the task record); if that is not enough, the
    result goes, and a ``success`` becomes an ``error`` that says so (never silent loss).
    """
    slimmed = msgspec.structs.replace(task, args=[], kwargs={})
    if len(encode(slimmed)) <= limit:
        return slimmed
    status = task.status
    traceback = task.traceback
    if status == "success":
        status = "error"
        traceback = "ValueError: the task's status record is too large to store; return less"
    if traceback and len(traceback) > SLIM_TRACEBACK:
        traceback = traceback[-SLIM_TRACEBACK:]
    return msgspec.structs.replace(slimmed, status=status, traceback=traceback, returning=None)


class StatusView:
    """uuid -> latest status of each task, with waiters for changes.

    Memory is bounded: unfinished tasks are always held; of the finished ones, the
    ``cache_size`` most recently finished are. An older one is dropped (``evicted``
    counts them) and read back from the status topic when asked for
    (:meth:`qtasks.store.StatusStore.lookup`).
    """

    def __init__(self, limit: int = 1_000_000, cache_size: int = 100_000) -> None:
        self._rows: dict[str, tuple[StatusHead, bytes]] = {}
        self._waiters: dict[str, list[tuple[Callable[[StatusHead | None], bool], asyncio.Future[None]]]] = {}
        self._limit = limit
        self._cache_size = cache_size
        self._finished: OrderedDict[str, None] = OrderedDict()
        self.evicted = 0
        #: ``updated_at`` of the oldest dropped task no expiry sweep has covered yet (None: none)
        #: and of the newest dropped task: what :meth:`qtasks.store.StatusStore.sweep` needs.
        self.unswept_drop: float | None = None
        self.newest_drop = 0.0
        self.caught_up = asyncio.Event()
        #: Finished tasks whose held record was followed in the topic by one it supersedes (a
        #: stale write, such as a late ``new``), with ``time.monotonic()`` when it was read:
        #: compaction keeps a key's last record, so the held one must be written again (a
        #: worker does: :meth:`qtasks.store.StatusStore.restate`). A record this process wrote
        #: counts only once it was read back; a task leaves this when its held record is read again.
        self.stale: dict[str, float] = {}
        self.stale_found = asyncio.Event()
        #: Tasks whose held record this process wrote (or showed) and has not read back yet:
        #: an older record read meanwhile comes before it in the topic, so it is not stale.
        self._unread: set[str] = set()
        #: Tasks whose every new head is told to ``_on_watched`` (a worker's runs: :meth:`watch`).
        self._watched: Container[str] = ()
        self._on_watched: Callable[[StatusHead], None] | None = None

    def watch(self, watched: Container[str], on_head: Callable[[StatusHead], None]) -> None:
        """Call ``on_head`` with each new head of a task in ``watched`` (checked as it is read)."""
        self._watched, self._on_watched = watched, on_head

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._rows

    def _apply(self, head: StatusHead, raw: bytes) -> bool:
        row = self._rows.get(head.uuid)
        if row is not None:
            held = row[0]
            if not supersedes((held.attempt, held.rev, held.is_finished), (head.attempt, head.rev, head.is_finished)):
                return False
        self._rows[head.uuid] = (head, raw)
        if head.is_finished:
            finished = self._finished
            finished[head.uuid] = None
            finished.move_to_end(head.uuid)
            while len(finished) > self._cache_size:
                old, _ = finished.popitem(last=False)
                dropped = self._rows.pop(old, None)
                self._unread.discard(old)
                self.stale.pop(old, None)
                self.evicted += 1
                if dropped is not None:
                    at = dropped[0].updated_at
                    self.newest_drop = max(self.newest_drop, at)
                    if self.unswept_drop is None or at < self.unswept_drop:
                        self.unswept_drop = at
        if head.uuid in self._waiters:
            self._notify(head.uuid)
        if head.uuid in self._watched and self._on_watched is not None:
            self._on_watched(head)
        return True

    def apply(self, task: Task, raw: bytes) -> bool:
        """Take a record this process wrote; return whether it was kept."""
        row = self._rows.get(task.uuid)
        if row is not None and row[1] == raw:
            # Held already, byte for byte: the tailer read this write back before its
            # acknowledgement was handled (or it was shown before). Waiting to read it back
            # again would wait forever, and hide a stale record that lands after it.
            return True
        kept = self._apply(head_of(task), raw)
        if kept:
            self._unread.add(task.uuid)
        return kept

    def apply_raw(self, key: bytes | None, value: bytes | None) -> None:
        """Take a record as read from the topic: a tombstone (no value) removes the task."""
        if value is None:
            if key is not None:
                uuid = key.decode()
                self._rows.pop(uuid, None)
                self._finished.pop(uuid, None)
                self._unread.discard(uuid)
                self.stale.pop(uuid, None)
                self._notify(uuid)
            return
        if key is None:
            self._apply(decode_status_head(value, self._limit), value)
            return
        uuid = key.decode()
        row = self._rows.get(uuid)
        if row is not None and row[1] == value:
            self._unread.discard(uuid)  # the held record read back: what comes after it is later
            self.stale.pop(uuid, None)  # the held record is the last one again
            return
        head = decode_status_head(value, self._limit)
        if self._apply(head, value):
            self._unread.discard(uuid)
            return
        if row is None or not row[0].is_finished or head.uuid != uuid or uuid in self._unread:
            return
        if uuid not in self.stale and len(self.stale) < STALE_LIMIT:
            self.stale[uuid] = time.monotonic()
            self.stale_found.set()

    def raw(self, uuid: str) -> bytes | None:
        """The held record of a task as stored (None: none held)."""
        row = self._rows.get(uuid)
        return None if row is None else row[1]

    def heads(self) -> list[StatusHead]:
        """The heads of every task held (a copy: the view may change while it is used)."""
        return [head for head, _raw in self._rows.values()]

    def get(self, uuid: str) -> Task | None:
        """The latest status of a task (a fresh object), or None."""
        row = self._rows.get(uuid)
        return None if row is None else decode_status(row[1], self._limit)

    def head(self, uuid: str) -> StatusHead | None:
        """The head of the latest status (status, rev, attempt, worker, lease), or None."""
        row = self._rows.get(uuid)
        return None if row is None else row[0]

    def rev(self, uuid: str) -> int:
        """The ``rev`` of the held record (-1 when there is none)."""
        row = self._rows.get(uuid)
        return -1 if row is None else row[0].rev

    def expired(self, before: float) -> Iterator[str]:
        """uuids of finished tasks last updated before ``before`` (epoch seconds)."""
        for uuid, (head, _raw) in list(self._rows.items()):
            if head.is_finished and head.updated_at < before:
                yield uuid

    async def wait_for(
        self, uuid: str, predicate: Callable[[StatusHead | None], bool], timeout: float | None
    ) -> Task | None:
        """Wait until ``predicate(head)`` holds; return the whole task, or raise TimeoutError.

        A waiter is woken only by a change that satisfies it, so many waiters on busy
        tasks cost nothing per status write.
        """
        if predicate(self.head(uuid)):
            return self.get(uuid)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.setdefault(uuid, []).append(entry)
        try:
            async with asyncio.timeout(timeout):
                await fut
        finally:
            waiters = self._waiters.get(uuid)
            if waiters is not None and entry in waiters:
                waiters.remove(entry)
                if not waiters:
                    del self._waiters[uuid]
        return self.get(uuid)

    def when(
        self, uuid: str, predicate: Callable[[StatusHead | None], bool], callback: Callable[[], None]
    ) -> Callable[[], None]:
        """Call ``callback()`` once ``predicate(head)`` holds (soon, if it holds now); the
        returned function forgets it (call it when no longer interested)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: None if f.cancelled() else callback())
        if predicate(self.head(uuid)):
            fut.set_result(None)
            return lambda: None
        entry = (predicate, fut)
        self._waiters.setdefault(uuid, []).append(entry)

        def forget() -> None:
            fut.cancel()
            waiters = self._waiters.get(uuid)
            if waiters is not None and entry in waiters:
                waiters.remove(entry)
                if not waiters:
                    del self._waiters[uuid]

        return forget

    def _notify(self, uuid: str) -> None:
        waiters = self._waiters.get(uuid)
        if not waiters:
            return
        head = self.head(uuid)
        keep = []
        for predicate, fut in waiters:
            if fut.done():
                continue
            if predicate(head):
                fut.set_result(None)
            else:
                keep.append((predicate, fut))
        if keep:
            self._waiters[uuid] = keep
        else:
            del self._waiters[uuid]
