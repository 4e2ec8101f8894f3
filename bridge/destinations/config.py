"""Small validators for destination config entries, with precise ConfigError messages."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, overload

from bridge.config_values import as_text
from bridge.destinations.base import ConfigError
from bridge.destinations.http import check_url
from bridge.suggest import did_you_mean


def check_keys(cfg: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    """Reject keys this destination kind does not know, suggesting the closest one."""
    for key in cfg:
        if key in allowed:
            continue
        hint = did_you_mean(str(key), allowed) or f" (valid keys: {', '.join(sorted(allowed))})"
        raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def required_str(cfg: Mapping[str, Any], key: str, where: str) -> str:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{where}.{key}: required")
    # As the sources' string settings: a YAML number (``workspace_id: 12345``) is its text.
    value = as_text(cfg[key], f"{where}.{key}")
    if not value.strip():
        # Most often a secret whose ${VAR} is unset: say so, as the sources' keys do.
        raise ConfigError(f"{where}.{key}: must not be empty (is its environment variable set?)")
    return value


def optional_str(cfg: Mapping[str, Any], key: str, where: str, default: str) -> str:
    if cfg.get(key) is None:
        return default
    return required_str(cfg, key, where)


@overload
def optional_int(cfg: Mapping[str, Any], key: str, where: str, *, default: int, minimum: int, maximum: int) -> int: ...


@overload
def optional_int(
    cfg: Mapping[str, Any], key: str, where: str, *, default: None, minimum: int, maximum: int
) -> int | None: ...


def optional_int(
    cfg: Mapping[str, Any], key: str, where: str, *, default: int | None, minimum: int, maximum: int
) -> int | None:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key}: must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise ConfigError(f"{where}.{key}: must be between {minimum} and {maximum}, got {value}")
    return int(value)


def optional_base_url(cfg: Mapping[str, Any], key: str, where: str) -> str | None:
    """An http(s) URL without a trailing slash, or None when not set."""
    if cfg.get(key) is None:
        return None
    value = required_str(cfg, key, where).strip()
    problem = check_url(value)
    if problem:
        raise ConfigError(f"{where}.{key}: {problem}")
    return value.rstrip("/")
