"""Fixtures for every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _structlog_config_restored() -> Iterator[None]:
    """Each test ends with structlog configured as it began. Some tests configure logging
    (a level, a stream to read back); left behind, a warning threshold made a later test's
    ``capture_logs`` see nothing, depending on the order the tests ran in."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
