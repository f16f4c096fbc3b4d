"""What QTasks users bring along: routers, shared tasks and app-wide middlewares, for every connector.

``tests/unit`` runs it on ``memory://`` and ``tests/integration`` on a real Kafka broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qtasks import AsyncRouter, Router, _state, shared_task
from qtasks.asyncio import QueueTasks
from qtasks.middlewares import TaskMiddleware


@pytest.fixture
def no_shared_tasks() -> Iterator[None]:
    """Shared tasks are process-wide: a test that makes some takes them away again."""
    before = list(_state.shared_tasks)
    yield
    _state.shared_tasks[:] = before


async def test_a_routers_tasks_run_once_it_is_included(app: QueueTasks) -> None:
    router = Router()

    @router.task(retry=1, description="doubles")
    async def double(x: int) -> int:
        return 2 * x

    @router.task
    async def count(n: int):
        for i in range(n):
            yield i

    other = AsyncRouter()  # QTasks' name for it

    @other.task(name="shout")
    def loud(text: str) -> str:
        return text.upper()

    app.include_router(router, other)
    assert sorted(app.registry.names()) == ["count", "double", "shout"]
    assert app.registry.get("double").retry == 1  # type: ignore[union-attr]
    await app.start()
    done = await double.add_task(21, timeout=20)  # a router's task submits through the app it joined
    assert done is not None and done.returning == 42
    assert [v async for v in (await app.add_task("count", 3)).stream(timeout=20)] == [0, 1, 2]
    assert (await app.add_task("shout", "hi", timeout=20)).returning == "HI"  # type: ignore[union-attr]


async def test_a_router_name_taken_in_the_app_or_the_router_is_refused(app: QueueTasks) -> None:
    router = Router()

    @router.task
    async def same() -> None: ...

    with pytest.raises(ValueError, match="already in this router"):

        @router.task(name="same")
        async def again() -> None: ...

    @app.task(name="same")
    async def mine() -> None: ...

    with pytest.raises(ValueError, match="already registered"):
        app.include_router(router)
    with pytest.raises(TypeError, match=r"qtasks\.Router"):
        app.include_router(object())  # type: ignore[arg-type]


async def test_a_shared_task_joins_every_app(make_app: Callable[..., QueueTasks], no_shared_tasks: None) -> None:
    first, second = make_app(), make_app()

    @shared_task(awaiting=True, retry=0)
    async def shared_add(a: int, b: int) -> int:
        return a + b

    @shared_task
    async def shared_name() -> str:
        return "shared"

    @second.task(name="shared_name")
    async def own_name() -> str:
        return "own"

    assert "shared_add" not in first.registry  # taken when the worker starts, as QTasks does
    await first.start()
    await second.start()
    assert "shared_add" in first.registry and "shared_add" in second.registry
    done = await first.add_task("shared_add", 2, 3, timeout=20)
    assert done is not None and done.returning == 5
    assert second.registry.get("shared_name").func is own_name.func  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="already registered"):

        @shared_task(name="shared_add")
        async def twice() -> None: ...


async def test_app_middlewares_run_around_every_task_in_order(app: QueueTasks) -> None:
    order: list[str] = []

    class Stamp(TaskMiddleware):
        async def __call__(self) -> None:
            order.append("app before")
            self.task_executor.kwargs["stamp"] = "stamped"

    class Shout(TaskMiddleware):
        def __call__(self) -> None:  # a sync one
            order.append("app after")
            self.task_executor.result = str(self.task_executor.result).upper()

    def own_before(name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        order.append(f"{name} before")

    class OwnAfter(TaskMiddleware):
        def __call__(self) -> None:
            order.append("own after")

    app.add_middleware(Stamp)
    app.add_middleware(Shout, position="after")
    with pytest.raises(ValueError, match="'before' or 'after'"):
        app.add_middleware(Stamp, position="around")
    with pytest.raises(TypeError, match=r"must subclass qtasks\.middlewares\.TaskMiddleware"):
        app.add_middleware(dict)
    with pytest.raises(TypeError, match="not an instance"):
        app.add_middleware(Stamp(None))

    @app.task(middlewares_before=[own_before], middlewares_after=[OwnAfter])
    async def greet(who: str, stamp: str = "") -> str:
        order.append("task")
        return f"hello {who}, {stamp}"

    await app.start()
    done = await app.add_task("greet", "ana", timeout=20)
    assert done is not None and done.status == "success"
    assert done.returning == "HELLO ANA, STAMPED"
    assert order == ["app before", "greet before", "task", "own after", "app after"]


async def test_a_failing_middleware_ends_the_task_as_error_and_the_worker_goes_on(app: QueueTasks) -> None:
    class Broken(TaskMiddleware):
        async def __call__(self) -> None:
            if self.task_executor.args == ["bad"]:
                raise RuntimeError("the middleware broke")

    app.add_middleware(Broken)

    @app.task
    async def echo(x: str) -> str:
        return x

    await app.start()
    failed = await app.add_task("echo", "bad", timeout=20)
    assert failed is not None and failed.status == "error" and "the middleware broke" in (failed.traceback or "")
    ok = await app.add_task("echo", "good", timeout=20)
    assert ok is not None and ok.returning == "good"


async def test_a_router_can_hold_a_periodic_task(app: QueueTasks) -> None:
    router = Router()
    runs: list[float] = []
    two = asyncio.Event()

    @router.periodic(every=1)
    async def tick() -> None:
        runs.append(time.time())
        if len(runs) >= 2:
            two.set()

    app.include_router(router)
    assert app.registry.get("tick").schedule is not None  # type: ignore[union-attr]
    await app.start()
    await asyncio.wait_for(two.wait(), 20)
