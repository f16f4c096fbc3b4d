"""TaskExecutor on its own (no broker): execute() always returns an Outcome; sync runs past max_time stop."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from qtasks.exc import TaskCancelError, TaskPluginTriggerError, TaskTimeoutError
from qtasks.executor import TRACEBACK_LIMIT, Outcome, TaskExecutor
from qtasks.plugins import PluginManager
from qtasks.registry import TaskSpec
from qtasks.threads import TaskThreads, ThreadLimitError


class Sink:
    """Keeps emitted values; ``fail_at`` makes the n-th emit raise as a too-large record would."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.values: list[Any] = []
        self.fail_at = fail_at

    async def emit(self, value: Any) -> None:
        if self.fail_at is not None and len(self.values) == self.fail_at:
            raise ValueError(f"a result of {len(repr(value))} bytes is over max_record_bytes")
        self.values.append(value)


class Plugin:
    """Raises ``exc`` on trigger ``at``; returns ``returns`` there otherwise."""

    def __init__(self, at: str, exc: BaseException | None = None, returns: Any = None) -> None:
        self.at, self.exc, self.returns = at, exc, returns

    async def trigger(self, name: str, **kwargs: Any) -> Any:
        if name != self.at:
            return None
        if self.exc is not None:
            raise self.exc
        return self.returns


def executor(
    func: Callable[..., Any],
    *,
    args: tuple[Any, ...] = (),
    sink: Sink | None = None,
    plugins: tuple[Plugin, ...] = (),
    pool: Any = None,
    **spec: Any,
) -> TaskExecutor:
    manager = PluginManager()
    for plugin in plugins:
        manager.add(plugin)
    return TaskExecutor(
        TaskSpec(name=func.__name__, func=func, **spec),
        uuid="u-1",
        args=list(args),
        kwargs={},
        sink=sink or Sink(),
        app=None,
        plugins=manager,
        thread_pool=pool,
    )


@pytest.fixture
def pool() -> Iterator[TaskThreads]:
    threads = TaskThreads(2, name_prefix="test-task")
    yield threads
    threads.shutdown(wait=False, cancel_futures=True, cancel_running=True)


# -- every failure is an outcome ---------------------------------------------------


async def async_ok() -> int:
    return 1


def sync_ok() -> int:
    return 1


async def agen_ok() -> AsyncIterator[int]:
    yield 1
    yield 2


def gen_ok() -> Iterator[int]:
    yield 1
    yield 2


async def asks_plugins() -> None:
    raise TaskPluginTriggerError("over to the plugins")


def raises(exc: BaseException) -> Callable[..., Any]:
    def raiser(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return raiser


def araises(exc: BaseException) -> Callable[..., Any]:
    async def raiser(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return raiser


def sync_raises(exc: BaseException) -> Callable[[], None]:
    def task() -> None:
        raise exc

    return task


def gen_raises(exc: BaseException) -> Callable[[], Iterator[int]]:
    def task() -> Iterator[int]:
        yield 1
        raise exc

    return task


async def async_raises_generator_exit() -> None:
    raise GeneratorExit


ERRORS: list[tuple[str, Callable[[], TaskExecutor], type[BaseException], str]] = [
    (
        "plugin raises in task_executor_run_task_trigger_error",
        lambda: executor(
            asks_plugins, plugins=(Plugin("task_executor_run_task_trigger_error", RuntimeError("plugin broke")),)
        ),
        RuntimeError,
        "plugin broke",
    ),
    (
        "plugin raises in task_executor_args_replace",
        lambda: executor(async_ok, plugins=(Plugin("task_executor_args_replace", RuntimeError("args plugin")),)),
        RuntimeError,
        "args plugin",
    ),
    (
        "plugin returns new_args of a wrong shape",
        lambda: executor(async_ok, plugins=(Plugin("task_executor_args_replace", returns={"new_args": 5}),)),
        TypeError,
        "task_executor_args_replace returned 5",
    ),
    (
        "plugin raises in task_executor_before_execute",
        lambda: executor(sync_ok, plugins=(Plugin("task_executor_before_execute", RuntimeError("before")),)),
        RuntimeError,
        "before",
    ),
    (
        "plugin raises in task_executor_run_task",
        lambda: executor(sync_ok, plugins=(Plugin("task_executor_run_task", RuntimeError("run_task")),)),
        RuntimeError,
        "run_task",
    ),
    (
        "plugin raises in task_executor_after_execute",
        lambda: executor(async_ok, plugins=(Plugin("task_executor_after_execute", RuntimeError("after")),)),
        RuntimeError,
        "after",
    ),
    (
        "plugin raises in task_executor_decode",
        lambda: executor(
            async_ok, decode=lambda r: r, plugins=(Plugin("task_executor_decode", RuntimeError("decode plugin")),)
        ),
        RuntimeError,
        "decode plugin",
    ),
    (
        "plugin's own await is cancelled (not the worker stopping)",
        lambda: executor(async_ok, plugins=(Plugin("task_executor_before_execute", asyncio.CancelledError()),)),
        asyncio.CancelledError,
        "",
    ),
    (
        "before-middleware raises",
        lambda: executor(async_ok, middlewares_before=[raises(LookupError("mw before"))]),
        LookupError,
        "mw before",
    ),
    (
        "before-middleware returns a wrong shape",
        lambda: executor(async_ok, middlewares_before=[lambda name, args, kwargs: "nonsense"]),
        TypeError,
        "before-middleware",
    ),
    (
        "async before-middleware raises",
        lambda: executor(sync_ok, middlewares_before=[araises(LookupError("async mw"))]),
        LookupError,
        "async mw",
    ),
    (
        "after-middleware raises",
        lambda: executor(sync_ok, middlewares_after=[raises(LookupError("mw after"))]),
        LookupError,
        "mw after",
    ),
    ("decode raises", lambda: executor(async_ok, decode=raises(ValueError("bad decode"))), ValueError, "bad decode"),
    (
        "sync generate_handler raises, async generator",
        lambda: executor(agen_ok, generate_handler=raises(ValueError("handler"))),
        ValueError,
        "handler",
    ),
    (
        "async generate_handler raises, async generator",
        lambda: executor(agen_ok, generate_handler=araises(ValueError("async handler"))),
        ValueError,
        "async handler",
    ),
    (
        "sync generate_handler raises, sync generator (in its thread)",
        lambda: executor(gen_ok, generate_handler=raises(ValueError("thread handler"))),
        ValueError,
        "thread handler",
    ),
    (
        "async generate_handler raises, sync generator (on the loop)",
        lambda: executor(gen_ok, generate_handler=araises(ValueError("loop handler"))),
        ValueError,
        "loop handler",
    ),
    (
        "sync task raises KeyboardInterrupt in its thread",
        lambda: executor(sync_raises(KeyboardInterrupt())),
        KeyboardInterrupt,
        "",
    ),
    (
        "sync task raises SystemExit in its thread",
        lambda: executor(sync_raises(SystemExit(3))),
        SystemExit,
        "3",
    ),
    (
        "sync task raises GeneratorExit in its thread",
        lambda: executor(sync_raises(GeneratorExit())),
        GeneratorExit,
        "",
    ),
    (
        "sync task raises asyncio.CancelledError in its thread",
        lambda: executor(sync_raises(asyncio.CancelledError())),
        asyncio.CancelledError,
        "",
    ),
    (
        "sync generator raises KeyboardInterrupt in its thread",
        lambda: executor(gen_raises(KeyboardInterrupt())),
        KeyboardInterrupt,
        "",
    ),
    ("async task raises GeneratorExit", lambda: executor(async_raises_generator_exit), GeneratorExit, ""),
    ("wrong arguments", lambda: executor(sync_ok, args=(1, 2)), TypeError, "wrong arguments for task"),
]


@pytest.mark.parametrize(("case", "make", "exc_type", "message"), ERRORS, ids=[c[0] for c in ERRORS])
async def test_every_failure_is_an_error_outcome(
    case: str, make: Callable[[], TaskExecutor], exc_type: type[BaseException], message: str
) -> None:
    outcome = await make().execute()
    assert outcome.status == "error", outcome
    assert type(outcome.exc) is exc_type
    assert message in str(outcome.exc)
    assert outcome.traceback and exc_type.__name__ in outcome.traceback


async def test_a_plugin_may_turn_plugin_error_into_a_result() -> None:
    plugin = Plugin("task_executor_run_task_trigger_error", returns={"result": 7})
    outcome = await executor(asks_plugins, plugins=(plugin,)).execute()
    assert (outcome.status, outcome.returning) == ("success", 7)


async def test_a_failing_trigger_error_plugin_keeps_the_task_error_in_the_traceback() -> None:
    plugin = Plugin("task_executor_run_task_trigger_error", RuntimeError("plugin broke"))
    outcome = await executor(asks_plugins, plugins=(plugin,)).execute()
    assert outcome.traceback is not None
    assert "over to the plugins" in outcome.traceback
    assert "task_executor_run_task_trigger_error" in outcome.traceback


async def test_keyboard_interrupt_on_the_loop_passes_through() -> None:
    # On the loop it may be the process's own Ctrl-C: execute() must not swallow it.
    with pytest.raises(KeyboardInterrupt):
        await executor(araises(KeyboardInterrupt())).execute()


# -- the sink and closing generators -----------------------------------------------


def _async_gen(log: list[str], finally_raises: BaseException | None = None, yield_in_finally: bool = False):
    async def agen() -> AsyncIterator[str]:
        try:
            for i in range(5):
                yield "x" * (i + 1)
        finally:
            log.append("closed")
            if yield_in_finally:
                yield "refused to close"
            if finally_raises is not None:
                raise finally_raises

    return agen


def _sync_gen(log: list[str]):
    def gen() -> Iterator[str]:
        try:
            for i in range(5):
                yield "x" * (i + 1)
        finally:
            log.append("closed")

    return gen


@pytest.mark.parametrize("make_gen", [_async_gen, _sync_gen], ids=["async generator", "sync generator"])
async def test_a_sink_that_rejects_a_value_ends_the_run_as_error_and_closes_the_generator(make_gen: Any) -> None:
    log: list[str] = []
    sink = Sink(fail_at=2)
    outcome = await executor(make_gen(log), sink=sink).execute()
    assert outcome.status == "error"
    assert isinstance(outcome.exc, ValueError)
    assert "over max_record_bytes" in str(outcome.exc)
    assert outcome.traceback is not None and "over max_record_bytes" in outcome.traceback
    assert sink.values == ["x", "xx"]
    # A sync generator runs ahead of the sink by up to a bridge buffer, so it may have
    # yielded more than was emitted (the worker counts results by the sink, not this).
    assert outcome.yield_count == 2 if make_gen is _async_gen else outcome.yield_count >= 2
    assert log == ["closed"]


@pytest.mark.parametrize(
    ("sink", "finally_raises", "yield_in_finally", "exc_type", "in_traceback"),
    [
        (Sink(), RuntimeError("cleanup failed"), False, RuntimeError, "cleanup failed"),
        (Sink(fail_at=1), RuntimeError("cleanup failed"), False, ValueError, "closing the generator also failed"),
        (Sink(fail_at=1), None, True, ValueError, "ignored GeneratorExit"),
    ],
    ids=[
        "finishes, then aclose raises",
        "sink fails, then aclose raises",
        "sink fails, then yields in finally",
    ],
)
async def test_aclose_failing_is_an_error_and_never_hides_the_first_one(
    sink: Sink, finally_raises: BaseException | None, yield_in_finally: bool, exc_type: type, in_traceback: str
) -> None:
    log: list[str] = []
    task = _async_gen(log, finally_raises, yield_in_finally)
    outcome = await executor(task, sink=sink).execute()
    assert outcome.status == "error"
    assert type(outcome.exc) is exc_type
    assert outcome.traceback is not None and in_traceback in outcome.traceback
    assert log == ["closed"]


async def test_the_traceback_of_user_code_is_kept_and_bounded() -> None:
    def deep_in_user_code() -> None:
        raise ValueError("y" * (TRACEBACK_LIMIT * 2))

    outcome = await executor(deep_in_user_code).execute()
    assert outcome.traceback is not None
    assert "deep_in_user_code" in outcome.traceback
    assert len(outcome.traceback) <= TRACEBACK_LIMIT + len("\n...\n")


# -- cancellation ------------------------------------------------------------------


async def test_cancel_stops_an_async_task_as_cancel() -> None:
    async def waits() -> None:
        await asyncio.sleep(10)

    ex = executor(waits)
    run = asyncio.ensure_future(ex.execute())
    await asyncio.sleep(0.05)
    ex.cancel("enough")
    outcome = await asyncio.wait_for(run, 1)
    assert (outcome.status, outcome.cancel_reason) == ("cancel", "enough")


async def test_a_cancel_request_and_the_worker_stopping_together_propagate() -> None:
    async def waits() -> None:
        await asyncio.sleep(10)

    ex = executor(waits)
    run = asyncio.ensure_future(ex.execute())
    await asyncio.sleep(0.05)
    ex.cancel("enough")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run


async def test_cancel_wakes_ctx_sleep_in_a_sync_task(pool: TaskThreads) -> None:
    def sleeps(task: Any) -> None:
        task.ctx.sleep(10)

    ex = executor(sleeps, echo=True, pool=pool)
    run = asyncio.ensure_future(ex.execute())
    await asyncio.sleep(0.1)
    started = time.monotonic()
    ex.cancel("stop")
    outcome = await asyncio.wait_for(run, 2)
    assert outcome.status == "cancel"
    assert time.monotonic() - started < 0.5


# -- sync runs past max_time, and stop means stop ----------------------------------


async def test_abandoned_sync_tasks_do_not_starve_later_ones(pool: TaskThreads) -> None:
    release = threading.Event()

    def hangs() -> None:
        release.wait()  # blocked in C: abandoning cannot stop it until it returns

    try:
        hung = await asyncio.gather(*(executor(hangs, max_time=0.1, pool=pool).execute() for _ in range(3)))
        assert [o.status for o in hung] == ["error"] * 3
        assert all(isinstance(o.exc, TaskTimeoutError) for o in hung)
        outcome = await asyncio.wait_for(executor(sync_ok, pool=pool).execute(), 2)
        assert (outcome.status, outcome.returning) == ("success", 1), outcome.traceback
    finally:
        release.set()


async def test_no_thread_left_is_an_error_outcome_not_a_hang() -> None:
    pool = TaskThreads(1, max_threads=1)
    release = threading.Event()
    try:
        hung = await executor(raises_after(release), max_time=0.05, pool=pool).execute()
        assert isinstance(hung.exc, TaskTimeoutError)
        outcome = await asyncio.wait_for(executor(sync_ok, pool=pool).execute(), 2)
        assert outcome.status == "error"
        assert isinstance(outcome.exc, ThreadLimitError)
    finally:
        release.set()
        pool.shutdown(wait=False, cancel_running=True)


def raises_after(release: threading.Event) -> Callable[[], None]:
    def hangs() -> None:
        release.wait()

    return hangs


async def test_a_busy_sync_function_past_max_time_stops_running(pool: TaskThreads) -> None:
    counter = [0]

    def busy() -> None:
        while True:
            counter[0] += 1

    outcome = await executor(busy, max_time=0.1, pool=pool).execute()
    assert isinstance(outcome.exc, TaskTimeoutError)
    await asyncio.sleep(0.1)
    stopped_at = counter[0]
    await asyncio.sleep(0.2)
    assert counter[0] == stopped_at
    assert pool.threads <= 1  # the abandoned thread ended; at most the pool's next idle one


async def test_a_sync_task_in_ctx_sleep_stops_at_once_past_max_time(pool: TaskThreads) -> None:
    woke = threading.Event()

    def sleeps(task: Any) -> None:
        task.ctx.sleep(10)
        woke.set()  # never reached

    outcome = await executor(sleeps, echo=True, max_time=0.1, pool=pool).execute()
    assert isinstance(outcome.exc, TaskTimeoutError)
    for _ in range(50):
        if pool.abandoned_threads == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.abandoned_threads == 0
    assert not woke.is_set()


async def test_stop_abandons_a_sync_thread_and_the_cancellation_propagates(pool: TaskThreads) -> None:
    counter = [0]

    def busy() -> None:
        while True:
            counter[0] += 1

    run = asyncio.ensure_future(executor(busy, pool=pool).execute())
    await asyncio.sleep(0.1)
    run.cancel()  # the worker stopping past its deadline
    with pytest.raises(asyncio.CancelledError):
        await run
    await asyncio.sleep(0.1)
    stopped_at = counter[0]
    await asyncio.sleep(0.2)
    assert counter[0] == stopped_at


async def test_a_sync_generator_past_max_time_ends_at_its_next_yield(pool: TaskThreads) -> None:
    log: list[str] = []

    def ticks() -> Iterator[int]:
        try:
            for i in range(100):
                time.sleep(0.05)
                yield i
        finally:
            log.append("closed")

    sink = Sink()
    outcome = await executor(ticks, max_time=0.3, sink=sink, pool=pool).execute()
    assert isinstance(outcome.exc, TaskTimeoutError)
    await asyncio.sleep(0.2)
    assert log == ["closed"]
    emitted = len(sink.values)
    assert 1 <= emitted < 10
    await asyncio.sleep(0.2)
    assert len(sink.values) == emitted


@pytest.mark.parametrize("use_pool", [False, True], ids=["loop default executor", "TaskThreads"])
async def test_all_four_kinds_succeed(use_pool: bool, pool: TaskThreads) -> None:
    for func, returning in ((async_ok, 1), (sync_ok, 1), (agen_ok, None), (gen_ok, None)):
        sink = Sink()
        outcome: Outcome = await executor(func, sink=sink, pool=pool if use_pool else None).execute()
        assert (outcome.status, outcome.returning) == ("success", returning)
        if func in (agen_ok, gen_ok):
            assert sink.values == [1, 2]


async def test_a_cancelled_sync_task_ends_as_cancel(pool: TaskThreads) -> None:
    def checks(task: Any) -> None:
        task.ctx.cancel("by itself")

    outcome = await executor(checks, echo=True, pool=pool).execute()
    assert outcome.status == "cancel"
    assert isinstance(outcome.exc, TaskCancelError)


def _none() -> None: ...
def _one(a: int) -> None: ...
def _defaults(a: int, b: int = 1, c: int = 2) -> None: ...
def _star(a: int, *rest: int) -> None: ...
def _kwonly(a: int, *, b: int) -> None: ...
def _posonly(a: int, /, b: int = 0) -> None: ...
def _anykw(a: int, **kw: int) -> None: ...


@pytest.mark.parametrize("func", [_none, _one, _defaults, _star, _kwonly, _posonly, _anykw])
def test_the_argument_check_agrees_with_python_on_every_call(func: Callable[..., None]) -> None:
    spec = TaskSpec(name="t", func=func)
    signature = inspect.signature(func)
    names = ["a", "b", "c", "rest", "kw", "x"]
    for given in range(5):
        for count in range(3):
            for keys in itertools.combinations(names, count):
                args, kwargs = list(range(given)), dict.fromkeys(keys, 0)
                try:
                    signature.bind(*args, **kwargs)
                    python = None
                except TypeError as exc:
                    python = str(exc)
                try:
                    spec.check_arguments(args, kwargs)
                    ours = None
                except TypeError as exc:
                    ours = str(exc)
                assert ours == python, (func.__name__, args, kwargs)
