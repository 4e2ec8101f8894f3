"""A mapping's declared options: the ``options:`` section of a mapping file.

A destination's ``mapping_options`` (and ``bridge translate --option``) are read by the
mapping as ``$options.NAME`` and compared by exact type: ``anonymous_ids: "yes"`` is not
``true``, and a mapping testing ``{value: $options.anonymous_ids, equals: true}`` then
quietly behaved as if the option were off. A mapping that declares its options has each
value checked against the declared type when the config is bound to it (`bridge check`,
start, reload) and when a dry run is given one, with a message naming what was expected
and what was given. The type names are those of the ``is`` condition.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.mapping.yamlnodes import Diagnostics, YNode, did_you_mean, join, kind_of
from bridge.value_words import describe

# type name -> (what is expected, in words; whether a value is of the type)
OPTION_TYPES: dict[str, tuple[str, Any]] = {
    "boolean": ("a boolean (true or false)", lambda v: type(v) is bool),
    "string": ("a string", lambda v: type(v) is str),
    "integer": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "array": ("a list", lambda v: type(v) is list),
    "object": ("a mapping", lambda v: type(v) is dict),
}
SPEC_KEYS = ("type", "default", "description")


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One declared option: its name, type and, when given, its default."""

    name: str
    type: str
    has_default: bool = False
    default: Any = None
    description: str = ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this option, or None when it fits."""
        expected, fits = OPTION_TYPES[self.type]
        if fits(value):
            return None
        return f"expected {expected}, got {describe(value)}"


def option_problems(specs: Mapping[str, OptionSpec], options: Mapping[Any, Any]) -> list[tuple[str, str]]:
    """(option name, problem) for each given option whose value its declaration refuses.
    Names the mapping does not declare are left to the unread-option check."""
    out: list[tuple[str, str]] = []
    for key in sorted(options, key=str):
        spec = specs.get(str(key))
        if spec is not None and (problem := spec.problem(options[key])) is not None:
            out.append((str(key), problem))
    return out


def compile_options(node: YNode, diags: Diagnostics) -> dict[str, OptionSpec | None] | None:
    """The ``options:`` section: ``NAME: {type: T, default: V, description: ...}`` each;
    None for a declaration with a diagnostic (its name is declared all the same, so its
    reads are not said to be undeclared too), and None for a section that is no mapping."""
    if not node.is_map:
        diags.add(
            node, "options", f"expected a mapping of option name to {{type: ..., default: ...}}, got {kind_of(node)}"
        )
        return None
    specs: dict[str, OptionSpec | None] = {}
    for name, sn in node.value.items():
        where = join("options", name)
        specs[str(name)] = None
        if not sn.is_map:
            diags.add(sn, where, f"expected {{type: ..., default: ...}}, got {kind_of(sn)}")
            continue
        if not diags.check_keys(sn, where, SPEC_KEYS, "an option", required=("type",)):
            continue
        specs[str(name)] = _spec(str(name), sn.value, where, diags)
    return specs


def _spec(name: str, v: dict[str, YNode], where: str, diags: Diagnostics) -> OptionSpec | None:
    tn = v["type"]
    if tn.value not in OPTION_TYPES or not isinstance(tn.value, str):
        hint = did_you_mean(tn.value, OPTION_TYPES) if isinstance(tn.value, str) else ""
        diags.add(tn, join(where, "type"), f"expected one of {', '.join(OPTION_TYPES)}, got {kind_of(tn)}{hint}")
        return None
    description = ""
    if "description" in v:
        dn = v["description"]
        if not isinstance(dn.value, str):
            diags.add(dn, join(where, "description"), f"expected text, got {kind_of(dn)}")
            return None
        description = dn.value
    spec = OptionSpec(name, tn.value, description=description)
    if "default" not in v:
        return spec
    default = v["default"].plain()
    if (problem := spec.problem(default)) is not None:
        diags.add(v["default"], join(where, "default"), problem)
        return None
    return OptionSpec(name, spec.type, True, default, description)
