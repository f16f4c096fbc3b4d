"""Background loops that never die silently.

Every long-running loop of qtasks (the status tailer, the worker's poll, control,
commit, lease and expiry loops, the results reader) runs under a :class:`Supervisor`.
A loop that raises is logged with its traceback and restarted after a capped backoff;
one that keeps failing (``max_failures`` in a row, none of them after a healthy run of
``healthy_after`` seconds) is fatal: the supervisor records the error, calls its
``on_fatal`` callback (the worker stops with that error) and wakes whoever waits in
:meth:`Supervisor.wait` (start-up never waits forever for a loop that died).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from qtasks.exc import BrokerRefusedError

log = logging.getLogger("qtasks.supervise")

T = TypeVar("T")


def raise_if_cancelled() -> None:
    """Raise CancelledError if the current task was cancelled and the cancellation got lost.

    On Python 3.11 ``asyncio.wait_for`` (which aiokafka uses inside) turns a cancellation
    that arrives as its inner call fails into that call's exception: a retry loop that
    catches the exception would run on forever after ``task.cancel()``. The task still
    counts the request (``cancelling()``), so every retry loop asks here before retrying.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class LoopFailedError(RuntimeError):
    """A supervised loop failed too often in a row; the component it served is stopped."""


def restart_delay(failures: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds before restarting a loop that failed ``failures`` times in a row (1-based)."""
    return min(cap, base * 2.0 ** max(0, failures - 1))


class Supervisor:
    """Runs named loops, restarts the ones that fail, and reports one that cannot be kept alive."""

    def __init__(
        self,
        name: str,
        *,
        on_fatal: Callable[[BaseException], Any] | None = None,
        max_failures: int = 8,
        healthy_after: float = 30.0,
    ) -> None:
        self.name = name
        self.on_fatal = on_fatal
        self.max_failures = max_failures
        self.healthy_after = healthy_after
        self.error: BaseException | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failed: asyncio.Event | None = None
        self._stopping = False

    @property
    def failed(self) -> asyncio.Event:
        """Set once a loop failed for good (``error`` says why)."""
        if self._failed is None:
            self._failed = asyncio.Event()
        return self._failed

    def spawn(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop()`` until :meth:`stop`, restarting it when it raises or returns early."""
        self._stopping = False
        self.failed  # noqa: B018 - created on the running loop
        self._tasks[name] = asyncio.get_running_loop().create_task(self._keep(name, loop), name=f"qtasks-{name}")

    def running(self) -> list[str]:
        """The names of the loops that are running."""
        return [name for name, task in self._tasks.items() if not task.done()]

    async def _keep(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                await loop()
                if self._stopping:
                    return
                problem: BaseException = LoopFailedError(f"loop {name} returned while it should run")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelled()  # a lost cancellation is not a failure: stop, do not restart
                problem = exc
            if time.monotonic() - started >= self.healthy_after:
                failures = 0
            failures += 1
            # a broker that refuses us (credentials, ACLs) refuses a restarted loop too
            if failures >= self.max_failures or isinstance(problem, BrokerRefusedError):
                self._fail(name, problem, failures)
                return
            delay = restart_delay(failures)
            log.error(
                "%s: loop %s failed (%d in a row); restarting in %.1f s",
                self.name,
                name,
                failures,
                delay,
                exc_info=problem,
            )
            await asyncio.sleep(delay)

    def _fail(self, name: str, problem: BaseException, failures: int) -> None:
        error = LoopFailedError(f"{self.name}: loop {name} failed {failures} times in a row: {problem!r}")
        error.__cause__ = problem
        log.critical("%s", error, exc_info=problem)
        if self.error is None:
            self.error = error
        self.failed.set()
        if self.on_fatal is not None:
            try:
                self.on_fatal(error)
            except Exception:
                log.exception("%s: the fatal-error callback failed", self.name)

    async def wait(self, awaitable: Awaitable[T], timeout: float | None = None) -> T:
        """Await ``awaitable``, but raise the supervisor's error if a loop fails for good first."""
        if self.error is not None:
            raise self.error
        job = asyncio.ensure_future(awaitable)
        failed = asyncio.ensure_future(self.failed.wait())
        try:
            done, _ = await asyncio.wait({job, failed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller is cancelled: what it waited for goes too
            job.cancel()
            raise
        finally:
            failed.cancel()
        if job in done:
            return job.result()
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        if self.error is not None:
            raise self.error
        raise TimeoutError(f"{self.name}: not ready within {timeout} s")

    def wind_down(self) -> None:
        """From now on a loop that returns has finished its work: it is not restarted (nor one that fails)."""
        self._stopping = True

    async def stop(self) -> None:
        """Cancel every loop and wait until they have ended."""
        self._stopping = True
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        # gather, not wait_for: on Python 3.11 a cancellation could otherwise be swallowed.
        await asyncio.gather(*tasks, return_exceptions=True)
