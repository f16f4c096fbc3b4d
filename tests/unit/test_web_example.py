"""docs/examples/web.py as a browser meets it: a real server (uvicorn, in its own process)
and an HTTP client reading Server-Sent Events: live values, a cancel and a failure
mid-stream, and a resume from Last-Event-ID."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("web") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", "docs/examples", "web:api", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, "QTASKS_BROKER_URL": "memory://web"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/jobs/nope").status_code == 404:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def events(client: httpx.AsyncClient, path: str, **headers: str) -> AsyncIterator[dict[str, Any]]:
    """Each SSE event as {"event", "id", "data", "at"} as it arrives."""
    async with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, Any] = {}
        async for line in response.aiter_lines():
            if not line:
                if fields:
                    yield {"event": "message", **fields, "at": time.monotonic()}
                fields = {}
                continue
            key, _, value = line.partition(": ")
            fields[key] = json.loads(value) if key == "data" else value


async def submit(client: httpx.AsyncClient, **params: Any) -> str:
    response = await client.post("/jobs", params=params)
    assert response.status_code == 200
    return str(response.json()["uuid"])


async def test_values_arrive_live_then_the_end(server: str) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=30) as client:
        uuid = await submit(client, n=5, delay=0.2)
        got = [e async for e in events(client, f"/jobs/{uuid}/events")]
    values = [e for e in got if e["event"] == "message"]
    assert [e["data"] for e in values] == [{"i": i} for i in range(5)]
    assert [e["id"] for e in values] == [f"{uuid}/{i}" for i in range(5)]
    assert values[-1]["at"] - values[0]["at"] >= 0.5  # live: spread over the job's run
    assert got[-1]["event"] == "end" and got[-1]["data"]["status"] == "success"


async def test_a_cancel_mid_stream_ends_the_stream_with_its_reason(server: str) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=30) as client:
        uuid = await submit(client, n=100, delay=0.05)
        got = []
        async for e in events(client, f"/jobs/{uuid}/events"):
            got.append(e)
            if len(got) == 3:
                assert (await client.delete(f"/jobs/{uuid}")).json() == {"cancelled": True}
        assert (await client.get(f"/jobs/{uuid}")).json()["status"] == "cancel"
    assert got[-1]["event"] == "end"
    assert got[-1]["data"]["status"] == "cancel" and got[-1]["data"]["cancel_reason"] == "cancelled from the web"
    assert 3 <= len(got) - 1 < 100


async def test_a_failure_mid_stream_ends_it_with_the_error(server: str) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=30) as client:
        uuid = await submit(client, n=10, delay=0.05, fail_at=3)
        got = [e async for e in events(client, f"/jobs/{uuid}/events")]
    assert [e["data"] for e in got[:-1]] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert got[-1]["event"] == "end"
    assert got[-1]["data"]["status"] == "error" and got[-1]["data"]["error"] == "RuntimeError: failed at 3"


async def test_a_reconnect_with_last_event_id_resumes_after_it(server: str) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=30) as client:
        uuid = await submit(client, n=8, delay=0.1)
        first = []
        async for e in events(client, f"/jobs/{uuid}/events"):
            first.append(e)
            if len(first) == 3:
                break  # the connection drops after seq 2
        resumed = [e async for e in events(client, f"/jobs/{uuid}/events", **{"Last-Event-ID": first[-1]["id"]})]
    assert [e["data"]["i"] for e in first] == [0, 1, 2]
    assert [e["data"]["i"] for e in resumed[:-1]] == [3, 4, 5, 6, 7]  # nothing twice, nothing missed
    assert resumed[-1]["event"] == "end" and resumed[-1]["data"]["status"] == "success"


async def test_a_malformed_last_event_id_is_a_clear_400(server: str) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=30) as client:
        uuid = await submit(client, n=2, delay=0.01)
        for bad in ("garbage", f"{uuid}/x", "/3"):
            response = await client.get(f"/jobs/{uuid}/events", headers={"Last-Event-ID": bad})
            assert response.status_code == 400, (bad, response.text)


async def test_a_reconnect_after_the_end_gets_204_and_bad_uuids_get_400(server: str) -> None:
    async with httpx.AsyncClient(base_url=server, timeout=30) as client:
        uuid = await submit(client, n=2, delay=0.01)
        got = [e async for e in events(client, f"/jobs/{uuid}/events")]
        last_id = [e for e in got if e["event"] == "message"][-1]["id"]
        again = await client.get(f"/jobs/{uuid}/events", headers={"Last-Event-ID": last_id})
        assert again.status_code == 204  # a browser's EventSource stops reconnecting
        for bad in ("not-a-uuid", "x" * 40):
            assert (await client.get(f"/jobs/{bad}")).status_code in (400, 404)
            assert (await client.delete(f"/jobs/{bad}")).status_code in (400, 404)
        assert (await client.get("/jobs/3b878272-66f2-4dbc-83e7-e54bb4289bb7")).status_code == 404
