"""The examples the documentation shows work as shown: the quick start's config loads with
the credentials the README names, the README's config is that file, and the YAML snippets
of docs/mappings.md compile as a mapping (or a fixture) would. A doc edit that breaks an
example fails here, not in a reader's terminal."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.cli import main
from bridge.mapping import Discarded, MapContext, Output, load_mapping_file
from bridge.mapping.fixtures import run_fixtures

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
MAPPINGS_DOC = REPO / "docs" / "mappings.md"
QUICK_START_CONFIG = REPO / "examples" / "bridge.yaml"

ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
# The parts of a mapping file a snippet may be (docs/mappings.md, "A mapping file").
SECTIONS = {"options", "integrations", "lookups", "identity", "let", "drop", "rules"}


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^ *```yaml\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL)


# -- README: the quick start's config ---------------------------------------------------------
def test_the_readme_config_example_is_the_quick_start_config() -> None:
    """The README shows the config file `make run` uses; without its header comment, the two
    are the same text, so the one a reader copies is the one the sandbox runs."""
    blocks = yaml_blocks(README.read_text())
    assert len(blocks) == 1, "the README shows one config; this test compares it with examples/"
    text = QUICK_START_CONFIG.read_text()
    without_header = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    assert blocks[0] == without_header


def config_env_refs() -> set[tuple[str, str]]:
    """(name, `:-default`) of every ${VAR} the quick start's config reads (not its comments)."""
    text = QUICK_START_CONFIG.read_text()
    live = "".join(line.split("#", 1)[0] + "\n" for line in text.splitlines())
    return set(ENV_REF_RE.findall(live))


def named_credentials() -> tuple[set[str], set[str]]:
    """The README's quick start credentials: (required, optional)."""
    named = re.search(
        r"With credentials in the environment \((.*?)\), the same `make run`", README.read_text(), re.DOTALL
    )
    assert named, "the README no longer names the quick start's credentials"
    required, optional = named.group(1).split("optionally")
    return set(re.findall(r"`([A-Z_]+)`", required)), set(re.findall(r"`([A-Z_]+)`", optional))


def test_the_quick_start_config_reads_the_credentials_the_readme_names() -> None:
    required, optional = named_credentials()
    refs = config_env_refs()
    assert {name for name, _ in refs} == required | optional
    assert {name for name, default in refs if default} <= optional


def test_bridge_check_passes_on_the_quick_start_config_with_credentials_and_names_the_first_gap_without(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)  # the config's mappings.dir is relative, as `make run` runs it
    required, optional = named_credentials()
    for name in required | optional:
        monkeypatch.delenv(name, raising=False)
    assert main(["check", "--config", "examples/bridge.yaml"]) == 2
    quoted = "sources[0].write_key: is required (it is empty: is its environment variable set?)"
    assert quoted in README.read_text()
    assert quoted in capsys.readouterr().err
    # The required ones are enough: the optional ones may stay unset.
    for name in required:
        monkeypatch.setenv(name, f"dummy-{name.lower().replace('_', '-')}")
    assert main(["check", "--config", "examples/bridge.yaml"]) == 0, capsys.readouterr().err


# -- docs/mappings.md: its snippets compile ---------------------------------------------------
def classify(blocks: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The doc's YAML blocks as (sections of a mapping, fields of a body, fixtures). The
    overview of a mapping file's keys, with `{...}` for their contents, is no example."""
    sections: list[dict[str, Any]] = []
    fields: list[dict[str, Any]] = []
    fixtures: list[dict[str, Any]] = []
    for block in blocks:
        if "{...}" in block:
            assert "source_format:" in block, f"a placeholder outside the overview:\n{block}"
            continue
        data = yaml.safe_load(block)
        assert isinstance(data, dict), block
        if "input" in data and "expect" in data:
            fixtures.append(data)
        elif set(data) <= SECTIONS:
            sections.append(data)
        else:
            fields.append(data)
    return sections, fields, fixtures


def snippet_mapping(sections: list[dict[str, Any]], fields: list[dict[str, Any]]) -> dict[str, Any]:
    """One Segment -> MoEngage mapping made of every section snippet, plus a first rule whose
    customer attributes are every field snippet (each under its block's number, so two
    snippets may show the same field). The glue is the least a mapping needs: its header,
    and a read of each option the options snippet declares (a declared option must be read)."""
    mapping: dict[str, Any] = {"source_format": "segment", "destination_kind": "moengage"}
    for section in sections:
        clash = set(mapping) & set(section)
        assert not clash, f"two snippets show {clash}: this test joins them into one mapping"
        mapping.update(section)
    attributes = {f"s{i}_{name}": value for i, block in enumerate(fields) for name, value in block.items()}
    glue_rule = {
        "name": "doc-fields",
        "match": {"type": "identify"},
        "kind": "customer",
        "body": {"customer_id": "$.userId", "attributes": {"object": attributes}},
    }
    mapping["rules"] = [glue_rule, *mapping.get("rules", [])]
    mapping["drop"] = [
        {"when": {"value": f"$options.{name}", "equals": "never-given"}, "reason": "glue"}
        for name in mapping.get("options", {})
    ]
    return mapping


def test_every_mapping_snippet_of_the_reference_compiles(tmp_path: Path) -> None:
    sections, fields, _ = classify(yaml_blocks(MAPPINGS_DOC.read_text()))
    shown = set().union(*sections)
    assert {"options", "lookups", "identity", "let", "rules"} <= shown, shown
    assert fields, "docs/mappings.md shows no field snippet any more"
    shutil.copytree(REPO / "mappings" / "lookups", tmp_path / "lookups")  # the lookups snippet's file:
    path = tmp_path / "doc-snippets.yaml"
    path.write_text(yaml.safe_dump(snippet_mapping(sections, fields), sort_keys=False))
    mapping = load_mapping_file(path)  # raises MappingError naming every problem

    # The rules snippet does what the text around it says.
    def apply(event: dict[str, Any]) -> Any:
        return mapping.apply(event, MapContext(linked_id=None, options={}))

    order = apply({"type": "track", "userId": "u1", "event": "Order Completed", "properties": {"total": "42"}})
    assert isinstance(order, list) and len(order) == 1 and isinstance(order[0], Output)
    assert order[0].body["actions"][0]["action"] == "Purchase"
    assert order[0].body["actions"][0]["attributes"]["revenue"] == 42
    for event, reason in [
        ({"type": "track", "userId": "u1", "event": "Heartbeat"}, "heartbeat"),
        ({"type": "track", "userId": "u1", "event": "internal:x"}, "internal_event"),
        ({"type": "alias", "userId": "u1", "previousId": "u0"}, "unsupported_type"),
    ]:
        result = apply(event)
        assert isinstance(result, Discarded) and result.reason == reason, (event, result)


def test_the_fixture_example_passes_on_the_shipped_mapping(tmp_path: Path) -> None:
    _, _, fixtures = classify(yaml_blocks(MAPPINGS_DOC.read_text()))
    assert len(fixtures) == 1
    shutil.copytree(REPO / "mappings", tmp_path / "mappings", ignore=shutil.ignore_patterns("tests"))
    case = tmp_path / "mappings" / "tests" / "segment-to-moengage" / "doc-example.yaml"
    case.parent.mkdir(parents=True)
    case.write_text(yaml.safe_dump(fixtures[0]))
    report = run_fixtures(tmp_path / "mappings")
    assert not report.diagnostics and len(report.results) == 1
    assert report.results[0].ok, report.results[0].message
