"""The threads sync tasks run in: a pool that can give up on a run and try to stop it.

``concurrent.futures.ThreadPoolExecutor`` cannot do either. A run past its ``max_time``
keeps its thread, so a few hung tasks starve every later one; its threads are joined at
interpreter exit, so one hung task keeps the process alive; and a run the worker handed
back on stop goes on (and another worker runs the same task at the same time).

:class:`TaskThreads` implements ``Executor.submit`` and ``shutdown`` (so
``loop.run_in_executor`` takes it) and adds :meth:`TaskThreads.abandon`:

- its threads are daemon threads, never joined at exit;
- an abandoned run stops counting against ``size``: its thread leaves the pool (it ends
  when the run does) and a new thread takes its place, up to ``max_threads`` threads in
  all; past that, ``submit`` raises :class:`ThreadLimitError` instead of queueing work
  that no thread would ever take;
- ``abandon`` raises :class:`TaskAbandoned` inside the run's thread
  (``PyThreadState_SetAsyncExc``), which Python code sees at its next bytecode. The
  limit, which nothing in CPython lifts: a thread blocked in a C call (``time.sleep``, a
  socket read, a lock) sees it only when that call returns. ``ctx.sleep`` waits on an
  event the executor sets, so a task that sleeps through it stops at once.

The hazard that comes with raising in another thread: the exception can land between a
Python-level lock's acquire and the ``try`` that releases it (``threading.Condition``,
``logging`` handlers, ``queue.Queue``), leaving that lock held by a thread that is gone.
The pool's own bookkeeping uses a C ``Lock`` taken with ``with`` so it is not exposed,
and a run is only interrupted while it is inside the task's code; but task code that is
abandoned in the middle of such a call can still wedge that lock. A task waiting in
``ctx.sleep`` when it is abandoned stops there, holding no such lock.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from typing import Any, TypeVar

from qtasks.exc import QTasksError

__all__ = ["TaskAbandoned", "TaskThreads", "ThreadLimitError", "wait_future"]

T = TypeVar("T")


class TaskAbandoned(BaseException):
    """Raised inside a sync task's thread when the run is no longer wanted (past ``max_time``, worker stopping).

    A ``BaseException`` like ``asyncio.CancelledError``, so ``except Exception`` in task
    code does not swallow it. Its result is never used.
    """


class ThreadLimitError(QTasksError, RuntimeError):
    """No thread is free for a sync task: the pool holds ``max_threads`` threads, most running abandoned tasks.

    Abandoned tasks that ignore :class:`TaskAbandoned` (blocked in C calls) hold their
    threads; raise ``thread_pool_size`` or make those tasks use ``ctx.sleep`` and timeouts.
    """


def wait_future(future: Future[T], stop: Callable[[], BaseException | None] | None = None) -> T:
    """``future.result()`` for a task's thread: in short waits, so a ``TaskAbandoned`` raised there lands between them.

    A plain ``result()`` blocks in one C call that nothing interrupts; if the loop that
    should complete ``future`` is gone, the thread would hang there forever. ``stop`` is
    asked between waits: an exception it returns cancels ``future`` (the coroutine run for
    it on the loop stops too) and is raised.
    """
    while not future.done():
        wait((future,), timeout=0.1)
        if stop is not None and not future.done() and (exc := stop()) is not None:
            future.cancel()
            raise exc
    return future.result()


def _interrupt(ident: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in thread ``ident`` at its next bytecode (None takes back a pending one)."""
    set_async_exc = getattr(getattr(ctypes, "pythonapi", None), "PyThreadState_SetAsyncExc", None)
    if set_async_exc is None:  # not CPython: the run is abandoned but goes on
        return
    set_async_exc(ctypes.c_ulong(ident), None if exc is None else ctypes.py_object(exc))


class _Run:
    __slots__ = ("abandoned", "args", "fn", "future", "kwargs", "thread")

    def __init__(self, future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.thread: threading.Thread | None = None
        self.abandoned = False


class TaskThreads(Executor):
    """A pool of ``size`` daemon threads for sync tasks, which can abandon a run (see the module docstring)."""

    _counter = itertools.count()

    def __init__(self, size: int, *, max_threads: int | None = None, name_prefix: str = "qtasks-task") -> None:
        if size < 1:
            raise ValueError(f"a thread pool needs at least 1 thread, got size={size}")
        self.size = size
        self.max_threads = 2 * size if max_threads is None else max_threads
        if self.max_threads < size:
            raise ValueError(f"max_threads ({self.max_threads}) must be at least size ({size})")
        self._prefix = name_prefix
        # A plain Lock, taken with ``with``: its __enter__ is C code, so a stray
        # TaskAbandoned cannot land between taking it and the block that releases it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: collections.deque[_Run] = collections.deque()
        self._runs: dict[Future[Any], _Run] = {}
        self._working: set[threading.Thread] = set()  # in the pool: idle or on a wanted run
        self._abandoned: set[threading.Thread] = set()  # out of the pool, still on an abandoned run
        self._busy = 0  # threads of the pool on a run (the others are idle or starting)
        self._shutdown = False

    # -- Executor ------------------------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` in a pool thread; raise :class:`ThreadLimitError` if none can be had."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot run a task: the thread pool is shut down")
            if len(self._queue) >= self._free and len(self._working) < self.size:
                self._start_thread()  # raises ThreadLimitError at the cap
            future: Future[T] = Future()
            run = _Run(future, fn, args, kwargs)
            self._runs[future] = run
            self._queue.append(run)
            self._cond.notify()
            return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, cancel_running: bool = False) -> None:
        """Stop taking work. ``cancel_futures``: drop queued runs. ``cancel_running``: abandon running ones.

        ``wait`` joins the threads still in the pool (never abandoned ones: they are left
        to end on their own, as daemon threads).
        """
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    run = self._queue.popleft()
                    self._runs.pop(run.future, None)
                    run.future.cancel()
            running = [run for run in self._runs.values() if run.thread is not None] if cancel_running else []
            self._cond.notify_all()
        for run in running:
            self.abandon(run.future)
        if wait:
            with self._lock:
                threads = list(self._working)
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()

    # -- abandoning ----------------------------------------------------------------

    def abandon(self, future: Future[Any]) -> bool:
        """Give up on the run of ``future``: its result is never used and its thread is asked to stop.

        A queued run is dropped. A running one gets :class:`TaskAbandoned` raised in its
        thread (at its next bytecode; after the C call it is blocked in, if any); the
        thread leaves the pool, which starts another if work is waiting. ``future`` ends
        with ``TaskAbandoned`` at once. Returns False if the run had already ended.
        """
        with self._lock:
            run = self._runs.pop(future, None)
            if run is None:
                return False
            run.abandoned = True
            thread = run.thread
            if thread is None:
                self._queue.remove(run)
                future.cancel()
                return True
            self._working.discard(thread)
            self._busy -= 1
            self._abandoned.add(thread)
            assert thread.ident is not None
            _interrupt(thread.ident, TaskAbandoned)
            if len(self._queue) > self._free and len(self._working) < self.size:
                try:
                    self._start_thread()
                except ThreadLimitError:
                    pass  # the queued runs wait for a thread of the pool to be free
        future.set_exception(TaskAbandoned())
        return True

    @property
    def threads(self) -> int:
        """Threads alive, abandoned ones included."""
        with self._lock:
            return len(self._working) + len(self._abandoned)

    @property
    def abandoned_threads(self) -> int:
        """Threads still running an abandoned run."""
        with self._lock:
            return len(self._abandoned)

    # -- the threads ---------------------------------------------------------------

    @property
    def _free(self) -> int:
        """Threads of the pool idle or starting (lock held): each takes a queued run without a new thread."""
        return len(self._working) - self._busy

    def _start_thread(self) -> None:
        """Called with the lock held."""
        if len(self._working) + len(self._abandoned) >= self.max_threads:
            raise ThreadLimitError(
                f"no thread for a sync task: all {self.max_threads} threads are busy, "
                f"{len(self._abandoned)} of them with abandoned tasks that have not stopped yet "
                "(a task blocked in a C call such as time.sleep stops only when the call returns)"
            )
        thread = threading.Thread(target=self._main, name=f"{self._prefix}-{next(self._counter)}", daemon=True)
        self._working.add(thread)
        thread.start()

    def _next(self) -> _Run | None:
        """The next queued run, or None when the thread should end (pool shut down and nothing queued)."""
        with self._lock:
            while True:
                while not self._queue:
                    if self._shutdown:
                        return None
                    self._cond.wait()
                run = self._queue.popleft()
                if run.future.set_running_or_notify_cancel():
                    run.thread = threading.current_thread()
                    self._busy += 1
                    return run
                self._runs.pop(run.future, None)  # cancelled while queued

    def _main(self) -> None:
        me = threading.current_thread()
        try:
            while (run := self._next()) is not None:
                self._run(run)
                if run.abandoned:
                    return  # this thread left the pool when the run was abandoned
        except TaskAbandoned:
            return  # arrived after the run, in the pool's own code: the thread was leaving anyway
        finally:
            with self._lock:
                self._working.discard(me)
                self._abandoned.discard(me)

    def _run(self, run: _Run) -> None:
        try:
            result = run.fn(*run.args, **run.kwargs)
        except BaseException as exc:  # the future carries it, as ThreadPoolExecutor's does
            # Settled inside the except clause, whose name is cleared however the clause is
            # left (an abandon() landing in it included): a frame that kept the error would
            # be held by the error's own traceback, a cycle left to the garbage collector.
            self._settle(run, None, exc)
        else:
            self._settle(run, result, None)
            del result
        del run

    def _settle(self, run: _Run, result: Any, error: BaseException | None) -> None:
        with self._lock:
            if run.abandoned:
                # abandon() may have raised in this thread after the run ended; take it back.
                assert run.thread is not None and run.thread.ident is not None
                _interrupt(run.thread.ident, None)
                return
            self._runs.pop(run.future, None)
            self._busy -= 1
        if error is not None:
            run.future.set_exception(error)
        else:
            run.future.set_result(result)
