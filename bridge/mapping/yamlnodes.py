"""YAML read with positions: every node keeps the line and column it came from.

Diagnostics must point at ``file:line:column``, which plain ``yaml.safe_load`` loses,
so the file is composed to PyYAML nodes and converted to a small tree of ``YNode``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import yaml

from bridge.mapping.api import Diagnostic
from bridge.suggest import did_you_mean as did_you_mean  # re-exported for the mapping modules
from bridge.yaml_unique import syntax_problem


@dataclass(slots=True)
class YNode:
    """A YAML value with its 1-based position. ``value`` holds children as YNodes."""

    value: Any  # dict[str, YNode] | list[YNode] | scalar
    line: int
    column: int
    key_pos: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def is_map(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def is_list(self) -> bool:
        return isinstance(self.value, list)

    def __repr__(self) -> str:
        # As the author wrote it: diagnostics quote values ("got [string]"), and a value
        # that holds nodes would otherwise print as YNode(value=..., line=...).
        return repr(self.plain())

    def plain(self) -> Any:
        """The value as plain Python data, positions dropped."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


def kind_of(node: YNode) -> str:
    """What a node is, in the words of the YAML file it was written in: its author wrote
    `null` or `true`, never Python's `NoneType None` or `bool True`."""
    if node.is_map:
        return "a mapping"
    if node.is_list:
        return "a list"
    v = node.value
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return f"the number {v!r}"
    if isinstance(v, date):  # a datetime too
        return f"the date {v.isoformat()} (quote it to mean the text)"
    return repr(v)


class Diagnostics:
    """Collects every problem of one file so the author sees all of them at once."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[Diagnostic] = []

    def add(self, node: YNode | None, yaml_path: str, message: str) -> None:
        line, col = (node.line, node.column) if node is not None else (1, 1)
        self.items.append(Diagnostic(self.file, line, col, yaml_path or "<root>", message))

    def add_at(self, pos: tuple[int, int], yaml_path: str, message: str) -> None:
        self.items.append(Diagnostic(self.file, pos[0], pos[1], yaml_path or "<root>", message))

    def check_keys(
        self,
        node: YNode,
        yaml_path: str,
        allowed: Iterable[str],
        what: str,
        required: Iterable[str] = (),
    ) -> bool:
        """Report unknown and missing keys of a mapping node; True when all is well."""
        allowed = list(allowed)
        ok = True
        for key in node.value:
            if key not in allowed:
                ok = False
                self.add_at(
                    node.key_pos.get(key, (node.line, node.column)),
                    join(yaml_path, key),
                    f"unknown key {key!r} in {what}{did_you_mean(key, allowed)}; expected one of: {', '.join(allowed)}",
                )
        for key in required:
            if key not in node.value:
                ok = False
                self.add(node, yaml_path, f"{what} is missing required key {key!r}")
        return ok


def join(base: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{base}[{key}]"
    return f"{base}.{key}" if base else key


class MappingLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are booleans.

    YAML 1.1 reads yes/no/on/off (and so the country code NO) as booleans, which
    silently breaks lookup tables and literals in a mapping file.
    """


MappingLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
MappingLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


# Deeper than any real mapping; keeps composing, converting and evaluating far from
# Python's recursion limit.
MAX_DEPTH = 64


class YamlRejected(yaml.MarkedYAMLError):
    """A construct mapping files do not allow, found while composing: it has a YAML path."""

    def __init__(self, mark: Any, yaml_path: str, problem: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.yaml_path = yaml_path


YAML_TAG_PREFIX = "tag:yaml.org,2002:"
# The tags an author may write out (`!!str 5`); every other one is refused rather than
# ignored (`!!python/object` on a mapping) or made into a value no event holds (`!!binary`).
PLAIN_TAGS = frozenset(YAML_TAG_PREFIX + name for name in ("str", "int", "float", "bool", "null", "map", "seq"))


class StrictMappingLoader(MappingLoader):
    """The loader for mapping and lookup files: no anchors or aliases, no tags beyond the
    plain ones, bounded nesting.

    Aliases let a few hundred bytes expand to gigabytes (and a self-reference to a
    cycle), and deep nesting exhausts the recursion limit; both are refused while
    composing, before anything is expanded.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._ypath: list[str] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        here = self._ypath[-1] if self._ypath else ""
        if parent is None:
            ypath = ""
        elif isinstance(index, int):
            ypath = join(here, index)
        elif isinstance(index, yaml.ScalarNode):
            ypath = join(here, str(index.value))
        else:  # a mapping key: report it at its mapping
            ypath = here
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            raise YamlRejected(
                event.start_mark,
                ypath,
                f"YAML aliases ('*{event.anchor}') are not allowed in mapping files; "
                "name a shared value under 'let:' and use $let.NAME, or put a shared table under 'lookups:'",
            )
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise YamlRejected(
                event.start_mark,
                ypath,
                f"YAML anchors ('&{anchor}') are not allowed in mapping files; "
                "name a shared value under 'let:' and use $let.NAME, or put a shared table under 'lookups:'",
            )
        tag = getattr(event, "tag", None)
        if tag not in (None, "!") and tag not in PLAIN_TAGS:
            shown = tag.replace(YAML_TAG_PREFIX, "!!", 1)
            raise YamlRejected(
                event.start_mark,
                ypath,
                f"YAML tag '{shown}' is not allowed in mapping files; expected plain data: a string,"
                " number, true/false, null, list or mapping (quote a value that starts with '!')",
            )
        if len(self._ypath) >= MAX_DEPTH:
            raise YamlRejected(
                event.start_mark, ypath, f"nested too deep; expected at most {MAX_DEPTH} levels of nesting"
            )
        self._ypath.append(ypath)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._ypath.pop()
        return node


def parse_yaml(text: str, diags: Diagnostics) -> YNode | None:
    """Parse one YAML document; syntax errors, duplicate keys, anchors, aliases and
    excessive nesting become diagnostics."""
    try:
        # PyYAML checks every character of a str here, before parsing: a NUL or another
        # control character stops it with a position in characters, not a line.
        loader = StrictMappingLoader(text)
    except yaml.reader.ReaderError as exc:
        diags.add_at(_text_position(text, exc.position), "", f"invalid YAML: {_unreadable(exc)}")
        return None
    try:
        root = loader.get_single_node()
        if root is None:
            diags.add(None, "", "the file is empty; expected a mapping")
            return None
        return _convert(root, loader, diags, "")
    except YamlRejected as exc:
        mark = exc.problem_mark
        diags.add_at((mark.line + 1, mark.column + 1) if mark else (1, 1), exc.yaml_path, str(exc.problem))
        return None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        diags.add_at((line, col), "", f"invalid YAML: {syntax_problem(exc)}")
        return None
    except yaml.YAMLError as exc:
        diags.add(None, "", f"invalid YAML: {exc}")
        return None
    finally:
        loader.dispose()


def _text_position(text: str, index: int) -> tuple[int, int]:
    """The 1-based line and column of a character index."""
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _unreadable(exc: yaml.reader.ReaderError) -> str:
    char = exc.character if isinstance(exc.character, str) else chr(exc.character)
    return (
        f"character U+{ord(char):04X} is not allowed in a YAML file; remove it, or write it as an"
        f" escape (\\x{ord(char):02x}) inside a double-quoted string"
        if ord(char) < 0x100
        else f"character U+{ord(char):04X} is not allowed in a YAML file; remove it"
    )


def _convert(node: yaml.Node, loader: yaml.SafeLoader, diags: Diagnostics, path: str) -> YNode:
    line, col = node.start_mark.line + 1, node.start_mark.column + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[str, YNode] = {}
        key_pos: dict[str, tuple[int, int]] = {}
        for key_node, value_node in node.value:
            kpos = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            # Read as text, a list or mapping key, or a null one, became a name nobody wrote
            # ("None", "['a', 'b']"): a lookup or field nothing could ever use.
            if not isinstance(key_node, yaml.ScalarNode):
                what = "a list" if isinstance(key_node, yaml.SequenceNode) else "a mapping"
                diags.add_at(kpos, path, f"expected a key that is a name, got {what}")
                continue
            key = _scalar(key_node, loader, diags, path)
            if key is None:
                diags.add_at(kpos, path, "expected a key that is a name, got null (quote it to mean the text 'null')")
                continue
            if not isinstance(key, str):
                key = str(key).lower() if isinstance(key, bool) else str(key)
            if key in out:
                diags.add_at(kpos, join(path, key), f"duplicate key {key!r}")
                continue
            key_pos[key] = kpos
            out[key] = _convert(value_node, loader, diags, join(path, key))
        return YNode(out, line, col, key_pos)
    if isinstance(node, yaml.SequenceNode):
        return YNode([_convert(v, loader, diags, join(path, i)) for i, v in enumerate(node.value)], line, col)
    return YNode(_scalar(node, loader, diags, path), line, col)


def _scalar(node: yaml.Node, loader: yaml.SafeLoader, diags: Diagnostics, path: str) -> Any:
    """A scalar's value; one YAML reads but Python cannot hold (an integer of more than 4,300
    digits) is a diagnostic at its position, and its text stands in for it."""
    try:
        return loader.construct_object(node, deep=True)
    except ValueError as exc:
        diags.add_at((node.start_mark.line + 1, node.start_mark.column + 1), path, f"cannot read this value: {exc}")
        return str(node.value)
