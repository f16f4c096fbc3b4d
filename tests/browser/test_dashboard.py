"""The dashboard as a user meets it: a browser on its pages, a worker and the dashboard as
processes (``qtasks run``, ``qtasks web``) on a real broker.

Chromium and chromedriver come from Debian's packages (``make browser-deps``, which
``make test`` runs). Set ``QTASKS_SCREENSHOT=path.png`` to keep a screenshot of the task page
(docs/dashboard-task.png is one).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.faults.workers import PARTITIONS, Workers, workers_of
from tests.helpers import free_port

pytestmark = pytest.mark.kafka

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


#: Headless, as root, and quiet: no connection of its own (updates, sync, field trials),
#: which a machine without outside access refuses, and a fresh profile.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def group(tmp_path: Path, broker_url: str) -> AsyncIterator[tuple[Workers, str]]:
    """Two workers and the dashboard, as processes; the dashboard's URL."""
    async with workers_of(tmp_path, broker_url) as make:
        cluster: Workers = make()
        workers = [cluster.start_worker(concurrency=4) for _ in range(2)]
        port = free_port()
        web = cluster.start_command("web", ["web", "--port", str(port)])
        await cluster.wait_assigned(workers)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 60
            while True:
                assert web.alive(), web.tail()
                assert time.monotonic() < deadline, "the dashboard did not answer within 60 s"
                try:
                    if (await client.get(f"{url}/api/group")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                await asyncio.sleep(0.1)
        yield cluster, url


def wait(browser: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 30) -> Any:
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition)


def table(browser: WebDriver, table_id: str) -> list[list[str]]:
    """The cells of a table's body, read at once (the page replaces its rows as it refreshes)."""
    rows: list[list[str]] = browser.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} tbody tr`)].map(r => [...r.cells].map(c => c.textContent))",
        table_id,
    )
    return rows


def values_shown(browser: WebDriver) -> list[Any]:
    return [json.loads(li.text) for li in browser.find_elements(By.CSS_SELECTOR, "#values li.value")]


@pytest.mark.timeout(240)
async def test_submit_a_generator_watch_its_values_arrive_and_cancel_a_running_task(
    group: tuple[Workers, str], browser: WebDriver
) -> None:
    _cluster, url = group
    await asyncio.to_thread(browser.get, url)
    await asyncio.to_thread(wait, browser, lambda b: "2 worker(s)" in b.find_element(By.ID, "group").text)
    # Both workers with their partitions: every tasks partition is someone's.
    rows = table(browser, "workers")
    assert len(rows) == 2
    assert sorted(int(p) for row in rows for p in row[2].split(", ")) == list(range(PARTITIONS))

    # Submit from the page: 8 values, one every 0.4 s.
    Select(browser.find_element(By.NAME, "name")).select_by_visible_text("gen")
    args = browser.find_element(By.NAME, "args")
    args.clear()
    args.send_keys("[8, 0.4]")
    browser.find_element(By.CSS_SELECTOR, "#submit button").click()
    wait(browser, lambda b: "/tasks/" in b.current_url)
    uuid = browser.current_url.rsplit("/", 1)[1]

    # The values come one by one, while the task runs: the page showed some, not all, at some point.
    counts: list[int] = []

    def progressed(b: WebDriver) -> bool:
        counts.append(len(values_shown(b)))
        return counts[-1] == 8

    await asyncio.to_thread(wait, browser, progressed, 60)
    partial = [c for c in counts if 0 < c < 8]
    assert len(set(partial)) >= 3, counts  # seen growing live, not in one piece at the end
    assert [v["i"] for v in values_shown(browser)] == list(range(8))
    await asyncio.to_thread(wait, browser, lambda b: b.find_element(By.ID, "status").text == "success")
    assert browser.find_element(By.ID, "count").text == "8"

    # A long task: its page, the Cancel button, and its end as cancel.
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{url}/api/tasks", json={"name": "long_run", "args": [120]})
        assert response.status_code == 201, response.text
        long_uuid = response.json()["uuid"]
    # The overview lists it among the running tasks, with its worker and attempt.
    await asyncio.to_thread(browser.get, url)
    await asyncio.to_thread(wait, browser, lambda b: long_uuid in b.find_element(By.ID, "running").text)
    [cells] = [row for row in table(browser, "running") if row[0] == long_uuid]
    assert cells[1] == "long_run" and cells[2] and cells[3] == "1"
    await asyncio.to_thread(browser.get, f"{url}/tasks/{long_uuid}")
    await asyncio.to_thread(wait, browser, lambda b: len(values_shown(b)) >= 2)  # running, values arriving
    assert browser.find_element(By.ID, "status").text == "process"
    if path := os.environ.get("QTASKS_SCREENSHOT"):
        browser.save_screenshot(path)
    browser.find_element(By.ID, "cancel").click()
    await asyncio.to_thread(wait, browser, lambda b: b.find_element(By.ID, "status").text == "cancel")
    reason = browser.find_element(By.ID, "cancel-reason").text
    assert reason == "Cancelled: cancelled from the dashboard"
    assert not browser.find_element(By.ID, "cancel").is_displayed()

    # The lists: the tasks page finds both, filtered by status.
    await asyncio.to_thread(browser.get, f"{url}/tasks?status=cancel")
    await asyncio.to_thread(wait, browser, lambda b: long_uuid in b.find_element(By.ID, "tasks").text)
    assert uuid not in browser.find_element(By.ID, "tasks").text


@pytest.mark.timeout(240)
async def test_a_dead_letter_shows_with_its_reason_and_a_replay_that_cannot_work_says_why(
    group: tuple[Workers, str], browser: WebDriver
) -> None:
    cluster, url = group
    app = await cluster.client()
    await app.core.broker.producer.send(app.topics.tasks, b"{oops", key=b"from-a-bad-producer", partition=0)
    await app.core.broker.producer.flush()

    def listed(b: WebDriver) -> bool:
        b.get(f"{url}/dlq")
        WebDriverWait(b, 10).until(lambda b: b.execute_script("return document.readyState") == "complete")
        time_left = time.monotonic() + 2
        while time.monotonic() < time_left:  # the page fills its table with one request
            if "{oops" in b.find_element(By.ID, "letters").text:
                return True
            time.sleep(0.05)
        return False

    await asyncio.to_thread(wait, browser, listed, 60)
    assert "not valid JSON" in browser.find_element(By.ID, "letters").text
    browser.find_element(By.CSS_SELECTOR, "#letters button.replay").click()
    await asyncio.to_thread(wait, browser, lambda b: "still does not decode" in b.find_element(By.ID, "outcome").text)
