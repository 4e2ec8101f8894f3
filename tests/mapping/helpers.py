"""Small builders for mapping tests: real files in tmp_path, compiled by the real loader."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from bridge.mapping import CompiledMapping, MapContext, MappingError, load_mapping_file
from bridge.mapping.api import Diagnostic, Output


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def indent(text: str, n: int) -> str:
    return textwrap.indent(textwrap.dedent(text).strip("\n"), " " * n)


def track_rule(body: str, top: str = "") -> str:
    """A segment->segment mapping file's text: ``top`` (lets, identity), then one track
    rule ``t`` whose body is ``body`` (YAML, any indentation)."""
    return (
        "source_format: segment\n"
        "destination_kind: segment\n" + textwrap.dedent(top).lstrip("\n") + "rules:\n"
        "  - name: t\n"
        "    kind: track\n"
        "    body:\n" + indent(body, 6) + "\n"
    )


def value_mapping(tmp_path: Path, expr: str, extra_top: str = "") -> CompiledMapping:
    """A segment->segment mapping whose track body carries properties.v = <expr>."""
    top = textwrap.dedent(extra_top) + "let:\n  v:\n" + indent(expr, 4) + "\n"
    text = track_rule("event: e\nuserId: u\nproperties: {object: {v: $let.v}}", top)
    return load_mapping_file(write(tmp_path / "m.yaml", text))


def evaluate(mapping: CompiledMapping, event: dict[str, Any], ctx: MapContext | None = None) -> Any:
    """properties.v of the single output, or a sentinel string when it was left out."""
    result = mapping.apply(event, ctx or MapContext())
    assert isinstance(result, list), result
    (out,) = result
    assert isinstance(out, Output)
    return out.body["properties"].get("v", "<absent>")


def outputs(result: Any) -> list[Output]:
    assert isinstance(result, list), result
    return result


# A minimal valid Segment -> MoEngage mapping, split so a test can put what it checks between.
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
    """The diagnostics loading ``text`` as a mapping file fails with."""
    path = write(tmp_path / "m.yaml", text)
    with pytest.raises(MappingError) as exc:
        load_mapping_file(path)
    return exc.value.diagnostics
