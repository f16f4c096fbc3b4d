"""Periodic tasks: ``@app.periodic(cron=...)`` or ``every=``, one run per tick across the whole group.

One worker ticks at a time: the one that owns partition 0 of the delays topic (its
consumer group hands that partition to exactly one member, and to another when that
one leaves or dies). At each tick it submits the task with a uuid made from the app, the
task and the tick, then records the tick in the compacted topic ``<app>.schedule``
(key ``tick:<task name>``). A worker that takes the ticking over reads that topic, and
the ticks after the last one recorded are submitted then:

- a tick whose uuid is already known (submitted, not yet recorded, when the last ticker
  died) is not submitted again; a copy submitted twice anyway (two tickers for a moment,
  during a rebalance) is one task, which runs once;
- ticks missed within ``periodic_grace`` of the last sign of a ticking worker (a crash
  and its rebalance take that long) are all submitted;
- ticks missed while no worker ran (longer gaps) follow the schedule's ``catch_up``:
  ``"latest"`` (the default: the last of them), ``"all"`` (each, at most
  :data:`MAX_CATCH_UP`, the latest ones) or ``"skip"`` (none).

A schedule with no tick recorded yet (a new periodic task) gets a mark where its
ticking starts, so a worker that takes over before its first tick still submits it.
The ticking worker writes a sign of life (key ``alive``, naming the tasks it ticks)
every :data:`ALIVE_EVERY` seconds. A ticking worker that falls behind by more than the
grace (frozen, or its clock jumped) treats that gap as one in which no worker ran.
A task's status has the tick it was submitted for in ``not_before``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import time
import uuid as uuid_mod
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

from qtasks.connectors.base import TopicPartition
from qtasks.core import Core
from qtasks.cron import Cron, Every
from qtasks.delivery import fetch, retried
from qtasks.exc import ConnectorError, RecordError
from qtasks.records import TickRecord, decode_tick, encode
from qtasks.validate import check_arguments

if TYPE_CHECKING:
    from qtasks.registry import Registry, TaskSpec

log = logging.getLogger("qtasks.periodic")

CatchUp = Literal["latest", "all", "skip"]
#: Seconds between the ticking worker's signs of life.
ALIVE_EVERY: Final = 2.0
#: Seconds past which this ticker's own tick is late (it was frozen): another may have run it.
LATE_TICK: Final = 5.0
#: The most missed ticks ``catch_up="all"`` submits (the latest ones).
MAX_CATCH_UP: Final = 1000
#: The most ticks looked at when catching up (a fine cron after a long outage).
_MAX_LOOKED_AT: Final = 200_000
_NAMESPACE: Final = uuid_mod.UUID("5d1c6a3e-5b8f-4f1e-9a57-8b7f6c2e1d40")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When a periodic task runs, with which arguments, and what happens to ticks missed while no worker ran."""

    when: Cron | Every
    catch_up: CatchUp = "latest"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(
        cls,
        *,
        cron: str | None,
        every: float | None,
        tz: Any,
        catch_up: str,
        args: Sequence[Any],
        kwargs: dict[str, Any] | None,
    ) -> Schedule:
        """A checked schedule: ``TypeError``/``ValueError`` naming what is wrong."""
        if (cron is None) == (every is None):
            raise TypeError("a periodic task takes cron= or every=, one of them")
        if every is not None and tz is not None:
            raise TypeError("tz= goes with cron=; every= counts seconds since the Unix epoch")
        if catch_up not in ("latest", "all", "skip"):
            raise ValueError(f"catch_up must be 'latest', 'all' or 'skip', got {catch_up!r}")
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise TypeError(f"args= takes a tuple or list, got {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"kwargs= takes a dict, got {type(kwargs).__name__}")
        check_arguments(list(args), dict(kwargs or {}))
        when: Cron | Every = Cron(cron, tz) if cron is not None else Every(every)  # type: ignore[arg-type]
        return cls(when, catch_up, tuple(args), dict(kwargs or {}))  # type: ignore[arg-type]

    def check(self, fn: Callable[..., Any], task_options: dict[str, Any]) -> Callable[..., Any]:
        """``fn`` if it takes this schedule's arguments (after the task object, with ``echo``); else ``TypeError``."""
        echo = [None] if task_options.get("echo") else []
        try:
            inspect.signature(fn).bind(*echo, *self.args, **self.kwargs)
        except TypeError as exc:
            raise TypeError(
                f"periodic task {fn.__name__!r} cannot take args={self.args!r}, kwargs={self.kwargs!r}: {exc}"
            ) from None
        return fn


def schedule_of(options: dict[str, Any]) -> Schedule:
    """The schedule in a periodic task's keywords (taken out of ``options``; the rest are ``task``'s)."""
    return Schedule.of(
        cron=options.pop("cron", None),
        every=options.pop("every", None),
        tz=options.pop("tz", None),
        catch_up=options.pop("catch_up", "latest"),
        args=options.pop("args", ()),
        kwargs=options.pop("kwargs", None),
    )


def tick_uuid(app: str, task: str, tick: float) -> str:
    """The uuid of the run of ``task`` for ``tick``: the same in every worker."""
    return str(uuid_mod.uuid5(_NAMESPACE, f"{app}\x00{task}\x00{tick!r}"))


def missed(
    when: Cron | Every, last: float, alive: float, now: float, grace: float, catch_up: CatchUp
) -> tuple[list[float], int]:
    """The ticks after ``last`` up to ``now`` to submit, oldest first, and how many others are passed over.

    Those within ``grace`` of ``alive`` (the last sign of a ticking worker) are all kept,
    at most the latest :data:`MAX_CATCH_UP`; later ones follow ``catch_up``. The count
    passed over is -1 when it was not counted (a long gap of a cron schedule: only its
    latest ticks are looked at).
    """
    handover = min(max(alive, last) + grace, now)
    kept, passed = latest_ticks(when, last, handover, MAX_CATCH_UP)
    if handover >= now:
        return kept, passed
    want = {"all": MAX_CATCH_UP, "latest": 1, "skip": 0}[catch_up]
    outage, others = latest_ticks(when, handover, now, want)
    return kept + outage, -1 if -1 in (passed, others) else passed + others


def latest_ticks(when: Cron | Every, after: float, upto: float, want: int) -> tuple[list[float], int]:
    """The latest ``want`` ticks in (``after``, ``upto``], oldest first, and how many others the span holds (-1: not counted).

    Only the end of a long span is looked at: a window that grows from an hour until it
    holds enough ticks, or the whole span.
    """
    if upto <= after:
        return [], 0
    if isinstance(when, Every):
        step = when.seconds
        first, last = when.first_after(after), when.first_after(upto) - 1
        count = max(0, last - first + 1)
        kept = [n * step for n in range(max(first, last - want + 1), last + 1)] if want else []
        return kept, count - len(kept)
    window = 3600.0
    while True:
        begin = max(after, upto - window)
        found: deque[float] = deque(maxlen=want or None)
        count = 0
        tick = when.next_after(begin)
        while tick <= upto and count < _MAX_LOOKED_AT:
            count += 1
            if want:
                found.append(tick)
            tick = when.next_after(tick)
        if begin <= after and count < _MAX_LOOKED_AT:
            kept = list(found)[-want:] if want else []
            return kept, count - len(kept)
        if count >= want:  # enough (or, for "skip", nothing wanted: the rest is not counted)
            return list(found), -1
        window *= 4


class Ticker:
    """The worker's periodic loop: ticks while this worker owns partition 0 of the delays topic."""

    def __init__(self, core: Core, registry: Registry, worker_id: str) -> None:
        self.core = core
        self.registry = registry
        self.worker_id = worker_id
        self._term = 0
        self._changed = asyncio.Event()
        self.leading = False
        #: Ticks submitted here, and when this worker last took the ticking over (tests, debugging).
        self.submitted = 0
        self.led_at = 0.0

    def lead(self) -> None:
        """This worker now owns the ticking (partition 0 of the delays topic was assigned to it)."""
        self._term += 1
        self.leading = True
        self._changed.set()

    def step_down(self) -> None:
        """Another worker ticks from now on (or none, until the group hands the partition out)."""
        self._term += 1
        self.leading = False
        self._changed.set()

    def _schedules(self) -> list[tuple[TaskSpec, Schedule]]:
        return [(spec, spec.schedule) for spec in self.registry if spec.schedule is not None]

    async def run(self) -> None:
        """The worker's supervised loop."""
        while True:
            self._changed.clear()
            term = self._term
            if self.leading and self._schedules():
                await self._tick(term)
            else:
                await self._changed.wait()

    async def _tick(self, term: int) -> None:
        core = self.core
        schedules = self._schedules()
        await retried(core.store.catch_up_all, what="the end of the status topic", trouble=core.trouble)
        last, alive_of, alive_all = await self._read()
        now = self.led_at = time.time()
        grace = core.config.periodic_grace or max(60.0, 2 * core.config.kafka_session_timeout_ms / 1000)
        log.info("worker %s ticks the periodic tasks %s", self.worker_id, [spec.name for spec, _ in schedules])
        for spec, schedule in schedules:
            name = spec.name
            if name in last:
                # The last sign of a worker ticking this task (one that ticked others only does not count).
                alive = max(alive_of.get(name, 0.0), alive_all)
                handover = max(alive, last[name]) + grace  # a ticker may have run the ticks up to here
                if not await self._catch_up(
                    term, spec, schedule, (last[name], alive, now, grace), handover, "while no worker ran"
                ):
                    return
            else:
                # A schedule never recorded starts now: a worker that takes over before its
                # first tick was recorded submits the ticks after this mark.
                await self._record(name, now, "")
        # This worker's own ticks from here: one run each; but a gap longer than the grace (the
        # worker was frozen, or its clock jumped ahead) is one in which no worker ticked, and
        # its ticks follow catch_up as above.
        specs = {spec.name: (spec, schedule) for spec, schedule in schedules}
        done = dict.fromkeys(specs, now)  # each task's ticks up to here are dealt with
        plan: dict[str, float] = {}
        for name, (_, schedule) in specs.items():
            self._plan(plan, name, schedule, now)
        own_grace = max(grace, 4 * ALIVE_EVERY)
        awake = now
        next_alive = 0.0
        while self._term == term:
            now = time.time()
            if now >= next_alive:
                await self._alive(now, list(specs))
                next_alive = now + ALIVE_EVERY
            for name, tick in sorted(plan.items(), key=lambda item: item[1]):
                if tick > now or self._term != term:
                    continue
                spec, schedule = specs[name]
                why = "while this worker was frozen or its clock jumped"
                if not await self._catch_up(
                    term, spec, schedule, (done[name], awake, now, own_grace), now - LATE_TICK, why
                ):
                    return
                done[name] = now
                self._plan(plan, name, schedule, now)
            awake = now
            wake = min(min(plan.values(), default=next_alive), next_alive)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake - time.time())):
                    await self._changed.wait()

    async def _catch_up(
        self,
        term: int,
        spec: TaskSpec,
        schedule: Schedule,
        span: tuple[float, float, float, float],
        careful_upto: float,
        why: str,
    ) -> bool:
        """Submit the ticks :func:`missed` gives for ``span`` (last, alive, now, grace); False if the
        ticking moved meanwhile. Ticks up to ``careful_upto`` may have run already (:meth:`_fire`)."""
        last, alive, now, grace = span
        try:
            ticks, passed = missed(schedule.when, last, alive, now, grace, schedule.catch_up)
        except ValueError as exc:  # a schedule with no tick left (never raised for a bounded tick)
            log.warning("periodic task %s: no catch-up: %s", spec.name, exc)
            ticks, passed = [], 0
        if passed:
            log.warning(
                "periodic task %s: %s tick(s) missed %s are passed over (catch_up=%r)",
                spec.name,
                passed if passed > 0 else "older",
                why,
                schedule.catch_up,
            )
        for tick in ticks:
            if self._term != term:
                return False
            await self._fire_or_log(spec, schedule, tick, careful=tick <= careful_upto)
        return self._term == term

    @staticmethod
    def _plan(plan: dict[str, float], name: str, schedule: Schedule, after: float) -> None:
        """Plan the next tick of ``name`` after ``after``; a schedule with none left is dropped, logged."""
        try:
            plan[name] = schedule.when.next_after(after)
        except ValueError as exc:
            plan.pop(name, None)
            log.error("periodic task %s is not ticked any more: %s", name, exc)

    async def _fire_or_log(self, spec: TaskSpec, schedule: Schedule, tick: float, careful: bool) -> None:
        """:meth:`_fire`; a tick that cannot be submitted at all (its arguments do not fit a record)
        is logged and passed over, and the ticking goes on."""
        try:
            await self._fire(spec, schedule, tick, careful)
        except (TypeError, ValueError) as exc:
            log.error("periodic task %s: the tick at %s was not submitted: %s", spec.name, tick, exc)

    async def _fire(self, spec: TaskSpec, schedule: Schedule, tick: float, careful: bool) -> None:
        """Submit the run of ``spec`` for ``tick`` (unless it is known already), then record the tick.

        ``careful``: another ticker may have run this tick already, longer ago than the view
        keeps finished tasks for (a read of the status topic if the view does not know it).
        """
        core = self.core
        uuid = tick_uuid(core.name, spec.name, tick)
        await retried(lambda: core.store.catch_up(uuid), what="the status of a tick", trouble=core.trouble)
        head = core.view.head(uuid)
        if head is None and careful and core.view.newest_drop >= tick:
            # Another ticker may have run it (a takeover's catch-up, a ticker late after a
            # freeze), and the view has dropped a task that ended after this tick: this one,
            # perhaps. Its partition is read back; if that cannot be done in time, the tick
            # is submitted (at worst a second run, never a lost tick).
            try:
                head = await core.store.head(uuid)
            except (TimeoutError, ConnectorError) as exc:
                log.warning(
                    "periodic task %s: could not read back the tick at %s (%r); submitting it", spec.name, tick, exc
                )
        if head is None or head.status == "new":
            new = core.new_task(
                spec.name, schedule.args, schedule.kwargs, priority=spec.priority, not_before=tick, uuid=uuid
            )
            if head is None:
                await core.submit_all([new])
                self.submitted += 1
            else:
                # Submitted by a ticker that died before its task record was surely stored:
                # sent again (one task all the same: the worker that reads a second copy skips it).
                await core.resend(new)
        await self._record(spec.name, tick, uuid)

    async def _record(self, name: str, tick: float, uuid: str) -> None:
        """Record ``tick`` as the last of ``name`` (``uuid`` empty: where a new schedule starts)."""
        record = TickRecord(kind="tick", name=name, tick=tick, uuid=uuid, worker=self.worker_id, at=time.time())
        await self.core.send(self.core.topics.schedule, encode(record), f"tick:{name}", 1, what=f"tick of {name}")

    async def _alive(self, now: float, names: list[str]) -> None:
        core = self.core
        record = TickRecord(kind="alive", worker=self.worker_id, at=now, names=names)
        await core.send(core.topics.schedule, encode(record), "alive", 1, what="the ticking worker's sign of life")

    async def _read(self) -> tuple[dict[str, float], dict[str, float], float]:
        """The last tick of each periodic task; the last sign of a worker ticking each; and the last
        sign of one ticking all of them, as older workers wrote it (0.0: none)."""
        core = self.core
        tp = TopicPartition(core.topics.schedule, 0)
        consumer = core.broker.consumer(None, client_id=f"{self.worker_id}-schedule")
        await consumer.start()
        last: dict[str, float] = {}
        alive_of: dict[str, float] = {}
        alive_all = 0.0
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning([tp])
            end = (await retried(lambda: consumer.end_offsets([tp]), what="the schedule's end"))[tp]
            while await consumer.position(tp) < end:
                for record in await fetch(consumer, 0.5):
                    if record.offset >= end or record.value is None:
                        continue
                    try:
                        tick = decode_tick(record.value, core.config.max_record_bytes)
                        if not (0.0 <= tick.tick < 1e11 and 0.0 <= tick.at < 1e11):
                            raise RecordError(f"its times are out of range: tick={tick.tick!r}, at={tick.at!r}")
                    except RecordError as exc:
                        log.warning("ignored a schedule record at offset %d: %s", record.offset, exc)
                        continue
                    if tick.kind == "alive":
                        for name in tick.names:
                            alive_of[name] = max(alive_of.get(name, 0.0), tick.at)
                        if not tick.names:
                            alive_all = max(alive_all, tick.at)
                    elif tick.name:
                        last[tick.name] = max(last.get(tick.name, 0.0), tick.tick)
        finally:
            await consumer.stop()
        return last, alive_of, alive_all
