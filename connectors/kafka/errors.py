"""The one error edge: every aiokafka error becomes a qtasks ConnectorError with aiokafka's ``retriable``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from aiokafka import TopicPartition as KafkaTP
from aiokafka import errors as kafka_exc

from qtasks.connectors.base import TopicPartition
from qtasks.connectors.kafka.health import Health
from qtasks.connectors.kafka.refusals import refusal
from qtasks.exc import (
    BrokerRefusedError,
    BrokerUnavailableError,
    CommitFailedError,
    ConnectorError,
    RecordTooLargeError,
)
from qtasks.supervise import raise_if_cancelled

log = logging.getLogger("qtasks.kafka")


# -- errors (pure mapping, one edge) -----------------------------------------------------

#: Broker or connection did not answer: the call may work later.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    kafka_exc.KafkaConnectionError,
    kafka_exc.NodeNotReadyError,
    kafka_exc.RequestTimedOutError,
    kafka_exc.NoBrokersAvailable,
    kafka_exc.KafkaTimeoutError,
    TimeoutError,
    OSError,
)
_TOO_LARGE: tuple[type[BaseException], ...] = (
    kafka_exc.MessageSizeTooLargeError,
    kafka_exc.RecordTooLargeError,
    kafka_exc.RecordListTooLargeError,
)
#: Failures after which an idempotent producer's state is wrong for good: a new producer
#: id is the only way out (what the Java client does with ``bumpIdempotentEpoch``).
_FATAL: tuple[type[BaseException], ...] = (
    kafka_exc.OutOfOrderSequenceNumber,
    kafka_exc.UnknownProducerId,
    kafka_exc.ProducerFenced,
    kafka_exc.InvalidProducerEpoch,
    kafka_exc.ProducerClosed,
)
_REBALANCE: tuple[type[BaseException], ...] = (
    kafka_exc.CommitFailedError,
    kafka_exc.RebalanceInProgressError,
    kafka_exc.IllegalStateError,
    kafka_exc.IllegalGenerationError,
    kafka_exc.UnknownMemberIdError,
)


def map_error(exc: BaseException, action: str, *, servers: str = "", topic: str | None = None) -> ConnectorError:
    """The qtasks error for an aiokafka error raised while doing ``action``.

    ``retriable`` is aiokafka's own flag, except where the class says more (a broker that
    did not answer may answer later; a rebalance means the records come again).
    """
    if isinstance(exc, ConnectorError):
        return exc
    where = f" ({topic})" if topic else ""
    detail = str(exc) or type(exc).__name__
    refused = refusal(exc, servers or "?", {})
    if refused is not None:
        return BrokerRefusedError(f"{action}{where}: {refused}")
    if isinstance(exc, _TOO_LARGE):
        return RecordTooLargeError(f"{action}{where}: the broker refused a record as too large: {detail}")
    if isinstance(exc, _UNAVAILABLE):
        return BrokerUnavailableError(f"{action}: Kafka at {servers or '?'} did not answer: {detail}")
    if action == "commit" and isinstance(exc, _REBALANCE):
        return CommitFailedError(f"commit refused ({detail}); the records will be delivered again")
    if isinstance(exc, kafka_exc.UnknownTopicOrPartitionError):
        name = repr(topic) if topic else "a topic"
        return ConnectorError(
            f"{action}: {name} does not exist on the cluster (deleted, or not created yet)",
            retriable=bool(exc.retriable),
        )
    return ConnectorError(f"{action}{where}: {detail}", retriable=bool(getattr(exc, "retriable", False)))


def is_fatal(exc: BaseException) -> bool:
    """Whether a failed delivery leaves the idempotent producer unusable until it is rebuilt.

    Any batch the broker refused for good (not retriable) leaves a gap in the partition's
    sequence numbers, so it counts as fatal too.
    """
    return isinstance(exc, _FATAL) or (isinstance(exc, kafka_exc.KafkaError) and not exc.retriable)


@contextlib.contextmanager
def kafka_errors(
    action: str, *, servers: str = "", topic: str | None = None, health: Health | None = None
) -> Iterator[None]:
    """Run aiokafka calls and raise what :func:`map_error` makes of their errors.

    A broker that did not answer is also reported to ``health`` (which then checks it).
    Cancellation passes through untouched, also one that aiokafka's ``wait_for`` turned
    into an error on Python 3.11: it is raised as the cancellation it was.
    """
    try:
        yield
    except ConnectorError:
        raise
    except KAFKA_ERRORS as exc:
        raise mapped(exc, action, servers=servers, topic=topic, health=health) from exc


#: What aiokafka calls raise besides our own errors (:func:`mapped` makes them ConnectorErrors).
KAFKA_ERRORS = (kafka_exc.KafkaError, TimeoutError, OSError)


def mapped(
    exc: BaseException, action: str, *, servers: str = "", topic: str | None = None, health: Health | None = None
) -> ConnectorError:
    """:func:`kafka_errors` for one caught error (a hot path's own ``try``): the error to raise.

    A cancellation that aiokafka turned into an error is raised here as what it was.
    """
    raise_if_cancelled()
    error = map_error(exc, action, servers=servers, topic=topic)
    if health is not None and isinstance(error, BrokerUnavailableError):
        health.suspect()
    return error


def _tp(tp: TopicPartition) -> KafkaTP:
    return KafkaTP(tp.topic, tp.partition)
