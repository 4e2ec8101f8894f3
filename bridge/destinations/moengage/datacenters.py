"""MoEngage data centers: the host each one serves and the region it sits in."""

from __future__ import annotations

from bridge.destinations.base import ConfigError

# 01 and 04 are both US; 101 has no published region.
REGIONS: dict[str, str | None] = {
    "01": "us",
    "02": "eu",
    "03": "in",
    "04": "us",
    "05": "sg",
    "06": "id",
    "101": None,
}


def normalise_data_center(value: object, where: str) -> str:
    """The canonical data-center code ("01" ... "06", "101") for a str or int value."""
    valid = ", ".join(f'"{dc}"' for dc in REGIONS)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigError(f"{where}: must be one of {valid}, got {value!r}")
    text = str(value).strip()
    code = text.zfill(2) if text.isdigit() else text
    if code not in REGIONS:
        raise ConfigError(f"{where}: unknown data center {value!r}; valid values are {valid}")
    return code


def default_base_url(data_center: str) -> str:
    return f"https://api-{data_center}.moengage.com"
