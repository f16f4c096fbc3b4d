"""The dashboard's HTTP side on memory:// (the browser suite drives its pages on Kafka)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
import pytest

from qtasks import ops, web
from qtasks.asyncio import QueueTasks
from qtasks.exc import BrokerUnavailableError
from qtasks.web import create_app
from tests.helpers import FAST, free_port, unique


@pytest.fixture
async def app() -> AsyncIterator[QueueTasks]:
    app = QueueTasks(name=unique(), broker_url=f"memory://{unique('log')}", **FAST)

    @app.task
    async def count(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield {"i": i}

    @app.task
    def fails() -> None:
        raise ValueError("as planned")

    @app.task
    def echo(timeout: float, priority: str) -> list[object]:
        return [timeout, priority]

    await app.start()
    yield app
    await app.stop(timeout=2)


@pytest.fixture
async def client(app: QueueTasks) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(app)), base_url="http://dash") as client:
        yield client


JSON = {"content-type": "application/json"}


def events(text: str) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


async def test_a_submitted_task_streams_its_values_then_its_end(app: QueueTasks, client: httpx.AsyncClient) -> None:
    created = await client.post("/api/tasks", json={"name": "count", "args": [3]})
    assert created.status_code == 201
    uuid = created.json()["uuid"]
    response = await client.get(f"/api/tasks/{uuid}/events")
    assert response.headers["content-type"].startswith("text/event-stream")
    got = events(response.text)
    assert [(kind, data.get("seq"), data.get("value")) for kind, data in got[:-1]] == [
        ("value", i, {"i": i}) for i in range(3)
    ]
    assert got[-1][0] == "end" and got[-1][1]["status"] == "success"
    assert (await client.get(f"/api/tasks/{uuid}")).json()["yield_count"] == 3
    listed = (await client.get("/api/tasks", params={"status": "success", "name": "count"})).json()
    assert [t["uuid"] for t in listed] == [uuid]
    assert (await client.post(f"/api/tasks/{uuid}/cancel")).status_code == 409  # finished: nothing to cancel


async def test_a_failed_task_ends_its_stream_with_the_traceback(app: QueueTasks, client: httpx.AsyncClient) -> None:
    uuid = (await client.post("/api/tasks", json={"name": "fails"})).json()["uuid"]
    await app.wait(uuid, timeout=10)
    [(kind, data)] = events((await client.get(f"/api/tasks/{uuid}/events")).text)
    assert kind == "end" and data["status"] == "error" and "ValueError: as planned" in str(data["traceback"])


async def test_bad_requests_get_a_clear_answer(client: httpx.AsyncClient) -> None:
    not_json = await client.post("/api/tasks", content=b"not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 400
    assert (await client.post("/api/tasks", json={"args": []})).status_code == 400
    assert (await client.post("/api/tasks", json={"name": "count", "args": "3"})).status_code == 400
    missing = await client.get("/api/tasks/0b1c2d3e-0000-4000-8000-000000000000")
    assert missing.status_code == 404
    assert (await client.get("/api/tasks", params={"limit": "many"})).status_code == 400
    assert (await client.post("/api/dlq/7/replay")).status_code == 404


async def test_a_hostile_task_name_in_the_address_is_shown_as_text(client: httpx.AsyncClient) -> None:
    # Any non-empty text names a task (a foreign producer's record may): it must not become markup or script.
    # (A path segment holds no "/": "</script>" cannot come this way, and is escaped anyway.)
    hostile = '"><img src=x onerror=alert(1)>'
    page = (await client.get(f"/tasks/{quote(hostile)}")).text
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # the heading
    assert 'const uuid = "\\"\\u003e\\u003cimg src=x onerror=alert(1)\\u003e"' in page  # the script's constant


async def test_the_pages_are_served(client: httpx.AsyncClient) -> None:
    for path in ("/", "/tasks", "/dlq"):
        response = await client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "<option>count</option>" in (await client.get("/")).text  # the submit form offers the app's tasks


async def test_what_another_site_could_make_a_browser_send_is_refused(
    app: QueueTasks, client: httpx.AsyncClient
) -> None:
    task = {"name": "count", "args": [1]}
    # A form on another site: no preflight for text/plain, and its Origin says where it is from.
    form = await client.post("/api/tasks", content=json.dumps(task), headers={"content-type": "text/plain"})
    assert form.status_code == 403
    foreign = await client.post("/api/tasks", json=task, headers={"origin": "https://evil.example"})
    assert foreign.status_code == 403 and foreign.json() == {"error": "a request from another site"}
    assert (await client.post("/api/tasks", json=task, headers={"sec-fetch-site": "cross-site"})).status_code == 403
    assert (await client.post("/api/dlq/replay", headers={"origin": "https://evil.example"})).status_code == 403
    # The page's own requests pass.
    own = await client.post("/api/tasks", json=task, headers={"origin": "http://dash", "sec-fetch-site": "same-origin"})
    assert own.status_code == 201

    # DNS rebinding: a name the dashboard is not served as.
    rebound = httpx.ASGITransport(app=create_app(app, ["127.0.0.1", "localhost"]))
    async with httpx.AsyncClient(transport=rebound, base_url="http://127.0.0.1:8000") as local:
        assert (await local.get("/api/tasks")).status_code == 200
        stolen = await local.get("/api/tasks", headers={"host": "attacker.example:8000"})
        assert stolen.status_code == 403 and "attacker.example" in stolen.json()["error"]


async def test_a_task_s_own_arguments_named_like_add_task_s_options_reach_it(
    app: QueueTasks, client: httpx.AsyncClient
) -> None:
    created = await client.post("/api/tasks", json={"name": "echo", "kwargs": {"timeout": 0.5, "priority": "high"}})
    assert created.status_code == 201
    final = await app.wait(created.json()["uuid"], timeout=10)
    assert final.returning == [0.5, "high"]


async def test_a_reconnecting_event_source_goes_on_after_its_last_value(
    app: QueueTasks, client: httpx.AsyncClient
) -> None:
    uuid = (await client.post("/api/tasks", json={"name": "count", "args": [4]})).json()["uuid"]
    await app.wait(uuid, timeout=10)
    resumed = await client.get(f"/api/tasks/{uuid}/events", headers={"last-event-id": f"{uuid}/1"})
    got = events(resumed.text)
    assert [data["seq"] for kind, data in got if kind == "value"] == [2, 3]
    assert "id: " + f"{uuid}/3" in resumed.text and got[-1][0] == "end"
    done = await client.get(f"/api/tasks/{uuid}/events", headers={"last-event-id": f"{uuid}/3"})
    assert done.status_code == 204  # everything was sent: the browser stops reconnecting
    bad = await client.get(f"/api/tasks/{uuid}/events", headers={"last-event-id": "nonsense"})
    assert bad.status_code == 400


async def test_a_body_over_the_limit_is_refused_whatever_its_length_says_and_nothing_is_submitted(
    app: QueueTasks,
) -> None:
    dashboard = create_app(app, max_body=1000)
    big = json.dumps({"name": "count", "args": [1], "kwargs": {"pad": "x" * 2000}}).encode()

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for at in range(0, len(big), 100):
            yield big[at : at + 100]

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=dashboard), base_url="http://dash") as client:
        said = await client.post("/api/tasks", content=big, headers={"content-type": "application/json"})
        assert said.status_code == 413 and "at most 1000 bytes" in said.json()["error"]
        unsaid = await client.post("/api/tasks", content=chunked(), headers={"content-type": "application/json"})
        assert unsaid.status_code == 413
        assert (await client.get("/api/tasks")).json() == []
        assert (await client.post("/api/tasks", json={"name": "count", "args": [1]})).status_code == 201


async def test_a_request_the_broker_does_not_answer_gets_a_504_but_an_event_stream_lasts_as_long_as_its_task(
    app: QueueTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unanswered(*args: object, **kwargs: object) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(ops, "inspect_group", unanswered)

    @app.task
    async def slowly() -> AsyncIterator[int]:
        for i in range(3):
            await asyncio.sleep(0.2)
            yield i

    dashboard = create_app(app, request_timeout=0.3)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=dashboard), base_url="http://dash") as client:
        started = time.monotonic()
        stuck = await client.get("/api/group")
        assert stuck.status_code == 504 and "no answer within 0.3 s" in stuck.json()["error"]
        assert time.monotonic() - started < 2
        assert (await client.get("/api/group")).status_code == 504  # the next one is not stuck behind it
        uuid = (await client.post("/api/tasks", json={"name": "slowly"})).json()["uuid"]
        streamed = events((await client.get(f"/api/tasks/{uuid}/events")).text)
        assert [kind for kind, _ in streamed] == ["value", "value", "value", "end"]


async def test_a_broker_away_is_a_503_and_a_handler_s_own_timeout_is_not_called_the_dashboard_s(
    app: QueueTasks, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def away(*args: object, **kwargs: object) -> None:
        raise BrokerUnavailableError("no broker")

    async def own_timeout(*args: object, **kwargs: object) -> None:
        raise TimeoutError("an inner wait ran out")

    transport = httpx.ASGITransport(app=create_app(app), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
        monkeypatch.setattr(ops, "list_tasks", away)
        answer = await client.get("/api/tasks")
        assert answer.status_code == 503 and "the broker is away: no broker" in answer.json()["error"]
        monkeypatch.setattr(ops, "list_tasks", own_timeout)
        assert (await client.get("/api/tasks")).status_code == 500  # a bug to see, not "no answer in 30 s"
        big = await client.post("/api/tasks", content=b"[" + b"1," * 600_000 + b"1]", headers=JSON)
        assert big.status_code == 413 and big.headers["connection"] == "close"  # not read on


async def test_the_server_refuses_connections_past_its_limit_and_stops_with_streams_open(
    app: QueueTasks, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(web, "MAX_CONNECTIONS", 2)

    @app.task
    async def endless() -> AsyncIterator[int]:
        while True:
            await asyncio.sleep(0.05)
            yield 1

    port = free_port()
    server = web._server(app, "127.0.0.1", port, web.LOOPBACK)
    serving = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    clients = [httpx.AsyncClient(base_url=base, timeout=10) for _ in range(3)]
    try:
        while not server.started:
            assert not serving.done(), serving
            await asyncio.sleep(0.02)
        uuid = (await clients[0].post("/api/tasks", json={"name": "endless"})).json()["uuid"]
        # Three task pages open at once, on connections of their own: the one past the limit is
        # refused (uvicorn counts the connection asking too).
        streams = [client.stream("GET", f"/api/tasks/{uuid}/events") for client in clients]
        opened = [await stream.__aenter__() for stream in streams]
        answers = [response.status_code for response in opened]
        assert answers[0] == 200 and answers[-1] == 503 and answers.count(200) <= 2
        first = opened[0].aiter_text()
        assert "event: value" in await first.__anext__()
        stopping = time.monotonic()
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        # The open streams ended as the server stopped: not held until SHUTDOWN_TIMEOUT, then cancelled.
        assert time.monotonic() - stopping < web.SHUTDOWN_TIMEOUT - 2
        async for _ in first:  # read to its end: a body broken off raises here
            pass
        assert "Exception in ASGI application" not in capfd.readouterr().err
    finally:
        server.should_exit = True
        for client in clients:
            await client.aclose()
        if not serving.done():
            serving.cancel()
