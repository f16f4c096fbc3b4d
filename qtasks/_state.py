"""Process-wide state: the last app created, for contexts used outside a worker."""

from __future__ import annotations

from typing import Any

#: The last ``QueueTasks`` created in this process (QTasks' ``qtasks._state.app_main``).
app_main: Any = None
