"""A YAML loader refusing a key given twice in one mapping, for every YAML file the bridge
reads by hand: the config and the mapping fixtures (mapping files have their own node
reader, which refuses duplicates as it walks); and a syntax error in words, for both.

YAML's "last one wins" drops the first of two keys silently: two ``store:`` sections, a
secret set twice, or a fixture's first ``discarded:`` expectation never looked at.
"""

from __future__ import annotations

from typing import Any

import yaml


class UniqueKeysLoader(yaml.SafeLoader):
    """A SafeLoader refusing duplicate keys; mix it in first (``class L(UniqueKeysLoader,
    OtherLoader)``) to add the check to another SafeLoader."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked once per node, before its first flatten: flattening rewrites the node in
        # place (merged keys put before its own), and a mapping merged into another (`<<: *x`)
        # may be flattened before it is constructed itself. A key it overrides is no duplicate.
        checked = self.__dict__.setdefault("_unique_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            self._check_unique(node)
        super().flatten_mapping(node)

    def _check_unique(self, node: yaml.MappingNode) -> None:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error says so
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)


def syntax_problem(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's problem, with where the construct it was reading began: the mistake is
    often there, lines above where the parser gave up (a `{` or a quote never closed)."""
    problem = exc.problem or ""
    context, start, end = exc.context, exc.context_mark, exc.problem_mark
    if context and start is not None and (end is None or (start.line, start.column) != (end.line, end.column)):
        problem += f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
    elif context:
        problem = f"{context} {problem}"
    if "'\\t'" in problem:
        problem += "; indent with spaces: YAML does not allow tabs there"
    return problem
