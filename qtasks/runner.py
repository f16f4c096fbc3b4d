"""One run of one task: its result sink, its status writes, the executor, and its conclusion.

:class:`TaskRun` writes ``process`` (attempt n, a lease), runs the task through the
executor (every handled value goes to the :class:`ResultSink` the moment it is
yielded), then writes the attempt's end marker and the terminal status, durably, so a
finished task is on the log before its offset may be committed. A failed run that may be
retried ends as ``retry`` and hands over to a child task submitted with a
``not_before`` time: the backoff holds no concurrency slot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import traceback
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from typing import Any

import msgspec

from qtasks.connectors.base import Record
from qtasks.core import Core
from qtasks.decisions import ENCODE_ERRORS, check_result, conclude
from qtasks.delivery import deliver
from qtasks.exc import ConnectorError, error_of
from qtasks.executor import Outcome, TaskExecutor, snapshot_checkpoint
from qtasks.logs import current_task
from qtasks.partitioner import partition_for
from qtasks.plugins import Events, PluginManager
from qtasks.records import ResultRecord, StatusHead, Task, TaskRecord, encode
from qtasks.registry import TaskSpec
from qtasks.retry import backoff
from qtasks.stats import UNKNOWN_TASK
from qtasks.tracing import Headers, RunTrace
from qtasks.transactions import PartitionTxn

log = logging.getLogger("qtasks.worker")

_EVENTS = {"success": "task_success", "error": "task_error", "cancel": "task_cancel"}


@dataclasses.dataclass(frozen=True, slots=True)
class Resume:
    """Where a run goes on from what an earlier attempt of its task stored."""

    #: The seq of the run's first value (a checkpoint's; else 0) and the CRC-32 of the values before it.
    seq: int = 0
    crc: int = 0
    #: The state ``ctx.resume_state`` returns (the checkpoint's).
    state: Any = None
    #: Exactly-once: values before this seq were committed; the run does not send them again ...
    committed: int = 0
    #: ... and checks that it yields the same ones (CRC-32 of the committed values; None: not known).
    committed_crc: int | None = None

    @classmethod
    def of(cls, prior: Task | None, *, exactly_once: bool) -> Resume:
        """What a new attempt of the task whose last status is ``prior`` goes on from."""
        if prior is None or prior.attempt == 0:
            return cls()
        if not exactly_once:
            return cls(prior.checkpoint_seq, prior.checkpoint_crc, prior.checkpoint)
        return cls(prior.checkpoint_seq, prior.checkpoint_crc, prior.checkpoint, prior.yield_count, prior.values_crc)


class ResultSink:
    """Writes a task's handled values as result records and keeps a bounded ``returning``.

    Exactly-once, the values go in the transaction of the task's partition, and the sink
    keeps a CRC-32 of them, so a later attempt can check that it yields the same values.
    A resumed run starts at its checkpoint's seq and does not send again the values an
    earlier attempt committed.
    """

    __slots__ = (
        "_attempt",
        "_bytes",
        "_key",
        "_limit",
        "_max_bytes",
        "_max_items",
        "_mismatch",
        "_partition",
        "_pending",
        "_pending_seqs",
        "_send",
        "_topic",
        "_trouble",
        "_txn",
        "_uuid",
        "checkpoint",
        "committed",
        "committed_crc",
        "crc",
        "error",
        "failed_seq",
        "first_at",
        "headers",
        "items",
        "last_delivery",
        "mismatched",
        "sent",
        "seq",
        "trace",
        "track_crc",
    )

    def __init__(
        self,
        core: Core,
        uuid: str,
        attempt: int,
        partition: int,
        *,
        txn: PartitionTxn | None = None,
        resume: Resume | None = None,
    ) -> None:
        resume = resume or Resume()
        self._txn = txn
        self._send: Any = txn.send if txn is not None else core.broker.producer.send
        self._topic = core.topics.results
        self._uuid = uuid
        self._key = uuid.encode()
        self._partition = partition
        self._attempt = attempt
        self._limit = core.record_limit(core.topics.results)
        self._trouble = core.trouble
        self._mismatch = core.config.resume_mismatch
        #: The seq of the next value; ``sent``: values before it are in the producer (or the transaction).
        self.seq = self.sent = resume.seq
        #: A run resumed from a checkpoint does not know the values before it: ``returning`` is the count.
        self.items: list[Any] | None = [] if resume.seq == 0 else None
        self._bytes = 0
        self._max_items = core.config.returning_max_items
        self._max_bytes = core.config.returning_max_bytes
        self.track_crc = txn is not None
        #: CRC-32 of the encoded values before ``sent`` (exactly-once).
        self.crc = resume.crc
        self.committed = resume.committed
        self.committed_crc = resume.committed_crc
        self.mismatched = False
        #: The last ``ctx.checkpoint``: (seq of the next value, state, CRC-32 of the values before it).
        self.checkpoint: tuple[int, Any, int] | None = None
        self.last_delivery: Any = None
        #: Values' deliveries not seen done yet, oldest first (a partition's deliveries
        #: end in order): looked at as values are sent and at the end, no callback per value.
        #: Their seqs beside them, not in a tuple each: no object per value in flight for the
        #: garbage collector to walk.
        self._pending: deque[Any] = deque()
        self._pending_seqs: deque[int] = deque()
        #: The first delivery error of a value of this attempt (the attempt then ends as error).
        self.error: BaseException | None = None
        #: The seq of the first value whose delivery failed (an ending as error says it: ``lost_from``).
        self.failed_seq: int | None = None
        #: ``time.monotonic()`` when this attempt sent its first value (0.0: none yet).
        self.first_at = 0.0
        #: Traces on: the run's trace (told of each value) and the headers its records carry.
        self.trace: RunTrace | None = None
        self.headers: Headers | None = None

    async def emit(self, value: Any) -> None:
        """One result record for one handled value; a value that cannot be stored is an error."""
        seq = self.seq
        try:
            if self.track_crc:  # the value encoded once, for the record and for the checksum
                value_raw = encode(value)
                crc = zlib.crc32(value_raw, self.crc)
                raw = encode(
                    ResultRecord(uuid=self._uuid, seq=seq, attempt=self._attempt, value=msgspec.Raw(value_raw))
                )
            else:
                crc = 0
                raw = encode(ResultRecord(uuid=self._uuid, seq=seq, attempt=self._attempt, value=value))
        except ENCODE_ERRORS as exc:
            raise TypeError(
                f"the task yielded a value of type {type(value).__name__} that cannot be encoded as JSON: {exc}"
            ) from None
        if len(raw) > self._limit:
            raise ValueError(
                f"value {seq} of the task is {len(raw)} bytes encoded, over the results topic's limit "
                f"of {self._limit} bytes (max_record_bytes, or the topic's max.message.bytes): yield smaller values"
            )
        if seq < self.committed:
            # An earlier attempt committed this value: it is not sent again.
            self._count(seq, value, len(raw), crc)
            if self.sent == self.committed:
                self._check_replay()
            return
        delivery = await self._send(self._topic, raw, key=self._key, partition=self._partition, headers=self.headers)
        # Counted once sent, never before: a run stopped while its send waited (a commit
        # holds sends back; max_time, a cancel) counts only the values that were sent.
        self._count(seq, value, len(raw), crc)
        if not self.first_at:
            self.first_at = time.monotonic()
        if self.trace is not None:
            try:
                self.trace.value(seq)
            except Exception:  # a trace never changes what happens to the task
                log.warning("the tracer failed on value %d of %s", seq, self._uuid, exc_info=True)
                self.trace = None
        if delivery is not None:
            self.last_delivery = delivery
            pending = self._pending
            pending.append(delivery)
            self._pending_seqs.append(seq)
            if pending[0].done():
                self.settle_done()

    def _count(self, seq: int, value: Any, size: int, crc: int) -> None:
        self.seq = self.sent = seq + 1
        self.crc = crc
        items = self.items
        if items is not None:
            self._bytes += size
            if len(items) >= self._max_items or self._bytes > self._max_bytes:
                self.items = None
            else:
                items.append(value)

    def _check_replay(self) -> None:
        """The values this run went over again must be the ones committed (a deterministic generator)."""
        if self.committed_crc is None or self.crc == self.committed_crc or self.mismatched:
            return
        self.mismatched = True
        problem = (
            f"task {self._uuid} was resumed and yielded values other than the {self.committed} its earlier "
            "attempt committed (it is not deterministic); the committed ones stay in the results"
        )
        if self._mismatch == "error":
            raise ValueError(problem + " (resume_mismatch='error')")
        log.warning("%s", problem)

    def finish_replay(self) -> None:
        """The run ended: one that yielded fewer values than were committed did not go on alike."""
        if self.seq < self.committed and not self.mismatched:
            self.committed_crc = -1  # never a CRC: the check fails
            self.sent = self.committed
            self._check_replay()

    def mark(self, state: Any, limit: int) -> None:
        """``ctx.checkpoint(state)``: the state to go on from at the next value (JSON, at most ``limit`` bytes)."""
        self.checkpoint = (self.seq, snapshot_checkpoint(state, limit), self.crc)

    def _delivered(self, seq: int, delivery: Any) -> None:
        if delivery.cancelled():
            return
        error = delivery.exception()  # read every failure, so none is reported as never retrieved
        if error is not None and self.failed_seq is None:
            self.failed_seq = seq
            if self.error is None:
                self.error = error

    async def settle(self) -> None:
        """Wait for the deliveries of the values sent so far; the first failure is in ``error``."""
        pending, seqs = self._pending, self._pending_seqs
        while pending:
            delivery = pending[0]
            if not delivery.done():
                await asyncio.wait([delivery])
                continue  # a lease renewal's settle_done may have taken it in meanwhile
            pending.popleft()
            self._delivered(seqs.popleft(), delivery)

    async def end(self, status: str) -> None:
        """Write the end marker of this attempt and wait until it is stored (exactly-once: sent in the transaction).

        All of a task's results go to one partition, in order: once the marker is
        stored, every value before it was either stored or reported in ``error``.
        """
        raw = encode(ResultRecord(uuid=self._uuid, seq=self.seq, attempt=self._attempt, end=True, status=status))
        if self._txn is not None:
            await self._txn.send(self._topic, raw, key=self._key, partition=self._partition, headers=self.headers)
            return

        def send() -> Any:
            return self._send(self._topic, raw, key=self._key, partition=self._partition, headers=self.headers)

        await deliver(send, what=f"end of the results of {self._uuid}", trouble=self._trouble)
        await self.settle()  # done already: they were sent before the marker, to its partition

    def settle_done(self) -> None:
        """Take in the deliveries that are done (in order), so ``failed_seq`` is current up to them."""
        pending = self._pending
        while pending and pending[0].done():
            self._delivered(self._pending_seqs.popleft(), pending.popleft())


class Announcer:
    """Writes the held-back ``process`` status of each run that outlives ``process_grace``.

    One loop and one timer for all the runs, not one timer per run: most runs end
    sooner, and a run that has ended (or was announced) is passed over.
    """

    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._young: deque[tuple[float, TaskRun]] = deque()
        self._added = asyncio.Event()

    def add(self, run: TaskRun) -> None:
        """Announce ``run`` once its grace is over (runs are added in the order they start)."""
        young = self._young
        if not young:
            self._added.set()
        young.append((time.monotonic() + self._grace, run))

    async def run(self) -> None:
        """The worker's supervised loop."""
        young = self._young
        while True:
            if not young:
                self._added.clear()
                await self._added.wait()
                continue
            wait = young[0][0] - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            while young and young[0][0] <= now:
                young.popleft()[1].announce_soon()


@dataclasses.dataclass(slots=True)
class Host:
    """What a run needs from the worker that hosts it."""

    core: Core
    worker_id: str
    plugins: PluginManager
    events: Events
    #: The app passed to events (``app=``) and the one the task's context sees.
    app: Any
    user_app: Any
    pool: Executor
    worker: Any
    announcer: Announcer


class TaskRun:
    """One attempt of one task on this worker."""

    def __init__(
        self,
        host: Host,
        rec: TaskRecord,
        spec: TaskSpec,
        head: StatusHead | None,
        attempt: int,
        txn: PartitionTxn | None = None,
        record: Record | None = None,
        source: str | None = None,
    ) -> None:
        self.host = host
        self.rec = rec
        #: The task record as read (its headers carry the sender's trace context).
        self.record = record
        self.spec = spec
        self.attempt = attempt
        #: Exactly-once: the transaction of the task record's partition (everything goes in it).
        self.txn = txn
        core = host.core
        self.partition = partition_for(rec.uuid, core.results_partitions)
        self.task = base_status(rec, head, host.worker_id)
        self.task.source = source  # share mode: the record another worker would take over
        prior = core.view.get(rec.uuid) if attempt > 1 else None
        self.resume = Resume.of(prior, exactly_once=txn is not None)
        #: Where an earlier attempt's results start, when this run goes on from its values (a
        #: stream of the task starts there, not at this run's first value).
        self._earlier_start = (
            prior.results_offset
            if prior is not None
            and (self.resume.seq or self.resume.committed)
            and prior.results_partition == self.partition
            else None
        )
        self.sink = ResultSink(core, rec.uuid, attempt, self.partition, txn=txn, resume=self.resume)
        #: Set once the run writes its ending: lease renewals stop.
        self.concluding = False
        #: Exactly-once: set once the terminal status is in the transaction (no progress record after it).
        self.ended = False
        #: Set by the worker once the run is over here (ended, or handed back).
        self.finished = False
        #: Set by the worker when another worker took the task over (this one was frozen or
        #: cut off past its lease): the run stops and writes nothing more, not even a release.
        self.superseded = False
        if txn is not None:
            txn.runs.add(self)
        #: Set once the ``process`` status is written (at least once it may be held back: :meth:`start`).
        self.announced = False
        #: Store the ``process`` status before the task starts, whatever ``process_grace`` says
        #: (share mode, a record handed out before: each run that starts is counted).
        self.announce_at_start = False
        self._announcing: asyncio.Task[None] | None = None
        #: Called once the task's own code is done and only its ending is left (the worker frees its slot).
        self.on_ran: Callable[[], None] | None = None
        #: ``time.monotonic()`` at the start of the run (its duration and time to first value count from it).
        self.began = 0.0
        #: What the last progress record said: (values, checkpoint seq, when).
        self._progress: tuple[int, int | None, float] = (-1, None, 0.0)
        executor_cls = spec.executor or TaskExecutor
        self.executor: TaskExecutor = executor_cls(
            spec,
            uuid=rec.uuid,
            args=rec.args,
            kwargs=rec.kwargs,
            sink=self.sink,
            app=host.user_app,
            plugins=host.plugins,
            thread_pool=host.pool,
            broker=core.broker,
        )
        registry = host.worker.registry
        self.executor.middlewares = (registry.middlewares_before, registry.middlewares_after)
        self.executor.stream_app = host.app
        self.executor.resume_state = self.resume.state
        # ``ctx.checkpoint(state)``, in order with the values yielded before it. Not a method
        # of the run: the executor would hold the run that holds it, and every run would be
        # left for the garbage collector to free.
        self.executor.on_checkpoint = partial(self.sink.mark, limit=core.config.checkpoint_max_bytes)
        self.executor.checkpoint_limit = core.config.checkpoint_max_bytes

    async def start(self) -> None:
        """``process``: attempt n, this worker's lease, where the results start.

        At least once, it is shown here at once but written only once the run outlives
        ``process_grace`` or its partition is revoked (:meth:`announce`): a short task
        writes its ending alone (its values too, for a generator). Until then the log says
        ``new``, and a worker that takes the task over runs it as if it never started,
        which is what at least once allows for a run whose worker died.
        """
        core = self.host.core
        now = time.time()
        self.began = time.monotonic()
        rec = self.rec
        core.stats.started(self.spec.name, now - max(rec.created_at, rec.not_before))
        self.task = msgspec.structs.replace(
            self.task,
            status="process",
            attempt=self.attempt,
            started_at=now,
            lease_until=now + core.config.lease_timeout,
            results_partition=self.partition,
            # Every result of this run lands after this offset: a reader starts here.
            results_offset=self._results_start(self._earlier_start),
            updated_at=now,
            yield_count=self.sink.committed,
            values_crc=self.sink.committed_crc,
            # Kept until this run stores its own: an attempt that dies first leaves it to the next.
            checkpoint=self.resume.state,
            checkpoint_seq=self.resume.seq,
            checkpoint_crc=self.resume.crc,
        )
        if self.resume.seq or self.resume.committed:
            log.info(
                "task %s resumes at value %d (checkpoint at %d)", self.rec.uuid, self.resume.committed, self.resume.seq
            )
        grace = core.config.process_grace
        if self.txn is not None or not grace or self.announce_at_start:
            self.task = await core.store.write(self.task, txn=self.txn, durable=self.announce_at_start)
            self.announced = True
            return
        self.task = core.store.show(self.task)
        self.host.announcer.add(self)

    def finish(self) -> None:
        """The run is over here (ended, handed back, or dropped): nothing more is announced for it."""
        if self.finished:
            return
        self.finished = True
        if self._announcing is not None:
            self._announcing.cancel()
        self._end_trace("released")  # handed back (or dropped) before its ending: a trace not ended yet
        sink = self.sink
        first = sink.first_at - self.began if sink.first_at and self.began else None
        self.host.core.stats.run_over(self.spec.name, self.values_here, first)

    def _end_trace(self, status: str, error: BaseException | None = None, reason: str | None = None) -> None:
        trace, self.sink.trace = self.sink.trace, None
        if trace is not None:
            try:
                trace.end(status, error, reason)
            except Exception:  # a trace never changes what happens to the task
                log.warning("the tracer failed at the end of %s", self.rec.uuid, exc_info=True)

    @property
    def values_here(self) -> int:
        """Values this run has sent so far: from its checkpoint on, and past what an earlier
        attempt committed (exactly once, those are gone over again but not sent)."""
        sink = self.sink
        return max(sink.seq - max(self.resume.seq, sink.committed), 0)

    async def announce(self, *, durable: bool = False) -> None:
        """Write the ``process`` status held back so far (no-op once written, or once the run ends).

        ``durable`` (a revoke): return once it is stored, also when the announcer's write of it
        is under way.
        """
        if self.announced and durable and self._announcing is not None and not self._announcing.done():
            self._announcing.cancel()  # written again below, durably
            self.announced = False
        if self.announced or self.concluding or self.finished or self.task.status != "process":
            return
        self.announced = True
        written = await self.host.core.store.write(
            self.task, durable=durable, wanted=lambda: not (self.concluding or self.finished)
        )
        if not self.concluding:
            self.task = written

    def announce_soon(self) -> None:
        """The run outlived ``process_grace``: write its ``process`` status in the background."""
        if self.announced or self.concluding or self.finished:
            return
        self._announcing = asyncio.get_running_loop().create_task(self.announce())
        self._announcing.add_done_callback(self._announced)

    def _announced(self, done: asyncio.Task[None]) -> None:
        if self._announcing is done:
            self._announcing = None  # a cancelled one's traceback holds this run: a cycle
        if not done.cancelled() and (exc := done.exception()) is not None:
            # The next lease renewal writes it again; the ending does not depend on it.
            log.warning("could not write the process status of %s: %s", self.rec.uuid, exc)

    def _results_start(self, earlier: int | None = None) -> int | None:
        """An offset of the results partition at or before this run's first result (None: not
        known here); at or before ``earlier`` too (an earlier attempt's, whose values this run goes on from)."""
        core = self.host.core
        topic = core.topics.results
        known = [core.broker.producer.known_end(topic, self.partition)]
        if self.txn is not None:
            known.append(self.txn.producer.known_end(topic, self.partition))
        found = [offset for offset in known if offset is not None]
        if not found:
            return earlier
        start = max(found)
        return start if earlier is None else min(start, earlier)

    async def renew(self) -> None:
        """Renew the lease, with the progress so far (``yield_count``) and the last checkpoint.

        A checkpoint is written once the values before it are stored (the last delivery
        settled), so a later attempt that goes on from it misses nothing.
        """
        if self.concluding or self.superseded or not self.announced:
            return  # a run not yet announced has been running for less than process_grace
        checkpoint = self.sink.checkpoint
        last = self.sink.last_delivery
        if checkpoint is not None and last is not None and not last.done():
            await asyncio.wait([last], timeout=self.host.core.config.lease_interval)
            if not last.done() or last.cancelled() or last.exception() is not None:
                checkpoint = None
        if checkpoint is not None:
            # Every value before it must be stored, not only the last: a later attempt that
            # goes on from it would never send again one that was refused.
            self.sink.settle_done()
            failed = self.sink.failed_seq
            if failed is not None and failed < checkpoint[0]:
                checkpoint = None
        if self.concluding or self.superseded or self.finished:
            return
        now = time.time()
        renewal = msgspec.structs.replace(
            self.task,
            lease_until=now + self.host.core.config.lease_timeout,
            yield_count=self.sink.seq,
            updated_at=now,
        )
        if checkpoint is not None:
            seq, state, crc = checkpoint
            renewal = msgspec.structs.replace(renewal, checkpoint=state, checkpoint_seq=seq, checkpoint_crc=crc)
            self.task = renewal
        # A renewal still waiting for the broker when the task ends is dropped, never written after the end.
        await self.host.core.store.write(renewal, wanted=lambda: not (self.concluding or self.superseded))
        self.host.core.stats.lease_renewals += 1

    async def write_progress(self) -> None:
        """Exactly-once, just before its transaction commits: the values sent so far, the last checkpoint, the lease.

        Called by the commit with new sends held back, so the record says exactly what the
        transaction holds: a later attempt goes on from it.
        """
        if self.ended or self.txn is None:
            return
        sink = self.sink
        count, crc = (sink.sent, sink.crc) if sink.sent >= sink.committed else (sink.committed, sink.committed_crc)
        checkpoint = sink.checkpoint
        now = time.time()
        config = self.host.core.config
        said = (count, checkpoint[0] if checkpoint is not None else None)
        if said == self._progress[:2] and now - self._progress[2] < config.lease_interval:
            return
        record = msgspec.structs.replace(
            self.task,
            yield_count=count,
            values_crc=crc,
            lease_until=now + config.lease_timeout,
            updated_at=now,
        )
        if checkpoint is not None:
            seq, state, checkpoint_crc = checkpoint
            record = msgspec.structs.replace(
                record, checkpoint=state, checkpoint_seq=seq, checkpoint_crc=checkpoint_crc
            )
        self.task = await self.host.core.store.write(record, txn=self.txn)
        self._progress = (*said, now)

    async def run(self) -> Task:
        """Start, execute and conclude; return the terminal status as written."""
        host = self.host
        current_task.set((self.rec.uuid, self.spec.name, self.attempt))
        tracer = host.core.tracer
        if tracer is not None and self.record is not None:
            try:
                trace = tracer.run(self.rec, self.record, self.attempt, host.worker_id, host.worker.group_id)
            except Exception:  # a trace never changes what happens to the task
                log.warning("the tracer failed at the start of %s", self.rec.uuid, exc_info=True)
            else:
                self.sink.trace, self.sink.headers = trace, trace.headers
        await self.start()
        await trigger(host, "worker_execute_before", task=self.task)
        await host.events.fire("task_running", app=host.app, task=self.task, worker=host.worker)
        outcome = await self.executor.execute()
        return await self.conclude(outcome)

    async def conclude(self, outcome: Outcome) -> Task:
        """Write the end marker and the terminal status (or ``retry`` and its child task)."""
        host, rec, spec, sink = self.host, self.rec, self.spec, self.sink
        core = host.core
        self.concluding = True
        if self.on_ran is not None:
            self.on_ran()
        outcome = check_result(spec.name, spec.is_generator, outcome, core.config.returning_max_bytes)
        retries_left = rec.retry if rec.retry is not None else (spec.retry or 0)
        done = conclude(
            outcome,
            is_generator=spec.is_generator,
            retries_left=retries_left,
            retry_on_exc=spec.retry_on_exc,
            items=sink.items,
            count=sink.seq,
        )
        sink.finish_replay()
        token = self.executor.token
        # A cancel that comes while a failed run ends stops its chain: no retry is submitted.
        status = "cancel" if done.status == "retry" and token.is_set else done.status
        if sink.seq or spec.is_generator:
            # Results are stored before the status says the task ended, so a reader who
            # sees the terminal status can read every value.
            try:
                await sink.end(status)
            except ConnectorError as exc:  # refused for good (retriable ones are retried)
                sink.error = sink.error or exc
                await sink.settle()  # which value was refused first: the ending says so (lost_from)
        if status == "retry" and token.is_set:
            status = "cancel"  # it came while the end marker was being stored (a stream follows the status)
        traceback = outcome.traceback
        cancel_reason = outcome.cancel_reason
        if status == "cancel" and done.status == "retry":
            cancel_reason = token.reason
        if sink.error is not None:
            status = "error"
            traceback = f"ConnectorError: a value of this task was not stored: {sink.error}"
        child_uuid = None
        if status == "retry":
            delay = 0.0 if host.worker._stopping else backoff(rec.retry_count, *_backoff(core))
            child = await core.submit(
                rec.task_name,
                rec.args,
                rec.kwargs,
                priority=rec.priority,
                retry=done.retries_left,
                retry_parent_uuid=rec.uuid,
                retry_count=rec.retry_count + 1,
                not_before=time.time() + delay,
                key=rec.key,
                after=rec.after,  # a chord's callback: its retry gets the results again
                txn=self.txn,
            )
            child_uuid = child.uuid
        final = msgspec.structs.replace(
            self.task,
            status=status,
            yield_count=max(sink.seq, sink.committed),
            lost_from=sink.failed_seq if status == "error" else None,
            returning=done.returning,
            returning_truncated=done.truncated,
            traceback=traceback,
            cancel_reason=cancel_reason,
            lease_until=0.0,
            retry_child_uuid=child_uuid,
            retry=retries_left if child_uuid else self.task.retry,
            updated_at=time.time(),
            checkpoint=None,
        )
        # Exactly-once, the ending goes in the transaction (shown once it commits) and this
        # returns at once: the record's offset commits in the same transaction.
        self.task = await core.store.write(final, durable=True, txn=self.txn)
        self.ended = True
        if self.task.status != status:
            status = self.task.status  # a client's cancel ended the task while it ran (it stands)
            log.info("task %s (%s) was cancelled as its run ended", self.task.uuid, self.task.task_name)
        core.stats.ended(spec.name, status, time.monotonic() - self.began if self.began else None)
        self._end_trace(status, outcome.exc, cancel_reason if status == "cancel" else traceback)
        if status in ("error", "retry"):
            kind, message = error_of(traceback)
            then = f"; retried as {child_uuid}" if child_uuid else ""
            log.info(
                "task %s (%s) failed: %s%s",
                self.task.uuid,
                self.task.task_name,
                f"{kind}: {message}" if message else kind,
                then,
            )
            await trigger(host, "worker_task_error", task=self.task, exc=outcome.exc)
        await trigger(host, "worker_execute_after", task=self.task)
        if event := _EVENTS.get(status):
            await host.events.fire(event, app=host.app, task=self.task, exc=outcome.exc, worker=host.worker)
        await host.events.fire("task_stopping", app=host.app, task=self.task, worker=host.worker)
        return self.task

    async def release(self) -> None:
        """Give up this run: its lease ends now, so the partition's next owner runs it at once.

        Exactly-once there is nothing to release: the next owner fences this worker's
        producer and takes the task over at once (its progress commits with the rest).
        """
        if self.txn is not None:
            return
        core = self.host.core
        head = core.view.head(self.rec.uuid)
        if head is None or head.is_finished or head.attempt > self.attempt:
            return  # ended, or another worker's newer run: its lease is not this run's to end
        try:
            # Share mode: a hand-back, not a death, so share_delivery_limit does not count it.
            released = self.task.released + (1 if core.config.processing_mode == "share" else 0)
            await core.store.write(
                msgspec.structs.replace(self.task, lease_until=0.0, released=released, updated_at=time.time())
            )
            await core.broker.producer.flush()
        except ConnectorError as exc:
            log.warning("could not release %s: %s", self.rec.uuid, exc)


def _backoff(core: Core) -> tuple[float, float]:
    return core.config.retry_backoff_base, core.config.retry_backoff_max


def base_status(rec: TaskRecord, head: StatusHead | None, worker_id: str) -> Task:
    """The status record of ``rec`` before this worker wrote anything."""
    return Task(
        uuid=rec.uuid,
        task_name=rec.task_name,
        status="new",
        priority=rec.priority,
        args=rec.args,
        kwargs=rec.kwargs,
        created_at=rec.created_at,
        updated_at=time.time(),
        retry=rec.retry,
        retry_parent_uuid=rec.retry_parent_uuid,
        retry_count=rec.retry_count,
        attempt=head.attempt if head is not None else 0,
        released=head.released if head is not None else 0,
        worker=worker_id,
        not_before=rec.not_before,
        key=rec.key,
        after=rec.after,
    )


async def end_without_running(
    host: Host, rec: TaskRecord, head: StatusHead | None, status: str, txn: PartitionTxn | None = None, **fields: Any
) -> Task:
    """End a task that does not run here (cancelled while queued, unknown): its status, durably (or in ``txn``)."""
    task = base_status(rec, head, host.worker_id)
    task.status = status  # type: ignore[assignment]
    for name, value in fields.items():
        setattr(task, name, value)
    written = await host.core.store.write(task, durable=True, txn=txn)
    name = rec.task_name
    host.core.stats.ended(name if name in host.worker.registry else UNKNOWN_TASK, status)
    if status == "cancel":
        await host.events.fire("task_cancel", app=host.app, task=written, exc=None, worker=host.worker)
    return written


async def end_unfinished(host: Host, rec: TaskRecord, exc: BaseException, txn: PartitionTxn | None = None) -> bool:
    """Something failed outside the task (a bug, a write refused for good): end it as error; False if not even that."""
    text = "".join(traceback.format_exception(exc))[-8000:]
    try:
        await end_without_running(
            host,
            rec,
            host.core.view.head(rec.uuid),
            "error",
            txn,
            traceback=f"the worker could not finish this task:\n{text}",
        )
    except ConnectorError as again:
        # Not even the error could be written: the offset stays uncommitted, so the
        # record is delivered again after a restart or rebalance (at least once).
        log.error("could not write the error status of %s: %s", rec.uuid, again)
        return False
    return True


async def trigger(host: Host, name: str, **kwargs: Any) -> None:
    """Fire a worker trigger; a failing plugin is logged and never leaves a task unfinished."""
    if len(host.plugins):
        try:
            await host.plugins.trigger(name, worker=host.worker, **kwargs)
        except Exception:
            log.exception("plugin trigger %s failed", name)
