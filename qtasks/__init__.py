"""qtasks: a Kafka-native streaming task engine with QTasks' API.

``from qtasks import QueueTasks`` for blocking client methods, ``from qtasks.asyncio
import QueueTasks`` for coroutines. See README.md and docs/.
"""

from qtasks.blocking import QueueTasks
from qtasks.bulk import Args
from qtasks.config import QueueConfig
from qtasks.context import AsyncContext, SyncContext
from qtasks.exc import QTasksError, TaskCancelError, TaskPluginTriggerError
from qtasks.logs import Logger
from qtasks.pipe import Stream, UpstreamFailedError, UpstreamRetriedError
from qtasks.records import StreamItem, Task
from qtasks.router import AsyncRouter, Router, SyncRouter, shared_task

__all__ = [
    "Args",
    "AsyncContext",
    "AsyncRouter",
    "Logger",
    "QTasksError",
    "QueueConfig",
    "QueueTasks",
    "Router",
    "Stream",
    "StreamItem",
    "SyncContext",
    "SyncRouter",
    "Task",
    "TaskCancelError",
    "TaskPluginTriggerError",
    "UpstreamFailedError",
    "UpstreamRetriedError",
    "shared_task",
]

__version__ = "0.1.0"
