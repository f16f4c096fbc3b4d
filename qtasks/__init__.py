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
from qtasks.records import StreamItem, Task

__all__ = [
    "Args",
    "AsyncContext",
    "Logger",
    "QTasksError",
    "QueueConfig",
    "QueueTasks",
    "StreamItem",
    "SyncContext",
    "Task",
    "TaskCancelError",
    "TaskPluginTriggerError",
]

__version__ = "0.1.0"
