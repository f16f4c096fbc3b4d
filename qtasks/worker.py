"""The worker: a member of the consumer group that sequences its loops; nothing else.

Loops (each supervised: a loop that raises is restarted, one that keeps failing stops
the worker with a clear error):

- **poll**: fetch task records into a backlog (decoded; a bad record is dead-lettered),
  start them in priority order while slots are free, pause the partitions when full or
  while the broker is failing, and keep polling so the group never thinks it dead;
- **delayed**: hold records whose ``not_before`` lies ahead (due within a second or two:
  longer delays wait in the delays topic), with no slot, and move them to the backlog when due;
- **delays**: move delayed tasks through the delays topic to the tasks topic as their time
  comes (:mod:`qtasks.scheduler`, in the group ``<group_id>.delays``);
- **periodic**: submit the periodic tasks at their ticks, on the one worker that owns
  partition 0 of the delays topic (:mod:`qtasks.periodic`);
- **control**: cancel requests; **commit**: the lowest unfinished offset of each
  partition; **lease**: renew the leases of running tasks; **expire**: tombstones.

Exactly-once (``processing_guarantee="exactly_once"``), the commit loop is replaced by
the **transactions** loop: each assigned partition has a
:class:`~qtasks.transactions.PartitionTxn`, started on assignment (which fences the
partition's previous owner), committed every ``eos_commit_interval`` with the
partition's offset, and closed when the partition goes. A partition whose transaction
fails is dropped here (its runs stop, nothing more is written) and the worker rejoins
the group, which hands it out afresh; there are no lease renewals (each commit carries
the progress of the partition's runs).

What to do with a record is decided by :func:`qtasks.decisions.admit`; one run is a
:class:`qtasks.runner.TaskRun`. A record of a task that already runs here (a rebalance
gave its partition back) joins that run: no second slot, its offset finishes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import logging
import os
import socket
import time
import uuid as uuid_mod
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Literal

from qtasks.config import share_group_of
from qtasks.connectors.base import Record, ShareConsumer, TopicPartition
from qtasks.core import Core
from qtasks.deadletter import dead_letter
from qtasks.decisions import ShareDelivery, admit
from qtasks.delays import AT, DUE, KEY, MOVED
from qtasks.delivery import deliver, fetch, retried
from qtasks.exc import (
    BrokerRefusedError,
    ChordError,
    CommitFailedError,
    ConnectorError,
    RecordError,
    TaskNotFoundError,
    error_of,
)
from qtasks.logs import current_task
from qtasks.offsets import PartitionOffsets
from qtasks.partitioner import partition_for
from qtasks.periodic import Ticker
from qtasks.plugins import Events, PluginManager
from qtasks.records import ControlRecord, StatusHead, TaskRecord, decode_control, decode_task
from qtasks.registry import Registry
from qtasks.runner import Announcer, Host, TaskRun, end_unfinished, end_without_running
from qtasks.scheduler import DelayScheduler
from qtasks.share_mode import ShareOffsets, as_record, end_at_limit, send_again
from qtasks.stats import UNKNOWN_TASK
from qtasks.store import CATCH_UP_TIMEOUT, records_of
from qtasks.supervise import Supervisor, raise_if_cancelled
from qtasks.threads import TaskThreads
from qtasks.transactions import PartitionLostError, PartitionTxn, transactional_id

log = logging.getLogger("qtasks.worker")

#: A fetched record waiting for a slot: (priority, arrival, decoded or error, record, its partition's offsets).
_Waiting = tuple[int, int, TaskRecord | RecordError, Record, PartitionOffsets]
#: A task record due more than this many seconds from now is not held here: it goes to the
#: delays topic (a client whose clock runs ahead, another producer), and its offset is done.
#: One the delays topic moved here (its ``qtasks-moved`` header) is held whatever its time:
#: the worker that moved it found it due by its clock, and sending it back would bounce it
#: between the topics for as long as the two clocks disagree.
FORWARD_AFTER = 5.0
#: While a key waits for its retry, its partition holds this many times more records queued
#: behind keys before it is paused: the retry's record is behind them (a bound on memory all the same).
KEY_RETRY_ROOM = 16


def _has_ended(head: StatusHead | None) -> bool:
    """Whether a task's status is terminal (a retry the key waits for, cancelled meanwhile)."""
    return head is not None and head.is_finished


def _moved(record: Record) -> bool:
    """Whether the delays topic moved this record here (it is held, never sent back)."""
    return any(name == MOVED for name, _ in record.headers or ())


class _Dropped(Exception):
    """A record left unfinished on purpose: a rebalance came while it was being admitted, or (share mode) its lock ran out."""


class Worker:
    """Runs the app's tasks as a member of the workers' consumer group."""

    def __init__(
        self,
        core: Core,
        registry: Registry,
        plugins: PluginManager,
        events: Events,
        *,
        app: Any,
        user_app: Any,
        group_id: str,
        concurrency: int | None = None,
    ) -> None:
        config = core.config
        self.core = core
        self.registry = registry
        self.group_id = group_id
        self.concurrency = concurrency or config.concurrency
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid_mod.uuid4().hex[:6]}"
        self.prefetch = config.prefetch if config.prefetch >= 0 else self.concurrency
        self._pool = TaskThreads(config.thread_pool_size, name_prefix="qtasks-task")
        self._announcer = Announcer(core.config.process_grace)
        self.host = Host(core, self.id, plugins, events, app, user_app, self._pool, self, self._announcer)
        self.supervisor = Supervisor(f"worker {self.id}", on_fatal=self._on_fatal)
        #: Submits the periodic tasks at their ticks, while this worker owns partition 0 of the delays topic.
        self.ticker = Ticker(core, registry, self.id)
        #: Moves delayed tasks on, in the group ``<group_id>.delays`` (its own loop).
        self.delays = DelayScheduler(
            core, f"{group_id}.delays", f"{self.id}-delays", self.id, on_first=self._on_first_delays
        )
        self.error: BaseException | None = None
        self.tasks_done = 0
        self._consumer: Any = None
        #: processing_mode="share": the share-group member that hands this worker its records.
        self._share: ShareConsumer | None = None
        #: Share mode: the records held here and not acknowledged yet (their locks are renewed).
        self._share_live: set[ShareOffsets] = set()
        #: Share mode: records that came with a delivery count above 1, and locks that ran out here.
        self.share_redelivered = 0
        self.share_locks_lost = 0
        #: Share mode: set when a slot frees or an acknowledgement is taken (a full poll loop waits for it).
        self._share_wake = asyncio.Event()
        self._control: Any = None
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._owned: set[TopicPartition] = set()
        self._paused = False
        self._in_flight = 0
        self._backlog: list[_Waiting] = []
        self._delayed: list[tuple[float, int, TaskRecord, Record, PartitionOffsets]] = []
        self._delay_changed = asyncio.Event()
        self._sequence = 0
        self._handlers: set[asyncio.Task[None]] = set()
        #: Handlers made but not yet running: one cancelled now never runs its own cleanup.
        self._unstarted: dict[asyncio.Task[None], TaskRecord | RecordError] = {}
        self._running: dict[str, TaskRun] = {}
        #: Handlers whose run gave its slot back and is storing its ending.
        self._ending = 0
        #: At least once: the view's catch-up after the last assignment.
        self._view_ready: asyncio.Task[None] | None = None
        #: At least once: between a revoke and the next assignment (no run starts).
        self._revoked = False
        #: uuid -> the records (with their offsets) that joined the run of that uuid here.
        self._active: dict[str, list[tuple[PartitionOffsets, Record]]] = {}
        #: The handler of each run here, and those whose run another worker took over (they stop).
        self._run_handlers: dict[str, asyncio.Task[None]] = {}
        self._superseded: set[asyncio.Task[None]] = set()
        #: Runs stopped here because another worker took their task over.
        self.runs_superseded = 0
        self._cancelled: OrderedDict[str, str] = OrderedDict()
        #: When the control loop started reading (epoch s): every cancel sent since has been or will be read here.
        self._control_from = float("inf")
        self._stopping = False
        self._started = False
        self._context = contextvars.Context()
        #: Exactly-once: the transaction of each assigned tasks partition, and when each is ready.
        self.exactly_once = config.exactly_once
        self._txns: dict[TopicPartition, PartitionTxn] = {}
        self._txn_ready: dict[TopicPartition, asyncio.Task[None]] = {}
        self._commits: dict[TopicPartition, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Future[list[None]]] = set()
        self._txn_wake = asyncio.Event()
        #: The handlers of each partition's records (exactly-once drops them with the partition).
        self._handlers_of: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        #: Ordering keys (``add_task(key=...)``) taken by a record here (waiting, delayed or
        #: handled) -> the records of the key that come after it, in order, with no slot.
        self._keys: dict[str, deque[_Waiting]] = {}
        self._queued_by_key = 0
        #: Records queued behind keys, per partition; the partitions paused for holding too many.
        self._queued_in: dict[TopicPartition, int] = {}
        self._key_paused: set[TopicPartition] = set()
        #: The key each keyed handler holds (a rebalance keeps the keys of live handlers).
        self._handler_keys: dict[asyncio.Task[None], str] = {}
        #: A keyed run that ended as ``retry``: its uuid -> its child's; the key waits for the child.
        self._retry_of: dict[str, str] = {}
        self._key_retries: dict[str, str] = {}
        #: Key -> what forgets its watch on the status of the retry it waits for (see _release_key).
        self._retry_watches: dict[str, Callable[[], None]] = {}
        #: Partitions a key's retry child will come in, with how many keys wait there: their
        #: key-queue limit is KEY_RETRY_ROOM times larger meanwhile (the child is behind them).
        self._retry_tps: dict[TopicPartition, int] = {}
        #: When the last warning about workers' clocks that disagree was logged.
        self._skew_warned = 0.0
        #: A keyed task's record whose retry the key waits for stays unfinished until the retry
        #: is taken (child uuid -> its partition's offsets, its offset): a worker that stops or
        #: dies first leaves it to be read again, and the next owner waits for the retry too.
        self._retry_parents: dict[str, list[tuple[PartitionOffsets, int]]] = {}
        #: Chords' callbacks waiting (no slot) for the tasks they come after.
        self._afters: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Join the group and start the loops."""
        core = self.core
        await core.connect()
        connector = core.broker
        topics = core.topics
        # A worker reads tasks and cancels, writes results, statuses and dead letters, and
        # moves delayed tasks on (the delays topic, in its own group, to the tasks topic).
        # In share mode it reads the tasks in its share group, and sets that group's settings.
        share = core.config.processing_mode == "share"
        await connector.check_access(
            {
                topics.tasks: ("read", "write"),
                topics.control: ("read",),
                topics.results: ("write",),
                topics.status: ("read", "write"),
                topics.dlq: ("write",),
                topics.delays: ("read", "write"),
                topics.schedule: ("read", "write"),
            },
            group=[self.delays.group_id] if share else [self.group_id, self.delays.group_id],
            share_group=self.share_group if share else None,
        )
        self._control = connector.consumer(None, client_id=f"{self.id}-control")
        await self._control.start()
        try:
            control_tps = [TopicPartition(core.topics.control, p) for p in range(core.config.control_partitions)]
            self._control.assign(control_tps)
            self._control_from = time.time()
            await self._control.seek_to_end(control_tps)
            if share:
                await self._start_share()
            else:
                self._consumer = connector.consumer(self.group_id, client_id=self.id)
                self._consumer.subscribe([core.topics.tasks], self)
                await self._consumer.start()
            try:
                await self.delays.start()
            except BaseException:
                await asyncio.shield(self._stop_intake())
                raise
        except BaseException:
            await asyncio.shield(self._control.stop())  # a failed start leaves nothing running
            raise
        self._started = True
        if not self.exactly_once:  # exactly-once, a run taken over is fenced instead
            core.view.watch(self._running, self._on_head)
        #: What each record's handler starts from: the context the worker started in, never
        #: the one of the handler whose end made room for it (its task, its trace span).
        self._context = contextvars.copy_context()
        spawn = self.supervisor.spawn
        spawn("poll", self._share_loop if self._share is not None else self._poll_loop)
        spawn("delayed", self._delay_loop)
        spawn("delays", self.delays.run)
        spawn("periodic", self.ticker.run)
        spawn("restate", core.store.restate)
        spawn("control", self._control_loop)
        if self.exactly_once:
            spawn("transactions", self._txn_loop)
        else:
            spawn("commit", self._commit_loop)
            spawn("lease", self._lease_loop)
            if self._share is not None:
                spawn("locks", self._lock_loop)
            if core.config.process_grace:
                spawn("announce", self._announcer.run)
        if core.config.status_ttl > 0:
            spawn("expire", self._expire_loop)
        log.info("worker %s running tasks %s (concurrency %d)", self.id, self.registry.names(), self.concurrency)

    @property
    def share_group(self) -> str:
        """The share group of the workers (processing_mode="share")."""
        return share_group_of(self.group_id)

    async def _start_share(self) -> None:
        core = self.core
        # Where the app owns the group: every record from the start (Kafka's default is the
        # end), locked as long as a lease lasts.
        settings = {
            "share.auto.offset.reset": "earliest",
            "share.record.lock.duration.ms": str(int(core.config.lease_timeout * 1000)),
            "share.delivery.count.limit": str(core.config.share_delivery_limit),
        }
        await core.broker.configure_share_group(self.share_group, settings)
        await self._share_timings()
        share = core.broker.share_consumer(self.share_group, [core.topics.tasks], client_id=self.id)
        await share.start()
        self._share = share
        # Records are admitted once the view has read the status topic to its end.
        self._view_ready = asyncio.get_running_loop().create_task(self._catch_up())
        log.info("worker %s takes tasks from share group %s", self.id, self.share_group)

    async def _share_timings(self) -> None:
        """The share group's member timings, from the worker's Kafka settings, where the brokers allow them.

        Until the session timeout passes, a dead worker's partitions are given to no one:
        workers sharing a partition with it take its records at once, but a partition it
        had alone waits. Brokers allow 45 to 60 s by default
        (``group.share.min.session.timeout.ms``); outside their range the group keeps its own.
        """
        config = self.core.config
        for name, value in (
            ("share.session.timeout.ms", config.kafka_session_timeout_ms),
            ("share.heartbeat.interval.ms", config.kafka_heartbeat_interval_ms),
        ):
            try:
                await self.core.broker.configure_share_group(self.share_group, {name: str(value)})
            except BrokerRefusedError:
                raise  # an ACL is missing: the worker cannot run as asked
            except ConnectorError as exc:
                raise_if_cancelled()
                log.info("share group %s keeps the brokers' %s: %s", self.share_group, name, exc)

    async def _stop_intake(self) -> None:
        if self._share is not None:
            await self._share.stop()  # what it holds and did not finish goes to the others now
        elif self._consumer is not None:
            await self._consumer.stop()

    async def _share_loop(self) -> None:
        """The poll loop of share mode: ask for no more records than there is room for (each is locked)."""
        share = self._share
        assert share is not None
        while not self._stopping:
            room = self._capacity
            if room <= 0 or self.core.trouble:
                # Full: nothing is fetched, so nothing is locked waiting. The acknowledgements of
                # what ended meanwhile ride on no fetch: they go now, before their locks run out.
                # Then it waits for a slot or an acknowledgement (or half a second: the broker's
                # trouble ends unannounced), as group mode's fetch wakes when a slot frees.
                self._share_wake.clear()
                await share.flush_acks()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._share_wake.wait()
                continue
            # A broker away (a retriable error) is waited out here, as in group mode: the
            # supervisor would end the worker after a few restarts of the loop in a row.
            shared = await fetch(share, 0.5, max_records=room)
            if self._stopping:
                return
            for item in shared:
                if item.delivery_count > 1:
                    self.share_redelivered += 1
                self._take(as_record(item), ShareOffsets(share, item, self._share_live, self._share_wake))
            self._fill()

    async def _lock_loop(self) -> None:
        """Share mode: renew the locks of every record held here (running or waiting), a third of a lock apart."""
        share = self._share
        assert share is not None
        while True:
            await asyncio.sleep(max(0.1, (share.lock_ms or self.core.config.lease_timeout * 1000) / 3000))
            # Also while a stop waits for the runs (the poll loop has ended): what ended goes now.
            await share.flush_acks()
            live = list(self._share_live)
            if live:
                gone = {id(record) for record in await share.renew([o.shared for o in live])}
                self._locks_lost([o for o in live if id(o.shared) in gone and o in self._share_live])

    def _locks_lost(self, offsets: list[ShareOffsets]) -> None:
        """Records whose locks ran out: counted once, never renewed or acknowledged again, and
        those waiting here are not started (the group may have handed them to another worker)."""
        for held in offsets:
            held.lose()
            self.share_locks_lost += 1
            shared = held.shared
            log.warning(
                "the lock of %s[%d]@%d ran out: another worker may run it too",
                shared.topic,
                shared.partition,
                shared.offset,
            )
        if offsets:
            self._backlog = [e for e in self._backlog if not (isinstance(e[4], ShareOffsets) and e[4].lost)]
            heapq.heapify(self._backlog)
            self._delayed = [e for e in self._delayed if not (isinstance(e[4], ShareOffsets) and e[4].lost)]
            heapq.heapify(self._delayed)
            self._share_wake.set()  # room freed: a full poll loop fetches again

    async def _still_held(self, held: ShareOffsets) -> bool:
        """Whether this worker still holds the record's lock (asked of the group: renewed now)."""
        if not held.lost and self._share is not None and await self._share.renew([held.shared]):
            self._locks_lost([held])
        return not held.lost

    def _on_first_delays(self, owned: bool) -> None:
        (self.ticker.lead if owned and not self._stopping else self.ticker.step_down)()

    def _on_fatal(self, error: BaseException) -> None:
        self.error = error
        log.critical("worker %s stops: %s", self.id, error)
        asyncio.get_running_loop().create_task(self.stop())

    async def stop(self, timeout: float | None = None) -> None:
        """Stop taking tasks, let running ones finish within ``timeout``, hand back the rest, commit, leave."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        self.ticker.step_down()  # a stopping worker submits nothing more ...
        self.delays.leave()  # ... and hands its delay levels (and the ticking) over at once
        self.supervisor.wind_down()  # the poll loop returns now; the others run until stop
        timeout = self.core.config.stop_timeout if timeout is None else timeout
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=timeout)
            if pending:
                log.warning("stop: %d task(s) still running after %.1f s; handing them back", len(pending), timeout)
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5)
        await self.supervisor.stop()
        if self._view_ready is not None:
            self._view_ready.cancel()
        if self.exactly_once:
            await self._commit_txns()
            await self._close_txns(set(self._txns))
        else:
            try:
                await self._commit()
            except ConnectorError as exc:
                log.warning("final commit failed (%s); the uncommitted records will be delivered again", exc)
        await self._stop_intake()
        await self.delays.stop()
        await self._close_txns(set(self._txns))  # none is opened while stopping; this is a backstop
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=60)
        await self._control.stop()
        for waiter in self._afters:
            waiter.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True, cancel_running=True)
        self._started = False

    # -- rebalance listener ----------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit what is done before the partitions go (eager rebalance)."""
        if self.exactly_once:
            # Runs go on meanwhile; a partition that stays here keeps its transaction.
            await self._commit_txns()
            return
        # No run starts until the new assignment (a record whose admission is under way is
        # dropped: it is read again from the committed offset). A run whose process status
        # is still held back (process_grace) writes it now, so the partition's next owner
        # sees it running and waits for its lease; bounded, as a broker that is away cannot
        # take it anyway (the next owner then runs the task again: at least once).
        # A run whose code is done (concluding) is not announced: its ending is being stored,
        # and the partition's next owner must see that ending, not a task still ``new``, or it
        # runs the task again. It is waited for, within the same bound.
        self._revoked = True
        runs = list(self._running.values())
        ending = [
            handler
            for uuid, run in self._running.items()
            if run.concluding and (handler := self._run_handlers.get(uuid)) is not None
        ]
        if runs:
            try:
                async with asyncio.timeout(self.core.config.lease_interval):
                    await asyncio.gather(*(run.announce(durable=True) for run in runs))
                    if ending:
                        await asyncio.wait(ending)
            except (ConnectorError, TimeoutError) as exc:
                log.info("could not write every process status or ending before the rebalance: %r", exc)
        try:
            await self._commit()
        except ConnectorError as exc:
            log.info("commit before rebalance failed: %s", exc)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Start the bookkeeping afresh: every assigned partition is read again from its committed offset."""
        self._owned = set(assigned)
        self._revoked = False
        # Waiting and delayed records come again; records of runs in progress here join them.
        self._backlog = []
        self._delayed = []
        # Keys stay taken by the records being handled here; the records queued behind them come again.
        self._keys = {key: deque() for key in self._handler_keys.values()}
        self._queued_by_key = 0
        self._queued_in = {}
        self._key_paused = set()
        self._key_retries = {}
        for forget in self._retry_watches.values():
            forget()
        self._retry_watches = {}
        self._retry_tps = {}
        self._retry_parents = {}
        for waiter in self._afters:  # chords' callbacks are read again too
            waiter.cancel()
        self._offsets = {tp: PartitionOffsets() for tp in assigned}
        if self._paused:
            self._consumer.pause(assigned)
        else:  # a partition paused for its keys' queue before is read afresh now
            self._consumer.resume(assigned)
        log.info("worker %s assigned %s", self.id, sorted(p.partition for p in assigned))
        if not self.exactly_once:
            # Records are admitted once the view read the status topic to its end: a task
            # the partition's last owner announced while letting it go is seen running.
            if self._view_ready is not None:
                self._view_ready.cancel()
            self._view_ready = asyncio.get_running_loop().create_task(self._catch_up())
        else:
            # Closed in the background: the group waits for no producer (their runs stop now,
            # and the partitions' next owners fence them anyway).
            await self._close_txns({tp for tp, txn in self._txns.items() if tp not in assigned or txn.lost}, wait=False)
            if not self._stopping:  # a stopping worker takes no partition up
                for tp in assigned:
                    if tp not in self._txns:
                        self._open_txn(tp)

    async def _catch_up(self) -> None:
        try:
            await retried(self.core.store.catch_up_all, what="the end of the status topic", trouble=self.core.trouble)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # each admission looks its task up anyway (and fails loudly if it must)
            log.warning("could not read the status topic to its end after a rebalance: %r", exc)

    # -- the poll loop ---------------------------------------------------------------

    @property
    def _capacity(self) -> int:
        """Records the worker may still take: running plus waiting (due or, for a few seconds at
        most, not yet due) stay within concurrency + prefetch."""
        return self.concurrency + self.prefetch - self._in_flight - len(self._backlog) - len(self._delayed)

    async def _poll_loop(self) -> None:
        consumer = self._consumer
        while not self._stopping:
            # Full, or the broker is failing (status writes wait): take nothing new, keep polling.
            self._set_paused(self._capacity <= 0 or bool(self.core.trouble))
            records = await fetch(consumer, 0.5, max_records=max(self._capacity, 1))
            if self._stopping:
                return
            for record in records:
                self._take(record)
            self._fill()

    def _set_paused(self, paused: bool) -> None:
        if paused != self._paused:
            self._paused = paused
            if paused:
                self._consumer.pause(self._owned)
            else:  # partitions full of one busy key's records stay paused
                self._consumer.resume(self._owned - self._key_paused)

    def _take(self, record: Record, shared: ShareOffsets | None = None) -> None:
        """Hold a fetched record (its offset counts as unfinished from now on)."""
        offsets = shared or self._offsets.setdefault(record.tp, PartitionOffsets())
        offsets.start(record.offset)
        rec: TaskRecord | RecordError
        try:
            rec = decode_task(record.value, self.core.record_limit(self.core.topics.tasks))
        except RecordError as exc:
            rec = exc
        except Exception as exc:  # a decoder bug must not stop the loop: the record is bad input
            rec = RecordError(f"task record could not be decoded: {type(exc).__name__}: {exc}", "undecodable")
        if shared is not None and isinstance(rec, TaskRecord) and rec.key is not None:
            # A share group keeps no order: the task cannot run as its key promises.
            rec = RecordError(
                f"task {rec.uuid} ({rec.task_name}) has ordering key {rec.key!r}, which processing_mode='share' "
                "cannot honour (a share group keeps no order): send it to workers in processing_mode='group'",
                "keyed",
            )
        self._sequence += 1
        if isinstance(rec, RecordError):
            heapq.heappush(self._backlog, (-(2**31), self._sequence, rec, record, offsets))
            return
        name = rec.task_name
        self.core.stats.count("received", name if name in self.registry else UNKNOWN_TASK)
        entry = (rec.priority, self._sequence, rec, record, offsets)
        if (joined := self._active.get(rec.uuid)) is not None:
            joined.append((offsets, record))  # runs here already (a rebalance gave it back)
        elif rec.after:
            self._hold_after(entry)
        else:
            self._place(entry)

    def _place(self, entry: _Waiting) -> None:
        """Behind its key's other records, or into the backlog (or the delayed heap)."""
        rec = entry[2]
        assert isinstance(rec, TaskRecord)
        if rec.key is not None and not self._take_key(rec):
            self._keys[rec.key].append(entry)
            self._queued_by_key += 1
            self._count_key_queue(entry[3].tp, 1)
        else:
            self._queue(entry)

    def _key_queue_limit(self, tp: TopicPartition) -> int:
        """How many records may wait behind their keys in ``tp`` before it is paused: more while
        a key there waits for its retry (the retry's record is behind them), but bounded."""
        limit = max(64, 4 * (self.concurrency + self.prefetch))
        return limit * KEY_RETRY_ROOM if tp in self._retry_tps else limit

    def _count_key_queue(self, tp: TopicPartition, change: int) -> None:
        """Records queued behind their keys take no slot and do not stop the fetching of other
        partitions; a partition holding too many of them is paused alone, until they drain."""
        queued = self._queued_in[tp] = self._queued_in.get(tp, 0) + change
        limit = self._key_queue_limit(tp)
        if queued >= limit and tp not in self._key_paused:
            self._key_paused.add(tp)
            self._consumer.pause([tp])
        elif queued <= limit // 2 and tp in self._key_paused:
            self._key_paused.discard(tp)
            if not self._paused and tp in self._owned:
                self._consumer.resume([tp])

    # -- chords -------------------------------------------------------------------------

    def _hold_after(self, entry: _Waiting) -> None:
        """A chord's callback waits, with no slot, until the tasks it comes after have ended."""
        waiter = asyncio.get_running_loop().create_task(self._after(entry), context=self._context.copy())
        self._afters.add(waiter)
        waiter.add_done_callback(self._afters.discard)

    async def _after(self, entry: _Waiting) -> None:
        rec = entry[2]
        assert isinstance(rec, TaskRecord)
        # Each wait follows the status view (and a retry chain): no polling. An unknown task
        # counts as ended; the callback's run then says which one.
        await asyncio.gather(*(self.host.app.wait(uuid) for uuid in rec.after), return_exceptions=True)
        if not self._stopping:
            self._place(entry)
            self._fill()

    async def _results_of(self, after: list[str]) -> tuple[list[Any], str | None]:
        """The results of the tasks a chord's callback comes after, in order; or why it cannot run."""
        results = []
        for uuid in after:
            try:
                task = await self.host.app.wait(uuid)
            except TaskNotFoundError:
                return [], f"qtasks.exc.ChordError: task {uuid} of the chord is not known"
            if task.status != "success":
                why = task.cancel_reason if task.status == "cancel" else error_of(task.traceback)[1]
                return [], f"qtasks.exc.ChordError: task {task.uuid} of the chord ended as {task.status}: {why}"
            results.append(task.returning)
        return results, None

    def _queue(self, entry: _Waiting) -> None:
        """Into the backlog, or (due later) the delayed heap."""
        rec = entry[2]
        assert isinstance(rec, TaskRecord)
        now = time.time()
        if now < rec.not_before and (rec.not_before <= now + FORWARD_AFTER or _moved(entry[3])):
            if rec.not_before > now + FORWARD_AFTER and now >= self._skew_warned + 60:
                self._skew_warned = now  # held records take room: the worker fetches less meanwhile
                log.warning(
                    "task %s was moved from the delays topic %.0f s before it is due by this worker's clock: "
                    "the workers' clocks disagree (is NTP running?); it waits here until then",
                    rec.uuid,
                    rec.not_before - now,
                )
            heapq.heappush(self._delayed, (rec.not_before, entry[1], rec, entry[3], entry[4]))
            self._delay_changed.set()
        else:
            heapq.heappush(self._backlog, entry)

    # -- ordering keys ----------------------------------------------------------------

    def _take_key(self, rec: TaskRecord) -> bool:
        """Whether ``rec`` may go ahead now: its key is free (it takes it), or it is the retry the key waits for."""
        key = rec.key
        assert key is not None
        if key not in self._keys:
            self._keys[key] = deque()
            return True
        if self._key_retries.get(key) == rec.uuid:
            self._wait_for_retry(key, None)  # the retry of the key's last run goes first
            return True
        return False

    def _parent_done(self, child: str) -> None:
        """The retry ``child`` was taken (or is no longer waited for): its parent's record is done."""
        for offsets, offset in self._retry_parents.pop(child, ()):
            offsets.finish(offset)

    def _wait_for_retry(self, key: str, child: str | None) -> None:
        """The key waits for its last run's retry ``child`` (None: no longer). The partition the
        child comes in is read meanwhile past its usual key-queue limit: the child is behind."""
        tp = TopicPartition(self.core.topics.tasks, partition_for(key, self.core.tasks_partitions))
        if child is None and (waited := self._key_retries.get(key)) is not None:
            self._parent_done(waited)
        if (forget := self._retry_watches.pop(key, None)) is not None:
            forget()  # no longer waited for (or waited for afresh, below)
        if child is not None:
            self._key_retries[key] = child
            self._retry_tps[tp] = self._retry_tps.get(tp, 0) + 1
            if tp in self._key_paused and self._queued_in.get(tp, 0) < self._key_queue_limit(tp) // 2:
                self._key_paused.discard(tp)
                if not self._paused and tp in self._owned:
                    self._consumer.resume([tp])
        elif self._key_retries.pop(key, None) is not None:
            left = self._retry_tps.get(tp, 0) - 1
            if left > 0:
                self._retry_tps[tp] = left
            else:
                self._retry_tps.pop(tp, None)
                self._count_key_queue(tp, 0)  # paused again if its key queues are still long

    def _release_key(self, rec: TaskRecord) -> None:
        """``rec``'s handler is done: the next record of its key goes ahead (or, after a retry, its child)."""
        key = rec.key
        child = self._retry_of.pop(rec.uuid, None)
        if key is None or key not in self._keys:
            return
        if child is not None and not self._stopping:
            waiting = self._keys[key]
            for i, entry in enumerate(waiting):
                # The child read already (queued behind the key's next ones): it goes first.
                if isinstance(entry[2], TaskRecord) and entry[2].uuid == child:
                    del waiting[i]
                    self._queued_by_key -= 1
                    self._count_key_queue(entry[3].tp, -1)
                    self._queue(entry)
                    self._fill()
                    return
            self._wait_for_retry(key, child)
            # A child that ends before it comes here never comes: cancelled during its backoff
            # (the chain was), the delays loop drops it. The key goes on once the view shows its
            # ending. A worker that reads the parent's record again after a restart or a
            # rebalance finds the child ended and does not wait for it at all (_run_record).
            self._retry_watches[key] = self.core.view.when(child, _has_ended, lambda: self._retry_ended(key, child))
            # Bounded: a child that never comes here (its partition moved) does not hold the key for ever.
            bound = self.core.config.retry_backoff_max + 2 * self.core.config.lease_timeout + 30.0
            asyncio.get_running_loop().call_later(bound, self._stop_waiting_for, key, child)
            return
        self._next_of_key(key)

    def _retry_ended(self, key: str, child: str) -> None:
        if self._go_on_without(key, child):
            log.info("the retry %s of key %r ended before it came here; the key goes on", child, key)

    def _stop_waiting_for(self, key: str, child: str) -> None:
        if self._go_on_without(key, child):
            log.warning(
                "the retry %s of key %r did not come to this worker in time; the key goes on without it", child, key
            )

    def _go_on_without(self, key: str, child: str) -> bool:
        """The key stops waiting for its retry ``child`` and goes on (False: it no longer waited for it)."""
        if self._key_retries.get(key) != child:
            return False
        self._wait_for_retry(key, None)
        self._next_of_key(key)
        self._fill()
        return True

    def _next_of_key(self, key: str, *, fill: bool = True) -> None:
        waiting = self._keys.get(key)
        if waiting:
            self._queued_by_key -= 1
            entry = waiting.popleft()
            self._count_key_queue(entry[3].tp, -1)
            self._queue(entry)
            if fill and not self._stopping:
                self._fill()  # at once: the slot its key's last task held may be free already
        else:
            self._keys.pop(key, None)

    def _fill(self) -> None:
        """Start backlog records, lowest priority number first, while there is room."""
        backlog = self._backlog
        while backlog and self._in_flight < self.concurrency and not self._stopping and not self._revoked:
            _, _, rec, record, offsets = heapq.heappop(backlog)
            if isinstance(rec, TaskRecord):
                if (joined := self._active.get(rec.uuid)) is not None:
                    joined.append((offsets, record))
                    if rec.key is not None:
                        self._next_of_key(rec.key, fill=False)  # it held the key; the run it joined holds it
                    continue
                self._active[rec.uuid] = []
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(
                self._handle(rec, record, offsets), context=self._context.copy()
            )
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
            self._unstarted[task] = rec
            task.add_done_callback(self._never_started)
            if isinstance(rec, TaskRecord) and rec.key is not None:
                self._handler_keys[task] = rec.key
            if self.exactly_once:
                of_tp = self._handlers_of.setdefault(record.tp, set())
                of_tp.add(task)
                task.add_done_callback(of_tp.discard)

    async def _delay_loop(self) -> None:
        while True:
            self._delay_changed.clear()
            now = time.time()
            while self._delayed and self._delayed[0][0] <= now:
                _, sequence, rec, record, offsets = heapq.heappop(self._delayed)
                heapq.heappush(self._backlog, (rec.priority, sequence, rec, record, offsets))
            self._fill()
            wait = self._delayed[0][0] - now if self._delayed else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._delay_changed.wait()

    def _never_started(self, task: asyncio.Task[None]) -> None:
        """A handler cancelled before its first step (a partition dropped right after it was
        made) never ran its ``finally``: give its slot back and forget its run, or the record,
        read again, would join a run that does not exist and never run."""
        self._handler_keys.pop(task, None)
        rec = self._unstarted.pop(task, None)
        if rec is None:
            return
        if isinstance(rec, TaskRecord):
            self._active.pop(rec.uuid, None)
            self._release_key(rec)
        self._free_slot()

    async def _handle(self, rec: TaskRecord | RecordError, record: Record, offsets: PartitionOffsets) -> None:
        # Running: from here on the finally below does the bookkeeping.
        me = asyncio.current_task()
        assert me is not None
        self._unstarted.pop(me, None)
        finished = False
        rejected = False  # share mode: the record is dead-lettered, never handed out again
        sent_again = False  # share mode: the record was sent afresh; the task has not ended
        txn = None
        holds_slot = True
        dropped = False

        def ran() -> None:
            # The task's code is done and only its ending is left to store: the slot goes to
            # the next record now. Endings under way are bounded too (by concurrency).
            nonlocal holds_slot
            if holds_slot and self._ending < self.concurrency:
                holds_slot = False
                self._ending += 1
                self._free_slot()

        try:
            if self.exactly_once:
                txn = await self._txn_of(record.tp)
                if txn is None:
                    return  # the partition is not ours (any more): its next owner reads the record
            if isinstance(rec, TaskRecord):  # the lines logged while it is handled name it (JSON logs)
                current_task.set((rec.uuid, rec.task_name, None))
            if isinstance(rec, RecordError):
                await dead_letter(self.core, record, str(rec), self.id, txn, kind=rec.kind)
                rejected = True
            else:
                delivery = None
                if isinstance(offsets, ShareOffsets):
                    delivery = offsets.delivery(record, self.core.config.share_delivery_limit)
                done = await self._run_record(rec, txn, ran, record, delivery, offsets)
                rejected, sent_again = done == "rejected", done == "again"
            finished = True
        except asyncio.CancelledError:
            if me not in self._superseded or self._stopping:
                raise  # handed back: the worker stops past its deadline
            me.uncancel()  # taken over by another worker: the run stopped, the handler ends here
        except _Dropped:
            dropped = True  # not finished here: the record is read again after the rebalance
        except Exception as exc:
            raise_if_cancelled()  # a stop whose cancellation became an error hands the task back
            if txn is not None and (txn.lost or txn.error is not None):
                # Nothing this run wrote since the last commit will be seen: the record is read
                # again from the committed offset and the task goes on from what was committed.
                log.info("dropped %s@%d with its partition's transaction: %s", record.tp, record.offset, exc)
                return
            log.error("could not finish %s@%d", record.tp, record.offset, exc_info=exc)
            finished = isinstance(rec, TaskRecord) and await end_unfinished(self.host, rec, exc, txn)
        finally:
            joined = self._active.pop(rec.uuid, []) if isinstance(rec, TaskRecord) else []
            retaken: list[tuple[PartitionOffsets, Record]] = []
            if me in self._superseded:
                self._superseded.discard(me)
                if not finished and not self._stopping and not isinstance(offsets, ShareOffsets):
                    # Group mode, another worker took the task over: while the partition is read
                    # here, the task's records are admitted again. They wait for that run and
                    # finish once it ends (or take the task over if that worker dies too). A
                    # partition gone elsewhere is read again by its owner.
                    retaken = [(o, r) for o, r in ((offsets, record), *joined) if o is self._offsets.get(r.tp)]
            elif dropped and not self._stopping and not isinstance(offsets, ShareOffsets):
                # Group mode, a rebalance came during its admission: copies of the record read
                # again since (the partition stayed here) joined it; they are admitted afresh.
                retaken = [(o, r) for o, r in joined if o is self._offsets.get(r.tp)]
            # The key is given up here, so a rebalance from now on must not count it held.
            self._handler_keys.pop(me, None)
            key = rec.key if isinstance(rec, TaskRecord) else None
            child = None
            if key is not None:
                assert isinstance(rec, TaskRecord)
                child = self._retry_of.get(rec.uuid)
                if retaken:  # first of its key: the key's next task waits while the other run goes on
                    self._first_of_key(rec, *retaken.pop(0))
                self._release_key(rec)
            if finished and child is not None and (self._stopping or self._key_retries.get(key or "") == child):
                # Its retry is not taken yet: the record stays unfinished until it is (above).
                if not self._stopping:  # with the copies of it read again while it ran
                    self._retry_parents[child] = [(offsets, record.offset), *((o, r.offset) for o, r in joined)]
                finished = False
            if finished and rejected and isinstance(offsets, ShareOffsets):
                offsets.reject()  # dead-lettered: never handed out again
                for other, copy in joined:  # the task has ended: its other records are done
                    other.finish(copy.offset)
            elif finished and sent_again and isinstance(offsets, ShareOffsets):
                offsets.finish(record.offset)  # its fresh copy is stored
                for other, _ in joined:  # the task has not ended: its copies (the fresh one among them) go on
                    if isinstance(other, ShareOffsets) and not other.lost:
                        self._take(as_record(other.shared), other)
            elif finished:
                offsets.finish(record.offset)
                for other, copy in joined:
                    other.finish(copy.offset)
            for other, copy in retaken:
                self._retake(copy, other)
            if not finished and isinstance(offsets, ShareOffsets):
                offsets.give_back()  # handed back (a stop), or not ours to finish: another worker takes it
                for other, _ in joined:
                    if not isinstance(other, ShareOffsets):
                        continue
                    if self._stopping or other.lost:
                        other.give_back()
                    else:  # records of the task that joined it are still held here: taken afresh
                        self._take(as_record(other.shared), other)
            if holds_slot:
                self._free_slot()
            else:
                self._ending -= 1

    def _retake(self, record: Record, offsets: PartitionOffsets) -> None:
        """Group mode: admit a record taken before once more (its offset stays unfinished all along)."""
        self._take(record)  # into its partition's offsets, ``offsets`` (the caller checked)
        offsets.finish(record.offset)

    def _first_of_key(self, rec: TaskRecord, offsets: PartitionOffsets, record: Record) -> None:
        """Put a record taken before (its offset unfinished) first in its key's queue, which
        its key's run holds: the run's end then hands the key to it, not to the next task."""
        assert rec.key is not None
        self._sequence += 1
        self._keys.setdefault(rec.key, deque()).appendleft((rec.priority, self._sequence, rec, record, offsets))
        self._queued_by_key += 1
        self._count_key_queue(record.tp, 1)

    def _free_slot(self) -> None:
        self._in_flight -= 1
        if not self._stopping:
            self._fill()
            if self._paused and self._capacity > 0 and not self.core.trouble:
                self._set_paused(False)  # resuming wakes the poll loop's fetch at once
            self._share_wake.set()  # share mode: the same, for a poll loop waiting while full

    # -- one record ------------------------------------------------------------------

    async def _run_record(
        self,
        rec: TaskRecord,
        txn: PartitionTxn | None = None,
        ran: Callable[[], None] | None = None,
        record: Record | None = None,
        share: ShareDelivery | None = None,
        taken: PartitionOffsets | None = None,
    ) -> Literal["rejected", "again"] | None:
        """Admit and run (or end) one task record: ``rejected`` when its record went to the
        dead-letter topic, ``again`` when it was sent afresh (share mode: the task has not ended).

        ``taken`` is what the record was taken into. Group mode: the offsets of its partition
        in the assignment it was read in; a record read in an earlier one is neither run nor
        ended here (its partition's owner reads it again from the committed offset, this
        worker too if it stayed here). Share mode: the record's lock here; a record whose lock ran out is not
        started (the group may have handed it to another worker), and one whose task another
        worker runs from this very record is taken over only once the group confirms this
        worker holds it (a copy of it that waited here after its lock ran out must not take
        over the worker the group handed it to next).
        """
        core = self.core
        uuid = rec.uuid
        held = taken if isinstance(taken, ShareOffsets) else None
        if held is not None and held.lost:
            raise _Dropped()
        if record is not None and rec.not_before > time.time() + FORWARD_AFTER and not _moved(record):
            await self._forward(rec, record, txn)
            return None
        # The catch-up after the last assignment (a rebalance meanwhile cancels it and starts
        # another: this record then waits for that one, and is dropped below as read before it).
        while (ready := self._view_ready) is not None and not ready.done():
            await asyncio.wait((ready,))
        # Share mode, a record handed out before: its task's runs (``attempt``, ``released``)
        # decide whether it is poison, so the view first reads what its last worker wrote
        # before handing it back (a hand-back not read yet would count as a death).
        caught_up = share is None or not (share.count > 1 or share.again)
        while True:
            # The view may lag behind the submit, or have dropped an old finished task. While
            # the broker is away the lookup waits for it: a task is never decided on a guess.
            head = await retried(
                lambda: core.store.head(uuid, timeout=2.0, txn=txn), what=f"the status of {uuid}", trouble=core.trouble
            )
            if self._left_behind(record, taken):
                raise _Dropped()  # nothing is decided on it here: not even an ending
            if not caught_up and head is not None and head.status == "process":
                caught_up = True
                await retried(lambda: core.store.catch_up(uuid), what=f"the status of {uuid}", trouble=core.trouble)
                continue
            spec = self.registry.get(rec.task_name)
            decision = admit(
                head,
                rec,
                now=time.time(),
                ttl=core.config.status_ttl,
                me=self.id,
                cancelled=uuid in self._cancelled,
                known=spec is not None,
                fenced=txn is not None,
                share=share,
            )
            if decision.action != "wait":
                break
            await self._wait_for_lease(uuid, head)
        action = decision.action
        if held is not None:
            takes_over = (
                head is not None
                and head.status == "process"
                and head.worker not in (None, self.id)
                and head.lease_until > time.time()
            )
            if held.lost or (takes_over and not await self._still_held(held)):
                raise _Dropped()
        if action == "skip" and rec.key is not None and head is not None and head.retry_child_uuid:
            # A keyed task read again after it was retried (its worker stopped before the retry
            # was taken): the key waits for the retry, unless it has started already.
            child = await retried(
                lambda: core.store.head(head.retry_child_uuid or "", timeout=2.0, txn=txn),
                what="the status of a retry",
                trouble=core.trouble,
            )
            if child is None or child.status == "new":
                self._retry_of[uuid] = head.retry_child_uuid
        chord: tuple[list[Any], str | None] = ([], None)  # a chord's callback: what it comes after
        if action == "expired":
            log.warning("skipped %s (%s): older than status_ttl and its status has expired", uuid, rec.task_name)
        elif action == "cancel":
            reason = self._cancelled.pop(uuid, "") or f"{rec.task_name}.cancel"
            await end_without_running(self.host, rec, head, "cancel", txn, cancel_reason=reason)
        elif action == "unknown":
            known = ", ".join(self.registry.names()) or "none"
            exc = TaskNotFoundError(f"unknown task {rec.task_name!r}: this worker knows {known}")
            task = await end_without_running(
                self.host,
                rec,
                head,
                "error",
                txn,
                traceback=f"qtasks.exc.TaskNotFoundError: {exc}",
                attempt=decision.attempt,
            )
            await self.host.events.fire("task_error", app=self.host.app, task=task, exc=exc, worker=self.host.worker)
        elif action == "limit":
            assert share is not None
            await end_at_limit(self.host, rec, head, share, decision.attempt, record)
            return "rejected"
        elif action == "again":
            assert share is not None and record is not None
            await send_again(self.core, rec, head, share, record)
            return "again"
        elif action == "run" and rec.retry_parent_uuid and (why := await self._chain_cancelled(rec)) is not None:
            await end_without_running(self.host, rec, head, "cancel", txn, cancel_reason=why)
        elif action == "run" and rec.after and (chord := await self._results_of(rec.after))[1] is not None:
            task = await end_without_running(
                self.host, rec, head, "error", txn, traceback=chord[1], attempt=decision.attempt
            )
            error = ChordError(chord[1].split(": ", 1)[1])
            await self.host.events.fire("task_error", app=self.host.app, task=task, exc=error, worker=self.host.worker)
        elif action == "run":
            assert spec is not None
            if head is not None and head.status == "process" and head.worker not in (None, self.id):
                if txn is not None:
                    why = "its producer is fenced"
                elif share is not None and head.source == share.source:
                    why = f"its lock is gone: delivery {share.count} of the record came here"
                else:
                    why = "lease expired"
                log.info("taking over %s from %s (%s)", uuid, head.worker, why)
                sent = await retried(
                    lambda: self._cancel_sent(uuid), what=f"the cancels of {uuid}", trouble=core.trouble
                )
                if sent is not None:
                    # Cancelled while its worker was gone: a cancel sent before this worker
                    # started is not in what it reads of the control topic.
                    await end_without_running(
                        self.host, rec, head, "cancel", txn, cancel_reason=sent, attempt=decision.attempt
                    )
                    return None
            if self._left_behind(record, taken):
                raise _Dropped()  # the waits since the status lookup may have outlived a rebalance
            source = share.source if share is not None else None
            run = TaskRun(self.host, rec, spec, head, decision.attempt, txn, record, source)
            # Share mode: a run of a record handed out before is counted before it starts.
            run.announce_at_start = share is not None and share.announce_at_start
            if rec.after:  # a chord's callback: the results of the tasks it came after go first
                run.executor.args = [chord[0], *run.executor.args]
            run.on_ran = ran
            await self._run(run)
        return None

    def _left_behind(self, record: Record | None, taken: PartitionOffsets | None) -> bool:
        """Group mode: whether a rebalance came since ``record`` was taken into ``taken`` (a
        revoke under way, or an assignment since, which makes every partition's offsets
        afresh). The record may be another worker's by now: it is left unfinished, read
        again from the committed offset by its partition's owner (this worker too, if it
        stayed here)."""
        if record is None or taken is None or isinstance(taken, ShareOffsets):
            return False
        return self._revoked or taken is not self._offsets.get(record.tp)

    async def _chain_cancelled(self, rec: TaskRecord) -> str | None:
        """Why a retry's chain was cancelled while the run it follows was ending, or None.

        A cancel that reaches a failed run as it ends goes to that run (or, once it is over,
        waits here by its uuid); a client's that raced it ends the failed task as ``cancel``
        over its ``retry`` (a client's cancel outranks a worker's ending). Either way the retry
        the run handed over to must not run.
        """
        parent = rec.retry_parent_uuid
        assert parent is not None
        if parent in self._cancelled:
            return self._cancelled.pop(parent) or f"{rec.task_name}.cancel"
        store = self.core.store
        await retried(lambda: store.catch_up(parent), what=f"the status of {parent}", trouble=self.core.trouble)
        task = self.core.view.get(parent)
        if task is None or task.status != "cancel":
            return None
        return task.cancel_reason or f"{rec.task_name}.cancel"

    async def _cancel_sent(self, uuid: str) -> str | None:
        """The reason of a cancel of ``uuid`` on the control topic since its run started, or None.

        Each worker reads the control topic from where it stood when it started, so the cancel
        of a task whose worker died before this one started is not in what it read: a worker
        that takes a task over looks back for one (from the run's start, less the clock skew
        allowed between client and worker; takeovers are rare and the topic is small). A run
        that started after this worker's control loop did needs no look back.
        """
        core = self.core
        task = core.view.get(uuid)
        if task is None:
            return None
        since = (task.started_at or task.updated_at) - core.config.stream_clock_skew
        if since >= self._control_from:
            return None  # the control loop reads every cancel sent since: one would be waiting in _cancelled
        tp = TopicPartition(core.topics.control, partition_for(uuid, core.config.control_partitions))
        try:
            found = await records_of(
                core.broker, tp, uuid.encode(), client_id=f"{self.id}-cancels", since_ms=int(since * 1000)
            )
        except TimeoutError:
            raise ConnectorError(
                f"could not read the control topic to its end within {CATCH_UP_TIMEOUT} s", retriable=True
            ) from None
        reason = None
        for record in found:
            try:
                command = decode_control(record.value, core.config.max_record_bytes)
            except RecordError:
                continue  # the control loop logs it
            if command.kind == "cancel" and command.uuid == uuid:
                reason = command.reason or f"{task.task_name}.cancel"
        return reason

    async def _forward(self, rec: TaskRecord, record: Record, txn: PartitionTxn | None) -> None:
        """A task record due later than this worker holds one: into the delays topic, as a client
        would have sent it (in the partition's transaction, exactly once)."""
        core = self.core
        headers = [(n, v) for n, v in record.headers or () if n not in (DUE, AT, KEY, MOVED)]
        topic, partition, out = core.task_route(rec.uuid, rec.not_before, headers, key=rec.key)
        key = rec.uuid.encode()
        log.info("task %s is due in %.0f s: it waits in the delays topic", rec.uuid, rec.not_before - time.time())
        if txn is not None:
            await txn.send(topic, record.value, key=key, partition=partition, headers=out)
            return
        producer = core.broker.producer
        await deliver(
            lambda: producer.send(topic, record.value, key=key, partition=partition, headers=out or None),
            what=f"delayed task {rec.uuid}",
            trouble=core.trouble,
        )

    async def _run(self, run: TaskRun) -> None:
        uuid = run.rec.uuid
        # Registered until the terminal status is written: the lease is renewed, a cancel reaches it.
        self._running[uuid] = run
        handler = asyncio.current_task()
        if handler is not None:
            self._run_handlers[uuid] = handler
        try:
            if uuid in self._cancelled:
                run.executor.cancel(self._cancelled.pop(uuid) or f"{run.spec.name}.cancel")
            await run.run()
            if run.rec.key is not None and run.task.status == "retry" and run.task.retry_child_uuid:
                self._retry_of[uuid] = run.task.retry_child_uuid
        except BaseException:
            if not run.superseded:
                await run.release()
            raise
        finally:
            run.finish()
            self._running.pop(uuid, None)
            self._run_handlers.pop(uuid, None)
        self.tasks_done += 1

    def _on_head(self, head: StatusHead) -> None:
        """A new status of a task running here was read. If another worker took the task over
        (a newer run, or its ending) while this one went on, this worker was frozen or cut off
        past its lease: its run stops, writing nothing more, instead of streaming its values
        and its ending a second time."""
        run = self._running.get(head.uuid)
        if run is None or run.concluding or run.superseded or head.worker in (None, self.id):
            return
        if head.attempt <= run.attempt and not head.is_finished:
            return
        handler = self._run_handlers.get(head.uuid)
        if handler is None or handler.done():
            return
        run.superseded = True
        self.runs_superseded += 1
        self._superseded.add(handler)
        log.warning(
            "task %s (%s) was taken over by worker %s (attempt %d, %s): its run here (attempt %d) stops",
            head.uuid,
            run.spec.name,
            head.worker,
            head.attempt,
            head.status,
            run.attempt,
        )
        handler.cancel()

    async def _wait_for_lease(self, uuid: str, head: StatusHead | None) -> None:
        """Wait until another worker's run ends or its lease changes or runs out."""
        if head is None:
            return
        lease = head.lease_until

        def changed(h: StatusHead | None) -> bool:
            return h is None or h.is_finished or h.lease_until != lease

        with contextlib.suppress(TimeoutError):
            await self.core.view.wait_for(uuid, changed, max(0.0, lease - time.time()) + 0.01)

    # -- the other loops -------------------------------------------------------------

    async def _control_loop(self) -> None:
        limit = self.core.config.max_record_bytes
        while True:
            for record in await fetch(self._control, 1.0):
                try:
                    command = decode_control(record.value, limit)
                except RecordError as exc:
                    log.warning("ignored a control record at %s@%d: %s", record.tp, record.offset, exc)
                    continue
                self._on_control(command)

    def _on_control(self, command: ControlRecord) -> None:
        if command.kind != "cancel":
            return
        run = self._running.get(command.uuid)
        if run is not None:
            run.executor.cancel(command.reason or f"{run.spec.name}.cancel")
            return
        self._cancelled[command.uuid] = command.reason
        while len(self._cancelled) > 10_000:
            self._cancelled.popitem(last=False)

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.core.config.commit_interval)
            try:
                await self._commit()
            except CommitFailedError as exc:
                log.info("%s", exc)
            except ConnectorError as exc:
                if not exc.retriable:
                    raise

    async def _commit(self) -> None:
        """Commit the lowest unfinished offset of each owned partition.

        A finished offset's records are stored already (terminal statuses and end markers
        are written durably), so no flush is needed first.
        """
        offsets = {}
        for tp, tracker in self._offsets.items():
            if tp in self._owned and (target := tracker.committable()) is not None:
                offsets[tp] = target
        if not offsets:
            return
        await self._consumer.commit(offsets)
        for tp, offset in offsets.items():
            if (kept := self._offsets.get(tp)) is not None:
                kept.committed(offset)

    # -- exactly-once ----------------------------------------------------------------

    def _open_txn(self, tp: TopicPartition) -> None:
        """Start the transaction of a newly assigned partition (in the background; its records wait for it)."""
        producer = self.core.broker.transactional_producer(transactional_id(self.group_id, tp))
        config = self.core.config
        txn = PartitionTxn(
            producer,
            tp,
            self.group_id,
            limit=config.eos_commit_records,
            nudge=self._txn_wake.set,
            commit_timeout=config.eos_transaction_timeout,
        )
        self._txns[tp] = txn
        self._txn_ready[tp] = asyncio.get_running_loop().create_task(self._start_txn(txn))

    async def _start_txn(self, txn: PartitionTxn) -> None:
        """Fence the previous owner, then read the status topic to its end: what it committed is known here.

        Retried while the broker is away; a failure that is not retriable (the transactional
        id is not authorized) stops the worker loudly instead of leaving the partition idle.
        """
        trouble = self.core.trouble
        try:
            await deliver(txn.start, what=f"the transactions of {txn.tp.topic}[{txn.tp.partition}]", trouble=trouble)
            await retried(self.core.store.catch_up_all, what="the end of the status topic", trouble=trouble)
        except ConnectorError as exc:
            txn.lost = True
            self._on_fatal(exc)

    async def _txn_of(self, tp: TopicPartition) -> PartitionTxn | None:
        """The partition's transaction once it is ready; None if the partition is not (or no longer) ours."""
        txn = self._txns.get(tp)
        ready = self._txn_ready.get(tp)
        if txn is None or ready is None:
            return None
        await asyncio.shield(ready)
        return None if txn.lost or self._txns.get(tp) is not txn else txn

    async def _txn_loop(self) -> None:
        """Start each ready partition's next commit, every interval (or when one is full).

        Each partition commits on its own: one slow commit (its coordinator failing over)
        never holds back the others. A commit is never cut in half by a stop: the stop's
        own final commit waits for the one under way (the partition's commit lock).
        """
        interval = self.core.config.eos_commit_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._txn_wake.wait()
            self._txn_wake.clear()
            for txn in self._ready_txns():
                under_way = self._commits.get(txn.tp)
                if under_way is None or under_way.done():
                    self._commits[txn.tp] = asyncio.get_running_loop().create_task(self._commit_txn(txn))

    def _ready_txns(self) -> list[PartitionTxn]:
        return [
            txn
            for tp, txn in self._txns.items()
            if not txn.lost and (task := self._txn_ready.get(tp)) is not None and task.done() and not task.cancelled()
        ]

    async def _commit_txns(self) -> None:
        """Commit every ready partition's transaction now (a rebalance, a stop), and wait for all."""
        ready = self._ready_txns()
        if ready:
            await asyncio.gather(*(self._commit_txn(txn) for txn in ready))

    async def _commit_txn(self, txn: PartitionTxn) -> None:
        # A run that ended before this commit (or was handed back) leaves once its last progress commits.
        gone = {run for run in txn.runs if run.finished}

        async def progress() -> None:
            for run in list(txn.runs):
                await run.write_progress()

        try:
            await txn.commit(self._offsets.get(txn.tp), before=progress)
        except PartitionLostError as exc:
            await self._lose(txn, exc)
            return
        except Exception as exc:  # a bug: the partition is dropped and taken up afresh, loudly
            log.error("the commit of %s[%d] failed", txn.tp.topic, txn.tp.partition, exc_info=exc)
            await self._lose(txn, exc)
            return
        txn.runs -= gone

    async def _lose(self, txn: PartitionTxn, exc: BaseException) -> None:
        """The partition's transaction failed: drop the partition's runs here and let the group hand it out afresh."""
        if self._txns.get(txn.tp) is not txn:
            return
        log.warning(
            "worker %s drops %s[%d]: %s; the group hands it out again and its tasks go on from what was committed",
            self.id,
            txn.tp.topic,
            txn.tp.partition,
            exc,
        )
        await self._close_txns({txn.tp})
        if not self._stopping:
            self._consumer.rejoin()

    async def _close_txns(self, tps: set[TopicPartition], *, wait: bool = True) -> None:
        """Stop writing for these partitions: their runs end here, their open transactions are aborted.

        The partitions leave the worker's books at once; without ``wait`` their runs' ends and
        their producers' closing are waited for in the background (a rebalance callback must
        not wait for them; the closing is bounded anyway).
        """
        closing = []
        for tp in tps:
            txn = self._txns.pop(tp, None)
            ready = self._txn_ready.pop(tp, None)
            if ready is not None and not ready.done():
                ready.cancel()
            handlers = self._handlers_of.pop(tp, set())
            if txn is None:
                continue
            txn.lost = True  # nothing more is sent or committed for it from now on
            for handler in handlers:
                handler.cancel()
            closing.append(self._close_txn(txn, handlers))
        if not closing:
            return
        done = asyncio.gather(*closing)
        if wait:
            await done
        else:
            self._closing.add(done)
            done.add_done_callback(self._closing.discard)

    async def _close_txn(self, txn: PartitionTxn, handlers: set[asyncio.Task[None]]) -> None:
        if handlers:
            await asyncio.wait(handlers, timeout=5)
        try:
            await txn.close()
        except Exception as exc:  # a producer that cannot even stop: logged, never left running silently
            log.warning("closing the producer of %s[%d] failed: %s", txn.tp.topic, txn.tp.partition, exc)
        self.core.store.forget(txn)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.core.config.lease_interval)
            for uuid, run in list(self._running.items()):
                head = self.core.view.head(uuid)
                if head is None or head.is_finished or head.worker != self.id:
                    continue
                try:
                    await run.renew()
                except ConnectorError:
                    raise  # the broker's: the supervisor retries the loop, or stops the worker and says why
                except Exception:
                    # One run's trouble (a bug) must not keep the other runs' leases from renewal.
                    raise_if_cancelled()
                    log.exception("could not renew the lease of %s", uuid)

    async def _expire_loop(self) -> None:
        store = self.core.store
        ttl = self.core.config.status_ttl
        while True:
            await asyncio.sleep(min(ttl / 4, 60.0))
            for uuid in store.expired(ttl):
                await store.tombstone(uuid)
            unswept = store.view.unswept_drop
            if unswept is not None and unswept < time.time() - ttl:
                # Finished tasks the view dropped are due: they expire by a sweep of the topic
                # (at most about once per status_ttl while the view keeps dropping tasks).
                await store.sweep(ttl)
