"""Many tasks at once: ``app.add_tasks`` (one wait for a whole batch) and ``app.stream_many``.

``add_tasks(task_name, calls)`` takes one item per task: a tuple (or list) of positional
arguments, or :class:`Args` for keyword arguments too. Every task is encoded and checked
before anything is sent, so a bad item raises (naming its index) with nothing submitted;
then the records go out in batches of :data:`BATCH` tasks, each batch stored with one
wait instead of one per task.

``stream_many(uuids)`` merges the streams of many tasks: :class:`~qtasks.records.StreamItem` s
(``uuid``, ``seq``, ``attempt``, ``value``) as they arrive, each task's in order, until
every stream has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from qtasks.records import StreamItem

#: Tasks stored with one wait (bounds the deliveries pending at once).
BATCH = 5000


class Args:
    """The arguments of one task of :meth:`~qtasks.asyncio.QueueTasks.add_tasks`: ``Args(1, 2, mode="fast")``."""

    __slots__ = ("args", "kwargs")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        shown = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"Args({', '.join(shown)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Args) and (self.args, self.kwargs) == (other.args, other.kwargs)

    __hash__ = None  # type: ignore[assignment]


def calls_of(calls: Iterable[Any]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """(args, kwargs) of each item: a tuple or list of positional arguments, or :class:`Args`."""
    if isinstance(calls, str | bytes | dict):
        raise TypeError(f"add_tasks takes an iterable of argument tuples or qtasks.Args, got {type(calls).__name__}")
    found = []
    for i, call in enumerate(calls):
        if isinstance(call, Args):
            found.append((call.args, call.kwargs))
        elif isinstance(call, tuple | list):
            found.append((tuple(call), {}))
        else:
            raise TypeError(
                f"add_tasks: item {i} must be a tuple of positional arguments or qtasks.Args(...), "
                f"got {type(call).__name__} (task.map(values) passes each value as the one argument)"
            )
    return found


class _Ended:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


async def merge_streams(
    open_stream: Callable[[str], AsyncIterator[Any]], uuids: Iterable[str], *, buffer: int = 1000
) -> AsyncIterator[StreamItem]:
    """The items of every task's stream (``open_stream(uuid)`` yields StreamItems), as they come.

    The first stream that fails (an unknown task, its timeout) stops all the others and
    its error is raised here. A reader that stops early should close this generator
    (``break`` in ``async for`` does not: use ``contextlib.aclosing``), which closes the
    streams too. At most ``buffer`` items wait here for the reader; past that the streams
    wait (each one's own buffer, then the log, hold the rest).
    """
    queue: asyncio.Queue[StreamItem | _Ended] = asyncio.Queue(maxsize=buffer)

    async def pump(uuid: str) -> None:
        error: BaseException | None = None
        try:
            # Closed here whatever ends the pump (a cancel while it waits at the queue too):
            # the stream gives its reader partition back at once.
            stream = open_stream(uuid)
            try:
                async for item in stream:
                    await queue.put(item)
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        await queue.put(_Ended(error))

    pumps = [asyncio.create_task(pump(uuid)) for uuid in dict.fromkeys(uuids)]
    left = len(pumps)
    try:
        while left:
            item = await queue.get()
            if isinstance(item, _Ended):
                left -= 1
                if item.error is not None:
                    raise item.error
                continue
            yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
