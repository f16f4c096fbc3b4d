"""The asyncio flavour of qtasks: ``from qtasks.asyncio import QueueTasks``; client methods are coroutines."""

from qtasks.app import QueueTasks

__all__ = ["QueueTasks"]
