"""The status view: a materialized table of the compacted status topic.

Every process keeps one (like a Kafka Streams KTable): it reads the status topic from
the beginning at start, then tails it. ``app.get(uuid)`` and ``ctx.get_metadata()``
read it; a worker applies its own writes at once, so a running task sees itself as
``process``. Entries are kept as the raw encoded record (small) and decoded on read.
Which of two records of one task wins is a pure decision, :func:`supersedes`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from qtasks.records import TERMINAL, Task, decode_status


def supersedes(current: tuple[int, bool] | None, new: tuple[int, bool]) -> bool:
    """Whether a record ``(rev, terminal)`` replaces the one held.

    A terminal status is never replaced by a non-terminal one (a late ``process`` write
    or the echo of an older write cannot undo ``success``); otherwise the higher or
    equal ``rev`` wins.
    """
    if current is None:
        return True
    cur_rev, cur_terminal = current
    new_rev, new_terminal = new
    if cur_terminal and not new_terminal:
        return False
    return new_rev >= cur_rev


class StatusView:
    """uuid -> latest status of each task, with waiters for changes."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self._rows: dict[str, tuple[int, bool, float, bytes]] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._limit = limit
        self.caught_up = asyncio.Event()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._rows

    def apply(self, task: Task, raw: bytes) -> bool:
        """Take a record of the topic (or one this process wrote); return whether it was kept."""
        row = self._rows.get(task.uuid)
        terminal = task.status in TERMINAL
        if not supersedes(None if row is None else (row[0], row[1]), (task.rev, terminal)):
            return False
        self._rows[task.uuid] = (task.rev, terminal, task.updated_at, raw)
        self._notify(task.uuid)
        return True

    def apply_raw(self, key: bytes | None, value: bytes | None) -> None:
        """Take a record as read from the topic: a tombstone (no value) removes the task."""
        if value is None:
            if key is not None:
                uuid = key.decode()
                self._rows.pop(uuid, None)
                self._notify(uuid)
            return
        self.apply(decode_status(value, self._limit), value)

    def get(self, uuid: str) -> Task | None:
        """The latest status of a task, or None."""
        row = self._rows.get(uuid)
        return None if row is None else decode_status(row[3], self._limit)

    def rev(self, uuid: str) -> int:
        """The ``rev`` of the held record (-1 when there is none)."""
        row = self._rows.get(uuid)
        return -1 if row is None else row[0]

    def expired(self, before: float) -> Iterator[str]:
        """uuids of finished tasks last updated before ``before`` (epoch seconds)."""
        for uuid, (_, terminal, updated_at, _raw) in list(self._rows.items()):
            if terminal and updated_at < before:
                yield uuid

    async def wait_for(self, uuid: str, predicate: Callable[[Task | None], bool], timeout: float | None) -> Task | None:
        """Wait until ``predicate(task)`` holds; return the task, or raise TimeoutError."""
        async with asyncio.timeout(timeout):
            while True:
                task = self.get(uuid)
                if predicate(task):
                    return task
                fut = asyncio.get_running_loop().create_future()
                self._waiters.setdefault(uuid, []).append(fut)
                try:
                    await fut
                finally:
                    waiters = self._waiters.get(uuid)
                    if waiters and fut in waiters:
                        waiters.remove(fut)
                        if not waiters:
                            del self._waiters[uuid]

    def _notify(self, uuid: str) -> None:
        waiters = self._waiters.pop(uuid, None)
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
