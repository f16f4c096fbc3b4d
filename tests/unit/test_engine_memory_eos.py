"""The engine suite on memory://, exactly-once: every behaviour holds with transactions too."""

from __future__ import annotations

from typing import Any

import pytest

from tests.engine_suite import *  # noqa: F403


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {"processing_guarantee": "exactly_once"}
