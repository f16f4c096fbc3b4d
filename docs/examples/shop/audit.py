"""Tasks any app of the process gets, and a middleware class, as QTasks has them."""

from __future__ import annotations

from qtasks import shared_task
from qtasks.middlewares import TaskMiddleware

seen: list[str] = []


@shared_task
def audit(event: str) -> str:
    seen.append(event)
    return f"audited {event}"


class Noted(TaskMiddleware):
    """After every task: a note of the task and its result (here kept in a list; a real one would log it)."""

    def __call__(self) -> None:
        seen.append(f"{self.task_executor.spec.name} -> {self.task_executor.result!r}")
