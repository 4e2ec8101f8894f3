"""Fixture runner: mappings/tests/<mapping name>/*.yaml, one case per file.

A fixture has ``input`` (the event), optional ``context`` (linked_id, options, source)
and ``expect``: ``outputs`` (list of {kind, body}), ``discarded`` or ``failed`` (a
reason), and optionally ``identity_link`` ([from, to] or null) and ``identity_key``.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml

from bridge.mapping.api import CompiledMapping, Diagnostic, MapContext
from bridge.mapping.loader import compile_mapping_dir
from bridge.mapping.translate import result_to_json
from bridge.mapping.yamlnodes import MappingLoader
from bridge.yaml_unique import UniqueKeysLoader

FIXTURE_KEYS = ("description", "input", "context", "expect")
EXPECT_KEYS = ("outputs", "discarded", "failed", "detail", "identity_link", "identity_key")
CONTEXT_KEYS = ("linked_id", "options", "source", "links")


@dataclass(slots=True)
class FixtureResult:
    path: str
    mapping: str
    ok: bool
    message: str = ""


@dataclass(slots=True)
class FixtureReport:
    results: list[FixtureResult] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def failed(self) -> list[FixtureResult]:
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.diagnostics and not self.failed and bool(self.results)

    def render(self) -> str:
        lines = [str(d) for d in self.diagnostics]
        for r in self.failed:
            lines.append(f"FAIL {r.path}")
            lines.extend("    " + x for x in r.message.splitlines())
        if not self.results and not self.diagnostics:
            lines.append("no fixtures found")
        lines.append(f"{self.passed} passed, {len(self.failed)} failed, {len(self.diagnostics)} mapping errors")
        return "\n".join(lines)


def run_fixtures(mappings_dir: str | Path) -> FixtureReport:
    directory = Path(mappings_dir)
    mappings, diagnostics = compile_mapping_dir(directory)
    report = FixtureReport(diagnostics=list(diagnostics))
    tests_dir = directory / "tests"
    if not tests_dir.is_dir():
        return report
    for sub in sorted(p for p in tests_dir.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.iterdir() if f.suffix in (".yaml", ".yml"))
        mapping = mappings.get(sub.name)
        for f in files:
            if mapping is None:
                report.results.append(FixtureResult(str(f), sub.name, False, f"no loaded mapping named {sub.name!r}"))
                continue
            report.results.append(run_fixture_file(mapping, f))
    return report


class FixtureLoader(UniqueKeysLoader, MappingLoader):
    """MappingLoader (a SafeLoader with YAML 1.2 booleans) refusing a key given twice in one
    mapping, as mapping files do: with YAML's "last one wins" a fixture would silently test
    less than it says (the first of two ``discarded:`` expectations, or of two
    ``properties:`` of its event, never looked at)."""


def _read_fixture(path: Path) -> Any:
    loader = FixtureLoader(path.read_text(encoding="utf-8"))
    loader.name = str(path)  # positions in its errors name the fixture, not "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def run_fixture_file(mapping: CompiledMapping, path: Path) -> FixtureResult:
    try:
        data = _read_fixture(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return FixtureResult(str(path), mapping.name, False, f"cannot read fixture: {exc}")
    except RecursionError:
        # PyYAML composes nested collections recursively: thousands of levels overflow it.
        return FixtureResult(str(path), mapping.name, False, "cannot read fixture: its YAML is nested too deeply")
    problem = _check_fixture(data)
    if problem:
        return FixtureResult(str(path), mapping.name, False, problem)
    ctx_data = data.get("context") or {}
    # A fixture's options are what a destination would set: held to the same declaration.
    for key, bad in mapping.option_problems(ctx_data.get("options") or {}):
        return FixtureResult(str(path), mapping.name, False, f"context.options.{key}: {bad}")
    ctx = MapContext(
        linked_id=ctx_data.get("linked_id"),
        options=ctx_data.get("options") or {},
        source=ctx_data.get("source", ""),
        links=ctx_data.get("links") or {},
    )
    event = data["input"]
    expect = data["expect"]
    actual = result_to_json(mapping.apply(event, ctx))
    wanted: dict[str, Any] = {}
    got: dict[str, Any] = {}
    for key in ("outputs", "discarded", "failed"):
        if key in expect:
            wanted[key] = expect[key]
    for key in ("outputs", "discarded", "failed"):
        if key in actual:
            got[key] = actual[key]
    if "detail" in expect:
        wanted["detail"] = expect["detail"]
        got["detail"] = actual.get("detail", "")
    if "identity_link" in expect:
        wanted["identity_link"] = expect["identity_link"]
        link = mapping.identity_link(event)
        got["identity_link"] = list(link) if link else None
    if "identity_key" in expect:
        wanted["identity_key"] = expect["identity_key"]
        got["identity_key"] = mapping.identity_key(event)
    got = json.loads(json.dumps(got))
    if same(got, wanted):
        return FixtureResult(str(path), mapping.name, True)
    return FixtureResult(str(path), mapping.name, False, diff(wanted, got))


def same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON types all the way down: ``true`` is not ``1``, ``12`` is not ``12.0``."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def diff(wanted: Any, got: Any) -> str:
    a = json.dumps(wanted, indent=2, sort_keys=True, ensure_ascii=False).splitlines()
    b = json.dumps(got, indent=2, sort_keys=True, ensure_ascii=False).splitlines()
    lines = list(difflib.unified_diff(a, b, "expected", "actual", lineterm=""))
    if not lines:  # equal text, different types (a float written as 1e3 and read back, ...)
        return "expected and actual print alike but differ in JSON types (integer vs number vs boolean)"
    return "\n".join(lines)


def _check_fixture(data: Any) -> str:
    if not isinstance(data, dict):
        return "a fixture must be a mapping with input and expect"
    unknown = [k for k in data if k not in FIXTURE_KEYS]
    if unknown:
        return f"unknown fixture keys {unknown}; expected: {', '.join(FIXTURE_KEYS)}"
    for key in ("input", "expect"):
        if key not in data:
            return f"fixture is missing {key!r}"
    expect = data["expect"]
    if not isinstance(expect, dict):
        return "'expect' must be a mapping"
    unknown = [k for k in expect if k not in EXPECT_KEYS]
    if unknown:
        return f"unknown expect keys {unknown}; expected: {', '.join(EXPECT_KEYS)}"
    if sum(k in expect for k in ("outputs", "discarded", "failed")) != 1:
        return "'expect' needs exactly one of outputs, discarded, failed"
    ctx = data.get("context") or {}
    if not isinstance(ctx, dict) or any(k not in CONTEXT_KEYS for k in ctx):
        return f"'context' may only have: {', '.join(CONTEXT_KEYS)}"
    for key in ("options", "links"):
        if ctx.get(key) is not None and not isinstance(ctx[key], dict):
            return f"'context.{key}' must be a mapping"
    for key in ("linked_id", "source"):
        if ctx.get(key) is not None and not isinstance(ctx[key], str):
            return f"'context.{key}' must be a string"
    return _non_json(data)


def _non_json(v: Any, path: str = "", ancestors: frozenset[int] = frozenset()) -> str:
    """What in a fixture is not JSON data, where: events and expectations are JSON, and
    the runner would otherwise fail on it with a traceback (json.dumps of a !!binary, or
    a recursion without end through an alias to an enclosing anchor)."""
    where = path or "<root>"
    if isinstance(v, datetime | date):
        return f"{where} is a YAML date/time; quote it so it stays a JSON string"
    if isinstance(v, dict | list):
        if id(v) in ancestors:
            return f"{where} is an alias of a collection that contains it; JSON data cannot contain itself"
        inner = ancestors | {id(v)}
        items = v.items() if isinstance(v, dict) else enumerate(v)
        for k, x in items:
            found = _non_json(x, f"{path}[{k}]" if isinstance(v, list) else f"{path}.{k}" if path else str(k), inner)
            if found:
                return found
        return ""
    if v is None or isinstance(v, str | int | float):  # bool is an int
        return ""
    return f"{where} is a YAML {type(v).__name__} (a tag such as !!binary, !!set or !!omap), not JSON data"
