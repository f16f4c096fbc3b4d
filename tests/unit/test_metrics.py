"""The metrics endpoint as Prometheus and a Kubernetes probe meet it: counts, gauges, health, readiness."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qtasks.asyncio import QueueTasks
from qtasks.metrics import MetricsServer
from qtasks.stats import BUCKETS, Histogram
from tests.helpers import FAST, free_port, unique

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(app: QueueTasks) -> Samples:
    assert app.metrics is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{app.metrics.port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


async def serve(app: QueueTasks) -> MetricsServer:
    """The app's metrics server on a free port, every scrape fresh (no reuse of the last one)."""
    server = await app.serve_metrics(port=0, host="127.0.0.1")
    server.CACHE = 0.0
    return server


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.02)


@pytest.fixture
async def make_app() -> AsyncIterator[Callable[..., QueueTasks]]:
    apps: list[QueueTasks] = []

    def make(url: str = "memory://", **settings: Any) -> QueueTasks:
        app = QueueTasks(name=unique(), broker_url=f"{url}{unique('log')}", **{**FAST, **settings})
        apps.append(app)
        return app

    yield make
    for app in apps:
        faults = getattr(app.broker, "faults", None)
        if faults is not None:
            faults.clear()
        await app.stop(timeout=2)


async def test_a_scrape_counts_what_the_worker_and_the_client_did(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()

    @app.task
    async def numbers(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    @app.task
    def broken() -> None:
        raise ValueError("broken on purpose")

    @app.task(retry=1)
    def flaky() -> None:
        raise RuntimeError("always")

    await app.start()
    await serve(app)
    for _ in range(3):
        task = await app.add_task("numbers", 4)
        assert [v async for v in app.stream(task.uuid)] == [0, 1, 2, 3]
    assert (await app.add_task("broken", timeout=10)).status == "error"
    assert (await app.add_task("no_such_task", timeout=10)).status == "error"
    final = await app.add_task("flaky", timeout=10)  # waits through the retry chain
    assert final.status == "error" and final.retry_count == 1

    samples = await scrape(app)
    assert sample(samples, "qtasks_tasks_received_total", task="numbers") == 3
    assert sample(samples, "qtasks_tasks_started_total", task="numbers") == 3
    assert sample(samples, "qtasks_tasks_succeeded_total", task="numbers") == 3
    assert sample(samples, "qtasks_values_yielded_total", task="numbers") == 12
    assert sample(samples, "qtasks_tasks_failed_total", task="broken") == 1
    # An unknown name is any text a record carries: it gets one label, never its own.
    assert sample(samples, "qtasks_tasks_received_total", task="<unknown>") == 1
    assert sample(samples, "qtasks_tasks_failed_total", task="<unknown>") == 1
    assert sample(samples, "qtasks_tasks_retried_total", task="flaky") == 1
    assert sample(samples, "qtasks_tasks_failed_total", task="flaky") == 1
    assert sample(samples, "qtasks_tasks_started_total", task="flaky") == 2
    assert sample(samples, "qtasks_task_duration_seconds_count", task="numbers") == 3
    assert sample(samples, "qtasks_task_duration_seconds_bucket", task="numbers", le="+Inf") == 3
    assert sample(samples, "qtasks_task_queue_wait_seconds_count", task="broken") == 1
    assert sample(samples, "qtasks_task_first_value_seconds_count", task="numbers") == 3
    assert sample(samples, "qtasks_task_first_value_seconds_count", task="broken") is None  # no value, no sample
    assert sample(samples, "qtasks_client_tasks_submitted_total", task="numbers") == 3
    assert sample(samples, "qtasks_client_tasks_submitted_total", task="no_such_task") == 1
    assert sample(samples, "qtasks_client_stream_latency_seconds_count") == 12
    assert sample(samples, "qtasks_broker_reachable") == 1
    assert sample(samples, "qtasks_tasks_running") == 0
    assert sample(samples, "qtasks_worker_free_slots") == app.worker.concurrency  # type: ignore[union-attr]
    assert sample(samples, "process_cpu_seconds_total") is not None  # the process collector is there too


async def test_a_running_generator_shows_its_values_and_takes_a_slot(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app(concurrency=4)
    go_on = asyncio.Event()

    @app.task
    async def slow(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i
        await go_on.wait()
        yield n

    await app.start()
    await serve(app)
    task = await app.add_task("slow", 3)

    async def three_values_so_far() -> bool:
        return sample(await scrape(app), "qtasks_values_yielded_total", task="slow") == 3

    await until(three_values_so_far)
    samples = await scrape(app)
    assert sample(samples, "qtasks_tasks_running") == 1
    assert sample(samples, "qtasks_worker_free_slots") == 3

    async def renewed() -> bool:  # the run outlives lease_interval (0.5 s here)
        return (sample(await scrape(app), "qtasks_lease_renewals_total") or 0) >= 1

    await until(renewed)
    go_on.set()
    assert (await app.wait(task.uuid, timeout=10)).status == "success"
    samples = await scrape(app)
    assert sample(samples, "qtasks_values_yielded_total", task="slow") == 4  # moved from the run to the total
    assert sample(samples, "qtasks_tasks_running") == 0


async def test_records_waiting_for_a_slot_show_as_lag_until_committed(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app(concurrency=1, prefetch=0, tasks_partitions=1)
    go_on = asyncio.Event()

    @app.task
    async def hold() -> None:
        await go_on.wait()

    await app.start()
    await serve(app)
    tasks = [await app.add_task("hold") for _ in range(5)]
    tp = {"topic": app.topics.tasks, "partition": "0"}

    async def five_behind() -> bool:
        return sample(await scrape(app), "qtasks_consumer_lag", **tp) == 5

    await until(five_behind)
    samples = await scrape(app)
    assert sample(samples, "qtasks_offsets_uncommitted", **tp) == 1  # the one running; the rest wait in Kafka
    assert sample(samples, "qtasks_worker_free_slots") == 0
    go_on.set()
    for task in tasks:
        await app.wait(task.uuid, timeout=10)

    async def none_behind() -> bool:
        samples = await scrape(app)
        return (
            sample(samples, "qtasks_consumer_lag", **tp) == 0
            and sample(samples, "qtasks_offsets_uncommitted", **tp) == 0
        )

    await until(none_behind)


async def test_a_malformed_record_is_counted_by_the_kind_of_its_problem(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()
    await app.start()
    await serve(app)
    await app.broker.producer.send(app.topics.tasks, b"{not json", key=b"k", partition=0)
    await app.broker.producer.send(app.topics.tasks, None, key=b"k", partition=0)
    await app.broker.producer.flush()

    async def counted() -> bool:
        samples = await scrape(app)
        return (
            sample(samples, "qtasks_dead_letters_total", reason="not_json") == 1
            and sample(samples, "qtasks_dead_letters_total", reason="no_value") == 1
        )

    await until(counted)


async def test_readiness_follows_the_worker_and_the_broker(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app("faulty+memory://")
    server = await serve(app)
    url = f"http://127.0.0.1:{server.port}"
    assert sample(await scrape(app), "qtasks_broker_reachable") == 0  # not reached yet
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/healthz")).status_code == 200
        before = await client.get(f"{url}/readyz")
        assert before.status_code == 503
        assert before.json() == {"ready": False, "problems": ["no worker has started"]}
        await app.start()
        assert (await client.get(f"{url}/readyz")).json() == {"ready": True, "problems": []}
        app.broker.faults.down()  # type: ignore[attr-defined]
        down = await client.get(f"{url}/readyz")
        assert down.status_code == 503
        assert "the brokers do not answer" in down.json()["problems"][0]
        assert sample(await scrape(app), "qtasks_broker_reachable") == 0
        assert (await client.get(f"{url}/healthz")).status_code == 200  # alive all along
        app.broker.faults.up()  # type: ignore[attr-defined]
        assert (await client.get(f"{url}/readyz")).status_code == 200
    await app.stop()
    assert app.metrics is None  # stopped with the app


async def test_other_paths_methods_and_broken_requests_get_an_answer_and_the_server_goes_on(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()
    server = await app.serve_metrics(port=0, host="127.0.0.1")
    url = f"http://127.0.0.1:{server.port}"
    # A client that connects and says nothing useful, or hangs up mid-request.
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GARBAGE")
    writer.close()
    await writer.wait_closed()
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/nope")).status_code == 404
        assert (await client.post(f"{url}/metrics")).status_code == 405
        head = await client.head(f"{url}/metrics")
        assert head.status_code == 200 and head.content == b""
        assert (await client.get(f"{url}/metrics?x=1")).status_code == 200
    assert await app.serve_metrics() is server  # one server per app


def test_the_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    histogram = Histogram()
    for value in (0.0005, 0.001, 0.2, 7200.0):
        histogram.observe(value)
    buckets = dict(histogram.cumulative())
    assert buckets[repr(BUCKETS[0])] == 2  # le=0.001 holds 0.001 itself
    assert buckets["0.25"] == 3
    assert buckets["3600.0"] == 3
    assert buckets["+Inf"] == 4
    assert histogram.sum == pytest.approx(7200.2015)


QTASKS = [sys.executable, "-m", "qtasks", "-A", "tests.unit.cli_app:app"]


def test_qtasks_run_serves_the_probes_logs_json_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "QTASKS_METRICS_HOST": "127.0.0.1"}
    with open(tmp_path / "worker.log", "wb") as log:
        process = subprocess.Popen(
            [*QTASKS, "run", "--metrics-port", str(port), "--log-format", "json"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=5) as client:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, (tmp_path / "worker.log").read_text()
                assert time.monotonic() < deadline, "not ready within 30 s"
                try:
                    if client.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                time.sleep(0.05)
            assert client.get(f"{url}/healthz").text == "ok\n"
            assert 'qtasks_worker_info{group="cli_demo-workers"' in client.get(f"{url}/metrics").text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        lines = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()]
        assert any(line["message"].startswith("metrics on http://127.0.0.1:") for line in lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_scrapes_within_a_second_share_one_snapshot_and_a_flood_of_connections_is_turned_away(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app()

    @app.task
    def noop() -> None:
        return None

    await app.start()
    server = await app.serve_metrics(port=0, host="127.0.0.1")
    assert server.CACHE == 1.0  # the default: one end-offsets lookup a second, however many scrapers
    server.CACHE = 3600.0  # "within the reuse time", whatever the machine's speed
    first = await scrape(app)
    await app.add_task("noop", timeout=10)
    assert await scrape(app) == first  # the same snapshot, though a task ran since
    server.CACHE = 0.0
    assert sample(await scrape(app), "qtasks_tasks_succeeded_total", task="noop") == 1

    # Idle connections beyond the cap are closed at once; the server still answers afterwards.
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(server.MAX_CONNECTIONS)]
    extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(extra_reader.read(), 5) == b""  # turned away: closed with no answer
    for _, writer in idle:
        writer.close()
    extra_writer.close()
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{server.port}/healthz")).status_code == 200


async def test_delayed_periodic_keyed_and_chord_work_shows_in_the_metrics(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app()
    gate = asyncio.Event()
    ticked = asyncio.Event()

    @app.task
    async def hold() -> int:
        await gate.wait()
        return 1

    @app.periodic(every=1)
    async def beat() -> None:
        ticked.set()

    await app.start()
    await serve(app)
    await app.add_task("hold", countdown=30)  # held in a delay level
    first = await app.add_task("hold", key="k")
    await app.add_task("hold", key="k")  # waits behind the first of its key
    await app.chord("hold", [()], "hold")  # its callback waits for the chord's task
    await asyncio.wait_for(ticked.wait(), 20)
    await app.view.wait_for(first.uuid, lambda h: h is not None and h.status == "process", 20)
    samples = await scrape(app)
    assert sample(samples, "qtasks_delays_held") == 1
    assert sample(samples, "qtasks_worker_waiting_for_key") == 1
    assert sample(samples, "qtasks_worker_chords_waiting") == 1
    assert sample(samples, "qtasks_periodic_ticking") == 1
    assert sample(samples, "qtasks_periodic_submitted_total") >= 1
    assert sample(samples, "qtasks_delays_moved_total") == 0
    gate.set()
