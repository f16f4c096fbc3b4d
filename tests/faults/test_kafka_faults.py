"""Fault tests: worker processes on a real Kafka broker, started, stopped and killed as a user would.

The processes and what is read back are in :mod:`tests.faults.workers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from qtasks.periodic import tick_uuid
from tests.faults.workers import (
    PARTITIONS,
    ROOT,
    Workers,
    check_values,
    end_markers,
    executions,
    finished,
    read_stream,
    read_streams,
    running_on,
    scan_results,
    wait_all,
    workers_of,
)
from tests.helpers import until

pytestmark = pytest.mark.kafka


@pytest.fixture
async def make_cluster(tmp_path: Path, broker_url: str) -> AsyncIterator[Callable[..., Workers]]:
    async with workers_of(tmp_path, broker_url) as make:
        yield make


# -- 1. three workers, many generators -----------------------------------------------------


@pytest.mark.timeout(240)
async def test_three_workers_run_every_generator_exactly_once(make_cluster: Callable[..., Workers]) -> None:
    cluster = make_cluster()
    workers = [cluster.start_worker(concurrency=16) for _ in range(3)]
    await cluster.wait_assigned(workers)
    app = await cluster.client()

    n_tasks, n_values = 300, 20
    tasks = await asyncio.gather(*(app.add_task("gen", n_values, 0.002) for _ in range(n_tasks)))
    uuids = [t.uuid for t in tasks]
    live = [asyncio.create_task(read_stream(app, u, timeout=120)) for u in uuids[:10]]

    finals = await wait_all(app, uuids, timeout=120)

    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    assert Counter(t.attempt for t in finals.values()) == {1: n_tasks}
    for t in finals.values():
        assert t.yield_count == n_values, t
        check_values(t.returning, n_values)
        (runner,) = [w for w in workers if w.ran(t)]
        assert {v["pid"] for v in t.returning} == {runner.pid}, t

    by_worker = Counter(t.worker for t in finals.values())
    assert len(by_worker) >= 2, f"only one worker did work: {by_worker}"

    # Each task ran once: one seq-0 record, one end marker, nothing from a second run.
    scanned = await scan_results(app)
    assert set(scanned) == set(uuids)
    for u in uuids:
        records = scanned[u]
        assert executions(records) == [1], (u, records)
        assert end_markers(records) == [(1, "success")], (u, records)
        assert len(records) == n_values + 1, (u, records)

    streams = await read_streams(app, uuids)
    for u in uuids:
        assert streams[u] == finals[u].returning, u
    for u, reading in zip(uuids, live, strict=False):
        assert await reading == finals[u].returning, u


# -- 2. a worker joins, another leaves (SIGTERM) mid-run --------------------------------------


@pytest.mark.timeout(240)
async def test_worker_joining_and_leaving_mid_run_loses_nothing(make_cluster: Callable[..., Workers]) -> None:
    # Quick heartbeats make a rebalance shorter than a task, so partitions move while
    # their tasks still run on the previous owner (the new owner must wait for the lease).
    cluster = make_cluster(kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=500)
    w1, w2 = cluster.start_worker(concurrency=4), cluster.start_worker(concurrency=4)
    await cluster.wait_assigned([w1, w2])
    app = await cluster.client()

    n_tasks, n_values = 150, 10
    tasks = await asyncio.gather(*(app.add_task("gen", n_values, 0.09) for _ in range(n_tasks)))
    uuids = [t.uuid for t in tasks]

    await until(lambda: finished(app, uuids) >= 25, 60, "25 tasks done")
    w3 = cluster.start_worker(concurrency=4)
    await until(lambda: any(w3.assignments()), 60, "worker3 joined")
    await until(lambda: finished(app, uuids) >= 75, 60, "75 tasks done")
    # Worker1's partitions may have run dry by now (which partitions the 150 tasks landed
    # on is chance): more tasks give it work to be stopped in the middle of.
    more = await asyncio.gather(*(app.add_task("gen", n_values, 0.09) for _ in range(30)))
    uuids += [t.uuid for t in more]
    n_tasks += len(more)
    await until(lambda: len(running_on(app, uuids, w1)) >= 1, 30, "a task running on worker1")
    done_at_sigterm = finished(app, uuids)
    w1.popen.send_signal(signal.SIGTERM)
    running_at_sigterm = running_on(app, uuids, w1)

    finals = await wait_all(app, uuids, timeout=120)
    code = await asyncio.to_thread(w1.popen.wait, 30)
    assert code == 0, f"worker1 did not stop gracefully (exit code {code})\n{w1.tail()}"
    assert done_at_sigterm < n_tasks, "every task ended before the SIGTERM: the test proves nothing"

    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    assert any(w3.ran(t) for t in finals.values()), "the worker that joined ran nothing"
    # A graceful stop lets the running tasks finish where they run.
    for u in running_at_sigterm:
        assert w1.ran(finals[u]) and finals[u].attempt == 1, finals[u]

    streams = await read_streams(app, uuids)
    for u in uuids:
        check_values(streams[u], n_values)
        assert streams[u] == finals[u].returning, u

    # Nothing lost is the contract; beyond it, the lease protocol promises no double run
    # when a rebalance moves a partition while its tasks run (the new owner waits).
    scanned = await scan_results(app)
    twice = {u: executions(scanned[u]) for u in uuids if executions(scanned[u]) != [1]}
    assert not twice, f"tasks run more than once across the rebalances: {twice}"
    assert Counter(t.attempt for t in finals.values()) == {1: n_tasks}


# -- 3. kill -9 of a worker running generators ------------------------------------------------


@pytest.mark.timeout(240)
async def test_sigkill_of_a_worker_mid_generator_is_taken_over(make_cluster: Callable[..., Workers]) -> None:
    cluster = make_cluster(
        lease_timeout=3.0,
        lease_interval=0.5,
        kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=1000,
    )
    victim, survivor = cluster.start_worker(concurrency=6), cluster.start_worker(concurrency=6)
    await cluster.wait_assigned([victim, survivor])
    app = await cluster.client()

    n_tasks, n_values = 24, 8
    tasks = await asyncio.gather(*(app.add_task("gen", n_values, 0.4) for _ in range(n_tasks)))
    uuids = [t.uuid for t in tasks]

    # Kill it once it has streamed a value or two of several tasks.
    await until(lambda: len(running_on(app, uuids, victim)) >= 3, 60, "3 tasks running on the victim")
    await asyncio.sleep(1.0)
    victim.popen.kill()
    await asyncio.to_thread(victim.popen.wait, 10)
    # What the victim wrote before it died reaches this view within a moment.
    await asyncio.sleep(2.0)
    orphans = running_on(app, uuids, victim)
    assert len(orphans) >= 3, orphans

    finals = await wait_all(app, uuids, timeout=120)

    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    for u, t in finals.items():
        if u in orphans:
            assert t.attempt == 2, t
            assert survivor.ran(t), t
        else:
            assert t.attempt == 1, t
        assert t.yield_count == n_values, t
    assert "taking over" in survivor.log()

    scanned = await scan_results(app)
    for u in uuids:
        # An orphan the victim had not streamed a value of yet has no seq-0 record of attempt 1;
        # one it killed between its end marker and its status write has an attempt-1 marker too.
        if u in orphans:
            assert executions(scanned[u]) in ([1, 2], [2]), (u, scanned[u])
            assert end_markers(scanned[u]) in ([(2, "success")], [(1, "success"), (2, "success")]), scanned[u]
        else:
            assert executions(scanned[u]) == [1], (u, scanned[u])
            assert end_markers(scanned[u]) == [(1, "success")], (u, scanned[u])

    streams = await read_streams(app, uuids)
    for u in uuids:
        check_values(streams[u], n_values)
        pids = [v["pid"] for v in streams[u]]
        if u in orphans:
            # The values the victim streamed stand; the survivor's repeats of them are dropped.
            assert set(pids) <= {victim.pid, survivor.pid}, pids
            if (1, "success") not in end_markers(scanned[u]):
                assert pids[-1] == survivor.pid, pids
            assert pids == sorted(pids, key=lambda p: p == survivor.pid), pids
        else:
            assert len(set(pids)) == 1, pids


@pytest.mark.timeout(240)
async def test_a_worker_frozen_past_its_lease_stops_the_runs_taken_over_when_it_wakes(
    make_cluster: Callable[..., Workers],
) -> None:
    # Leases of 3 s, a 6 s group session: the worker is frozen (SIGSTOP) for 10 s, long enough
    # for the other worker to be given its partitions and take its tasks over.
    cluster = make_cluster(
        lease_timeout=3.0,
        lease_interval=0.5,
        process_grace=0.2,
        kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=1000,
    )
    frozen, other = cluster.start_worker(concurrency=8), cluster.start_worker(concurrency=8)
    await cluster.wait_assigned([frozen, other])
    app = await cluster.client()
    n_tasks, n_values = 12, 40
    tasks = await app.add_tasks("gen", [(n_values, 0.2)] * n_tasks)
    uuids = [t.uuid for t in tasks]
    await until(lambda: len(running_on(app, uuids, frozen)) >= 3, 60, "3 tasks running on the worker to freeze")
    frozen.popen.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        await asyncio.sleep(1.0)
        stranded = running_on(app, uuids, frozen)  # as its last writes left them
        await until(lambda: not running_on(app, uuids, frozen), 60, "its tasks taken over")
        await asyncio.sleep(max(0.0, stopped + 10.0 - time.monotonic()))
    finally:
        frozen.popen.send_signal(signal.SIGCONT)
    finals = await wait_all(app, uuids, timeout=120)
    assert Counter(t.status for t in finals.values()) == {"success": n_tasks}
    assert len(stranded) >= 3, stranded
    # Awake, it reads that its runs were taken over and stops them: only the other worker's
    # attempt ends (before, both attempts streamed to their end and ended the task twice).
    await until(lambda: frozen.log().count("was taken over by worker") >= len(stranded), 30, "its runs stopped")
    scanned = await scan_results(app)
    streamed_by_first = {u: sum(1 for r in scanned[u] if r.attempt == 1 and not r.end) for u in stranded}
    await asyncio.sleep(2.0)  # ten values' time: a run that went on would have streamed more
    scanned = await scan_results(app)
    assert {u: sum(1 for r in scanned[u] if r.attempt == 1 and not r.end) for u in stranded} == streamed_by_first
    assert all(n < n_values for n in streamed_by_first.values()), streamed_by_first
    for u in stranded:
        assert finals[u].attempt == 2 and other.ran(finals[u]), finals[u]
        assert executions(scanned[u]) == [1, 2], (u, executions(scanned[u]))
        assert end_markers(scanned[u]) == [(2, "success")], (u, end_markers(scanned[u]))
    streams = await read_streams(app, uuids)
    for u in uuids:
        check_values(streams[u], n_values)
    duplicates = sum(len([r for r in scanned[u] if not r.end]) - n_values for u in uuids)
    print(f"frozen worker: {len(stranded)} runs taken over and stopped, {duplicates} raw duplicate values")
    assert frozen.alive(), frozen.tail()
    more = await app.add_tasks("gen", [(2, 0.0)] * 8)
    ends = await wait_all(app, [t.uuid for t in more], timeout=60)
    assert {t.status for t in ends.values()} == {"success"}


# -- 4. a task longer than max.poll.interval.ms -----------------------------------------------


@pytest.mark.timeout(120)
async def test_task_running_three_times_max_poll_interval_runs_once(make_cluster: Callable[..., Workers]) -> None:
    cluster = make_cluster(
        kafka_max_poll_interval_ms=5000,
        kafka_session_timeout_ms=6000,
        kafka_heartbeat_interval_ms=1000,
    )
    # Concurrency 1: while the long task runs the worker's partitions are paused (backpressure)
    # and a second task waits in the topic.
    worker = cluster.start_worker(concurrency=1)
    await cluster.wait_assigned([worker])
    app = await cluster.client()

    seconds = 15
    long = await app.add_task("long_run", seconds)
    short = await app.add_task("gen", 3)
    assert long is not None and short is not None
    arrivals: list[float] = []

    async def follow() -> list[Any]:
        values = []
        async for value in app.stream(long.uuid, timeout=90):
            arrivals.append(time.monotonic())
            values.append(value)
        return values

    cpu_before = worker.cpu_seconds()
    values = await follow()
    cpu_used = worker.cpu_seconds() - cpu_before
    # Paused partitions are polled with a timeout, not spun on.
    assert cpu_used < 5.0, f"worker used {cpu_used:.1f} s of CPU while one task slept for {seconds} s"
    finals = await wait_all(app, [long.uuid, short.uuid], timeout=60)

    final = finals[long.uuid]
    assert final.status == "success", final
    assert final.attempt == 1, final
    assert final.yield_count == seconds, final
    check_values(values, seconds)
    assert {v["pid"] for v in values} == {worker.pid}
    assert arrivals[-1] - arrivals[0] >= seconds - 3, "the values did not arrive live"
    assert finals[short.uuid].status == "success" and finals[short.uuid].attempt == 1

    scanned = await scan_results(app)
    assert executions(scanned[long.uuid]) == [1]
    assert executions(scanned[short.uuid]) == [1]
    assert worker.alive()
    assignments = worker.assignments()
    assert assignments == [list(range(PARTITIONS))], f"rebalanced: {assignments}\n{worker.tail()}"
    assert "taking over" not in worker.log()


# -- 5. the CLI on Kafka ---------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_cli_add_follow_and_status_against_a_worker(make_cluster: Callable[..., Workers]) -> None:
    cluster = make_cluster()
    worker = cluster.start_worker(concurrency=4)
    await cluster.wait_assigned([worker])

    n_values = 6
    proc = await asyncio.create_subprocess_exec(
        *cluster.qtasks_argv("add", "gen", str(n_values), "0.4", "--follow", "--timeout", "60"),
        cwd=ROOT,
        env=cluster.env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    lines: list[tuple[float, str]] = []

    async def read_out() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            lines.append((time.monotonic(), raw.decode().rstrip("\n")))

    try:
        async with asyncio.timeout(90):
            _, err = await asyncio.gather(read_out(), proc.stderr.read())  # type: ignore[union-attr]
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = err.decode(errors="replace")
    assert code == 0, stderr
    uuid = lines[0][1]
    values = [json.loads(text) for _, text in lines[1:]]
    check_values(values, n_values)
    assert {v["pid"] for v in values} == {worker.pid}
    # Live: the first value was printed well before the last (0.4 s between values).
    assert lines[-1][0] - lines[1][0] >= 1.0, lines
    assert f"success: {n_values} values" in stderr, stderr

    status = await asyncio.to_thread(
        subprocess.run,
        cluster.qtasks_argv("status", uuid),
        cwd=ROOT,
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["uuid"] == uuid
    assert shown["status"] == "success"
    assert shown["attempt"] == 1
    assert shown["yield_count"] == n_values
    assert f"-{worker.pid}-" in shown["worker"]


# -- 6. the operator's commands --------------------------------------------------------------


async def test_the_operator_commands_against_two_workers(make_cluster: Callable[..., Workers]) -> None:
    cluster = make_cluster()
    workers = [cluster.start_worker(concurrency=4) for _ in range(2)]
    await cluster.wait_assigned(workers)
    app = await cluster.client()

    async def qtasks(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            cluster.qtasks_argv(*args),
            cwd=ROOT,
            env=cluster.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    long = [await app.add_task("long_run", 60) for _ in range(4)]
    for task in long:
        await app.view.wait_for(task.uuid, lambda h: h is not None and h.status == "process", 30)

    shown = await qtasks("inspect", "--json")
    assert shown.returncode == 0, shown.stderr
    group = json.loads(shown.stdout)
    assert group["state"] == "Stable"
    assert sorted(p for w in group["workers"] for p in w["partitions"]) == list(range(PARTITIONS))
    pids = {int(w["worker"].split("-")[-2]) for w in group["workers"]}
    assert pids == {w.pid for w in workers}
    running = {t["uuid"]: w["worker"] for w in group["workers"] for t in w["running"]}
    assert set(running) == {t.uuid for t in long}
    assert [p["partition"] for p in group["partitions"]] == list(range(PARTITIONS))
    assert group["lag"] == sum(p["lag"] for p in group["partitions"]) >= 4  # running ones are not committed
    table = await qtasks("inspect")
    assert table.returncode == 0 and f"group {app.group_id}: Stable, 2 worker(s)" in table.stdout, table.stderr

    listed = await qtasks("tasks", "--status", "process", "--json")
    assert {t["uuid"] for t in json.loads(listed.stdout)} == {t.uuid for t in long}

    cancelled = await qtasks("cancel", long[0].uuid, "--reason", "an operator said so")
    assert cancelled.returncode == 0, cancelled.stderr
    final = await app.wait(long[0].uuid, timeout=30)
    assert (final.status, final.cancel_reason) == ("cancel", "an operator said so")
    again = await qtasks("cancel", long[0].uuid)
    assert again.returncode == 1 and "is not queued or running" in again.stderr

    await app.core.broker.producer.send(app.topics.tasks, b"{broken", key=b"bad-record", partition=1)
    await app.core.broker.producer.flush()
    letters: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while not letters:
        assert time.monotonic() < deadline, "the bad record never reached the dead-letter topic"
        listing = await qtasks("dlq", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        letters = json.loads(listing.stdout)
    [letter] = letters
    assert (letter["topic"], letter["partition"], letter["key"]) == (app.topics.tasks, 1, "bad-record")
    assert "not valid JSON" in letter["reason"]
    one = json.loads((await qtasks("dlq", "show", str(letter["number"]), "--json")).stdout)
    assert one["value"] == "{broken"
    refused = await qtasks("dlq", "replay", str(letter["number"]))
    assert refused.returncode == 1 and "still does not decode" in refused.stderr

    tail = await asyncio.create_subprocess_exec(
        *cluster.qtasks_argv("tail", "--json", "--count", "3"),
        cwd=ROOT,
        env=cluster.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    submitted: set[str] = set()
    try:
        async with asyncio.timeout(60):
            while tail.returncode is None:  # until it has seen 3 changes (it starts at the log's end)
                submitted.add((await app.add_task("gen", 1)).uuid)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await tail.wait()
            out, err = await tail.communicate()
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
    assert tail.returncode == 0, err.decode()
    changes = [json.loads(line) for line in out.decode().splitlines()]
    # Changes of this app's tasks as they are written: the new ones, and lease renewals of the long ones.
    assert len(changes) == 3 and {c["uuid"] for c in changes} <= submitted | {t.uuid for t in long}
    for task in long[1:]:
        await app.cancel(task.uuid)


# -- delayed tasks ------------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_sigkill_of_the_worker_holding_delayed_tasks_loses_none_and_runs_none_early(
    make_cluster: Callable[..., Workers],
) -> None:
    cluster = make_cluster(kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=1000)
    victim = cluster.start_worker(concurrency=4)
    await cluster.wait_assigned([victim])
    await until(lambda: "moves on the delayed tasks of levels" in victim.log(), 60, "the victim to own the delays")
    app = await cluster.client()
    # Due in 8 s (the 4 s level) and 20 s (the 16 s level): the victim holds both when it dies.
    soon = await app.add_tasks("gen", [(2,)] * 40, countdown=8)
    later = await app.add_tasks("gen", [(2,)] * 40, countdown=20)
    handles = soon + later
    uuids = [h.uuid for h in handles]
    await asyncio.sleep(3.0)
    victim.popen.kill()
    await asyncio.to_thread(victim.popen.wait, 10)
    assert finished(app, uuids) == 0
    survivor = cluster.start_worker(concurrency=4)
    await cluster.wait_assigned([survivor])

    finals = await wait_all(app, uuids, timeout=150)

    assert Counter(t.status for t in finals.values()) == {"success": len(uuids)}
    for handle in handles:
        final = finals[handle.uuid]
        assert final.started_at >= handle.task.not_before, (final, handle.task.not_before)
        assert survivor.ran(final), final
    scanned = await scan_results(app)
    assert all(executions(scanned[u]) == [1] for u in uuids), {u: executions(scanned[u]) for u in uuids}
    late = [finals[h.uuid].started_at - h.task.not_before for h in handles]
    print(
        f"delayed tasks after a kill -9 of their holder: {len(uuids)} ran once, none early; late by {min(late):.1f}-{max(late):.1f} s"
    )


# -- periodic tasks -----------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_sigkill_of_the_ticking_worker_loses_no_tick_and_runs_none_twice(
    make_cluster: Callable[..., Workers], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QTASKS_FAULT_PERIODIC", "1")  # the app's `beat`, every second
    cluster = make_cluster(kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=1000)
    workers = [cluster.start_worker(concurrency=4), cluster.start_worker(concurrency=4)]
    await cluster.wait_assigned(workers)
    # The ticking worker is the one that owns level 0 once the delays group has settled (both
    # workers may have ticked for a while: the first to join leads until the second joins).
    await cluster.wait_levels(workers)
    leader, other = workers if 0 in workers[0].levels()[-1] else workers[::-1]
    await until(lambda: "ticks the periodic tasks" in leader.log().split("moves on the delayed")[-1], 60, "it to tick")
    app = await cluster.client()
    started = time.time()
    await asyncio.sleep(4.0)
    ticked = other.log().count("ticks the periodic tasks")
    leader.popen.kill()
    await asyncio.to_thread(leader.popen.wait, 10)
    killed = time.time()
    await until(lambda: other.log().count("ticks the periodic tasks") > ticked, 60, "the other worker to tick")
    took_over = time.time()
    await asyncio.sleep(4.0)
    ticks = [float(t) for t in range(math.ceil(started), math.floor(time.time()) - 1)]
    uuids = [tick_uuid(cluster.name, "beat", t) for t in ticks]

    finals = await wait_all(app, uuids, timeout=60)

    assert Counter(t.status for t in finals.values()) == {"success": len(ticks)}
    scanned = await scan_results(app)
    assert all(executions(scanned[u]) == [1] for u in uuids), {
        t: executions(scanned[u]) for t, u in zip(ticks, uuids, strict=True)
    }
    print(
        f"periodic, kill -9 of the ticking worker: {len(ticks)} ticks, each run once; "
        f"the other worker ticked {took_over - killed:.1f} s after the kill"
    )
