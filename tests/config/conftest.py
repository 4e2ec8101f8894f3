"""The config every config test starts from, and how they read its refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bridge.config.model import build_config
from bridge.destinations.base import ConfigError
from tests.e2e.harness import config_dict


@pytest.fixture
def raw(tmp_path: Path) -> dict[str, Any]:
    return config_dict(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        build_config(raw)
    return str(exc.value)
