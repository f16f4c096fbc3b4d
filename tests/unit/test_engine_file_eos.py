"""The engine suite on file://, exactly-once: transactions are journaled and replayed too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qtasks.connectors.file_log import close_file_log
from tests.engine_suite import *  # noqa: F403


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    url = f"file://{tmp_path}/log"
    yield url
    close_file_log(url)


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {"processing_guarantee": "exactly_once"}
