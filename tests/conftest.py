"""Fixtures shared by every suite: ``broker_url`` is memory:// unless a suite overrides it.

Also how the suite runs in parallel (``make test``: pytest-xdist, ``--dist loadgroup``). Each test
file is one unit of work, run whole by one worker process, so a file's module fixtures (a broker
of its own, a secure cluster) start once. Two suites are one unit each:

- ``tests/faults``: its tests kill, freeze and restart brokers and workers on timings of a few
  seconds (leases, sessions), so they run one after another, never beside each other;
- ``tests/secure``: its session broker (SASL_SSL, an authorizer) starts once.

What the fault tests measured is sent from their worker to the run's end-of-run table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from qtasks.asyncio import QueueTasks
from tests.faults.report import MEASURED, Measured, table
from tests.helpers import FAST, unique

#: Directories whose tests form one unit of work, run by one worker.
ONE_UNIT = ("tests/faults/", "tests/secure/")


def unit_of_work(nodeid: str) -> str:
    """The unit a test runs in: its file, or the suite of ``ONE_UNIT`` it belongs to."""
    path = nodeid.split("::", 1)[0]
    return next((unit for unit in ONE_UNIT if path.startswith(unit)), path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile``, with each suite of ``ONE_UNIT`` one unit.

    A scheduler of our own, not ``xdist_group`` marks: pytest 9.2's structured test ids drop
    the group suffix that pytest-xdist 3.8's ``loadgroup`` writes into them, so it silently
    spreads a group over every worker (pytest-xdist issue 1386).
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return unit_of_work(nodeid)

    return ByUnit(config, log)


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)
    if output is not None:  # a parallel worker: hand the measurements to the controller
        output["faults_measured"] = [dataclasses.asdict(row) for row in MEASURED]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    output = getattr(node, "workeroutput", None) or {}
    MEASURED.extend(Measured(**row) for row in output.get("faults_measured", []))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What each fault cost, printed at the end of every run that had fault tests."""
    if MEASURED:
        terminalreporter.section("faults: what each cost")
        terminalreporter.write_line(table(MEASURED))


@pytest.fixture
def broker_url() -> str:
    return f"memory://{unique('log')}"


@pytest.fixture
def app_settings() -> dict[str, Any]:
    """Settings every app of a test module gets (a module overrides it: the exactly-once suites)."""
    return {}


@pytest.fixture
async def make_app(broker_url: str, app_settings: dict[str, Any]) -> AsyncIterator[Callable[..., QueueTasks]]:
    apps: list[QueueTasks] = []

    def make(name: str | None = None, **settings: Any) -> QueueTasks:
        app = QueueTasks(name=name or unique(), broker_url=broker_url, **{**FAST, **app_settings, **settings})
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.stop(timeout=2)


@pytest.fixture
async def app(make_app: Callable[..., QueueTasks]) -> QueueTasks:
    return make_app()


@pytest.fixture
async def faulty_app() -> AsyncIterator[Callable[..., QueueTasks]]:
    """Apps on the fault-injecting connector over memory://; its faults are cleared before they stop."""
    apps: list[QueueTasks] = []

    def make(log: str | None = None, name: str | None = None, **settings: Any) -> QueueTasks:
        """An app on the log ``log`` (several apps on one log are one cluster), named ``name``."""
        url = f"faulty+memory://{log or unique('log')}"
        app = QueueTasks(name=name or unique(), broker_url=url, **{**FAST, **settings})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.broker.faults.clear()  # type: ignore[attr-defined]
        await app.stop(timeout=2)
