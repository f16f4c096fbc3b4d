"""docs/reference.md says what the code does: it is generated from it, and the triggers and
events fire with the arguments it lists."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec

from qtasks import QueueConfig, Task
from qtasks.asyncio import QueueTasks
from qtasks.plugins import EVENT_HOOKS, TRIGGER_HOOKS
from qtasks.reference import _documented_fields, render
from tests.helpers import FAST, unique

ROOT = Path(__file__).resolve().parents[2]


def test_the_reference_is_generated_from_the_code() -> None:
    assert (ROOT / "docs" / "reference.md").read_text() == render(), "docs/reference.md is stale: run `make docs`"


def test_every_setting_and_every_task_field_is_described() -> None:
    settings = _documented_fields(QueueConfig)
    assert [f.name for f in dataclasses.fields(QueueConfig) if not settings.get(f.name)] == []
    fields = _documented_fields(Task)
    assert [f.name for f in msgspec.structs.fields(Task) if not fields.get(f.name)] == []


async def test_triggers_and_events_fire_with_the_arguments_the_reference_lists() -> None:
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique()}", **FAST)
    fired: dict[str, list[set[str]]] = defaultdict(list)

    class Recorder:
        def trigger(self, name: str, **kwargs: Any) -> None:
            fired[name].append(set(kwargs))

    app.add_plugin(Recorder())
    for event in EVENT_HOOKS:

        def handler(_event: str = event, **kwargs: Any) -> None:
            fired[f"event:{_event}"].append(set(kwargs))

        app.events.add(event, handler)

    @app.task(decode=lambda r: r)
    async def plain(x: int) -> int:
        return x

    @app.task
    async def gen(n: int):
        for i in range(n):
            yield i

    @app.task(echo=True)
    async def asks_plugins(self) -> None:
        self.ctx.plugin_error(reason="let a plugin decide")

    @app.task(retry=1)
    async def fails() -> None:
        raise ValueError("no")

    @app.task
    async def forever() -> None:
        await asyncio.sleep(60)

    async with app:
        await app.start()
        for name, args in [("plain", (1,)), ("gen", (2,)), ("asks_plugins", ()), ("fails", ())]:
            handle = await app.add_task(name, *args)
            await handle.wait(10)
        running = await app.add_task("forever")
        await app.view.wait_for(running.uuid, lambda h: h is not None and h.status == "process", 10)
        await running.cancel()
        await running.wait(10)
        await app.add_task("nobody", timeout=10)  # an unknown task: an error without a run

    for name, hook in TRIGGER_HOOKS.items():
        assert fired[name], f"trigger {name} never fired"
        assert all(keys == set(hook.arguments) for keys in fired[name]), (name, fired[name])
    for name, hook in EVENT_HOOKS.items():
        assert fired[f"event:{name}"], f"event {name} never fired"
        assert all(keys <= set(hook.arguments) for keys in fired[f"event:{name}"]), (name, fired[f"event:{name}"])
