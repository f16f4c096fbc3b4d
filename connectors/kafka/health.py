"""Reachability, quiet logs during an outage, and metadata updates that back off."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from aiokafka import errors as kafka_exc
from aiokafka.conn import create_conn

from qtasks.connectors.kafka.refusals import refusal
from qtasks.exc import (
    BrokerRefusedError,
    BrokerUnavailableError,
)
from qtasks.supervise import raise_if_cancelled

log = logging.getLogger("qtasks.kafka")


# -- reachability and quiet logs ---------------------------------------------------------


class Health:
    """Whether the brokers answer, checked by a probe (an ApiVersions round trip).

    Told by :func:`kafka_errors` and the log filter that something failed, it probes; if
    the probe fails too, the brokers are unreachable: one WARNING, then quiet probes with a
    capped backoff until one answers, then one INFO with the outage's length.
    """

    def __init__(self, servers: list[str], options: dict[str, Any], timeout: float) -> None:
        self.servers = servers
        self.where = ",".join(servers)
        self._conn_options = {k: v for k, v in options.items() if k != "bootstrap_servers"}
        self._timeout = timeout
        #: False while the brokers do not answer (for health checks).
        self.reachable = True
        #: Wall-clock time (``time.time()``) the current outage was noticed, else None.
        self.unreachable_since: float | None = None
        self._down_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start listening to the log filter's reports (the connector has started)."""
        self._loop = loop
        _WATCHED.add(self)

    async def close(self) -> None:
        """Stop probing."""
        _WATCHED.discard(self)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def suspect(self) -> None:
        """Something failed to reach the brokers: check (thread-safe, cheap when already checking)."""
        loop = self._loop
        if loop is None or loop.is_closed() or (self._task is not None and not self._task.done()):
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._watch_soon()
        else:
            loop.call_soon_threadsafe(self._watch_soon)

    def _watch_soon(self) -> None:
        if self._loop is not None and (self._task is None or self._task.done()) and self in _WATCHED:
            self._task = self._loop.create_task(self._watch(), name="qtasks-kafka-health")

    async def probe(self) -> None:
        """One ApiVersions round trip (and SASL, TLS) with any broker; raises if none answers in time.

        A broker that answers but refuses us (credentials, TLS, protocol) is a
        :class:`BrokerRefusedError` at once: waiting longer would not change its answer.
        """
        error: BaseException | None = None
        refused: str | None = None
        for server in self.servers:
            host, _, port = server.rpartition(":")
            try:
                async with asyncio.timeout(self._timeout):
                    conn = await create_conn(
                        host or server,
                        int(port or 9092),
                        client_id="qtasks-probe",
                        request_timeout_ms=int(self._timeout * 1000),
                        **self._conn_options,
                    )
            except (kafka_exc.KafkaError, OSError, TimeoutError) as exc:
                raise_if_cancelled()  # aiokafka's wait_for can turn our cancellation into this error
                reason = refusal(exc, server, self._conn_options, handshake=True)
                if reason is None and isinstance(exc, ConnectionError | kafka_exc.KafkaConnectionError):
                    reason = await self._answers_in_plain_text(host or server, int(port or 9092), server)
                refused = refused or reason
                error = exc
                continue
            conn.close()
            return
        if refused is not None:  # no broker took us, and one said why (a rollout may reach some first)
            raise BrokerRefusedError(refused) from None
        raise error or BrokerUnavailableError(f"no broker in {self.where}")

    async def _answers_in_plain_text(self, host: str, port: int, server: str) -> str | None:
        """A TLS handshake the broker cut: if it answers a plain-text client, the listener is not TLS."""
        protocol = str(self._conn_options.get("security_protocol", "PLAINTEXT"))
        if not protocol.endswith("SSL"):
            return None
        try:
            async with asyncio.timeout(min(self._timeout, 2.0)):
                conn = await create_conn(host, port, client_id="qtasks-probe", request_timeout_ms=2000)
        except (kafka_exc.KafkaError, OSError, TimeoutError):
            raise_if_cancelled()
            return None
        conn.close()
        return (
            f"TLS with Kafka at {server} failed: it answers in plain text, but kafka_security_protocol is "
            f"{protocol}: is its listener TLS? (use PLAINTEXT or SASL_PLAINTEXT for this one)"
        )

    async def wait_until_reachable(self, timeout: float) -> None:
        """Probe until a broker answers; BrokerUnavailableError after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.1
        while True:
            left = deadline - loop.time()
            try:
                async with asyncio.timeout(max(left, 0.001)):
                    await self.probe()
                return
            except (kafka_exc.KafkaError, OSError, TimeoutError) as exc:
                raise_if_cancelled()
                left = deadline - loop.time()
                if left <= 0:
                    raise BrokerUnavailableError(f"cannot reach Kafka at {self.where} within {timeout:g} s") from exc
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)

    async def _watch(self) -> None:
        try:
            await self.probe()
            return  # a blip: nothing to say
        except (kafka_exc.KafkaError, OSError, TimeoutError, BrokerRefusedError) as exc:
            raise_if_cancelled()
            reason = str(exc) or type(exc).__name__
        self.reachable = False
        self.unreachable_since = time.time()
        self._down_at = time.monotonic()
        log.warning("Kafka at %s is unreachable (%s); retrying quietly", self.where, reason)
        delay = 0.25
        while True:
            await asyncio.sleep(delay)
            try:
                await self.probe()
                break
            except (kafka_exc.KafkaError, OSError, TimeoutError, BrokerRefusedError):
                # refused: the settings or ACLs may be fixed on the broker's side; keep asking
                raise_if_cancelled()
                delay = min(delay * 2, 2.0)
        log.info("Kafka at %s is back after %.1f s", self.where, time.monotonic() - self._down_at)
        self.reachable = True
        self.unreachable_since = None


_WATCHED: weakref.WeakSet[Health] = weakref.WeakSet()

#: aiokafka messages (their format strings) that only say a connection or a request failed.
_CONNECTION_NOISE = (
    "Unable connect to",
    "Unable to request metadata",
    "Unable to update metadata",
    "Unable to bootstrap",
    "Got error produce response",
    "Failed fetch messages from",
    "Failed fetch offsets from",
    "Error sending",
    "Marking the coordinator dead",
    "Heartbeat send request failed",
    "Heartbeat session expired",
    "Heartbeat failed",
    "Group Coordinator Request failed",
    "FindCoordinator Request failed",
    "Cannot send",
    "Could not send",
    "Coordinator",
    "OffsetCommit failed",
    "LeaveGroup request failed",
    "Unexpected exception in AIOKafkaConnection",
    "Attempt to fetch offsets for partition",
)
_CONNECTION_ERRORS = (
    kafka_exc.KafkaConnectionError,
    kafka_exc.NodeNotReadyError,
    kafka_exc.RequestTimedOutError,
    kafka_exc.NoBrokersAvailable,
    kafka_exc.CoordinatorNotAvailableError,
    kafka_exc.NotCoordinatorError,
    kafka_exc.GroupCoordinatorNotAvailableError,
    OSError,
    TimeoutError,
)


class AiokafkaLogFilter(logging.Filter):
    """Turns aiokafka's logging into what an operator needs.

    - A connection failure or retry: dropped (kept at DEBUG if aiokafka's logger shows
      DEBUG), and every started connector is asked to check its brokers, which log one
      WARNING when they stop answering and one INFO when they are back.
    - Any other ERROR: shown at WARNING, once per distinct message per ``every`` seconds.
    - Everything else: DEBUG.
    """

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self.every = every
        self._seen: dict[str, float] = {}
        #: aiokafka records turned into DEBUG so far (dropped unless aiokafka logs at DEBUG).
        self.demoted = 0
        #: aiokafka records this filter was given so far, whatever became of them.
        self.seen = 0

    @staticmethod
    def is_connection_noise(record: logging.LogRecord) -> bool:
        """Whether the record only says that a connection or a request to a broker failed."""
        message = str(record.msg)
        if message.startswith(_CONNECTION_NOISE):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        exc = record.exc_info[1] if record.exc_info else None
        return any(isinstance(a, _CONNECTION_ERRORS) for a in (*args, exc))

    def filter(self, record: logging.LogRecord) -> bool:
        self.seen += 1
        if isinstance(record.args, tuple) and any(map(_is_sasl, record.args)):
            # aiokafka logs every request at DEBUG: SASL PLAIN's carries the password
            record.args = tuple("<SASL exchange hidden>" if _is_sasl(arg) else arg for arg in record.args)
        if record.levelno >= logging.WARNING and self.is_connection_noise(record):
            for health in list(_WATCHED):
                health.suspect()
            return self._demote(record)
        if record.levelno >= logging.ERROR:
            now = time.monotonic()
            key = f"{record.name}:{record.msg}"
            if now - self._seen.get(key, -self.every) < self.every:
                return self._demote(record)
            self._seen[key] = now
            if len(self._seen) > 1000:
                self._seen.clear()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        return self._demote(record)

    def _demote(self, record: logging.LogRecord) -> bool:
        self.demoted += 1
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _is_sasl(arg: object) -> bool:
    """A SASL request or response of aiokafka's protocol (their text would show credentials)."""
    return type(arg).__name__.startswith(("SaslAuthenticate", "SaslHandShake"))


_FILTER = AiokafkaLogFilter()


def install_log_filter() -> AiokafkaLogFilter:
    """Put :class:`AiokafkaLogFilter` on every aiokafka logger (idempotent; returns it)."""
    names = [n for n in list(logging.Logger.manager.loggerDict) if n == "aiokafka" or n.startswith("aiokafka.")]
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    return _FILTER


# -- metadata pacing --------------------------------------------------------------------

#: The longest wait between two failed metadata updates (Java's ``retry.backoff.max.ms``).
METADATA_BACKOFF_MAX = 1.0


def pace_metadata_updates(client: Any, cap: float = METADATA_BACKOFF_MAX) -> None:
    """Make an ``AIOKafkaClient`` wait after a metadata update that failed, before it reports so.

    Why: aiokafka's loops ask for metadata when a partition has no known leader and wait
    for the answer, with no backoff of their own: the producer's sender
    (``Sender._sender_routine``: a queued batch whose leader is unknown or -1) and the
    consumer's fetcher (``Fetcher._fetcher_routine``: ``invalid_metadata``). A broker that
    shuts down tells its clients that its partitions have no leader (-1) before it closes
    its port; from then on every update fails at once (connection refused) and the loop
    goes round again: tens of thousands of updates, and as many ERROR records, a second,
    one core busy for the whole outage.

    How: the update (``AIOKafkaClient._metadata_update``, run by the client's
    ``_md_synchronizer`` task) waits ``retry_backoff_ms`` after a failure, doubling up to
    ``cap`` seconds, and returns only then; every caller waiting for that update waits
    too. A successful update resets the wait. Set on the instance: aiokafka itself is
    untouched, and the first update after an outage is at most ``cap`` seconds late.
    """
    update = client._metadata_update
    first = max(float(client._retry_backoff), 0.01)
    delay = first

    async def paced(cluster_metadata: Any, topics: Any) -> bool:
        nonlocal delay
        updated = bool(await update(cluster_metadata, topics))
        if updated:
            delay = first
        else:
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)
        return updated

    client._metadata_update = paced
