"""Errors raised by qtasks.

Every error the engine raises derives from :class:`QTasksError`::

    QTasksError
    ├── ConfigError              a setting is missing or out of range
    ├── TaskNotFoundError        no such task: a name no worker knows, or a uuid no one wrote
    ├── TaskCancelError          a task was cancelled (ctx.cancel, app.cancel)
    ├── TaskPluginTriggerError   raised by ctx.plugin_error, handled by plugins
    ├── TaskTimeoutError         a task ran past its max_time
    ├── TaskFailedError          handle.result() of a task that ended in error (the remote error)
    ├── RecordError              a record could not be decoded (goes to the dead-letter topic)
    ├── AppClosedError           the app was closed while a call (a stream) still used it
    ├── StreamIncompleteError    a stream cannot read every value: some are gone from the log
    └── ConnectorError           the transport failed; carries ``retriable``
        ├── TopicConfigError     a topic exists with the wrong settings
        ├── CommitFailedError    offsets could not be committed (the group rebalanced)
        ├── ProducerFencedError  exactly-once: a newer producer owns the partition's transactions
        ├── RecordTooLargeError  a record is over the broker's or the topic's size limit
        ├── BrokerUnavailableError  the broker cannot be reached (or does not answer) in time
        └── BrokerRefusedError   the broker refuses this client: credentials, TLS or ACLs

``TaskCancelError`` and ``TaskPluginTriggerError`` keep QTasks' names so code written
for QTasks catches them unchanged.
"""

from __future__ import annotations

import re
from typing import Any


class QTasksError(Exception):
    """The root of every qtasks error."""


class ConfigError(QTasksError, ValueError):
    """A configuration value is invalid; the message names the setting and what it takes."""


class TaskNotFoundError(QTasksError, LookupError):
    """No such task: a name not registered on this worker, or a uuid with no status."""


class DeliveryLimitError(QTasksError):
    """Share mode: the share group handed a task out as many times as its delivery limit allows
    and none of its runs finished (their workers died or lost their locks). The task ends as
    ``error`` with this, and its record goes to the dead-letter topic."""


class ChordError(QTasksError):
    """A chord's callback did not run: one of the tasks it waited for did not succeed."""


class TaskCancelError(QTasksError):
    """The task was cancelled; it ends with status ``cancel`` and is never retried.

    Raised by ``handle.result()``, it carries the ``reason`` and the final ``task``.
    """

    reason: str | None = None
    task: Any = None


class TaskPluginTriggerError(QTasksError):
    """Raised by ``ctx.plugin_error(**kwargs)``: plugins may turn it into a result.

    The keyword arguments are kept in ``kwargs`` for the plugins to read.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args or (kwargs.get("message", "plugin error"),))
        self.kwargs = kwargs


class TaskTimeoutError(QTasksError, TimeoutError):
    """The task ran longer than its ``max_time``."""


_GROUP_LINE = re.compile(r"^[ |+]*([A-Za-z_][\w.]*Group): (.*)$")


def error_of(traceback: str | None) -> tuple[str, str]:
    """The exception's type and message from a formatted traceback (a message may span lines).

    The exception part starts at the first unindented line after the last frame line
    (``  File ...``); its text before the first ``": "`` is the type.
    """
    lines = (traceback or "").rstrip().splitlines()
    if not lines:
        return "", ""
    start = 0
    for i, line in enumerate(lines):
        if line.startswith("  File "):
            start = i + 1
    while start < len(lines) and lines[start].startswith(" "):
        start += 1
    text = "\n".join(lines[start:]) if start < len(lines) else lines[-1]
    kind, sep, message = text.partition(": ")
    if " " in kind or "\n" in kind:
        for line in lines:  # an exception group, drawn in boxes: its own line names it
            group = _GROUP_LINE.match(line)
            if group:
                return group.group(1), group.group(2)
        return "", text  # not "Type: message" (a note the worker wrote itself)
    return kind, message if sep else ""


class TaskFailedError(QTasksError):
    """A task ended in ``error``: ``handle.result()`` raises this in the caller's process.

    The remote error is described, never rebuilt (nothing is unpickled): ``remote_type``
    is its class name (``"ValueError"``), ``remote_message`` its message,
    ``remote_traceback`` the worker's traceback, and ``task`` the final :class:`Task`.
    """

    def __init__(
        self,
        message: str,
        *,
        task: Any = None,
        remote_type: str = "",
        remote_message: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.task = task
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    @classmethod
    def of(cls, task: Any) -> TaskFailedError:
        """The error of a finished task (its status ``error``)."""
        traceback = task.traceback or ""
        remote_type, remote_message = error_of(traceback)
        shown = f"{remote_type}: {remote_message}" if remote_message else remote_type
        return cls(
            f"task {task.uuid} ({task.task_name}) failed: {shown or task.status}",
            task=task,
            remote_type=remote_type,
            remote_message=remote_message,
            remote_traceback=traceback,
        )

    def __str__(self) -> str:
        if not self.remote_traceback:
            return super().__str__()
        return f"{super().__str__()}\n\nRemote traceback (the worker's):\n{self.remote_traceback.rstrip()}"


class RecordError(QTasksError, ValueError):
    """A record could not be decoded (too large, not JSON, or of the wrong shape), or cannot run
    as it asks (share mode: an ordering key).

    ``kind`` names the problem in a word (the ``reason`` label of the dead-letter metric):
    ``no_value``, ``not_bytes``, ``too_large``, ``not_utf8``, ``too_deep``, ``not_json``,
    ``wrong_shape``, ``newer_version``, ``no_key``, ``keyed`` or ``undecodable``. (A task past the share
    group's delivery limit is dead-lettered as ``delivery_limit``.)
    """

    def __init__(self, message: str, kind: str = "undecodable") -> None:
        super().__init__(message)
        self.kind = kind


class AppClosedError(QTasksError, RuntimeError):
    """The app was closed (``stop``/``close``) while a stream or a call still used it."""


class StreamIncompleteError(QTasksError):
    """A stream could not read every value of its task: some are no longer in the results
    topic (deleted by its retention, or lost with a replica), though the task's status says
    they were stored.

    Raised once the task has ended and the stream has read its results partition again from
    its start, after the values before the first missing one (a stream never skips a value):
    ``missing`` is the first range of seqs (of ``uuid``) that are not there; values after it
    may be.
    """

    def __init__(self, uuid: str, missing: range, undecodable: str | None = None) -> None:
        seqs = f"{missing.start}" if len(missing) == 1 else f"{missing.start} to {missing.stop - 1}"
        why = f"a record of the task cannot be read here: {undecodable}" if undecodable else "past its retention?"
        super().__init__(f"stream of {uuid}: its values of seq {seqs} are not in the results topic any more ({why})")
        self.uuid = uuid
        self.missing = missing
        #: Why a record of the task could not be decoded by this client (its
        #: ``max_record_bytes`` below the worker's, say), if one could not: the likelier cause.
        self.undecodable = undecodable


class ConnectorError(QTasksError):
    """The transport failed. ``retriable`` says whether trying again may help."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class TopicConfigError(ConnectorError):
    """A topic exists with settings qtasks cannot use (for example a status topic that is not compacted)."""


class CommitFailedError(ConnectorError):
    """Offsets were not committed because the consumer group rebalanced; the records will be seen again."""

    retriable = True


class ProducerFencedError(ConnectorError):
    """Exactly-once: this producer's transactions were fenced (a newer owner of the partition, or a
    transaction that ran past its timeout); nothing more it writes commits."""

    retriable = False


class RecordTooLargeError(ConnectorError):
    """A record is larger than the broker or its topic accepts; it was not sent (nothing else is affected)."""

    retriable = False


class BrokerUnavailableError(ConnectorError):
    """The broker could not be reached, or did not answer, in the time allowed."""

    retriable = True


class BrokerRefusedError(ConnectorError):
    """The broker answers but refuses this client: its credentials, its TLS settings, or its ACLs.

    Retrying cannot help until the settings or the broker's ACLs change; the message says which.
    """

    retriable = False
