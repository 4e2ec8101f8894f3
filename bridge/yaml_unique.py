"""A YAML loader refusing a key given twice in one mapping, for every YAML file the bridge
reads by hand: the config and the mapping fixtures (mapping files have their own node
reader, which refuses duplicates as it walks).

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
