"""Plugins are bound to trigger names the engine fires; a misspelled one is refused."""

from __future__ import annotations

from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from qtasks.plugins import TRIGGERS


class Recorder:
    def trigger(self, name: str, **kwargs: Any) -> None:
        pass


def test_a_misspelled_trigger_name_is_refused_with_the_list_of_valid_ones() -> None:
    app = QueueTasks(name="plugins", broker_url="memory://plugins")
    with pytest.raises(ValueError, match="unknown trigger name\\(s\\) 'task_executor_run_task_trigger_eror'") as info:
        app.add_plugin(Recorder(), trigger_names=["worker_execute_before", "task_executor_run_task_trigger_eror"])
    assert all(name in str(info.value) for name in TRIGGERS)
    assert len(app.plugins) == 0  # nothing was added


def test_every_trigger_name_and_a_single_name_are_accepted() -> None:
    app = QueueTasks(name="plugins", broker_url="memory://plugins")
    app.add_plugin(Recorder(), trigger_names=list(TRIGGERS))
    app.add_plugin(Recorder(), trigger_names="worker_task_error")  # type: ignore[arg-type]
    app.add_plugin(Recorder())
    assert len(app.plugins) == 3
    assert app.plugins.has("worker_task_error")


def test_an_event_handler_asking_for_what_the_event_does_not_give_is_refused() -> None:
    app = QueueTasks(name="plugins", broker_url="memory://plugins")
    with pytest.raises(ValueError, match="takes 'tsk', which the event does not give; it gives"):

        @app.events.on.task_success()
        def handler(tsk: Any) -> None: ...

    @app.events.on.task_success()
    def fine(task: Any, extra: int = 0, **rest: Any) -> None: ...

    assert app.events.has("task_success")
