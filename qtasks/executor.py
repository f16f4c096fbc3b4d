"""The executor: runs one task and turns it into events for a sink it does not know.

It drives the four kinds of task: coroutine functions and async generators on the event
loop, sync functions and sync generators in a thread pool (so the loop, and with it the
Kafka heartbeats, never blocks). Every value a generator yields goes through
``generate_handler`` and straight to ``sink.emit``: one result record per value, the
moment it is yielded. The executor decides the outcome (success, error, cancel); the
worker writes it.

Cancellation reaches a running task at its next yield (``TaskCancelError`` is thrown
into the generator), at ``ctx.sleep`` (``TaskCancelError``), or, for async code, at any
other await (``asyncio.CancelledError``, asyncio's own way). Sync code that never yields
nor sleeps finishes first; its result is then discarded and the task ends as ``cancel``.

``execute()`` always returns an :class:`Outcome`, whatever the task, its handler, its
middlewares, the plugins or the sink raise. Only three things pass through it:

- ``asyncio.CancelledError`` when the asyncio task running ``execute()`` is itself
  cancelled (the worker stopping past its deadline hands the task back);
- ``KeyboardInterrupt`` and ``SystemExit`` raised on the event loop: there they may be
  the process's own Ctrl-C or exit (a loop without ``asyncio.run``'s SIGINT handler gets
  Ctrl-C wherever the main thread is), and asyncio itself lets them through.

Raised by sync code in a pool thread, those two can only come from the task's own code
(signals reach the main thread only), so they, like every other exception, make an
``error`` outcome.

A sync run past its ``max_time``, or still running when the worker stops, is abandoned:
with a :class:`~qtasks.threads.TaskThreads` pool it gets ``TaskAbandoned`` raised in its
thread and no longer holds a pool slot; its result is never used.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import time
import traceback
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from concurrent.futures import Executor, Future
from typing import Any, Literal, Protocol

import msgspec

from qtasks.bridge import Checkpoint, RaisedInThread, SinkFailed, ThreadBridge, call_in_thread, close_generator
from qtasks.context import AsyncContext, AsyncTask, CancelToken, SyncContext, SyncTask
from qtasks.exc import TaskCancelError, TaskPluginTriggerError, TaskTimeoutError
from qtasks.middlewares import is_task_middleware, run_task_middleware
from qtasks.pipe import Stream
from qtasks.plugins import PluginManager, _call
from qtasks.registry import TaskSpec
from qtasks.threads import wait_future
from qtasks.validate import check_uuid

#: A traceback kept in a status record is cut to this many characters (the record must stay small).
TRACEBACK_LIMIT = 16_000


class ResultSink(Protocol):
    """Where the handled values of a generator go (the worker writes them as result records)."""

    async def emit(self, value: Any) -> None: ...


@dataclasses.dataclass(slots=True)
class Outcome:
    """How a run ended."""

    status: Literal["success", "error", "cancel"]
    returning: Any = None
    exc: BaseException | None = None
    traceback: str | None = None
    cancel_reason: str | None = None
    yield_count: int = 0


def _args_kwargs(value: Any, source: str) -> tuple[list[Any], dict[str, Any]]:
    """``(args, kwargs)`` as a middleware or plugin returned it; a wrong shape says who returned what."""
    if isinstance(value, list | tuple) and len(value) == 2:
        args, kwargs = value
        if isinstance(args, list | tuple) and isinstance(kwargs, Mapping):
            return list(args), dict(kwargs)
    shown = repr(value)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    raise TypeError(f"{source} returned {shown}; it must return None or (args, kwargs): a list and a dict")


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def snapshot_checkpoint(state: Any, limit: int) -> Any:
    """A copy of a checkpoint state as it is now, through JSON: the task may go on changing its
    own object, and what is stored must be what it was at the checkpoint. TypeError if it is
    not JSON, ValueError if over ``limit`` bytes encoded."""
    try:
        raw = msgspec.json.encode(state)
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
        raise TypeError(f"a checkpoint must be JSON (dicts, lists, str, numbers, bool, None): {exc}") from None
    if len(raw) > limit:
        raise ValueError(f"a checkpoint is {len(raw)} bytes encoded, over checkpoint_max_bytes={limit}")
    return msgspec.json.decode(raw)


class TaskExecutor:
    """Runs one task. ``await execute()`` returns an :class:`Outcome`; ``cancel(reason)`` stops it.

    A task may name a subclass in ``@app.task(executor=...)`` to change a step.
    """

    def __init__(
        self,
        spec: TaskSpec,
        *,
        uuid: str,
        args: list[Any],
        kwargs: dict[str, Any],
        sink: ResultSink,
        app: Any,
        plugins: PluginManager,
        thread_pool: Executor | None = None,
        broker: Any = None,
    ) -> None:
        self.spec = spec
        self.uuid = uuid
        self.args = list(args)
        self.kwargs = dict(kwargs)
        self.sink = sink
        self.app = app
        self.plugins = plugins
        self.thread_pool = thread_pool
        self.broker = broker
        self.token = CancelToken()
        self.yield_count = 0
        self._host: asyncio.Task[Any] | None = None
        self._in_user_code = False
        self._cancel_sent = False
        self._cancel_taken_back = False
        self._bridge: ThreadBridge | None = None
        self._thread_future: Future[Any] | None = None
        self._abandoned = False
        #: What ``ctx.resume_state`` returns (the state of an earlier attempt's checkpoint).
        self.resume_state: Any = None
        #: Takes a ``ctx.checkpoint(state)`` on the loop, in order with the values before it
        #: (it checks the state and raises if it cannot be stored); None: checkpoints are refused.
        self.on_checkpoint: Callable[[Any], None] | None = None
        #: The largest checkpoint (encoded bytes).
        self.checkpoint_limit = 64_000
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The app's middlewares (``app.add_middleware``): (before, after); before runs ahead of
        #: the task's own, after behind them.
        self.middlewares: tuple[Sequence[Any], Sequence[Any]] = ((), ())
        #: The task's result while the after-middlewares run (a TaskMiddleware may change it).
        self.result: Any = None
        #: The asyncio app whose streams a ``Stream`` parameter reads (the worker's).
        self.stream_app: Any = app

    # -- control -------------------------------------------------------------------

    def cancel(self, reason: str) -> None:
        """Ask the task to stop: at its next yield, ``ctx.sleep`` or (async code) await."""
        self.token.set(reason)
        host = self._host
        if host is not None and self._in_user_code and not self._cancel_sent:
            # Interrupt the await the task is suspended in; execute() tells this
            # cancellation from a real one (the worker stopping) by the flag.
            self._cancel_sent = True
            host.cancel()

    # -- the run -------------------------------------------------------------------

    async def execute(self) -> Outcome:
        """Run the task to its end and say how it ended; see the module docstring for what passes through.

        The task runs in the caller's asyncio task (no extra task per run): a cancel
        request cancels that task while it waits in the task's own code, and the
        cancellation is taken back (``uncancel``) once it is turned into an outcome.
        """
        self._host = asyncio.current_task()
        try:
            return await self._execute()
        except asyncio.CancelledError as exc:
            self._take_back_cancel()
            if self._host_cancelled():
                raise  # the worker is stopping: the task goes back with it
            return self._error(exc)  # raised by an await of a plugin or middleware of its own
        except (KeyboardInterrupt, SystemExit):
            raise  # on the loop these may be the process's own (module docstring)
        except TaskCancelError as exc:
            return self._cancelled(exc)
        except RaisedInThread as exc:
            return self._error(exc.exc)
        except BaseException as exc:
            return self._error(exc)
        finally:
            # Their errors' tracebacks hold this executor's frames: let go, or it is a cycle.
            self._thread_future = None
            self._bridge = None

    async def _execute(self) -> Outcome:
        try:
            await self._before()
            result = await self._run_limited(self._bind())
            if self.token.is_set:
                raise TaskCancelError(self.token.reason)
            result = await self._after(result)
            return Outcome("success", returning=result, yield_count=self.yield_count)
        except TaskCancelError as exc:
            return self._cancelled(exc)
        except TaskPluginTriggerError as exc:
            return await self._plugin_error(exc)

    async def _run_limited(self, bound: tuple[list[Any], dict[str, Any]]) -> Any:
        """``_run`` within ``max_time``; a run past it, or whose host task is cancelled, is abandoned."""
        spec = self.spec
        limit: asyncio.Timeout | None = None
        try:
            if spec.max_time is None:
                return await self._run(bound)
            async with asyncio.timeout(spec.max_time) as limit:
                return await self._run(bound)
        except TimeoutError:
            if limit is None or not limit.expired():
                raise  # the task's own TimeoutError: an ordinary error
            self._abandon()
            if self.token.is_set:
                raise TaskCancelError(self.token.reason) from None
            raise TaskTimeoutError(f"task {spec.name!r} ran longer than its max_time of {spec.max_time} s") from None
        except asyncio.CancelledError:
            self._take_back_cancel()
            if self._host_cancelled():
                self._abandon()  # the worker is stopping: a thread must not run on after the hand-back
                raise
            if self._cancel_sent:
                raise TaskCancelError(self.token.reason) from None
            raise  # raised by the task's own code (a sub-task it awaited was cancelled): an error
        finally:
            self._in_user_code = False
            self._take_back_cancel()

    def _take_back_cancel(self) -> None:
        """Undo the host cancellation ``cancel()`` sent, once (asyncio 3.11: ``uncancel`` only counts down)."""
        host = self._host
        if self._cancel_sent and not self._cancel_taken_back and host is not None and host.cancelling():
            host.uncancel()
            self._cancel_taken_back = True

    def _host_cancelled(self) -> bool:
        """Whether someone other than ``cancel()`` cancelled the asyncio task running ``execute()``."""
        host = self._host
        return host is not None and host.cancelling() > 0

    def _abandon(self) -> None:
        """The run's result is no longer wanted: stop its thread (if any) as soon as Python can."""
        if self._abandoned:
            return
        self._abandoned = True
        self.token.abandon()  # wakes ctx.sleep
        if self._bridge is not None:
            self._bridge.abandon()  # the generator's next put raises
        abandon = getattr(self.thread_pool, "abandon", None)
        if abandon is not None and self._thread_future is not None:
            abandon(self._thread_future)

    def _cancelled(self, exc: TaskCancelError) -> Outcome:
        return Outcome("cancel", cancel_reason=str(exc) or self.token.reason, yield_count=self.yield_count, exc=exc)

    def _error(self, exc: BaseException) -> Outcome:
        text = "".join(traceback.format_exception(exc))
        if len(text) > TRACEBACK_LIMIT:
            text = text[: TRACEBACK_LIMIT // 2] + "\n...\n" + text[-TRACEBACK_LIMIT // 2 :]
        return Outcome("error", exc=exc, traceback=text, yield_count=self.yield_count)

    async def _plugin_error(self, exc: TaskPluginTriggerError) -> Outcome:
        """``ctx.plugin_error``: plugins may turn it into a result; a plugin failing here is the error."""
        try:
            replaced = await self.plugins.trigger(
                "task_executor_run_task_trigger_error",
                task_executor=self,
                task_func=self.spec,
                task_broker=self.broker,
                e=exc,
            )
        except Exception as plugin_exc:
            plugin_exc.add_note(f"raised by a plugin on task_executor_run_task_trigger_error, handling {exc!r}")
            return self._error(plugin_exc)
        if replaced and "result" in replaced:
            return Outcome("success", returning=replaced["result"], yield_count=self.yield_count)
        return self._error(exc)

    async def _before(self) -> None:
        plugins = self.plugins
        if len(plugins):
            new = await plugins.trigger(
                "task_executor_args_replace", task_executor=self, args=self.args, kwargs=self.kwargs
            )
            if new and "new_args" in new:
                self.args, self.kwargs = _args_kwargs(new["new_args"], "a plugin on task_executor_args_replace")
            await plugins.trigger("task_executor_before_execute", task_executor=self)
        for middleware in (*self.middlewares[0], *self.spec.middlewares_before):
            if is_task_middleware(middleware):
                await run_task_middleware(middleware, self)  # it changes self.args and self.kwargs itself
                continue
            replaced = await _call(middleware, self.spec.name, self.args, self.kwargs)
            if replaced is not None:
                self.args, self.kwargs = _args_kwargs(replaced, f"before-middleware {_name(middleware)}")

    async def _after(self, result: Any) -> Any:
        spec = self.spec
        plugins = self.plugins
        if len(plugins):
            if spec.kind in ("async_gen", "sync_gen"):
                new = await plugins.trigger("task_executor_run_task_gen", task_executor=self, results=result)
                if new and "new_results" in new:
                    result = new["new_results"]
            new = await plugins.trigger("task_executor_run_task", task_executor=self, result=result)
            if new and "new_result" in new:
                result = new["new_result"]
            await plugins.trigger("task_executor_after_execute", task_executor=self, result=result)
        for middleware in (*spec.middlewares_after, *self.middlewares[1]):
            if is_task_middleware(middleware):
                self.result = result
                await run_task_middleware(middleware, self)  # it reads and may change self.result
                result = self.result
                continue
            result = await _call(middleware, spec.name, result)
        if spec.decode is not None:
            result = await _call(spec.decode, result)
            if len(plugins):
                new = await plugins.trigger("task_executor_decode", task_executor=self, result=result)
                if new and "new_result" in new:
                    result = new["new_result"]
        return result

    def _bind(self) -> tuple[list[Any], dict[str, Any]]:
        spec = self.spec
        args = list(self.args)
        if spec.echo:
            args.insert(0, self._echo_object())
        try:
            spec.check_arguments(args, self.kwargs)
        except TypeError as exc:
            shown = str(spec.signature)
            raise TypeError(f"wrong arguments for task {spec.name!r}: {exc}; it takes {shown}") from None
        if spec.streams:
            return self._streams(args, self.kwargs)
        return args, self.kwargs

    def _streams(self, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Each ``Stream`` parameter's upstream uuid becomes the stream of that task's values."""
        bound = self.spec.signature.bind(*args, **kwargs)
        loop = asyncio.get_running_loop()
        for name in self.spec.streams:
            if name not in bound.arguments:
                continue
            uuid = bound.arguments[name]
            try:
                uuid = check_uuid(uuid)
            except (TypeError, ValueError):
                raise TypeError(
                    f"task {self.spec.name!r}: parameter {name!r} is a qtasks.Stream and takes an upstream "
                    f"task's uuid, got {uuid!r:.80}"
                ) from None
            bound.arguments[name] = Stream(uuid, self.stream_app, loop, self.token)
        return list(bound.args), dict(bound.kwargs)

    def context(self) -> AsyncContext | SyncContext:
        """A fresh context for this run (what ``self.ctx`` is inside the task)."""
        self._loop = asyncio.get_running_loop()
        common: dict[str, Any] = {
            "task_name": self.spec.name,
            "task_uuid": self.uuid,
            "generate_handler": self.spec.generate_handler,
            "app": self.app,
            "token": self.token,
            "checkpoint": self._checkpoint if self.on_checkpoint is not None else None,
            "resume_state": self.resume_state,
        }
        if self.spec.is_async:
            return AsyncContext(**common)
        return SyncContext(loop=asyncio.get_running_loop(), **common)

    def _checkpoint(self, state: Any) -> None:
        """``ctx.checkpoint``: on the loop at once (async code), else through the loop in order."""
        take = self.on_checkpoint
        assert take is not None
        kind = self.spec.kind
        if kind in ("async", "async_gen"):
            take(state)
            return
        # Checked and copied in the task's thread, where the call is (an error is raised there,
        # and the thread may change its object before the loop takes the checkpoint).
        state = snapshot_checkpoint(state, self.checkpoint_limit)
        bridge = self._bridge
        if kind == "sync_gen" and bridge is not None:
            bridge.put(Checkpoint(state))
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(take, state)

    def _echo_object(self) -> AsyncTask | SyncTask:
        ctx = self.context()
        if isinstance(ctx, AsyncContext):
            return AsyncTask(ctx, self.spec)
        return SyncTask(ctx, self.spec)

    async def _run(self, bound: tuple[list[Any], dict[str, Any]]) -> Any:
        args, kwargs = bound
        kind = self.spec.kind
        if kind == "async":
            self._in_user_code = True
            try:
                return await self.spec.func(*args, **kwargs)
            finally:
                self._in_user_code = False
        if kind == "async_gen":
            return await self._drive_async_gen(self.spec.func(*args, **kwargs))
        if kind == "sync":
            return await self._in_thread(self.spec.func, tuple(args), kwargs)
        loop = asyncio.get_running_loop()
        bridge = self._bridge = ThreadBridge(loop, self.sink.emit, mark=self.on_checkpoint)
        try:
            await self._in_thread(self._drive_sync_gen, (args, kwargs, loop), {})
        except SinkFailed:
            pass  # the generator is closed; close() below raises the sink's error
        except BaseException:
            if isinstance(self._host, asyncio.Task) and self._host.cancelling():
                self._abandon()  # past max_time or the worker stopping: emit nothing more
            await bridge.close(raise_error=False)  # the run's own error wins
            raise
        await bridge.close()
        return None

    async def _in_thread(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``func`` in the thread pool; with a pool that can abandon runs, remember the run so it can be."""
        loop = asyncio.get_running_loop()
        pool = self.thread_pool
        # The task's context goes with it (as asyncio.to_thread does): its contextvars, the
        # task a log line names.
        run = contextvars.copy_context().run
        if pool is None:
            return await loop.run_in_executor(None, run, call_in_thread, func, args, kwargs)
        # What loop.run_in_executor does, keeping the pool's future for abandon().
        self._thread_future = pool.submit(run, call_in_thread, func, args, kwargs)
        return await asyncio.wrap_future(self._thread_future, loop=loop)

    async def _drive_async_gen(self, agen: AsyncGenerator[Any, Any]) -> None:
        try:
            await self._pump_async_gen(agen)
        except BaseException as exc:
            try:
                await agen.aclose()
            except Exception as close_exc:
                exc.add_note(f"closing the generator also failed: {close_exc!r}")
            raise
        await agen.aclose()  # an error here (a finally that raises or yields) is the run's error

    async def _pump_async_gen(self, agen: AsyncGenerator[Any, Any]) -> None:
        handler = self.spec.generate_handler
        handler_is_async = self.spec.handler_is_async
        emit = self.sink.emit
        token = self.token
        while True:
            self._in_user_code = True
            try:
                if token.is_set:
                    value = await agen.athrow(TaskCancelError(token.reason))
                else:
                    value = await agen.__anext__()
            except StopAsyncIteration:
                return
            finally:
                self._in_user_code = False
            if handler is not None:
                value = await handler(value) if handler_is_async else handler(value)
            await emit(value)
            self.yield_count += 1

    def _drive_sync_gen(self, args: list[Any], kwargs: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        """Runs in a pool thread."""
        gen: Generator[Any, Any, Any] = self.spec.func(*args, **kwargs)
        try:
            self._pump_sync_gen(gen, loop)
        except BaseException as exc:
            close_generator(gen.close, exc)
            raise
        gen.close()

    def _pump_sync_gen(self, gen: Generator[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> None:
        bridge = self._bridge
        assert bridge is not None
        handler = self.spec.generate_handler
        handler_is_async = self.spec.handler_is_async
        token = self.token
        deadline = None if self.spec.max_time is None else time.monotonic() + self.spec.max_time
        while True:
            try:
                if token.is_set:
                    value = gen.throw(TaskCancelError(token.reason))
                elif deadline is not None and time.monotonic() > deadline:
                    value = gen.throw(TaskTimeoutError(f"task {self.spec.name!r} ran longer than its max_time"))
                else:
                    value = next(gen)
            except StopIteration:
                return
            if handler is not None:
                if handler_is_async:
                    value = wait_future(asyncio.run_coroutine_threadsafe(handler(value), loop))
                else:
                    value = handler(value)
            bridge.put(value)
            self.yield_count += 1
