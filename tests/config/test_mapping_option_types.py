"""A destination's mapping_options of a type its mapping does not declare is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli import main
from bridge.config.model import build_config
from bridge.mapping import load_mapping_dir
from bridge.runtime import check_mappings


@pytest.mark.parametrize(
    ("value", "given"),
    [
        ("yes", 'the string "yes"'),
        ("true", 'the string "true"'),
        (1, "the integer 1"),
        (None, "null (nothing)"),
        ([True], "a list"),
    ],
)
def test_a_mapping_option_of_the_wrong_type_is_refused(raw: dict[str, Any], value: object, given: str) -> None:
    # `anonymous_ids: "yes"` was accepted, and the mapping's `equals: true` never matched:
    # anonymous calls went on being discarded.
    shipped = load_mapping_dir(raw["mappings"]["dir"])
    raw["destinations"][0]["mapping_options"] = {"anonymous_ids": value}
    assert check_mappings(build_config(raw), shipped) == [
        f"destinations[0].mapping_options.anonymous_ids: expected a boolean (true or false), got {given}"
    ]
    raw["destinations"][0]["mapping_options"] = {"anonymous_ids": False}
    assert check_mappings(build_config(raw), shipped) == []


def test_bridge_check_names_the_destination_option_type_and_value(
    raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw["destinations"][0]["mapping_options"] = {"anonymous_ids": "yes"}
    cfg = tmp_path / "bridge.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["check", "--config", str(cfg)]) == 1
    assert capsys.readouterr().err == (
        f"{cfg}: destinations[0].mapping_options.anonymous_ids: expected a boolean (true or false), "
        'got the string "yes"\n'
    )
