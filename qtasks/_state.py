"""Process-wide state: the last app created, for contexts used outside a worker."""

from __future__ import annotations

import contextvars
from typing import Any

#: The last ``QueueTasks`` created in this process (QTasks' ``qtasks._state.app_main``).
app_main: Any = None

#: ``@shared_task``: tasks every app of the process registers (``qtasks.router``).
shared_tasks: list[Any] = []

#: Exactly-once: the task whose own, not yet committed status writes a read may see (set by
#: that task's ``ctx.get_metadata``: a running task sees itself running). Every other
#: read sees committed statuses only.
own_task: contextvars.ContextVar[str | None] = contextvars.ContextVar("qtasks_own_task", default=None)
