"""Review fixes: hostile YAML, wrong-type values, null fields, coercion limits, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.mapping import MappingError, load_mapping_dir, load_mapping_file
from bridge.mapping.api import Diagnostic

from .helpers import write

HEADER = "source_format: segment\ndestination_kind: moengage\n"
RULES = """\
rules:
  - name: identify
    match: {type: identify}
    kind: customer
    body:
      customer_id: $.userId
"""


def errors(tmp_path: Path, text: str) -> list[Diagnostic]:
    path = write(tmp_path / "m.yaml", text)
    with pytest.raises(MappingError) as exc:
        load_mapping_file(path)
    return exc.value.diagnostics


# --- 1. anchors, aliases and nesting depth -----------------------------------


def test_alias_bomb_is_rejected_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    text = HEADER + "let:\n" + "\n".join("  " + x for x in lines) + "\n" + RULES
    diags = errors(tmp_path, text)
    assert diags
    d = diags[0]
    assert (d.line, d.column) == (4, 7)
    assert d.yaml_path == "let.a0"
    assert "anchor" in d.message and "let:" in d.message and "lookups" in d.message


def test_self_referencing_alias_is_a_diagnostic(tmp_path: Path) -> None:
    diags = errors(tmp_path, HEADER + "let:\n  x: &a [*a]\n" + RULES)
    assert diags and diags[0].yaml_path == "let.x"
    assert "anchor" in diags[0].message


def test_alias_alone_is_a_diagnostic(tmp_path: Path) -> None:
    text = HEADER + RULES + "    detail: *nowhere\n"
    diags = errors(tmp_path, text)
    assert diags and "alias" in diags[0].message


def test_deep_nesting_is_a_diagnostic(tmp_path: Path) -> None:
    text = HEADER + "let:\n  x: {literal: " + "[" * 3000 + "]" * 3000 + "}\n" + RULES
    diags = errors(tmp_path, text)
    assert diags and "deep" in diags[0].message
    assert diags[0].yaml_path.startswith("let.x.literal[0]")


def test_shipped_mappings_and_lookups_load_with_the_strict_loader() -> None:
    # the shipped files use no anchors and are not nested too deep
    assert set(load_mapping_dir(Path(__file__).resolve().parents[2] / "mappings")) >= {"segment-to-moengage"}
